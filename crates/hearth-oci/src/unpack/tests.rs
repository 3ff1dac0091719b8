//! Crafted layers, hostile ones included, built in memory.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};

use tar::{EntryType, Header};

use super::*;

const MTIME: u64 = 1_600_000_000;

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// A layer being written, entry by entry, with raw headers (so hostile names
/// get through: `tar::Builder`'s own path setters refuse them).
struct Layer {
    builder: tar::Builder<Vec<u8>>,
}

impl Layer {
    fn new() -> Self {
        Layer {
            builder: tar::Builder::new(Vec::new()),
        }
    }

    fn raw(
        &mut self,
        path: &[u8],
        kind: EntryType,
        data: &[u8],
        link: &[u8],
        mode: u32,
        owner: (u64, u64),
    ) -> &mut Self {
        let mut header = Header::new_gnu();
        header.set_entry_type(kind);
        header.set_size(data.len() as u64);
        header.set_mode(mode);
        header.set_mtime(MTIME);
        header.set_uid(owner.0);
        header.set_gid(owner.1);
        let old = header.as_old_mut();
        assert!(path.len() < old.name.len() && link.len() < old.linkname.len());
        old.name[..path.len()].copy_from_slice(path);
        old.linkname[..link.len()].copy_from_slice(link);
        header.set_cksum();
        self.builder.append(&header, data).expect("append");
        self
    }

    fn file(&mut self, path: &str, data: &[u8]) -> &mut Self {
        self.raw(
            path.as_bytes(),
            EntryType::Regular,
            data,
            b"",
            0o644,
            (0, 0),
        )
    }

    fn file_mode(&mut self, path: &str, data: &[u8], mode: u32) -> &mut Self {
        self.raw(path.as_bytes(), EntryType::Regular, data, b"", mode, (0, 0))
    }

    fn dir(&mut self, path: &str, mode: u32) -> &mut Self {
        self.raw(
            path.as_bytes(),
            EntryType::Directory,
            b"",
            b"",
            mode,
            (0, 0),
        )
    }

    fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.raw(
            path.as_bytes(),
            EntryType::Symlink,
            b"",
            target.as_bytes(),
            0o777,
            (0, 0),
        )
    }

    fn hardlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.raw(
            path.as_bytes(),
            EntryType::Link,
            b"",
            target.as_bytes(),
            0o644,
            (0, 0),
        )
    }

    fn tar(&mut self) -> Vec<u8> {
        let builder = std::mem::replace(&mut self.builder, tar::Builder::new(Vec::new()));
        builder.into_inner().expect("finish")
    }
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(data).expect("gzip");
    encoder.finish().expect("gzip")
}

/// A destination `root` with a sibling `outside` that must stay untouched.
struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::create_dir(dir.path().join("root")).expect("root");
        fs::create_dir(dir.path().join("outside")).expect("outside");
        fs::write(dir.path().join("outside/passwd"), b"original").expect("outside file");
        Fixture { dir }
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    fn outside(&self) -> PathBuf {
        self.dir.path().join("outside")
    }

    fn unpacker(&self, limits: UnpackLimits) -> Unpacker {
        Unpacker::new(&self.root(), limits, Arc::new(AtomicBool::new(false))).expect("unpacker")
    }

    fn assert_outside_untouched(&self) {
        let names: Vec<_> = fs::read_dir(self.outside())
            .expect("outside")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(
            names,
            [OsStr::new("passwd")],
            "something was written outside"
        );
        assert_eq!(
            fs::read(self.outside().join("passwd")).expect("read"),
            b"original"
        );
        let above: Vec<_> = fs::read_dir(self.dir.path())
            .expect("dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(
            above.len(),
            2,
            "something was written beside the destination: {above:?}"
        );
    }
}

fn limits() -> UnpackLimits {
    UnpackLimits {
        max_layer_bytes: 64 << 20,
        max_total_bytes: 128 << 20,
        max_entries: 10_000,
    }
}

/// Applies each layer (uncompressed) in order; the first error is returned.
fn apply(fixture: &Fixture, layers: &[Vec<u8>]) -> Result<Unpacked, UnpackError> {
    let mut unpacker = fixture.unpacker(limits());
    for layer in layers {
        unpacker.apply_layer(layer.as_slice(), Compression::None)?;
    }
    unpacker.finish()
}

#[test]
fn unpacks_files_dirs_links_modes_and_mtimes() {
    let f = Fixture::new();
    let layer = Layer::new()
        .dir("./", 0o755)
        .dir("./etc/", 0o755)
        .file("./etc/hostname", b"box\n")
        .file_mode("usr/bin/tool", b"#!/bin/sh\n", 0o4755)
        .dir("ro/", 0o555)
        .file_mode("ro/inside", b"x", 0o400)
        .symlink("etc/localtime", "/usr/share/zoneinfo/UTC")
        .symlink("escape", "../../../../etc/passwd")
        .raw(b"/abs/file", EntryType::Regular, b"abs", b"", 0o600, (0, 0))
        .tar();
    let report = apply(&f, &[layer]).expect("unpack");
    let root = f.root();
    assert_eq!(
        fs::read(root.join("etc/hostname")).expect("hostname"),
        b"box\n"
    );
    let meta = fs::metadata(root.join("etc/hostname")).expect("meta");
    assert_eq!(meta.mode() & 0o7777, 0o644);
    assert_eq!(meta.mtime(), MTIME as i64);
    assert_eq!(
        fs::metadata(root.join("usr/bin/tool"))
            .expect("tool")
            .mode()
            & 0o7777,
        0o4755
    );
    // Implicitly created parents are plain directories.
    assert!(fs::symlink_metadata(root.join("usr/bin"))
        .expect("usr/bin")
        .is_dir());
    let ro = fs::metadata(root.join("ro")).expect("ro");
    assert_eq!(ro.mode() & 0o7777, 0o555);
    assert_eq!(ro.mtime(), MTIME as i64, "directory mtimes are set last");
    assert_eq!(
        fs::metadata(root.join("ro/inside")).expect("inside").mode() & 0o7777,
        0o400
    );
    // Symlink targets are kept verbatim, wherever they point.
    assert_eq!(
        fs::read_link(root.join("etc/localtime")).expect("link"),
        Path::new("/usr/share/zoneinfo/UTC")
    );
    assert_eq!(
        fs::read_link(root.join("escape")).expect("link"),
        Path::new("../../../../etc/passwd")
    );
    assert_eq!(
        fs::symlink_metadata(root.join("escape"))
            .expect("meta")
            .mtime(),
        MTIME as i64
    );
    // A leading '/' means the layer's root.
    assert_eq!(fs::read(root.join("abs/file")).expect("abs"), b"abs");
    assert_eq!(report.entries, 9);
    assert!(report.owners.is_empty());
    f.assert_outside_untouched();
    // Let the tempdir be removed.
    fs::set_permissions(root.join("ro"), fs::Permissions::from_mode(0o755)).expect("chmod");
}

#[test]
fn refuses_dot_dot_anywhere() {
    for path in [
        &b"../evil"[..],
        b"a/../../evil",
        b"./..",
        b"a/b/../../../evil",
        b"/../evil",
    ] {
        let f = Fixture::new();
        let layer = Layer::new()
            .raw(path, EntryType::Regular, b"x", b"", 0o644, (0, 0))
            .tar();
        let err = apply(&f, &[layer]).expect_err("traversal");
        assert!(
            matches!(err, UnpackError::UnsafePath(_)),
            "{path:?}: {err:?}"
        );
        f.assert_outside_untouched();
    }
    // Whiteouts naming '..' too.
    let f = Fixture::new();
    let layer = Layer::new().file("a/.wh...", b"").tar();
    assert!(matches!(
        apply(&f, &[layer]),
        Err(UnpackError::UnsafePath(_))
    ));
}

#[test]
fn never_writes_through_a_symlink() {
    let f = Fixture::new();
    let outside = f.outside().display().to_string();
    // Planted and used in one layer.
    let layer = Layer::new()
        .symlink("a", &outside)
        .file("a/passwd", b"pwned")
        .tar();
    let err = apply(&f, &[layer]).expect_err("through symlink");
    assert!(matches!(err, UnpackError::SymlinkInPath(_)), "{err:?}");
    f.assert_outside_untouched();

    // Planted in one layer, used in the next; relative and absolute targets,
    // deeper paths, directories and hard links through the link.
    for (link, entry) in [
        (
            outside.as_str(),
            Layer::new().file("a/passwd", b"pwned").tar(),
        ),
        ("../outside", Layer::new().file("a/passwd", b"pwned").tar()),
        ("..", Layer::new().file("a/outside/passwd", b"pwned").tar()),
        (outside.as_str(), Layer::new().dir("a/newdir/", 0o755).tar()),
        (outside.as_str(), Layer::new().symlink("a/link", "/").tar()),
        (
            outside.as_str(),
            Layer::new().file("f", b"x").hardlink("a/passwd", "f").tar(),
        ),
    ] {
        let f = Fixture::new();
        let first = Layer::new().symlink("a", link).tar();
        let err = apply(&f, &[first, entry]).expect_err("through symlink");
        assert!(
            matches!(err, UnpackError::SymlinkInPath(_)),
            "{link}: {err:?}"
        );
        f.assert_outside_untouched();
    }
}

#[test]
fn replaces_a_symlink_instead_of_following_it() {
    let f = Fixture::new();
    let target = f.outside().join("passwd").display().to_string();
    let lower = Layer::new()
        .symlink("passwd", &target)
        .symlink("d", &f.outside().display().to_string())
        .tar();
    // A file at the link's path replaces the link; a directory entry at a
    // link's path replaces it with a real directory.
    let upper = Layer::new()
        .file("passwd", b"mine")
        .dir("d/", 0o755)
        .file("d/passwd", b"mine too")
        .tar();
    apply(&f, &[lower, upper]).expect("unpack");
    assert!(fs::symlink_metadata(f.root().join("passwd"))
        .expect("meta")
        .is_file());
    assert_eq!(fs::read(f.root().join("passwd")).expect("read"), b"mine");
    assert!(fs::symlink_metadata(f.root().join("d"))
        .expect("meta")
        .is_dir());
    assert_eq!(
        fs::read(f.root().join("d/passwd")).expect("read"),
        b"mine too"
    );
    f.assert_outside_untouched();
}

#[test]
fn hard_links_stay_inside() {
    let f = Fixture::new();
    let layer = Layer::new()
        .file("bin/busybox", b"elf")
        .hardlink("bin/sh", "bin/busybox")
        .hardlink("bin/ls", "./bin/busybox")
        .tar();
    apply(&f, &[layer]).expect("unpack");
    let a = fs::metadata(f.root().join("bin/busybox")).expect("a");
    let b = fs::metadata(f.root().join("bin/sh")).expect("b");
    assert_eq!(a.ino(), b.ino());
    assert_eq!(a.nlink(), 3);

    let outside_file = f.outside().join("passwd").display().to_string();
    for (target, expect_unsafe) in [
        ("../outside/passwd", true),
        (outside_file.as_str(), false), // absolute: resolved inside, where it does not exist
        ("missing", false),
        ("bin", false), // a directory
        ("", false),
    ] {
        let f = Fixture::new();
        let layer = Layer::new().dir("bin/", 0o755).hardlink("x", target).tar();
        let err = apply(&f, &[layer]).expect_err("bad hard link");
        assert!(
            matches!(err, UnpackError::HardLinkTarget(_)),
            "{target:?} (unsafe={expect_unsafe}): {err:?}"
        );
        f.assert_outside_untouched();
    }
    // A link whose target's parent is a symlink to the outside.
    let f = Fixture::new();
    let layer = Layer::new()
        .symlink("out", &f.outside().display().to_string())
        .hardlink("x", "out/passwd")
        .tar();
    assert!(matches!(
        apply(&f, &[layer]),
        Err(UnpackError::HardLinkTarget(_))
    ));
    f.assert_outside_untouched();
}

#[test]
fn applies_whiteouts_and_opaque_directories() {
    let f = Fixture::new();
    let lower = Layer::new()
        .file("a/x", b"x")
        .file("a/y", b"y")
        .file("b/deep/file", b"b")
        .file("d/1", b"1")
        .file("d/sub/2", b"2")
        .file("keep", b"k")
        .tar();
    let upper = Layer::new()
        .file("a/.wh.x", b"")
        .file(".wh.b", b"")
        .dir("d/", 0o755)
        .file("d/.wh..wh..opq", b"")
        .file("d/3", b"3")
        .file("new", b"n")
        .file(".wh.new", b"") // same layer: not hidden
        .file(".wh.never-existed", b"")
        .file("a/.wh..wh.plnk", b"") // aufs bookkeeping: ignored
        .tar();
    apply(&f, &[lower, upper]).expect("unpack");
    let root = f.root();
    assert!(!root.join("a/x").exists());
    assert!(root.join("a/y").exists());
    assert!(!root.join("b").exists());
    let mut d: Vec<_> = fs::read_dir(root.join("d"))
        .expect("d")
        .map(|e| e.expect("e").file_name())
        .collect();
    d.sort();
    assert_eq!(d, [OsStr::new("3")]);
    assert!(root.join("new").exists());
    assert!(root.join("keep").exists());
    assert!(!root.join("a/.wh..wh.plnk").exists());
    assert!(!root.join(".wh.never-existed").exists());

    // Opaque marker after same-layer entries keeps them, and a lower
    // directory re-declared in the layer loses its lower contents.
    let f = Fixture::new();
    let lower = Layer::new()
        .file("d/old", b"o")
        .file("d/sub/old", b"o")
        .tar();
    let upper = Layer::new()
        .dir("d/", 0o755)
        .dir("d/sub/", 0o755)
        .file("d/sub/new", b"n")
        .file("d/.wh..wh..opq", b"")
        .tar();
    apply(&f, &[lower, upper]).expect("unpack");
    assert!(!f.root().join("d/old").exists());
    assert!(!f.root().join("d/sub/old").exists());
    assert!(f.root().join("d/sub/new").exists());
}

#[test]
fn whiteouts_never_follow_symlinks() {
    let f = Fixture::new();
    let lower = Layer::new()
        .symlink("a", &f.outside().display().to_string())
        .tar();
    let upper = Layer::new()
        .file("a/.wh.passwd", b"")
        .file("a/.wh..wh..opq", b"")
        .tar();
    apply(&f, &[lower, upper]).expect("nothing to remove");
    f.assert_outside_untouched();
}

#[test]
fn overwrites_across_layers() {
    let f = Fixture::new();
    let lower = Layer::new()
        .file("f", b"old")
        .file("dir/inner", b"i")
        .file_mode("ro", b"r", 0o444)
        .tar();
    let upper = Layer::new()
        .file("f", b"new")
        .file("dir", b"now a file") // a file replaces a directory tree
        .file_mode("ro", b"rewritten", 0o444)
        .tar();
    apply(&f, &[lower, upper]).expect("unpack");
    assert_eq!(fs::read(f.root().join("f")).expect("f"), b"new");
    assert_eq!(fs::read(f.root().join("dir")).expect("dir"), b"now a file");
    assert_eq!(fs::read(f.root().join("ro")).expect("ro"), b"rewritten");
}

#[test]
fn skips_devices_and_fifos() {
    let f = Fixture::new();
    let layer = Layer::new()
        .raw(b"dev/null", EntryType::Char, b"", b"", 0o666, (0, 0))
        .raw(b"dev/sda", EntryType::Block, b"", b"", 0o660, (0, 0))
        .raw(b"run/fifo", EntryType::Fifo, b"", b"", 0o600, (0, 0))
        .file("after", b"ok")
        .tar();
    let report = apply(&f, &[layer]).expect("unpack");
    assert_eq!(report.skipped_special, 3);
    assert!(!f.root().join("dev/null").exists());
    assert!(f.root().join("after").exists());
}

#[test]
fn refuses_unsupported_entry_types() {
    let f = Fixture::new();
    let layer = Layer::new()
        .raw(b"volume", EntryType::new(b'V'), b"", b"", 0o644, (0, 0))
        .tar();
    let result = apply(&f, &[layer]);
    assert!(
        matches!(result, Err(UnpackError::UnsupportedEntry { .. })),
        "{result:?}"
    );
    // GNU sparse files are refused too (here by the tar reader, for a
    // malformed sparse header).
    let f = Fixture::new();
    let layer = Layer::new()
        .raw(b"sparse", EntryType::GNUSparse, b"", b"", 0o644, (0, 0))
        .tar();
    assert!(apply(&f, &[layer]).is_err());
}

#[test]
fn records_owners() {
    let f = Fixture::new();
    let layer = Layer::new()
        .raw(
            b"home/app/",
            EntryType::Directory,
            b"",
            b"",
            0o750,
            (1000, 1000),
        )
        .raw(
            b"home/app/data",
            EntryType::Regular,
            b"d",
            b"",
            0o2640,
            (1000, 50),
        )
        .raw(
            b"home/app/link",
            EntryType::Symlink,
            b"",
            b"data",
            0o777,
            (1000, 1000),
        )
        .hardlink("home/app/alias", "home/app/data")
        .raw(b"rootfile", EntryType::Regular, b"r", b"", 0o644, (0, 0))
        .raw(b"changed", EntryType::Regular, b"c", b"", 0o644, (7, 7))
        .tar();
    let upper = Layer::new()
        .file("changed", b"root now") // owner reset to 0:0
        .tar();
    let report = apply(&f, &[layer, upper]).expect("unpack");
    let root = is_root();
    let paths: Vec<_> = report
        .owners
        .iter()
        .map(|o| o.path.display().to_string())
        .collect();
    assert_eq!(
        paths,
        [
            "home/app",
            "home/app/alias",
            "home/app/data",
            "home/app/link"
        ]
    );
    let data = &report.owners[2];
    assert_eq!(
        (data.uid, data.gid, data.mode, data.applied),
        (1000, 50, 0o2640, root)
    );
    assert_eq!(
        report.owners[1].uid, 1000,
        "a hard link shares its target's owner"
    );
    if root {
        let meta = fs::symlink_metadata(f.root().join("home/app/data")).expect("meta");
        assert_eq!((meta.uid(), meta.gid()), (1000, 50));
        assert_eq!(
            meta.mode() & 0o7777,
            0o2640,
            "chmod after chown keeps setgid"
        );
        assert_eq!(
            fs::symlink_metadata(f.root().join("home/app/link"))
                .expect("link")
                .uid(),
            1000
        );
    }
}

#[test]
fn enforces_limits() {
    // Per layer.
    let f = Fixture::new();
    let mut unpacker = f.unpacker(UnpackLimits {
        max_layer_bytes: 100_000,
        ..limits()
    });
    let big = Layer::new().file("big", &vec![7u8; 200_000]).tar();
    let err = unpacker
        .apply_layer(big.as_slice(), Compression::None)
        .expect_err("too big");
    assert!(
        matches!(err, UnpackError::LayerTooLarge(100_000)),
        "{err:?}"
    );

    // In total.
    let f = Fixture::new();
    let mut unpacker = f.unpacker(UnpackLimits {
        max_layer_bytes: 100_000,
        max_total_bytes: 100_000,
        ..limits()
    });
    let part = Layer::new().file("part", &vec![7u8; 60_000]).tar();
    unpacker
        .apply_layer(part.as_slice(), Compression::None)
        .expect("first");
    let part2 = Layer::new().file("part2", &vec![7u8; 60_000]).tar();
    let err = unpacker
        .apply_layer(part2.as_slice(), Compression::None)
        .expect_err("total");
    assert!(
        matches!(err, UnpackError::TotalTooLarge(100_000)),
        "{err:?}"
    );

    // Entries.
    let f = Fixture::new();
    let mut unpacker = f.unpacker(UnpackLimits {
        max_entries: 5,
        ..limits()
    });
    let mut many = Layer::new();
    for i in 0..10 {
        many.file(&format!("f{i}"), b"");
    }
    let err = unpacker
        .apply_layer(many.tar().as_slice(), Compression::None)
        .expect_err("entries");
    assert!(matches!(err, UnpackError::TooManyEntries(5)), "{err:?}");

    // Header data: a 2 MiB GNU long name.
    let f = Fixture::new();
    let mut unpacker = f.unpacker(limits());
    let mut builder = tar::Builder::new(Vec::new());
    let name = format!("{}x", "n/".repeat(1 << 20));
    let mut header = Header::new_gnu();
    header.set_entry_type(EntryType::Regular);
    header.set_size(0);
    builder
        .append_data(&mut header, &name, &b""[..])
        .expect("long name");
    let long = builder.into_inner().expect("tar");
    let err = unpacker
        .apply_layer(long.as_slice(), Compression::None)
        .expect_err("metadata");
    assert!(matches!(err, UnpackError::MetadataTooLarge), "{err:?}");
}

#[test]
fn refuses_a_gzip_bomb_quickly() {
    // 64 MiB of zeros in one file, about 64 KiB compressed.
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    let mut header = Header::new_gnu();
    header.set_path("bomb").expect("path");
    header.set_size(64 << 20);
    header.set_mode(0o644);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(MTIME);
    header.set_entry_type(EntryType::Regular);
    header.set_cksum();
    encoder.write_all(header.as_bytes()).expect("header");
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..64 {
        encoder.write_all(&zeros).expect("zeros");
    }
    let bomb = encoder.finish().expect("gzip");
    assert!(bomb.len() < 256 << 10, "{}", bomb.len());
    let f = Fixture::new();
    let mut unpacker = f.unpacker(UnpackLimits {
        max_layer_bytes: 8 << 20,
        ..limits()
    });
    let started = std::time::Instant::now();
    let err = unpacker
        .apply_layer(bomb.as_slice(), Compression::Gzip)
        .expect_err("bomb");
    assert!(matches!(err, UnpackError::LayerTooLarge(_)), "{err:?}");
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    let written = fs::metadata(f.root().join("bomb"))
        .map(|m| m.len())
        .unwrap_or(0);
    assert!(written <= 8 << 20, "{written}");
}

#[test]
fn reads_gzip_and_zstd_layers() {
    let tar = Layer::new().file("hello", b"world").tar();
    let f = Fixture::new();
    let mut unpacker = f.unpacker(limits());
    unpacker
        .apply_layer(gzip(&tar).as_slice(), Compression::Gzip)
        .expect("gzip");
    let zstd_tar = Layer::new().file("z", b"zstd").tar();
    // Two frames with a skippable frame between them.
    let (first, second) = zstd_tar.split_at(700);
    let mut zstd =
        ruzstd::encoding::compress_to_vec(first, ruzstd::encoding::CompressionLevel::Fastest);
    zstd.extend_from_slice(&0x184D_2A50u32.to_le_bytes());
    zstd.extend_from_slice(&4u32.to_le_bytes());
    zstd.extend_from_slice(b"skip");
    zstd.extend(ruzstd::encoding::compress_to_vec(
        second,
        ruzstd::encoding::CompressionLevel::Fastest,
    ));
    unpacker
        .apply_layer(zstd.as_slice(), Compression::Zstd)
        .expect("zstd");
    unpacker.finish().expect("finish");
    assert_eq!(fs::read(f.root().join("hello")).expect("hello"), b"world");
    assert_eq!(fs::read(f.root().join("z")).expect("z"), b"zstd");
}

#[test]
fn refuses_corrupt_layers() {
    let f = Fixture::new();
    let mut unpacker = f.unpacker(limits());
    let mut bad = gzip(&Layer::new().file("x", &[1u8; 4096]).tar());
    let middle = bad.len() / 2;
    bad[middle] ^= 0xff;
    let err = unpacker
        .apply_layer(bad.as_slice(), Compression::Gzip)
        .expect_err("corrupt gzip");
    assert!(
        matches!(err, UnpackError::Decompress(_) | UnpackError::Corrupt(_)),
        "{err:?}"
    );
    let mut truncated = Layer::new().file("x", &[1u8; 4096]).tar();
    truncated.truncate(1024);
    let err = unpacker
        .apply_layer(truncated.as_slice(), Compression::None)
        .expect_err("truncated");
    assert!(matches!(err, UnpackError::Corrupt(_)), "{err:?}");
    assert!(matches!(
        unpacker.apply_layer(&b"not zstd at all"[..], Compression::Zstd),
        Err(UnpackError::Decompress(_) | UnpackError::Corrupt(_))
    ));
}

#[test]
fn refuses_a_non_empty_destination_and_stops_when_cancelled() {
    let f = Fixture::new();
    fs::write(f.root().join("x"), b"").expect("write");
    let err = Unpacker::new(&f.root(), limits(), Arc::new(AtomicBool::new(false)))
        .expect_err("not empty");
    assert!(matches!(err, UnpackError::Destination(_)));
    let f = Fixture::new();
    let cancel = Arc::new(AtomicBool::new(true));
    let mut unpacker = Unpacker::new(&f.root(), limits(), cancel).expect("unpacker");
    let layer = Layer::new().file("x", b"").tar();
    assert!(matches!(
        unpacker.apply_layer(layer.as_slice(), Compression::None),
        Err(UnpackError::Cancelled)
    ));
}

#![allow(clippy::unwrap_used)]

use super::*;
use std::io::Cursor;
use std::time::Instant;
use zip::write::SimpleFileOptions;

/// A fresh empty directory under the target's temp dir.
fn tempdir(tag: &str) -> PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "hearth-builder-test-{}-{}-{tag}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn opts(mode: u32) -> SimpleFileOptions {
    SimpleFileOptions::default().unix_permissions(mode)
}

/// Builds a zip with the `zip` writer: (name, mode, contents).
fn build(entries: &[(&str, u32, &[u8])]) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
    for (name, mode, data) in entries {
        if name.ends_with('/') {
            w.add_directory(*name, opts(*mode)).unwrap();
        } else {
            w.start_file(*name, opts(*mode)).unwrap();
            w.write_all(data).unwrap();
        }
    }
    w.finish().unwrap().into_inner()
}

fn run(zip: &[u8], limits: &Limits) -> (Dir, Result<Extracted, ArchiveError>) {
    let dir = Dir(tempdir("x"));
    let r = extract(Cursor::new(zip), &dir.0, limits);
    (dir, r)
}

fn run_err(zip: &[u8]) -> ArchiveError {
    run(zip, &Limits::default()).1.unwrap_err()
}

fn is_empty(dir: &Path) -> bool {
    fs::read_dir(dir).unwrap().next().is_none()
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// An entry for [`raw_zip`], which writes headers exactly as given.
struct Raw {
    name: Vec<u8>,
    method: u16,
    data: Vec<u8>,
    crc: u32,
    size: u32,
    mode: u32,
}

fn stored(name: &str, data: &[u8]) -> Raw {
    Raw {
        name: name.as_bytes().to_vec(),
        method: 0,
        data: data.to_vec(),
        crc: crc32(data),
        size: data.len() as u32,
        mode: 0o100_644,
    }
}

fn raw_zip(entries: &[Raw]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut central = Vec::new();
    for e in entries {
        let offset = out.len() as u32;
        let csize = e.data.len() as u32;
        out.extend_from_slice(b"PK\x03\x04");
        out.extend_from_slice(&20u16.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&e.method.to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(&e.crc.to_le_bytes());
        out.extend_from_slice(&csize.to_le_bytes());
        out.extend_from_slice(&e.size.to_le_bytes());
        out.extend_from_slice(&(e.name.len() as u16).to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&e.name);
        out.extend_from_slice(&e.data);

        central.extend_from_slice(b"PK\x01\x02");
        central.extend_from_slice(&0x031Eu16.to_le_bytes());
        central.extend_from_slice(&20u16.to_le_bytes());
        central.extend_from_slice(&0u16.to_le_bytes());
        central.extend_from_slice(&e.method.to_le_bytes());
        central.extend_from_slice(&[0; 4]);
        central.extend_from_slice(&e.crc.to_le_bytes());
        central.extend_from_slice(&csize.to_le_bytes());
        central.extend_from_slice(&e.size.to_le_bytes());
        central.extend_from_slice(&(e.name.len() as u16).to_le_bytes());
        central.extend_from_slice(&[0; 8]);
        central.extend_from_slice(&(e.mode << 16).to_le_bytes());
        central.extend_from_slice(&offset.to_le_bytes());
        central.extend_from_slice(&e.name);
    }
    let cd_offset = out.len() as u32;
    out.extend_from_slice(&central);
    out.extend_from_slice(b"PK\x05\x06");
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    out.extend_from_slice(&(central.len() as u32).to_le_bytes());
    out.extend_from_slice(&cd_offset.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out
}

/// A raw deflate stream (fixed Huffman) of `1 + 258 * matches` zero bytes:
/// one literal 0, then back-references of length 258 at distance 1.
fn deflate_zeros(matches: usize) -> Vec<u8> {
    struct Bits {
        out: Vec<u8>,
        acc: u64,
        n: u32,
    }
    impl Bits {
        fn put(&mut self, value: u64, count: u32) {
            self.acc |= value << self.n;
            self.n += count;
            while self.n >= 8 {
                self.out.push(self.acc as u8);
                self.acc >>= 8;
                self.n -= 8;
            }
        }
        /// Huffman codes go most significant bit first.
        fn code(&mut self, code: u64, len: u32) {
            let mut rev = 0;
            for i in 0..len {
                rev |= ((code >> i) & 1) << (len - 1 - i);
            }
            self.put(rev, len);
        }
    }
    let mut b = Bits {
        out: Vec::with_capacity(matches * 13 / 8 + 16),
        acc: 0,
        n: 0,
    };
    b.put(1, 1); // BFINAL
    b.put(1, 2); // BTYPE = fixed Huffman
    b.code(0x30, 8); // literal 0
    for _ in 0..matches {
        b.code(0xC5, 8); // length code 285 = 258
        b.code(0, 5); // distance code 0 = 1
    }
    b.code(0, 7); // end of block
    b.put(0, 7);
    b.out
}

#[test]
fn normal_artifact_is_extracted_exactly() {
    let big: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let zip = build(&[
        ("Dockerfile", 0o644, b"FROM alpine\nCOPY . /app\n"),
        ("app/", 0o755, b""),
        ("app/main.py", 0o755, b"print('hi')\n"),
        ("app/data/blob.bin", 0o600, &big),
        ("empty", 0o444, b""),
        ("./dot/x", 0o640, b"x"),
    ]);
    let (dir, r) = run(&zip, &Limits::default());
    let done = r.unwrap();
    assert_eq!(
        done,
        Extracted {
            files: 5,
            dirs: 1,
            bytes: (24 + 12 + big.len() + 1) as u64
        }
    );
    let check = |rel: &str, want: &[u8], mode: u32| {
        let p = dir.0.join(rel);
        assert_eq!(fs::read(&p).unwrap(), want, "{rel}");
        let m = fs::metadata(&p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(m, mode, "{rel}");
    };
    check("Dockerfile", b"FROM alpine\nCOPY . /app\n", 0o644);
    check("app/main.py", b"print('hi')\n", 0o755);
    check("app/data/blob.bin", &big, 0o600);
    check("empty", b"", 0o444);
    check("dot/x", b"x", 0o640);
    assert!(dir.0.join("app/data").is_dir());
}

#[test]
fn setuid_bits_are_dropped_and_missing_mode_defaults() {
    let zip = raw_zip(&[
        Raw {
            mode: 0o104_755,
            ..stored("Dockerfile", b"FROM a")
        },
        Raw {
            mode: 0,
            ..stored("plain", b"p")
        },
    ]);
    let (dir, r) = run(&zip, &Limits::default());
    r.unwrap();
    let mode = |p: &str| fs::metadata(dir.0.join(p)).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode("Dockerfile"), 0o755);
    assert_eq!(mode("plain"), 0o644);
}

#[test]
fn unsafe_paths_are_refused_before_writing() {
    for name in [
        "../x",
        "/abs",
        "a/../../x",
        "a/../b",
        "a/..",
        "C:/windows/x",
        "c:x",
        "a\\..\\..\\x",
        "..\\x",
        "nul\0byte",
        ".",
        "./",
    ] {
        let zip = raw_zip(&[stored("Dockerfile", b"FROM a"), stored(name, b"evil")]);
        let (dir, r) = run(&zip, &Limits::default());
        let e = r.unwrap_err();
        assert!(
            matches!(e, ArchiveError::UnsafePath { .. }),
            "{name:?}: {e:?}"
        );
        assert_eq!(e.code().as_str(), "ARCHIVE_INVALID");
        assert!(is_empty(&dir.0), "{name:?} wrote something");
    }
}

#[test]
fn symlink_entry_is_refused() {
    let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
    w.start_file("Dockerfile", opts(0o644)).unwrap();
    w.write_all(b"FROM a").unwrap();
    w.add_symlink("link", "/etc/passwd", opts(0o777)).unwrap();
    let zip = w.finish().unwrap().into_inner();
    let (dir, r) = run(&zip, &Limits::default());
    let e = r.unwrap_err();
    assert!(matches!(e, ArchiveError::Symlink { .. }), "{e:?}");
    assert_eq!(e.code().as_str(), "ARCHIVE_INVALID");
    assert!(is_empty(&dir.0));
}

#[test]
fn special_file_is_refused() {
    let zip = raw_zip(&[
        stored("Dockerfile", b"FROM a"),
        Raw {
            mode: 0o010_644, // FIFO
            ..stored("fifo", b"")
        },
    ]);
    assert!(matches!(run_err(&zip), ArchiveError::SpecialFile { .. }));
}

#[test]
fn too_many_entries() {
    let names: Vec<String> = (0..11).map(|i| format!("f{i}")).collect();
    let mut entries: Vec<(&str, u32, &[u8])> = vec![("Dockerfile", 0o644, b"FROM a")];
    entries.extend(names.iter().map(|n| (n.as_str(), 0o644, &b"x"[..])));
    let zip = build(&entries);
    let limits = Limits {
        max_entries: 10,
        ..Limits::default()
    };
    let (dir, r) = run(&zip, &limits);
    let e = r.unwrap_err();
    assert!(
        matches!(e, ArchiveError::TooManyEntries { max: 10 }),
        "{e:?}"
    );
    assert_eq!(e.code().as_str(), "ARCHIVE_INVALID");
    assert!(is_empty(&dir.0));
    let ok = Limits {
        max_entries: 12,
        ..Limits::default()
    };
    assert_eq!(run(&zip, &ok).1.unwrap().files, 12);
}

#[test]
fn depth_and_name_length_limits() {
    let deep = format!("{}f", "d/".repeat(64));
    let zip = raw_zip(&[stored("Dockerfile", b"FROM a"), stored(&deep, b"x")]);
    assert!(matches!(
        run_err(&zip),
        ArchiveError::TooDeep { max: 64, .. }
    ));
    let long = "n".repeat(4097);
    let zip = raw_zip(&[stored("Dockerfile", b"FROM a"), stored(&long, b"x")]);
    assert!(matches!(
        run_err(&zip),
        ArchiveError::NameTooLong { max: 4096 }
    ));
}

#[test]
fn compression_bomb_stops_early() {
    // 2 GiB of zeros compressed to ~13 MB, declared as 1 KiB.
    let matches = (2usize << 30) / 258 + 1;
    let data = deflate_zeros(matches);
    assert!(data.len() < 16 << 20);
    let bomb = Raw {
        name: b"bomb".to_vec(),
        method: 8,
        data,
        crc: 0,
        size: 1024,
        mode: 0o100_644,
    };
    let zip = raw_zip(&[stored("Dockerfile", b"FROM a"), bomb]);
    let limits = Limits {
        max_file_bytes: 64 << 20,
        max_total_bytes: 64 << 20,
        ..Limits::default()
    };
    let start = Instant::now();
    let (dir, r) = run(&zip, &limits);
    let e = r.unwrap_err();
    assert!(matches!(e, ArchiveError::SizeMismatch { .. }), "{e:?}");
    assert_eq!(e.code().as_str(), "ARCHIVE_INVALID");
    assert!(!dir.0.join("bomb").exists(), "partial file left behind");
    assert!(start.elapsed().as_secs() < 30);
}

#[test]
fn bomb_declared_at_its_true_size_is_refused_from_headers() {
    let bomb = Raw {
        name: b"bomb".to_vec(),
        method: 8,
        data: deflate_zeros(1000),
        crc: 0,
        size: 2 << 30,
        mode: 0o100_644,
    };
    let zip = raw_zip(&[stored("Dockerfile", b"FROM a"), bomb]);
    let limits = Limits {
        max_file_bytes: 64 << 20,
        max_total_bytes: 64 << 20,
        ..Limits::default()
    };
    let (dir, r) = run(&zip, &limits);
    assert!(matches!(
        r.unwrap_err(),
        ArchiveError::FileTooLarge { max, .. } if max == 64 << 20
    ));
    assert!(is_empty(&dir.0));
}

#[test]
fn declared_total_limit() {
    let zip = build(&[
        ("Dockerfile", 0o644, b"FROM a"),
        ("a", 0o644, &[1u8; 600]),
        ("b", 0o644, &[2u8; 600]),
    ]);
    let limits = Limits {
        max_total_bytes: 1000,
        ..Limits::default()
    };
    let e = run(&zip, &limits).1.unwrap_err();
    assert!(
        matches!(e, ArchiveError::TotalTooLarge { max: 1000 }),
        "{e:?}"
    );
}

#[test]
fn streaming_limits_hold_whatever_the_headers_say() {
    let zeros = io::repeat(0).take(2 << 30);
    let mut sink = io::sink();
    let start = Instant::now();
    let r = copy_limited(zeros, &mut sink, 64 << 20, u64::MAX, u64::MAX);
    assert!(matches!(r, Err(CopyError::FileLimit)));
    let r = copy_limited(
        io::repeat(0).take(2 << 30),
        &mut sink,
        u64::MAX,
        1 << 20,
        u64::MAX,
    );
    assert!(matches!(r, Err(CopyError::TotalLimit)));
    assert!(start.elapsed().as_secs() < 30);
    let r = copy_limited(&b"abc"[..], &mut sink, 3, 3, 3);
    assert_eq!(r.unwrap(), 3);
}

#[test]
fn missing_dockerfile() {
    for entries in [
        vec![("app.py", 0o644, &b"x"[..])],
        vec![("dockerfile", 0o644, &b"FROM a"[..])],
        vec![("sub/Dockerfile", 0o644, &b"FROM a"[..])],
        vec![("Dockerfile/", 0o755, &b""[..])],
        vec![],
    ] {
        let zip = build(&entries);
        let (dir, r) = run(&zip, &Limits::default());
        let e = r.unwrap_err();
        assert!(matches!(e, ArchiveError::DockerfileNotFound), "{e:?}");
        assert_eq!(e.code().as_str(), "ARCHIVE_DOCKERFILE_NOT_FOUND");
        assert!(is_empty(&dir.0));
    }
}

#[test]
fn not_a_zip() {
    for bytes in [&b""[..], b"hello world", b"PK\x03\x04garbage", &[0u8; 100]] {
        let e = run_err(bytes);
        assert!(matches!(e, ArchiveError::NotZip(_)), "{e:?}");
        assert_eq!(e.code().as_str(), "ARCHIVE_INVALID");
    }
}

#[test]
fn duplicates() {
    let exact = raw_zip(&[
        stored("Dockerfile", b"FROM a"),
        stored("x", b"1"),
        stored("x", b"2"),
    ]);
    let normalised = raw_zip(&[
        stored("Dockerfile", b"FROM a"),
        stored("x", b"1"),
        stored("./x", b"2"),
    ]);
    let file_then_child = raw_zip(&[
        stored("Dockerfile", b"FROM a"),
        stored("a", b"1"),
        stored("a/b", b"2"),
    ]);
    let child_then_file = raw_zip(&[
        stored("Dockerfile", b"FROM a"),
        stored("a/b", b"1"),
        stored("a", b"2"),
    ]);
    assert!(matches!(run_err(&exact), ArchiveError::DuplicateNames));
    for zip in [exact, normalised, file_then_child, child_then_file] {
        let (dir, r) = run(&zip, &Limits::default());
        let e = r.unwrap_err();
        assert!(
            matches!(
                e,
                ArchiveError::Duplicate { .. } | ArchiveError::DuplicateNames
            ),
            "{e:?}"
        );
        assert_eq!(e.code().as_str(), "ARCHIVE_INVALID");
        assert!(is_empty(&dir.0));
    }
    // A directory entry repeated, or after its children, is fine.
    let zip = build(&[
        ("Dockerfile", 0o644, b"FROM a"),
        ("d/f", 0o644, b"1"),
        ("d/", 0o755, b""),
    ]);
    run(&zip, &Limits::default()).1.unwrap();
}

#[test]
fn corrupt_data_is_archive_invalid() {
    let mut bad = stored("Dockerfile", b"FROM a");
    bad.crc ^= 1;
    let e = run_err(&raw_zip(&[bad]));
    assert!(matches!(e, ArchiveError::Corrupt { .. }), "{e:?}");
    assert_eq!(e.code().as_str(), "ARCHIVE_INVALID");
}

#[test]
fn destination_must_be_empty() {
    let zip = build(&[("Dockerfile", 0o644, b"FROM a")]);
    let dir = Dir(tempdir("nonempty"));
    fs::write(dir.0.join("existing"), b"x").unwrap();
    let e = extract(Cursor::new(&zip), &dir.0, &Limits::default()).unwrap_err();
    assert_eq!(e.code().as_str(), "INTERNAL_PLATFORM_ERROR");
    let e = extract(
        Cursor::new(&zip),
        &dir.0.join("missing"),
        &Limits::default(),
    )
    .unwrap_err();
    assert_eq!(e.code().as_str(), "INTERNAL_PLATFORM_ERROR");
}

#[test]
fn write_errors_map_to_codes() {
    let p = Path::new("/x");
    assert_eq!(
        write_error(p, io::Error::from_raw_os_error(libc::ENOSPC))
            .code()
            .as_str(),
        "DISK_STORAGE_FULL"
    );
    assert_eq!(
        write_error(p, io::Error::from_raw_os_error(libc::EDQUOT))
            .code()
            .as_str(),
        "DISK_STORAGE_FULL"
    );
    assert_eq!(
        write_error(p, io::Error::from_raw_os_error(libc::EACCES))
            .code()
            .as_str(),
        "INTERNAL_PLATFORM_ERROR"
    );
}

#[test]
fn error_messages_are_short() {
    let e = ArchiveError::UnsafePath {
        name: "../x".into(),
    };
    assert_eq!(e.to_string(), "entry \"../x\" has an unsafe path");
    assert_eq!(
        ArchiveError::DockerfileNotFound.to_string(),
        "no Dockerfile at the root of the artifact"
    );
}

fn pats(p: &[&str]) -> Vec<String> {
    p.iter().map(|s| s.to_string()).collect()
}

#[test]
fn dockerignore_patterns() {
    let p = pats(&[
        "# comment",
        "",
        "*.pyc",
        "/node_modules",
        "build/",
        "**/*.log",
        "!keep.log",
        "docs/**/draft?.md",
        "secret[0-9].txt",
    ]);
    let cases = [
        ("a.pyc", true),
        ("sub/a.pyc", false), // `*` does not cross `/`
        ("node_modules", true),
        ("node_modules/x/y.js", true),
        ("build/out.o", true),
        ("x.log", true),
        ("deep/er/x.log", true),
        ("keep.log", false),
        ("docs/draft1.md", true),
        ("docs/a/b/draft2.md", true),
        ("docs/a/draft10.md", false),
        ("secret5.txt", true),
        ("secretx.txt", false),
        ("src/main.rs", false),
        ("Dockerfile", false),
        ("./a.pyc", true),
    ];
    for (path, want) in cases {
        assert_eq!(ignored(path, &p), want, "{path}");
    }
}

#[test]
fn dockerignore_exceptions_last_match_wins() {
    let p = pats(&["*", "!src", "src/*.tmp", "!src/keep.tmp"]);
    assert!(ignored("README.md", &p));
    assert!(!ignored("src", &p));
    assert!(!ignored("src/main.rs", &p));
    assert!(ignored("src/a.tmp", &p));
    assert!(!ignored("src/keep.tmp", &p));
    assert!(!ignored("x", &pats(&[])));
    assert!(ignored("a*b", &pats(&["a\\*b"])));
    assert!(!ignored("axb", &pats(&["a\\*b"])));
    assert!(ignored("anything/at/all", &pats(&["**"])));
    assert!(ignored("a/b/c/x.txt", &pats(&["**/b/**/*.txt"])));
    assert!(!ignored("a/b/c/x.txt", &pats(&["**/z/**"])));
}

#[test]
fn dockerignore_hostile_patterns_are_fast() {
    let pattern = format!("{}nomatch", "**/".repeat(500));
    let path = "a/".repeat(64) + "b";
    let start = Instant::now();
    assert!(!ignored(&path, &pats(&[&pattern])));
    let star = format!("{}b", "*".repeat(2000));
    assert!(!ignored(&"a".repeat(4000), &pats(&[&star])));
    assert!(start.elapsed().as_secs() < 10);
}

#[test]
fn eocd_with_comment_is_found() {
    let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
    w.set_comment("fake PK\x05\x06 inside the comment");
    w.start_file("Dockerfile", opts(0o644)).unwrap();
    w.write_all(b"FROM a").unwrap();
    let zip = w.finish().unwrap().into_inner();
    assert_eq!(declared_entries(&mut Cursor::new(&zip)).unwrap(), Some(1));
    run(&zip, &Limits::default()).1.unwrap();
}

/// xorshift64*: small deterministic PRNG for the no-panic test.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

#[test]
fn mutated_zips_never_panic() {
    let valid = build(&[
        ("Dockerfile", 0o644, b"FROM alpine\nRUN echo hi\n"),
        ("app/", 0o755, b""),
        ("app/main.py", 0o755, b"print('hello world')\n"),
        ("app/data.bin", 0o644, &[7u8; 2000]),
    ]);
    let mut rng = Rng(0x1234_5678_9ABC_DEF1);
    let limits = Limits {
        max_file_bytes: 1 << 20,
        max_total_bytes: 4 << 20,
        ..Limits::default()
    };
    for _ in 0..300 {
        let mut zip = valid.clone();
        let flips = 1 + rng.next() % 8;
        for _ in 0..flips {
            let i = (rng.next() % zip.len() as u64) as usize;
            zip[i] = rng.next() as u8;
        }
        if rng.next() & 3 == 0 {
            let cut = (rng.next() % zip.len() as u64) as usize;
            zip.truncate(cut);
        }
        let (_dir, r) = run(&zip, &limits);
        if let Err(e) = r {
            assert!(
                matches!(
                    e.code().as_str(),
                    "ARCHIVE_INVALID" | "ARCHIVE_DOCKERFILE_NOT_FOUND"
                ),
                "{e:?}"
            );
        }
    }
}

//! Applies image layers (tar streams, maybe compressed) to a directory, treating
//! them as hostile:
//!
//! - paths are split into components; `..` is refused anywhere, a leading `/`
//!   or `./` is dropped (the layer's root is the destination);
//! - every parent is opened component by component with `O_NOFOLLOW` from a
//!   descriptor of the destination, so nothing is ever written through a
//!   symbolic link (a layer that plants `a -> /etc` and then writes `a/passwd`
//!   fails with [`UnpackError::SymlinkInPath`]); files are created with
//!   `O_CREAT|O_EXCL|O_NOFOLLOW` after whatever was at their path is removed;
//! - hard links are made with `linkat` between descriptors opened the same way,
//!   so their targets are inside the destination; links to directories are refused;
//! - character and block devices and FIFOs are skipped (counted);
//! - OCI whiteouts: `.wh.NAME` removes `NAME` from lower layers, `.wh..wh..opq`
//!   removes what lower layers put in its directory (entries of the same layer
//!   are kept, as the image spec says);
//! - modes are kept as they are (setuid and sticky bits included), mtimes too;
//!   directories stay owner-writable until [`Unpacker::finish`], which gives
//!   them their modes and mtimes deepest first; symlink targets are kept verbatim;
//! - ownership: `fchown`/`lchown` are tried for every entry with a non-zero
//!   uid or gid (they work as root, fail with EPERM otherwise) and every such
//!   entry is returned as an [`Ownership`] record, `applied` saying whether the
//!   chown worked, so a caller running unprivileged can apply them later
//!   (e.g. when writing the ext4 image);
//! - limits: decompressed bytes per layer and in total, entries in total, and
//!   1 MiB of header data (long names, PAX records) per entry, all counted as
//!   the bytes come out of the decompressor, so a bomb stops at the limit.

use std::cell::Cell;
use std::collections::{BTreeMap, HashSet};
use std::ffi::OsStr;
use std::fs;
use std::io::{self, BufRead, BufReader, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, Timespec, Timestamps};
use rustix::io::Errno;
use tar::EntryType;

use crate::manifest::Compression;

/// Header bytes (GNU long names, PAX records, padding) allowed per entry.
const MAX_ENTRY_METADATA: u64 = 1024 * 1024;

const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

/// Why a layer could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("destination {0:?} is not an empty directory")]
    Destination(PathBuf),
    #[error("layer is not a valid tar stream")]
    Corrupt(#[source] io::Error),
    #[error("cannot decompress layer")]
    Decompress(#[source] io::Error),
    #[error("entry {0:?} has an unsafe path")]
    UnsafePath(String),
    #[error("entry {0:?} goes through a symbolic link")]
    SymlinkInPath(String),
    #[error("a parent of entry {0:?} is not a directory")]
    NotADirectory(String),
    #[error("hard link {0:?} has a missing or invalid target")]
    HardLinkTarget(String),
    #[error("entry {path:?} has unsupported type {kind}")]
    UnsupportedEntry { path: String, kind: String },
    #[error("layer is larger than {0} bytes uncompressed")]
    LayerTooLarge(u64),
    #[error("image is larger than {0} bytes uncompressed")]
    TotalTooLarge(u64),
    #[error("image has more than {0} entries")]
    TooManyEntries(u64),
    #[error("entry headers larger than {MAX_ENTRY_METADATA} bytes")]
    MetadataTooLarge,
    #[error("no space left to unpack the image")]
    DiskFull(#[source] io::Error),
    #[error("cannot write {path:?}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("unpacking cancelled")]
    Cancelled,
}

/// Limits on what unpacking may produce.
#[derive(Debug, Clone, Copy)]
pub(crate) struct UnpackLimits {
    pub(crate) max_layer_bytes: u64,
    pub(crate) max_total_bytes: u64,
    pub(crate) max_entries: u64,
}

/// An entry whose owner is not root:root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ownership {
    /// Relative to the destination, without a leading `/`.
    pub path: PathBuf,
    pub uid: u64,
    pub gid: u64,
    /// Permission bits (`0o7777`), as in the layer.
    pub mode: u32,
    /// Whether `lchown` worked (it does only as root).
    pub applied: bool,
}

/// What a finished unpack reports.
#[derive(Debug, Clone, Default)]
pub struct Unpacked {
    /// Entries with a non-zero uid or gid, by path.
    pub owners: Vec<Ownership>,
    /// Device nodes and FIFOs left out.
    pub skipped_special: u64,
    /// Entries applied (whiteouts included).
    pub entries: u64,
    /// Decompressed tar bytes read, all layers.
    pub bytes: u64,
}

#[derive(Debug, Clone, Copy)]
struct DirAttrs {
    mode: u32,
    mtime: u64,
}

#[derive(Debug, Clone, Copy)]
enum Exceeded {
    Layer,
    Total,
    Metadata,
}

/// Counts what comes out of the decompressor.
struct Meter {
    data_mode: Cell<bool>,
    metadata: Cell<u64>,
    layer: Cell<u64>,
    layer_limit: u64,
    total_before: u64,
    total_limit: u64,
    exceeded: Cell<Option<Exceeded>>,
}

struct MeteredReader<R> {
    inner: R,
    meter: Rc<Meter>,
}

impl<R: Read> Read for MeteredReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let m = &self.meter;
        if m.exceeded.get().is_some() {
            return Err(io::Error::other("limit exceeded"));
        }
        let n = self.inner.read(buf)? as u64;
        let layer = m.layer.get() + n;
        m.layer.set(layer);
        let exceeded = if layer > m.layer_limit {
            Some(Exceeded::Layer)
        } else if m.total_before + layer > m.total_limit {
            Some(Exceeded::Total)
        } else if !m.data_mode.get() {
            m.metadata.set(m.metadata.get() + n);
            (m.metadata.get() > MAX_ENTRY_METADATA).then_some(Exceeded::Metadata)
        } else {
            None
        };
        if exceeded.is_some() {
            m.exceeded.set(exceeded);
            return Err(io::Error::other("limit exceeded"));
        }
        Ok(n as usize)
    }
}

/// A zstd stream of one or more frames (skippable frames skipped).
struct ZstdFrames<R: BufRead> {
    source: R,
    decoder: ruzstd::decoding::FrameDecoder,
    in_frame: bool,
}

impl<R: BufRead> Read for ZstdFrames<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use ruzstd::decoding::errors::{FrameDecoderError, ReadFrameHeaderError};
        use ruzstd::decoding::BlockDecodingStrategy;
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if !self.in_frame {
                if self.source.fill_buf()?.is_empty() {
                    return Ok(0);
                }
                match self.decoder.init(&mut self.source) {
                    Ok(()) => self.in_frame = true,
                    Err(FrameDecoderError::ReadFrameHeaderError(
                        ReadFrameHeaderError::SkipFrame { length, .. },
                    )) => {
                        let skipped = io::copy(
                            &mut (&mut self.source).take(u64::from(length)),
                            &mut io::sink(),
                        )?;
                        if skipped < u64::from(length) {
                            return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
                        }
                        continue;
                    }
                    Err(e) => return Err(io::Error::other(e)),
                }
            }
            if self.decoder.can_collect() > 0 {
                return self.decoder.read(buf);
            }
            if self.decoder.is_finished() {
                self.in_frame = false;
                continue;
            }
            self.decoder
                .decode_blocks(
                    &mut self.source,
                    BlockDecodingStrategy::UptoBytes(buf.len()),
                )
                .map_err(io::Error::other)?;
        }
    }
}

/// Applies layers, in order, to one destination.
pub(crate) struct Unpacker {
    root: OwnedFd,
    root_path: PathBuf,
    limits: UnpackLimits,
    cancel: Arc<AtomicBool>,
    entries: u64,
    total_bytes: u64,
    skipped_special: u64,
    owners: BTreeMap<PathBuf, Ownership>,
    dirs: BTreeMap<PathBuf, DirAttrs>,
    /// Paths written by the layer being applied (whiteouts spare them).
    layer_paths: HashSet<PathBuf>,
}

impl std::fmt::Debug for Unpacker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Unpacker")
            .field("root", &self.root_path)
            .finish_non_exhaustive()
    }
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn rel_path(components: &[&[u8]]) -> PathBuf {
    let mut path = PathBuf::new();
    for c in components {
        path.push(OsStr::from_bytes(c));
    }
    path
}

fn write_error(path: &Path) -> impl FnOnce(io::Error) -> UnpackError + '_ {
    move |source| {
        let code = source.raw_os_error();
        if code == Some(Errno::NOSPC.raw_os_error()) || code == Some(Errno::DQUOT.raw_os_error()) {
            UnpackError::DiskFull(source)
        } else {
            UnpackError::Io {
                path: path.display().to_string(),
                source,
            }
        }
    }
}

fn errno(path: &Path) -> impl FnOnce(Errno) -> UnpackError + '_ {
    move |e| write_error(path)(io::Error::from(e))
}

/// Splits a tar path into components: `..` and NUL bytes are refused, empty
/// components and `.` dropped.
fn components(raw: &[u8]) -> Result<Vec<&[u8]>, UnpackError> {
    let mut out = Vec::new();
    for c in raw.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err(UnpackError::UnsafePath(lossy(raw))),
            c if c.contains(&0) => return Err(UnpackError::UnsafePath(lossy(raw))),
            c => out.push(c),
        }
    }
    Ok(out)
}

fn timestamps(mtime: u64) -> Timestamps {
    let time = Timespec {
        tv_sec: i64::try_from(mtime).unwrap_or(i64::MAX),
        tv_nsec: 0,
    };
    Timestamps {
        last_access: time,
        last_modification: time,
    }
}

/// Removes `name` in `parent` and, for a directory, everything under it,
/// never following a symbolic link.
fn remove_tree_at(parent: &OwnedFd, name: &[u8]) -> io::Result<()> {
    match rustix::fs::unlinkat(parent, name, AtFlags::empty()) {
        Ok(()) | Err(Errno::NOENT) => return Ok(()),
        Err(Errno::ISDIR) | Err(Errno::PERM) => {}
        Err(e) => return Err(e.into()),
    }
    let dir = match rustix::fs::openat(parent, name, DIR_FLAGS, Mode::empty()) {
        Ok(dir) => dir,
        Err(Errno::NOENT) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    for child in child_names(&dir)? {
        remove_tree_at(&dir, &child)?;
    }
    match rustix::fs::unlinkat(parent, name, AtFlags::REMOVEDIR) {
        Ok(()) | Err(Errno::NOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The names in a directory, `.` and `..` left out.
fn child_names(dir: &OwnedFd) -> io::Result<Vec<Vec<u8>>> {
    let mut names = Vec::new();
    for entry in rustix::fs::Dir::read_from(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push(name.to_vec());
        }
    }
    Ok(names)
}

fn file_type_at(parent: &OwnedFd, name: &[u8]) -> Result<Option<FileType>, Errno> {
    match rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(stat) => Ok(Some(FileType::from_raw_mode(stat.st_mode))),
        Err(Errno::NOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Tries to give `fd` its owner; true when it worked.
fn try_fchown(fd: impl AsFd, uid: u64, gid: u64) -> bool {
    match (u32::try_from(uid), u32::try_from(gid)) {
        (Ok(uid), Ok(gid)) => std::os::unix::fs::fchown(fd, Some(uid), Some(gid)).is_ok(),
        _ => false,
    }
}

impl Unpacker {
    /// `dest` must be an existing empty directory.
    pub(crate) fn new(
        dest: &Path,
        limits: UnpackLimits,
        cancel: Arc<AtomicBool>,
    ) -> Result<Self, UnpackError> {
        let not_empty = || UnpackError::Destination(dest.to_owned());
        let root = rustix::fs::open(dest, DIR_FLAGS, Mode::empty()).map_err(|_| not_empty())?;
        if !child_names(&root).map_err(|_| not_empty())?.is_empty() {
            return Err(not_empty());
        }
        Ok(Unpacker {
            root,
            root_path: dest.to_owned(),
            limits,
            cancel,
            entries: 0,
            total_bytes: 0,
            skipped_special: 0,
            owners: BTreeMap::new(),
            dirs: BTreeMap::new(),
            layer_paths: HashSet::new(),
        })
    }

    /// Applies one layer read from `blob`.
    pub(crate) fn apply_layer<R: Read>(
        &mut self,
        blob: R,
        compression: Compression,
    ) -> Result<(), UnpackError> {
        self.layer_paths.clear();
        let buffered = BufReader::with_capacity(256 * 1024, blob);
        let decoder: Box<dyn Read> = match compression {
            Compression::None => Box::new(buffered),
            Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(buffered)),
            Compression::Zstd => Box::new(ZstdFrames {
                source: buffered,
                decoder: ruzstd::decoding::FrameDecoder::new(),
                in_frame: false,
            }),
        };
        let meter = Rc::new(Meter {
            data_mode: Cell::new(false),
            metadata: Cell::new(0),
            layer: Cell::new(0),
            layer_limit: self.limits.max_layer_bytes,
            total_before: self.total_bytes,
            total_limit: self.limits.max_total_bytes,
            exceeded: Cell::new(None),
        });
        let mut archive = tar::Archive::new(MeteredReader {
            inner: decoder,
            meter: meter.clone(),
        });
        let result = self.apply_entries(&mut archive, &meter);
        self.total_bytes += meter.layer.get();
        match meter.exceeded.get() {
            Some(Exceeded::Layer) => Err(UnpackError::LayerTooLarge(self.limits.max_layer_bytes)),
            Some(Exceeded::Total) => Err(UnpackError::TotalTooLarge(self.limits.max_total_bytes)),
            Some(Exceeded::Metadata) => Err(UnpackError::MetadataTooLarge),
            None => result,
        }
    }

    fn apply_entries<R: Read>(
        &mut self,
        archive: &mut tar::Archive<R>,
        meter: &Meter,
    ) -> Result<(), UnpackError> {
        let read_error = |e: io::Error| {
            let decompress = e
                .get_ref()
                .is_some_and(|inner| inner.is::<ruzstd::decoding::errors::FrameDecoderError>())
                || e.kind() == io::ErrorKind::InvalidInput;
            if decompress {
                UnpackError::Decompress(e)
            } else {
                UnpackError::Corrupt(e)
            }
        };
        for entry in archive.entries().map_err(read_error)? {
            if self.cancel.load(Ordering::Relaxed) {
                return Err(UnpackError::Cancelled);
            }
            let mut entry = entry.map_err(read_error)?;
            meter.metadata.set(0);
            if entry.header().entry_type() == EntryType::XGlobalHeader {
                continue;
            }
            self.entries += 1;
            if self.entries > self.limits.max_entries {
                return Err(UnpackError::TooManyEntries(self.limits.max_entries));
            }
            self.apply_entry(&mut entry, meter)?;
            meter.data_mode.set(true);
            let drained = io::copy(&mut entry, &mut io::sink());
            meter.data_mode.set(false);
            drained.map_err(read_error)?;
        }
        Ok(())
    }

    /// Opens the directory at `components`, creating missing ones (as
    /// written by this layer) when `create`. `None` when missing and not
    /// creating. `entry` names the entry in errors.
    fn open_dir(
        &mut self,
        components: &[&[u8]],
        create: bool,
        entry: &[u8],
    ) -> Result<Option<OwnedFd>, UnpackError> {
        let root_err = errno(&self.root_path);
        let mut current =
            rustix::fs::openat(&self.root, ".", DIR_FLAGS, Mode::empty()).map_err(root_err)?;
        for (i, c) in components.iter().enumerate() {
            let next = match rustix::fs::openat(&current, *c, DIR_FLAGS, Mode::empty()) {
                Ok(fd) => fd,
                Err(Errno::NOENT) if create => {
                    let rel = rel_path(&components[..=i]);
                    match rustix::fs::mkdirat(&current, *c, Mode::from_raw_mode(0o755)) {
                        Ok(()) | Err(Errno::EXIST) => {}
                        Err(e) => return Err(errno(&rel)(e)),
                    }
                    self.layer_paths.insert(rel.clone());
                    rustix::fs::openat(&current, *c, DIR_FLAGS, Mode::empty()).map_err(
                        |e| match e {
                            Errno::LOOP => UnpackError::SymlinkInPath(lossy(entry)),
                            e => errno(&rel)(e),
                        },
                    )?
                }
                Err(Errno::NOENT) => return Ok(None),
                Err(Errno::LOOP) | Err(Errno::NOTDIR) => {
                    return Err(match file_type_at(&current, c) {
                        Ok(Some(FileType::Symlink)) => UnpackError::SymlinkInPath(lossy(entry)),
                        _ => UnpackError::NotADirectory(lossy(entry)),
                    })
                }
                Err(e) => return Err(errno(&rel_path(&components[..=i]))(e)),
            };
            current = next;
        }
        Ok(Some(current))
    }

    /// Forgets recorded owners and directory modes at and under `rel`.
    fn forget(&mut self, rel: &Path) {
        fn prune<V>(map: &mut BTreeMap<PathBuf, V>, rel: &Path) {
            let doomed: Vec<PathBuf> = map
                .range(rel.to_path_buf()..)
                .map(|(k, _)| k)
                .take_while(|k| k.starts_with(rel))
                .cloned()
                .collect();
            for k in doomed {
                map.remove(&k);
            }
        }
        prune(&mut self.owners, rel);
        prune(&mut self.dirs, rel);
    }

    /// Makes `name` in `parent` free for a new entry: anything there is
    /// removed, except a directory when `keep_dir` (directories merge).
    /// Returns whether a directory was kept.
    fn make_room(
        &mut self,
        parent: &OwnedFd,
        name: &[u8],
        rel: &Path,
        keep_dir: bool,
    ) -> Result<bool, UnpackError> {
        match file_type_at(parent, name).map_err(errno(rel))? {
            None => Ok(false),
            Some(FileType::Directory) if keep_dir => Ok(true),
            Some(_) => {
                remove_tree_at(parent, name).map_err(write_error(rel))?;
                self.forget(rel);
                Ok(false)
            }
        }
    }

    fn record_owner(&mut self, rel: &Path, uid: u64, gid: u64, mode: u32, applied: bool) {
        if uid == 0 && gid == 0 {
            self.owners.remove(rel);
        } else {
            self.owners.insert(
                rel.to_owned(),
                Ownership {
                    path: rel.to_owned(),
                    uid,
                    gid,
                    mode,
                    applied,
                },
            );
        }
    }

    fn apply_entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        meter: &Meter,
    ) -> Result<(), UnpackError> {
        let raw_path = entry.path_bytes().into_owned();
        let parts = components(&raw_path)?;
        let header = entry.header();
        let kind = header.entry_type();
        let Some((name, parents)) = parts.split_last() else {
            // The layer's root directory itself: the destination's own
            // attributes are the caller's.
            return if kind.is_dir() {
                Ok(())
            } else {
                Err(UnpackError::UnsafePath(lossy(&raw_path)))
            };
        };
        let rel = rel_path(&parts);

        if let Some(target) = name.strip_prefix(b".wh.") {
            if target == b".wh..opq" {
                return self.opaque(parents, &raw_path);
            }
            if target.starts_with(b".wh.") {
                // aufs bookkeeping (.wh..wh.plnk and the like).
                return Ok(());
            }
            if target.is_empty() || target == b"." || target == b".." {
                return Err(UnpackError::UnsafePath(lossy(&raw_path)));
            }
            return self.whiteout(parents, target, &raw_path);
        }

        let mode = header.mode().map_err(UnpackError::Corrupt)? & 0o7777;
        let uid = header.uid().map_err(UnpackError::Corrupt)?;
        let gid = header.gid().map_err(UnpackError::Corrupt)?;
        let mtime = header.mtime().unwrap_or(0);
        let size = entry.size();
        let special = matches!(kind, EntryType::Char | EntryType::Block | EntryType::Fifo);
        let supported = kind.is_file()
            || kind.is_contiguous()
            || kind.is_dir()
            || kind.is_symlink()
            || kind.is_hard_link()
            || special;
        if !supported {
            return Err(UnpackError::UnsupportedEntry {
                path: lossy(&raw_path),
                kind: format!("{:?}", kind),
            });
        }
        if special {
            self.skipped_special += 1;
            return Ok(());
        }

        let Some(parent) = self.open_dir(parents, true, &raw_path)? else {
            return Err(UnpackError::NotADirectory(lossy(&raw_path)));
        };
        self.layer_paths.insert(rel.clone());

        if kind.is_dir() {
            if !self.make_room(&parent, name, &rel, true)? {
                rustix::fs::mkdirat(&parent, *name, Mode::from_raw_mode(0o700))
                    .map_err(errno(&rel))?;
            }
            let dir = rustix::fs::openat(&parent, *name, DIR_FLAGS, Mode::empty())
                .map_err(errno(&rel))?;
            let applied = (uid != 0 || gid != 0) && try_fchown(&dir, uid, gid);
            self.record_owner(&rel, uid, gid, mode, applied);
            self.dirs.insert(rel, DirAttrs { mode, mtime });
        } else if kind.is_symlink() {
            let target = entry
                .link_name_bytes()
                .map(|t| t.into_owned())
                .filter(|t| !t.is_empty() && !t.contains(&0))
                .ok_or_else(|| UnpackError::UnsafePath(lossy(&raw_path)))?;
            self.make_room(&parent, name, &rel, false)?;
            rustix::fs::symlinkat(target.as_slice(), &parent, *name).map_err(errno(&rel))?;
            let applied = (uid != 0 || gid != 0)
                && match (u32::try_from(uid), u32::try_from(gid)) {
                    // The parents were just opened without following links,
                    // so this path names the new link itself.
                    (Ok(u), Ok(g)) => {
                        std::os::unix::fs::lchown(self.root_path.join(&rel), Some(u), Some(g))
                            .is_ok()
                    }
                    _ => false,
                };
            self.record_owner(&rel, uid, gid, mode, applied);
            let _ = rustix::fs::utimensat(
                &parent,
                *name,
                &timestamps(mtime),
                AtFlags::SYMLINK_NOFOLLOW,
            );
        } else if kind.is_hard_link() {
            let invalid = || UnpackError::HardLinkTarget(lossy(&raw_path));
            let target_raw = entry
                .link_name_bytes()
                .map(|t| t.into_owned())
                .ok_or_else(invalid)?;
            let target_parts = components(&target_raw).map_err(|_| invalid())?;
            let Some((target_name, target_parents)) = target_parts.split_last() else {
                return Err(invalid());
            };
            let target_rel = rel_path(&target_parts);
            if target_rel == rel {
                return Ok(());
            }
            let target_dir = match self.open_dir(target_parents, false, &raw_path) {
                Ok(Some(dir)) => dir,
                Ok(None)
                | Err(UnpackError::SymlinkInPath(_))
                | Err(UnpackError::NotADirectory(_)) => return Err(invalid()),
                Err(e) => return Err(e),
            };
            match file_type_at(&target_dir, target_name).map_err(errno(&target_rel))? {
                None | Some(FileType::Directory) => return Err(invalid()),
                Some(_) => {}
            }
            self.make_room(&parent, name, &rel, false)?;
            rustix::fs::linkat(&target_dir, *target_name, &parent, *name, AtFlags::empty())
                .map_err(|e| match e {
                    Errno::NOENT => invalid(),
                    e => errno(&rel)(e),
                })?;
            match self.owners.get(&target_rel).cloned() {
                Some(owner) => {
                    self.owners
                        .insert(rel.clone(), Ownership { path: rel, ..owner });
                }
                None => {
                    self.owners.remove(&rel);
                }
            }
        } else {
            self.make_room(&parent, name, &rel, false)?;
            let fd = rustix::fs::openat(
                &parent,
                *name,
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            )
            .map_err(errno(&rel))?;
            let mut file = fs::File::from(fd);
            meter.data_mode.set(true);
            let copied = io::copy(entry, &mut file);
            meter.data_mode.set(false);
            match copied {
                // A read error is the layer's; a write error is ours.
                Err(e) if meter.exceeded.get().is_some() || e.raw_os_error().is_none() => {
                    return Err(UnpackError::Corrupt(e))
                }
                Err(e) => return Err(write_error(&rel)(e)),
                Ok(n) if n < size => {
                    return Err(UnpackError::Corrupt(io::ErrorKind::UnexpectedEof.into()))
                }
                Ok(_) => {}
            }
            // chown before chmod: chown clears setuid/setgid bits.
            let applied = (uid != 0 || gid != 0) && try_fchown(&file, uid, gid);
            rustix::fs::fchmod(&file, Mode::from_raw_mode(mode)).map_err(errno(&rel))?;
            rustix::fs::futimens(&file, &timestamps(mtime)).map_err(errno(&rel))?;
            self.record_owner(&rel, uid, gid, mode, applied);
        }
        Ok(())
    }

    /// `.wh.NAME`: removes `NAME` unless this layer wrote it.
    fn whiteout(
        &mut self,
        parents: &[&[u8]],
        target: &[u8],
        raw: &[u8],
    ) -> Result<(), UnpackError> {
        let mut parts = parents.to_vec();
        parts.push(target);
        let rel = rel_path(&parts);
        if self.layer_paths.contains(&rel) {
            return Ok(());
        }
        // A whiteout under a symlink or a file has nothing to remove.
        let parent = match self.open_dir(parents, false, raw) {
            Ok(Some(parent)) => parent,
            Ok(None) | Err(UnpackError::SymlinkInPath(_)) | Err(UnpackError::NotADirectory(_)) => {
                return Ok(())
            }
            Err(e) => return Err(e),
        };
        remove_tree_at(&parent, target).map_err(write_error(&rel))?;
        self.forget(&rel);
        Ok(())
    }

    /// `.wh..wh..opq`: removes what lower layers put in the directory.
    fn opaque(&mut self, dir: &[&[u8]], raw: &[u8]) -> Result<(), UnpackError> {
        let rel = rel_path(dir);
        let fd = match self.open_dir(dir, false, raw) {
            Ok(Some(fd)) => fd,
            Ok(None) | Err(UnpackError::SymlinkInPath(_)) | Err(UnpackError::NotADirectory(_)) => {
                return Ok(())
            }
            Err(e) => return Err(e),
        };
        self.clear_lower(&fd, &rel)
    }

    fn clear_lower(&mut self, dir: &OwnedFd, rel: &Path) -> Result<(), UnpackError> {
        for name in child_names(dir).map_err(write_error(rel))? {
            let child = rel.join(OsStr::from_bytes(&name));
            if self.layer_paths.contains(&child) {
                if file_type_at(dir, &name).map_err(errno(&child))? == Some(FileType::Directory) {
                    let sub = rustix::fs::openat(dir, name.as_slice(), DIR_FLAGS, Mode::empty())
                        .map_err(errno(&child))?;
                    self.clear_lower(&sub, &child)?;
                }
            } else {
                remove_tree_at(dir, &name).map_err(write_error(&child))?;
                self.forget(&child);
            }
        }
        Ok(())
    }

    /// Gives directories their modes and mtimes (deepest first) and returns
    /// the report.
    pub(crate) fn finish(mut self) -> Result<Unpacked, UnpackError> {
        let mut dirs: Vec<(PathBuf, DirAttrs)> =
            std::mem::take(&mut self.dirs).into_iter().collect();
        dirs.sort_by_key(|(path, _)| std::cmp::Reverse(path.components().count()));
        for (rel, attrs) in dirs {
            let bytes: Vec<Vec<u8>> = rel.iter().map(|c| c.as_bytes().to_vec()).collect();
            let parts: Vec<&[u8]> = bytes.iter().map(Vec::as_slice).collect();
            let Ok(Some(dir)) = self.open_dir(&parts, false, rel.as_os_str().as_bytes()) else {
                continue;
            };
            rustix::fs::fchmod(&dir, Mode::from_raw_mode(attrs.mode)).map_err(errno(&rel))?;
            rustix::fs::futimens(&dir, &timestamps(attrs.mtime)).map_err(errno(&rel))?;
        }
        Ok(Unpacked {
            owners: std::mem::take(&mut self.owners).into_values().collect(),
            skipped_special: self.skipped_special,
            entries: self.entries,
            bytes: self.total_bytes,
        })
    }
}

#[cfg(test)]
mod tests;

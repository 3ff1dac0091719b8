//! Disk and file helpers: copy-on-write qcow2 overlays, sparse copies, and
//! durable writes (fsync of files and of the directories that name them).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use rustix::fs::{seek, SeekFrom as RxSeekFrom};

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("qemu-img could not be run")]
    Spawn(#[source] std::io::Error),
    #[error("qemu-img failed to create {path}: {stderr}")]
    QemuImg { path: PathBuf, stderr: String },
    #[error("I/O on {0}")]
    Io(PathBuf, #[source] std::io::Error),
    #[error("{path} belongs to uid {owner}, not to this user (uid {me}); refusing to keep private data there")]
    NotOwned { path: PathBuf, owner: u32, me: u32 },
    #[error("{0} is not a directory")]
    NotADirectory(PathBuf),
}

/// Backing file formats an overlay can sit on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackingFormat {
    /// An immutable ext4 image (a base image).
    Raw,
    /// Another overlay (a snapshot's disk).
    Qcow2,
}

/// Creates a qcow2 overlay at `path` whose unwritten blocks read from `backing`.
pub async fn create_overlay(
    path: &Path,
    backing: &Path,
    format: BackingFormat,
) -> Result<(), DiskError> {
    create_overlay_sized(path, backing, format, None).await
}

/// [`create_overlay`] with a virtual size of `size` bytes (at least the
/// backing file's; more leaves room to grow the filesystem).
pub async fn create_overlay_sized(
    path: &Path,
    backing: &Path,
    format: BackingFormat,
    size: Option<u64>,
) -> Result<(), DiskError> {
    let format = match format {
        BackingFormat::Raw => "raw",
        BackingFormat::Qcow2 => "qcow2",
    };
    let output = tokio::process::Command::new("qemu-img")
        .arg("create")
        .arg("-q")
        .args(["-f", "qcow2", "-F", format, "-b"])
        .arg(backing)
        .arg(path)
        .args(size.map(|bytes| bytes.to_string()))
        .output()
        .await
        .map_err(DiskError::Spawn)?;
    if !output.status.success() {
        return Err(DiskError::QemuImg {
            path: path.to_path_buf(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// Copies `from` to `to`, keeping holes as holes (memory files are mostly
/// unwritten), and fsyncs the copy. Returns the bytes of data copied.
pub fn sparse_copy(from: &Path, to: &Path) -> Result<u64, DiskError> {
    let io_from = |e| DiskError::Io(from.to_path_buf(), e);
    let io_to = |e| DiskError::Io(to.to_path_buf(), e);
    // Not through a symlink: the source may sit in a jailed QEMU's directory.
    let mut src = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(from)
            .map_err(io_from)?
    };
    let len = src.metadata().map_err(io_from)?.len();
    // Made anew, never through a link: the target may be in a jailed QEMU's
    // directory too (a lean suspend's RAM file).
    let mut dst = create_fresh(to)?;
    dst.set_len(len).map_err(io_to)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut copied = 0u64;
    let mut offset = 0u64;
    while offset < len {
        // Next data region; ENXIO means only a hole remains.
        let data = match seek(&src, RxSeekFrom::Data(offset as i64)) {
            Ok(at) => at,
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) => return Err(io_from(e.into())),
        };
        let hole = seek(&src, RxSeekFrom::Hole(data as i64))
            .map_err(|e| io_from(e.into()))?
            .min(len);
        src.seek(SeekFrom::Start(data)).map_err(io_from)?;
        dst.seek(SeekFrom::Start(data)).map_err(io_to)?;
        let mut remaining = hole - data;
        while remaining > 0 {
            let want = remaining.min(buf.len() as u64) as usize;
            let n = src.read(&mut buf[..want]).map_err(io_from)?;
            if n == 0 {
                break;
            }
            // Skip all-zero blocks inside data regions too: they read back as zero.
            if buf[..n].iter().any(|&b| b != 0) {
                dst.write_all(&buf[..n]).map_err(io_to)?;
            } else {
                dst.seek(SeekFrom::Current(n as i64)).map_err(io_to)?;
            }
            remaining -= n as u64;
            copied += n as u64;
        }
        offset = hole;
    }
    dst.sync_all().map_err(io_to)?;
    Ok(copied)
}

/// Creates `path` and missing parents with mode 0700: VM directories, RAM files
/// and snapshots hold guest memory and disks, which are the tenant's secrets.
pub fn create_private_dir_all(path: &Path) -> Result<(), DiskError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|e| DiskError::Io(path.to_path_buf(), e))
}

/// Creates `path` (mode 0700) if missing, then makes sure it is private: a
/// real directory (not a symlink) owned by this user, with no access for group
/// or others (an existing 0755 directory is narrowed to 0700). A directory that
/// another user made — e.g. a RAM directory planted in a shared tmpfs — is
/// refused, since its owner could read or replace what hearth puts there.
pub fn ensure_private_dir(path: &Path) -> Result<(), DiskError> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    create_private_dir_all(path)?;
    let io = |e| DiskError::Io(path.to_path_buf(), e);
    let meta = std::fs::symlink_metadata(path).map_err(io)?;
    if !meta.is_dir() {
        return Err(DiskError::NotADirectory(path.to_path_buf()));
    }
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != me {
        return Err(DiskError::NotOwned {
            path: path.to_path_buf(),
            owner: meta.uid(),
            me,
        });
    }
    if meta.mode() & 0o077 != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
    }
    Ok(())
}

/// Creates an empty file readable and writable by this user only (0600),
/// replacing nothing: fails if it exists.
pub fn create_private_file(path: &Path) -> Result<File, DiskError> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| DiskError::Io(path.to_path_buf(), e))
}

/// Creates `path` empty and 0600 after removing whatever was there (a file or
/// a symlink, never followed): for files in directories a jailed QEMU can
/// write to.
pub fn create_fresh(path: &Path) -> Result<File, DiskError> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(DiskError::Io(path.to_path_buf(), e)),
    }
    create_private_file(path)
}

/// The files an image reads through: its qcow2 backing file, that file's, and
/// so on (not `image` itself), read from the qcow2 headers. A relative
/// backing name is relative to the directory of the image that names it.
pub fn backing_chain(image: &Path) -> Result<Vec<PathBuf>, DiskError> {
    let mut chain = Vec::new();
    let mut current = image.to_path_buf();
    while let Some(backing) = qcow2_backing(&current)? {
        let backing = if backing.is_absolute() {
            backing
        } else {
            current.parent().unwrap_or(Path::new("/")).join(backing)
        };
        if chain.contains(&backing) || chain.len() >= 256 {
            return Err(DiskError::Io(
                backing,
                std::io::Error::new(std::io::ErrorKind::InvalidData, "backing chain loops"),
            ));
        }
        chain.push(backing.clone());
        current = backing;
    }
    Ok(chain)
}

/// The header fields of a qcow2 file; `None` for anything else (a raw image).
fn qcow2_header(path: &Path) -> Result<Option<[u8; 32]>, DiskError> {
    let io = |e| DiskError::Io(path.to_path_buf(), e);
    let mut head = [0u8; 32];
    let mut file = File::open(path).map_err(io)?;
    match file.read_exact(&mut head) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(io(e)),
    }
    Ok((head[..4] == *b"QFI\xfb").then_some(head))
}

fn qcow2_backing(path: &Path) -> Result<Option<PathBuf>, DiskError> {
    let Some(head) = qcow2_header(path)? else {
        return Ok(None);
    };
    let be64 = |at: usize| u64::from_be_bytes(head[at..at + 8].try_into().unwrap_or([0; 8]));
    let offset = be64(8);
    let len = u32::from_be_bytes(head[16..20].try_into().unwrap_or([0; 4])) as usize;
    if offset == 0 || len == 0 {
        return Ok(None);
    }
    if len > 1023 {
        return Err(DiskError::Io(
            path.to_path_buf(),
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "backing file name too long",
            ),
        ));
    }
    let io = |e| DiskError::Io(path.to_path_buf(), e);
    let mut file = File::open(path).map_err(io)?;
    file.seek(SeekFrom::Start(offset)).map_err(io)?;
    let mut name = vec![0u8; len];
    file.read_exact(&mut name).map_err(io)?;
    use std::os::unix::ffi::OsStringExt;
    Ok(Some(PathBuf::from(std::ffi::OsString::from_vec(name))))
}

/// The virtual size of a qcow2 image in bytes; `None` for anything else.
pub fn virtual_size(path: &Path) -> Option<u64> {
    let head = qcow2_header(path).ok()??;
    Some(u64::from_be_bytes(head[24..32].try_into().ok()?))
}

/// Creates one directory with mode 0700; fails if it exists.
pub fn create_private_dir(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().mode(0o700).create(path)
}

/// fsyncs a directory so that renames and creations in it are durable.
pub fn sync_dir(dir: &Path) -> Result<(), DiskError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| DiskError::Io(dir.to_path_buf(), e))
}

/// `create_dir_all`, and durable: the parent of each directory it made is
/// fsynced, so after a power cut no file renamed into `path` hangs from a
/// directory entry that was never written.
pub fn create_dir_all_synced(path: &Path) -> Result<(), DiskError> {
    let missing: Vec<PathBuf> = path
        .ancestors()
        .take_while(|dir| !dir.as_os_str().is_empty() && !dir.exists())
        .map(Path::to_path_buf)
        .collect();
    std::fs::create_dir_all(path).map_err(|e| DiskError::Io(path.to_path_buf(), e))?;
    for dir in missing.iter().rev() {
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent)?;
        }
    }
    Ok(())
}

/// Writes `bytes` to `path` atomically: temporary file, fsync, rename, fsync dir.
/// The temporary file is made new (never opened through a link someone left
/// at its name: a VM directory is writable by its jailed QEMU).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), DiskError> {
    let tmp = path.with_extension("tmp");
    let io = |e| DiskError::Io(path.to_path_buf(), e);
    let mut file = create_fresh(&tmp)?;
    file.write_all(bytes).map_err(io)?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    if let Some(parent) = path.parent() {
        sync_dir(parent)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_copy_keeps_content_and_holes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("src");
        let dst = dir.path().join("dst");
        {
            let mut f = File::create(&src).expect("create");
            f.set_len(8 << 20).expect("set_len");
            f.seek(SeekFrom::Start(3 << 20)).expect("seek");
            f.write_all(&[7u8; 5000]).expect("write");
            f.seek(SeekFrom::Start((8 << 20) - 10)).expect("seek");
            f.write_all(b"0123456789").expect("write");
        }
        sparse_copy(&src, &dst).expect("copy");
        assert_eq!(
            std::fs::read(&src).expect("read"),
            std::fs::read(&dst).expect("read")
        );
        let blocks =
            std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&dst).expect("meta"));
        assert!(
            blocks * 512 < 1 << 20,
            "copy is not sparse: {blocks} blocks"
        );
    }

    #[test]
    fn atomic_write_replaces() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("m.json");
        write_atomic(&path, b"one").expect("write");
        write_atomic(&path, b"two").expect("write");
        assert_eq!(std::fs::read(&path).expect("read"), b"two");
        assert!(!path.with_extension("tmp").exists());
    }
}

#[cfg(test)]
mod private_tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn private_dirs_are_narrowed_and_symlinks_refused() {
        let root = tempfile::tempdir().expect("tempdir");
        let open = root.path().join("open");
        std::fs::create_dir(&open).expect("mkdir");
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        ensure_private_dir(&open).expect("own dir");
        let mode = std::fs::metadata(&open).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        let new = root.path().join("a/b");
        ensure_private_dir(&new).expect("created");
        assert_eq!(
            std::fs::metadata(&new).expect("meta").permissions().mode() & 0o777,
            0o700
        );
        let link = root.path().join("link");
        std::os::unix::fs::symlink(&open, &link).expect("symlink");
        assert!(matches!(
            ensure_private_dir(&link),
            Err(DiskError::NotADirectory(_))
        ));
        let file = root.path().join("f");
        let f = create_private_file(&file).expect("file");
        drop(f);
        assert_eq!(
            std::fs::metadata(&file).expect("meta").permissions().mode() & 0o777,
            0o600
        );
        assert!(create_private_file(&file).is_err(), "never replaces");
    }

    #[test]
    fn a_directory_of_another_user_is_refused() {
        // Only root can make one here; elsewhere the check is covered above.
        if rustix::process::geteuid().as_raw() != 0 {
            return;
        }
        let root = tempfile::tempdir().expect("tempdir");
        let planted = root.path().join("planted");
        std::fs::create_dir(&planted).expect("mkdir");
        std::os::unix::fs::chown(&planted, Some(65534), Some(65534)).expect("chown");
        match ensure_private_dir(&planted) {
            Err(DiskError::NotOwned { owner, .. }) => assert_eq!(owner, 65534),
            other => panic!("{other:?}"),
        }
    }
}

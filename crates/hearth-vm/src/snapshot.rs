//! Snapshot directories: a VM's memory, CPU/device state and disk overlay, with a
//! manifest that lets a reader refuse anything truncated, swapped or stale.
//!
//! Layout (format version 1):
//! - `mem`: the guest RAM image (clones map it private, copy-on-write),
//! - `state`: QEMU's migration stream without RAM (`x-ignore-shared`),
//! - `disk.qcow2`: the disk overlay at the moment of the snapshot,
//! - `manifest.json`: [`Manifest`].

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::accel::Accel;
use crate::record::MachineShape;

pub const FORMAT_VERSION: u32 = 1;
pub const MEMORY_FILE: &str = "mem";
pub const STATE_FILE: &str = "state";
pub const DISK_FILE: &str = "disk.qcow2";
pub const MANIFEST_FILE: &str = "manifest.json";
/// Largest manifest accepted; a real one is well under a kilobyte.
const MAX_MANIFEST: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot {0} has no readable manifest")]
    NoManifest(PathBuf, #[source] std::io::Error),
    #[error("snapshot manifest {0} is malformed")]
    BadManifest(PathBuf, #[source] serde_json::Error),
    #[error("snapshot manifest {0} is too large")]
    ManifestTooLarge(PathBuf),
    #[error("snapshot format {found} is not supported (expected {FORMAT_VERSION})")]
    Format { found: u32 },
    #[error("snapshot file {0} is missing")]
    MissingFile(PathBuf),
    #[error(
        "snapshot file {path} has {actual} bytes, manifest says {expected}: truncated or replaced"
    )]
    SizeMismatch {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    #[error("snapshot file {0} does not match its checksum")]
    ChecksumMismatch(PathBuf),
    #[error("snapshot manifest lists an unexpected file {0:?}")]
    UnexpectedFile(String),
    #[error("kernel {0} used by the snapshot is missing")]
    MissingKernel(PathBuf),
    #[error("cannot read {0}")]
    Io(PathBuf, #[source] std::io::Error),
}

/// One file of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub name: String,
    pub size: u64,
    pub blake3: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub created_unix: u64,
    pub shape: MachineShape,
    pub accel: Accel,
    pub kernel: PathBuf,
    pub kernel_version: String,
    pub initrd: PathBuf,
    pub cmdline: String,
    pub qemu_version: String,
    /// The VM had a virtio-net card: its clones must have one too.
    #[serde(default)]
    pub nic: bool,
    pub files: Vec<FileEntry>,
    /// The VM had the free-page-reporting balloon (see `VmRecord::balloon`).
    #[serde(default)]
    pub balloon: bool,
}

/// How much to check when opening a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verify {
    /// Presence and sizes: cheap, catches truncation.
    Sizes,
    /// Sizes and checksums of every file.
    Full,
}

/// An opened, checked snapshot.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

impl Snapshot {
    pub fn open(dir: &Path, verify: Verify) -> Result<Self, SnapshotError> {
        let dir =
            std::fs::canonicalize(dir).map_err(|e| SnapshotError::NoManifest(dir.into(), e))?;
        let manifest_path = dir.join(MANIFEST_FILE);
        let file = std::fs::File::open(&manifest_path)
            .map_err(|e| SnapshotError::NoManifest(dir.clone(), e))?;
        let mut text = Vec::new();
        file.take(MAX_MANIFEST + 1)
            .read_to_end(&mut text)
            .map_err(|e| SnapshotError::NoManifest(dir.clone(), e))?;
        if text.len() as u64 > MAX_MANIFEST {
            return Err(SnapshotError::ManifestTooLarge(manifest_path));
        }
        let manifest: Manifest = serde_json::from_slice(&text)
            .map_err(|e| SnapshotError::BadManifest(manifest_path.clone(), e))?;
        if manifest.format_version != FORMAT_VERSION {
            return Err(SnapshotError::Format {
                found: manifest.format_version,
            });
        }
        for required in [MEMORY_FILE, STATE_FILE, DISK_FILE] {
            if !manifest.files.iter().any(|f| f.name == required) {
                return Err(SnapshotError::MissingFile(dir.join(required)));
            }
        }
        for entry in &manifest.files {
            if ![MEMORY_FILE, STATE_FILE, DISK_FILE].contains(&entry.name.as_str()) {
                return Err(SnapshotError::UnexpectedFile(entry.name.clone()));
            }
            let path = dir.join(&entry.name);
            let actual = match std::fs::metadata(&path) {
                Ok(meta) => meta.len(),
                Err(_) => return Err(SnapshotError::MissingFile(path)),
            };
            if actual != entry.size {
                return Err(SnapshotError::SizeMismatch {
                    path,
                    expected: entry.size,
                    actual,
                });
            }
            if verify == Verify::Full && hash_file(&path)? != entry.blake3 {
                return Err(SnapshotError::ChecksumMismatch(path));
            }
        }
        if !manifest.kernel.is_file() {
            return Err(SnapshotError::MissingKernel(manifest.kernel.clone()));
        }
        if !manifest.initrd.is_file() {
            return Err(SnapshotError::MissingKernel(manifest.initrd.clone()));
        }
        Ok(Self { dir, manifest })
    }

    pub fn memory(&self) -> PathBuf {
        self.dir.join(MEMORY_FILE)
    }
    pub fn state(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }
    pub fn disk(&self) -> PathBuf {
        self.dir.join(DISK_FILE)
    }
}

/// The file entry for `name` inside `dir`, with size and checksum.
pub fn file_entry(dir: &Path, name: &str) -> Result<FileEntry, SnapshotError> {
    let path = dir.join(name);
    let size = std::fs::metadata(&path)
        .map_err(|e| SnapshotError::Io(path.clone(), e))?
        .len();
    Ok(FileEntry {
        name: name.to_string(),
        size,
        blake3: hash_file(&path)?,
    })
}

fn hash_file(path: &Path) -> Result<String, SnapshotError> {
    let mut hasher = blake3::Hasher::new();
    hasher
        .update_mmap(path)
        .map_err(|e| SnapshotError::Io(path.to_path_buf(), e))?;
    Ok(hasher.finalize().to_hex().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_snapshot(dir: &Path) -> Manifest {
        let kernel = dir.join("vmlinuz");
        std::fs::write(&kernel, b"kernel").expect("write");
        for (name, bytes) in [
            (MEMORY_FILE, &b"memory"[..]),
            (STATE_FILE, b"state"),
            (DISK_FILE, b"disk"),
        ] {
            std::fs::write(dir.join(name), bytes).expect("write");
        }
        let manifest = Manifest {
            format_version: FORMAT_VERSION,
            created_unix: 0,
            shape: MachineShape::default(),
            accel: Accel::Tcg,
            kernel: kernel.clone(),
            kernel_version: "test".into(),
            initrd: kernel,
            cmdline: String::new(),
            qemu_version: "test".into(),
            nic: false,
            files: [MEMORY_FILE, STATE_FILE, DISK_FILE]
                .iter()
                .map(|n| file_entry(dir, n).expect("entry"))
                .collect(),
            balloon: false,
        };
        std::fs::write(
            dir.join(MANIFEST_FILE),
            serde_json::to_vec(&manifest).expect("json"),
        )
        .expect("write");
        manifest
    }

    #[test]
    fn opens_a_good_snapshot() {
        let dir = tempfile::tempdir().expect("tempdir");
        fake_snapshot(dir.path());
        Snapshot::open(dir.path(), Verify::Full).expect("open");
    }

    #[test]
    fn truncated_file_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        fake_snapshot(dir.path());
        std::fs::write(dir.path().join(MEMORY_FILE), b"mem").expect("write");
        let err = Snapshot::open(dir.path(), Verify::Sizes).expect_err("must refuse");
        assert!(matches!(err, SnapshotError::SizeMismatch { .. }), "{err}");
    }

    #[test]
    fn altered_file_fails_the_checksum() {
        let dir = tempfile::tempdir().expect("tempdir");
        fake_snapshot(dir.path());
        std::fs::write(dir.path().join(STATE_FILE), b"STATE").expect("write");
        Snapshot::open(dir.path(), Verify::Sizes).expect("sizes still match");
        let err = Snapshot::open(dir.path(), Verify::Full).expect_err("must refuse");
        assert!(matches!(err, SnapshotError::ChecksumMismatch(_)), "{err}");
    }

    #[test]
    fn missing_and_malformed() {
        let dir = tempfile::tempdir().expect("tempdir");
        fake_snapshot(dir.path());
        std::fs::remove_file(dir.path().join(DISK_FILE)).expect("rm");
        assert!(matches!(
            Snapshot::open(dir.path(), Verify::Sizes),
            Err(SnapshotError::MissingFile(_))
        ));
        std::fs::write(dir.path().join(MANIFEST_FILE), b"{").expect("write");
        assert!(matches!(
            Snapshot::open(dir.path(), Verify::Sizes),
            Err(SnapshotError::BadManifest(..))
        ));
    }
}

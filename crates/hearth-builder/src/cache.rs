//! The content-addressed step cache.
//!
//! Every instruction of a stage extends a key: BLAKE3 of the previous key, the
//! instruction after substitution and, where the step reads outside inputs,
//! their digest (the files a COPY selects, the environment a RUN sees). A
//! step that changes the filesystem ends with the build VM's disk overlay
//! frozen (see `hearth_vm::QemuDriver::checkpoint_disk`): that qcow2 file is
//! the step's layer, and `<key>.done` names it. A later build whose key
//! matches boots from the layer instead of running the steps again.
//!
//! Layers chain to their parents by absolute path, and image versions chain
//! to the layers they were built from, so layers are never rewritten or moved;
//! a marker is replaced atomically, so two builds racing on one key both
//! stay valid (each keeps its own chain).

use std::path::{Path, PathBuf};

use hearth_vm::disk;

/// Bumped when the meaning of a key changes, so old layers stop matching.
pub const CACHE_FORMAT: &str = "hearth-step-cache-2";

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cannot use the layer cache at {0}")]
    Dir(PathBuf, #[source] disk::DiskError),
    #[error("cannot record layer {0}")]
    Record(String, #[source] disk::DiskError),
}

/// A step-cache key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Key(String);

impl Key {
    /// The key of a stage's base.
    pub fn base(identity: &str) -> Key {
        Key::from_parts(&[CACHE_FORMAT, "FROM", identity])
    }

    /// This key extended by one step.
    pub fn then(&self, parts: &[&str]) -> Key {
        let mut all = vec![self.0.as_str()];
        all.extend_from_slice(parts);
        Key::from_parts(&all)
    }

    fn from_parts(parts: &[&str]) -> Key {
        let mut hasher = blake3::Hasher::new();
        for part in parts {
            hasher.update(&(part.len() as u64).to_le_bytes());
            hasher.update(part.as_bytes());
        }
        Key(hasher.finalize().to_hex()[..40].to_string())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The cache directory: `layers/` holds qcow2 layers and `.done` markers.
#[derive(Debug, Clone)]
pub struct LayerCache {
    dir: PathBuf,
}

impl LayerCache {
    pub fn open(dir: &Path) -> Result<LayerCache, CacheError> {
        let dir = dir.join("layers");
        disk::create_private_dir_all(&dir).map_err(|e| CacheError::Dir(dir.clone(), e))?;
        Ok(LayerCache { dir })
    }

    /// The layer recorded for `key`, if its file is still there.
    pub fn lookup(&self, key: &Key) -> Option<PathBuf> {
        let marker = self.dir.join(format!("{}.done", key.as_str()));
        let name = std::fs::read_to_string(marker).ok()?;
        let name = name.trim();
        // The marker names a file in this directory, nothing else.
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            return None;
        }
        let path = self.dir.join(name);
        path.is_file().then_some(path)
    }

    /// A new, unused file name for an overlay (`what` says what it is for).
    pub fn new_file(&self, what: &str) -> PathBuf {
        let mut random = [0u8; 8];
        // Uniqueness, not secrecy: fall back to time and pid if getrandom fails.
        if rustix::rand::getrandom(&mut random, rustix::rand::GetRandomFlags::empty()).is_err() {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            random = (now ^ u64::from(std::process::id())).to_le_bytes();
        }
        self.dir
            .join(format!("{what}-{}.qcow2", hex::encode(random)))
    }

    /// Records `layer` (a frozen overlay in this cache) as the result of `key`.
    pub fn record(&self, key: &Key, layer: &Path) -> Result<(), CacheError> {
        let name = layer
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let _ =
            std::fs::set_permissions(layer, std::os::unix::fs::PermissionsExt::from_mode(0o400));
        let marker = self.dir.join(format!("{}.done", key.as_str()));
        disk::write_atomic(&marker, name.as_bytes())
            .map_err(|e| CacheError::Record(key.as_str().to_string(), e))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_chain_and_separate_parts() {
        let base = Key::base("debian-12@abc");
        assert_eq!(base, Key::base("debian-12@abc"));
        assert_ne!(base, Key::base("debian-12@abd"));
        assert_ne!(base.then(&["ab", "c"]), base.then(&["a", "bc"]));
        assert_eq!(base.then(&["RUN x"]), base.then(&["RUN x"]));
        assert_ne!(
            base.then(&["RUN x"]).then(&["RUN y"]),
            base.then(&["RUN y"])
        );
    }

    #[test]
    fn record_and_lookup() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = LayerCache::open(dir.path()).expect("open");
        let key = Key::base("x").then(&["RUN true"]);
        assert_eq!(cache.lookup(&key), None);
        let file = cache.new_file("layer");
        assert_ne!(file, cache.new_file("layer"));
        std::fs::write(&file, b"qcow2").expect("write");
        cache.record(&key, &file).expect("record");
        assert_eq!(cache.lookup(&key), Some(file.clone()));
        std::fs::remove_file(&file).expect("rm");
        assert_eq!(
            cache.lookup(&key),
            None,
            "a marker without its file is a miss"
        );
        std::fs::write(
            cache.dir().join(format!("{}.done", key.as_str())),
            "../../etc/passwd",
        )
        .expect("write");
        assert_eq!(cache.lookup(&key), None);
    }
}

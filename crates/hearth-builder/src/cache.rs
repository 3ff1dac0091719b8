//! The content-addressed step cache.
//!
//! Every instruction of a stage extends a key: BLAKE3 of the previous key, the
//! instruction after substitution and, where the step reads outside inputs,
//! those inputs (the digest of the files a COPY selects, the environment a RUN
//! sees); [`crate::plan`] says which, in the encoding of [`KeyInput`]. A
//! step that changes the filesystem ends with the build VM's disk overlay
//! frozen (see `hearth_vm::Driver::checkpoint_disk`): that qcow2 file is
//! the step's layer, and `<key>.done` names it. A later build whose key
//! matches boots from the layer instead of running the steps again.
//!
//! Layers chain to their parents by absolute path, and image versions chain
//! to the layers they were built from, so layers are never rewritten or moved;
//! a marker is replaced atomically, so two builds racing on one key both
//! stay valid (each keeps its own chain).

use std::path::{Path, PathBuf};

use hearth_vm::disk;

/// Bumped when the meaning or the encoding of a key changes, so old layers
/// stop matching. Format 4: a stage's base key holds the account (format 3
/// shared layers across accounts); format 3: keys hash [`KeyInput`]'s
/// explicit encoding (format 2 hashed the instruction's `Debug` text).
pub const CACHE_FORMAT: &str = "hearth-step-cache-4";

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cannot use the layer cache at {0}")]
    Dir(PathBuf, #[source] disk::DiskError),
    #[error("cannot record layer {0}")]
    Record(String, #[source] disk::DiskError),
}

/// What one step adds to its parent's key, as bytes that decode one way only.
///
/// The encoding is a sequence of fields; a field is its length as a u64
/// (8 bytes, little-endian), then that many bytes:
///
/// - a string: its UTF-8 bytes;
/// - a flag: one byte, 0 or 1;
/// - an optional string: a flag (present), then the string when present;
/// - a list: its item count as a field of 8 bytes (u64, little-endian), then
///   each item (a string, or a pair of strings: key then value).
///
/// The first field is the step's tag (`RUN`, `COPY`, ...), which fixes the
/// fields that follow. A key is the first 40 hex digits of the BLAKE3 hash of
/// `field(CACHE_FORMAT) field("base") field(scope) field(identity)` for a
/// stage's base (the scope is the account a build runs for, so no layer is
/// ever shared between accounts), and
/// of `field(CACHE_FORMAT) field("step") field(parent key)` followed by the
/// step's fields for a step. Changing any of this changes every key: bump
/// [`CACHE_FORMAT`] with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInput(Vec<u8>);

impl KeyInput {
    /// A step's input, starting with its tag.
    pub fn new(tag: &str) -> KeyInput {
        KeyInput(Vec::new()).str(tag)
    }

    fn field(mut self, bytes: &[u8]) -> KeyInput {
        self.0
            .extend_from_slice(&(bytes.len() as u64).to_le_bytes());
        self.0.extend_from_slice(bytes);
        self
    }

    pub fn str(self, text: &str) -> KeyInput {
        self.field(text.as_bytes())
    }

    pub fn flag(self, value: bool) -> KeyInput {
        self.field(&[u8::from(value)])
    }

    pub fn opt(self, text: Option<&str>) -> KeyInput {
        match text {
            Some(text) => self.flag(true).str(text),
            None => self.flag(false),
        }
    }

    fn count(self, n: usize) -> KeyInput {
        self.field(&(n as u64).to_le_bytes())
    }

    pub fn list<S: AsRef<str>>(self, items: &[S]) -> KeyInput {
        items.iter().fold(self.count(items.len()), |input, item| {
            input.str(item.as_ref())
        })
    }

    pub fn pairs<K: AsRef<str>, V: AsRef<str>>(self, pairs: &[(K, V)]) -> KeyInput {
        pairs.iter().fold(self.count(pairs.len()), |input, (k, v)| {
            input.str(k.as_ref()).str(v.as_ref())
        })
    }

    /// The encoded bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// A step-cache key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key(String);

impl Key {
    /// The key of a stage's base, for builds of `scope` (the account).
    ///
    /// Every later key chains from this one, so a RUN's result — which may hold
    /// secrets the step generated — and every layer derived from it are found
    /// only by builds of the same account; another account with the same
    /// Dockerfile builds its own. Base images themselves (content-addressed,
    /// never written) stay shared.
    pub fn base(scope: &str, identity: &str) -> Key {
        Key::hash(
            KeyInput::new(CACHE_FORMAT)
                .str("base")
                .str(scope)
                .str(identity),
        )
    }

    /// This key extended by one step.
    pub fn then(&self, step: &KeyInput) -> Key {
        let mut input = KeyInput::new(CACHE_FORMAT).str("step").str(&self.0);
        input.0.extend_from_slice(step.as_bytes());
        Key::hash(input)
    }

    fn hash(input: KeyInput) -> Key {
        Key(blake3::hash(input.as_bytes()).to_hex()[..40].to_string())
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
        let name = std::fs::read_to_string(&marker).ok()?;
        let name = name.trim();
        // The marker names a file in this directory, nothing else.
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            return None;
        }
        let path = self.dir.join(name);
        if !path.is_file() {
            return None;
        }
        // A hit keeps the entry fresh for `sweep`'s age limit.
        if let Ok(file) = std::fs::File::options().append(true).open(&marker) {
            let _ = file.set_modified(std::time::SystemTime::now());
        }
        Some(path)
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
        // The layer's bytes are durable before the marker that names it: after
        // a power cut a marker never points at a layer missing writes.
        std::fs::File::open(layer)
            .and_then(|file| file.sync_all())
            .map_err(|e| {
                CacheError::Record(
                    key.as_str().to_string(),
                    disk::DiskError::Io(layer.to_path_buf(), e),
                )
            })?;
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

    fn run(text: &str) -> KeyInput {
        KeyInput::new("RUN").str(text)
    }

    #[test]
    fn keys_chain_and_separate_parts() {
        let base = Key::base("111122223333", "debian-12@abc");
        assert_eq!(base, Key::base("111122223333", "debian-12@abc"));
        assert_ne!(base, Key::base("111122223333", "debian-12@abd"));
        // Another account never shares a layer, even on the same base.
        assert_ne!(base, Key::base("444455556666", "debian-12@abc"));
        assert_ne!(
            base.then(&KeyInput::new("X").str("ab").str("c")),
            base.then(&KeyInput::new("X").str("a").str("bc"))
        );
        assert_eq!(base.then(&run("x")), base.then(&run("x")));
        assert_ne!(base.then(&run("x")).then(&run("y")), base.then(&run("y")));
        // A step's fields cannot pass for its parent's: the key is 40 hex digits.
        assert_eq!(base.as_str().len(), 40);
    }

    #[test]
    fn the_encoding_is_as_documented() {
        let input = KeyInput::new("T")
            .flag(true)
            .opt(None)
            .opt(Some("o"))
            .list(&["a"])
            .pairs(&[("k", "v")]);
        let field = |bytes: &[u8]| {
            let mut out = (bytes.len() as u64).to_le_bytes().to_vec();
            out.extend_from_slice(bytes);
            out
        };
        let expected = [
            field(b"T"),
            field(&[1]),
            field(&[0]),
            field(&[1]),
            field(b"o"),
            field(&1u64.to_le_bytes()),
            field(b"a"),
            field(&1u64.to_le_bytes()),
            field(b"k"),
            field(b"v"),
        ]
        .concat();
        assert_eq!(input.as_bytes(), expected);
        // Lists and optional values keep their boundaries.
        assert_ne!(
            KeyInput::new("T").list(&["a", "b"]).str("c"),
            KeyInput::new("T").list(&["a"]).str("b").str("c")
        );
        assert_ne!(
            KeyInput::new("T").opt(None).str("x"),
            KeyInput::new("T").opt(Some("x"))
        );
    }

    #[test]
    fn record_and_lookup() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = LayerCache::open(dir.path()).expect("open");
        let key = Key::base("t", "x").then(&run("true"));
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

/// The backing file a qcow2 image names (resolved against its directory),
/// or `None` for a raw file, a qcow2 without one, or anything unreadable.
pub fn qcow2_backing(path: &Path) -> Option<PathBuf> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(path).ok()?;
    let mut header = [0u8; 20];
    file.read_exact(&mut header).ok()?;
    if &header[..4] != b"QFI\xfb" {
        return None;
    }
    let offset = u64::from_be_bytes(header[8..16].try_into().ok()?);
    let size = u32::from_be_bytes(header[16..20].try_into().ok()?) as usize;
    // QEMU limits backing file names to 1023 bytes.
    if offset == 0 || size == 0 || size > 1023 {
        return None;
    }
    let mut name = vec![0u8; size];
    file.seek(SeekFrom::Start(offset)).ok()?;
    file.read_exact(&mut name).ok()?;
    let name = PathBuf::from(String::from_utf8(name).ok()?);
    Some(match path.parent() {
        Some(dir) if name.is_relative() => dir.join(name),
        _ => name,
    })
}

impl LayerCache {
    /// Removes what no build can use and no image needs: markers unused for
    /// longer than `max_age` (a hit refreshes them) or whose layer is gone,
    /// then layer files that no remaining marker records and no chain from
    /// `roots` (the disks of image versions and VMs) reaches. Run it only
    /// while no build runs (the server does at start): a running build's
    /// layers are not recorded yet. Returns the files removed.
    pub fn sweep(&self, roots: &[PathBuf], max_age: std::time::Duration) -> usize {
        let mut live = std::collections::HashSet::new();
        let mut starts: Vec<PathBuf> = roots.to_vec();
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return 0;
        };
        let entries: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        let mut removed = 0;
        // Temporary files of marker writes a crash interrupted (never read).
        for tmp in entries
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e == "tmp"))
        {
            if std::fs::remove_file(tmp).is_ok() {
                removed += 1;
            }
        }
        for marker in entries
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e == "done"))
        {
            let name = std::fs::read_to_string(marker).unwrap_or_default();
            let layer = self.dir.join(name.trim());
            let stale = std::fs::metadata(marker)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > max_age);
            if stale || name.trim().is_empty() || name.contains('/') || !layer.is_file() {
                if std::fs::remove_file(marker).is_ok() {
                    removed += 1;
                }
            } else {
                starts.push(layer);
            }
        }
        for start in starts {
            // Chains are short; the bound guards against a loop of names.
            let mut next = Some(start);
            for _ in 0..10_000 {
                let Some(path) = next.take() else { break };
                let path = std::fs::canonicalize(&path).unwrap_or(path);
                if !live.insert(path.clone()) {
                    break;
                }
                next = qcow2_backing(&path);
            }
        }
        let dir = std::fs::canonicalize(&self.dir).unwrap_or(self.dir.clone());
        for file in entries
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e == "qcow2"))
        {
            let path = std::fs::canonicalize(file).unwrap_or(file.clone());
            if path.starts_with(&dir) && !live.contains(&path) && std::fs::remove_file(file).is_ok()
            {
                removed += 1;
            }
        }
        removed
    }
}

#[cfg(test)]
mod sweep_tests {
    use super::*;

    async fn overlay(path: &Path, backing: &Path, format: hearth_vm::disk::BackingFormat) {
        hearth_vm::disk::create_overlay(path, backing, format)
            .await
            .expect("qemu-img create");
    }

    #[test]
    fn sweep_removes_temporary_files_of_interrupted_marker_writes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = LayerCache::open(dir.path()).expect("cache");
        let tmp = cache.dir().join("abc.tmp");
        std::fs::write(&tmp, "layer-1.qcow2").expect("tmp");
        assert_eq!(cache.sweep(&[], std::time::Duration::from_secs(3600)), 1);
        assert!(!tmp.exists());
    }

    #[tokio::test]
    async fn sweep_keeps_recorded_and_referenced_chains() {
        use hearth_vm::disk::BackingFormat::{Qcow2, Raw};
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().join("base.ext4");
        std::fs::write(&base, vec![0u8; 1 << 20]).expect("base");
        let cache = LayerCache::open(dir.path()).expect("open");
        // boot <- recorded layer; boot2 <- image's layer (unrecorded) <- image disk;
        // an orphan, and a marker whose layer is gone.
        let boot = cache.new_file("boot");
        overlay(&boot, &base, Raw).await;
        let recorded = cache.new_file("layer");
        overlay(&recorded, &boot, Qcow2).await;
        cache
            .record(&Key::base("t", "a"), &recorded)
            .expect("record");
        let boot2 = cache.new_file("boot");
        overlay(&boot2, &base, Raw).await;
        let used = cache.new_file("layer");
        overlay(&used, &boot2, Qcow2).await;
        let image_disk = dir.path().join("image-disk.qcow2");
        overlay(&image_disk, &used, Qcow2).await;
        let orphan = cache.new_file("layer");
        overlay(&orphan, &boot, Qcow2).await;
        std::fs::write(
            cache
                .dir()
                .join(format!("{}.done", Key::base("t", "gone").as_str())),
            "layer-gone.qcow2",
        )
        .expect("marker");
        assert_eq!(qcow2_backing(&recorded), Some(boot.clone()));
        assert_eq!(qcow2_backing(&base), None);

        let day = std::time::Duration::from_secs(86_400);
        let removed = cache.sweep(std::slice::from_ref(&image_disk), day);
        assert_eq!(removed, 2, "the orphan and the dangling marker");
        for kept in [&boot, &recorded, &boot2, &used, &image_disk, &base] {
            assert!(kept.exists(), "{} was removed", kept.display());
        }
        assert!(!orphan.exists());
        assert_eq!(cache.lookup(&Key::base("t", "a")), Some(recorded.clone()));

        // An entry unused for longer than the limit goes, with the layers only
        // it kept (the image's chain stays).
        let marker = cache
            .dir()
            .join(format!("{}.done", Key::base("t", "a").as_str()));
        let old = std::time::SystemTime::now() - 2 * day;
        std::fs::File::options()
            .append(true)
            .open(&marker)
            .and_then(|f| f.set_modified(old))
            .expect("age the marker");
        let removed = cache.sweep(std::slice::from_ref(&image_disk), day);
        assert_eq!(
            removed, 3,
            "the marker, its layer and the boot layer under it"
        );
        assert!(!recorded.exists() && !boot.exists());
        for kept in [&boot2, &used, &image_disk] {
            assert!(kept.exists(), "{} was removed", kept.display());
        }
    }
}

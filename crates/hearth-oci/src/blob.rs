//! The content-addressed blob cache (`cache_dir/blobs/sha256/<hex>`) and blob
//! downloads: streamed to a temporary file beside the cache entry, hashed on
//! the way, renamed into place only when the size and sha256 match.

use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt;

use crate::registry::{Registry, RegistryError};
use crate::transport::next_chunk;

/// Why a blob could not be had.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("cannot download {digest}")]
    Download {
        digest: String,
        #[source]
        source: RegistryError,
    },
    #[error("blob {digest} does not match its digest")]
    DigestMismatch { digest: String },
    #[error("blob {digest} is larger than its declared {size} bytes")]
    TooLarge { digest: String, size: u64 },
    #[error("blob {digest} is shorter than its declared {size} bytes")]
    Truncated { digest: String, size: u64 },
    #[error("invalid digest {0:?}")]
    InvalidDigest(String),
    #[error("blob cache error at {path:?}")]
    Cache {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The on-disk cache.
#[derive(Debug, Clone)]
pub(crate) struct BlobCache {
    dir: PathBuf,
}

/// Where a blob came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    Cache,
    Downloaded,
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Removes a partial download unless it was renamed into place.
struct TempFile {
    path: PathBuf,
    keep: bool,
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.keep {
            let _ = fs::remove_file(&self.path);
        }
    }
}

fn cache_error(path: &Path) -> impl FnOnce(io::Error) -> BlobError + '_ {
    move |source| BlobError::Cache {
        path: path.to_owned(),
        source,
    }
}

/// The hex part of a `sha256:` digest, checked.
pub(crate) fn digest_hex(digest: &str) -> Result<&str, BlobError> {
    crate::reference::parse_digest(digest)
        .map_err(|_| BlobError::InvalidDigest(digest.to_owned()))?;
    Ok(&digest["sha256:".len()..])
}

/// `sha256:<hex>` of `bytes`.
pub(crate) fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

impl BlobCache {
    pub(crate) fn open(cache_dir: &Path) -> Result<Self, BlobError> {
        let dir = cache_dir.join("blobs").join("sha256");
        fs::create_dir_all(&dir).map_err(cache_error(&dir))?;
        Ok(BlobCache { dir })
    }

    pub(crate) fn path(&self, digest: &str) -> Result<PathBuf, BlobError> {
        Ok(self.dir.join(digest_hex(digest)?))
    }

    fn temp_path(&self, hex: &str) -> PathBuf {
        let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        self.dir
            .join(format!(".partial-{hex}-{}-{n}", std::process::id()))
    }

    /// A cached copy of `digest` whose size and hash match, if there is one.
    /// A corrupt copy is deleted.
    pub(crate) async fn cached(
        &self,
        digest: &str,
        size: u64,
    ) -> Result<Option<PathBuf>, BlobError> {
        let path = self.path(digest)?;
        let expected = digest.to_owned();
        let check = path.clone();
        let matches = tokio::task::spawn_blocking(move || verify_file(&check, &expected, size))
            .await
            .map_err(|e| BlobError::Cache {
                path: path.clone(),
                source: io::Error::other(e),
            })??;
        if matches {
            return Ok(Some(path));
        }
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(cache_error(&path)(e)),
        }
        Ok(None)
    }

    /// Reads a small cached blob (a manifest or a configuration) whose hash
    /// matches; `None` when it is missing or corrupt.
    pub(crate) fn read_small(
        &self,
        digest: &str,
        limit: u64,
    ) -> Result<Option<Vec<u8>>, BlobError> {
        let path = self.path(digest)?;
        let file = match fs::File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(cache_error(&path)(e)),
        };
        let mut bytes = Vec::new();
        file.take(limit + 1)
            .read_to_end(&mut bytes)
            .map_err(cache_error(&path))?;
        if bytes.len() as u64 > limit || sha256_digest(&bytes) != digest {
            let _ = fs::remove_file(&path);
            return Ok(None);
        }
        Ok(Some(bytes))
    }

    /// Stores a small blob already checked against `digest`.
    pub(crate) fn store_small(&self, digest: &str, bytes: &[u8]) -> Result<(), BlobError> {
        let path = self.path(digest)?;
        let temp = TempFile {
            path: self.temp_path(digest_hex(digest)?),
            keep: false,
        };
        fs::write(&temp.path, bytes).map_err(cache_error(&temp.path))?;
        fs::rename(&temp.path, &path).map_err(cache_error(&path))?;
        Ok(())
    }

    /// The path of a verified copy of the blob, downloading it when the cache
    /// has none. `on_download` is called before a download starts.
    pub(crate) async fn fetch(
        &self,
        registry: &Registry,
        digest: &str,
        size: u64,
        on_download: impl FnOnce(),
    ) -> Result<(PathBuf, Source), BlobError> {
        if let Some(path) = self.cached(digest, size).await? {
            return Ok((path, Source::Cache));
        }
        on_download();
        let path = self.path(digest)?;
        let mut temp = TempFile {
            path: self.temp_path(digest_hex(digest)?),
            keep: false,
        };
        let download = |source| BlobError::Download {
            digest: digest.to_owned(),
            source,
        };
        let response = registry
            .get(&format!("blobs/{digest}"), None, digest)
            .await
            .map_err(download)?;
        let mut body = response.into_body();
        let mut file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temp.path)
            .await
            .map_err(cache_error(&temp.path))?;
        let mut hasher = Sha256::new();
        let mut received: u64 = 0;
        let host = registry.host().to_owned();
        while let Some(chunk) = next_chunk(&mut body, &host)
            .await
            .map_err(|e| download(e.into()))?
        {
            received += chunk.len() as u64;
            if received > size {
                return Err(BlobError::TooLarge {
                    digest: digest.to_owned(),
                    size,
                });
            }
            hasher.update(&chunk);
            file.write_all(&chunk)
                .await
                .map_err(cache_error(&temp.path))?;
        }
        if received < size {
            return Err(BlobError::Truncated {
                digest: digest.to_owned(),
                size,
            });
        }
        if format!("sha256:{}", hex::encode(hasher.finalize())) != digest {
            return Err(BlobError::DigestMismatch {
                digest: digest.to_owned(),
            });
        }
        file.sync_all().await.map_err(cache_error(&temp.path))?;
        drop(file);
        fs::rename(&temp.path, &path).map_err(cache_error(&path))?;
        temp.keep = true;
        Ok((path, Source::Downloaded))
    }
}

/// Whether the file at `path` exists with `size` bytes hashing to `digest`.
fn verify_file(path: &Path, digest: &str, size: u64) -> Result<bool, BlobError> {
    let mut file = match fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(cache_error(path)(e)),
    };
    let len = file.metadata().map_err(cache_error(path))?.len();
    if len != size {
        return Ok(false);
    }
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = file.read(&mut buf).map_err(cache_error(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(format!("sha256:{}", hex::encode(hasher.finalize())) == digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn cache_keeps_only_matching_blobs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = BlobCache::open(dir.path()).expect("cache");
        let digest = sha256_digest(b"hello");
        assert_eq!(cache.cached(&digest, 5).await.expect("lookup"), None);
        cache.store_small(&digest, b"hello").expect("store");
        let path = cache.path(&digest).expect("path");
        assert_eq!(
            cache.cached(&digest, 5).await.expect("lookup"),
            Some(path.clone())
        );
        assert_eq!(
            cache.read_small(&digest, 100).expect("read").as_deref(),
            Some(&b"hello"[..])
        );
        // Wrong declared size: not a hit (and the copy is dropped).
        assert_eq!(cache.cached(&digest, 6).await.expect("lookup"), None);
        assert!(!path.exists());
        // Corrupt content with the right size: not a hit, removed.
        fs::write(&path, b"jello").expect("corrupt");
        assert_eq!(cache.cached(&digest, 5).await.expect("lookup"), None);
        assert!(!path.exists());
        fs::write(&path, b"jello").expect("corrupt");
        assert_eq!(cache.read_small(&digest, 100).expect("read"), None);
        assert!(matches!(
            cache.path("sha256:zz"),
            Err(BlobError::InvalidDigest(_))
        ));
        assert!(matches!(
            cache.path("sha256:../../etc"),
            Err(BlobError::InvalidDigest(_))
        ));
    }
}

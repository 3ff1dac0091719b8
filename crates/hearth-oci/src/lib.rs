//! Pulls OCI images from a registry through the distribution API and unpacks
//! them into a directory, for Dockerfile `FROM` lines that name a registry image.
//!
//! [`pull`] resolves the reference's manifest (an OCI image index or Docker
//! manifest list is narrowed to linux/amd64), downloads the configuration and
//! the layers into a content-addressed cache (`cache_dir/blobs/sha256/<hex>`,
//! every blob checked against its sha256 digest and declared size, streamed to
//! disk, never whole in memory; a cached blob is re-hashed before use and
//! downloaded again if it does not match), then applies the layers in order to
//! an empty directory. Layers are hostile input (the rules are documented in
//! `src/unpack.rs`): no path escapes the destination (`..` is refused, a
//! leading `/` is dropped), no symbolic link is ever followed while writing (an
//! entry whose parent is a symlink fails), hard links must point inside, device
//! nodes and FIFOs are skipped, OCI whiteouts and opaque directories apply,
//! modes (setuid included) and mtimes are kept, and [`Limits`] cap
//! decompressed bytes and entries as they are produced.
//!
//! Ownership: an unprivileged process cannot `chown`, so [`PulledImage::owners`]
//! lists every entry whose uid or gid is not 0, with its mode and whether the
//! `lchown` worked (it does when running as root). Whoever builds the root
//! filesystem from the tree applies the ones not `applied`.

mod blob;
mod manifest;
mod reference;
mod registry;
mod transport;
mod unpack;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};
use http::header::CONTENT_TYPE;

pub use blob::BlobError;
pub use manifest::{ImageConfig, ManifestError};
pub use reference::{Reference, ReferenceError};
pub use registry::RegistryError;
pub use transport::HttpError;
pub use unpack::{Ownership, UnpackError};

use blob::{sha256_digest, BlobCache, Source};
use manifest::{Compression, Manifest};
use registry::{Credentials, Registry};
use unpack::{UnpackLimits, Unpacker};

/// Largest manifest or index accepted.
const MAX_MANIFEST_BYTES: u64 = 4 * 1024 * 1024;
/// Largest image configuration accepted.
const MAX_CONFIG_BYTES: u64 = 8 * 1024 * 1024;
/// Blobs downloaded at once.
const PARALLEL_DOWNLOADS: usize = 3;

/// Where to pull from.
#[derive(Clone)]
pub struct RegistryConfig {
    /// `host[:port]`. `docker.io` means Docker Hub (`registry-1.docker.io`,
    /// one-component names get `library/`).
    pub registry: String,
    /// Plain HTTP (for a registry on loopback); otherwise HTTPS checked against
    /// the webpki roots.
    pub insecure_http: bool,
    pub username: Option<String>,
    pub password: Option<String>,
}

impl std::fmt::Debug for RegistryConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryConfig")
            .field("registry", &self.registry)
            .field("insecure_http", &self.insecure_http)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// What a pull may download and unpack.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Per layer: its compressed size, and its decompressed tar stream.
    pub max_layer_bytes: u64,
    /// All layers: compressed, and decompressed.
    pub max_total_bytes: u64,
    pub max_layers: usize,
    /// Tar entries in all layers.
    pub max_entries: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_layer_bytes: 8 << 30,
            max_total_bytes: 16 << 30,
            max_layers: 128,
            max_entries: 2_000_000,
        }
    }
}

/// A pulled and unpacked image.
#[derive(Debug, Clone)]
pub struct PulledImage {
    /// Digest of what the reference resolved to (an index or a manifest):
    /// `name@digest` pulls the same image again.
    pub digest: String,
    /// Digest of the linux/amd64 image manifest (equal to `digest` when the
    /// reference named a manifest, not an index).
    pub manifest_digest: String,
    pub config: ImageConfig,
    /// Entries whose uid or gid is not 0, sorted by path.
    pub owners: Vec<Ownership>,
    pub stats: PullStats,
}

/// What a pull did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PullStats {
    /// Blobs (configuration and layers) downloaded, and their bytes.
    pub blobs_downloaded: usize,
    pub bytes_downloaded: u64,
    /// Blobs found in the cache.
    pub blobs_cached: usize,
    pub layers: usize,
    /// Tar entries applied, and decompressed tar bytes.
    pub entries: u64,
    pub unpacked_bytes: u64,
    /// Device nodes and FIFOs left out.
    pub skipped_special: u64,
}

/// Why a pull failed.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error("invalid image reference")]
    Reference(#[from] ReferenceError),
    #[error("reference names registry {0:?}, not the configured one")]
    OtherRegistry(String),
    #[error("registry request failed")]
    Registry(#[from] RegistryError),
    #[error("unusable image")]
    Manifest(#[from] ManifestError),
    #[error("manifest {0} does not match its digest")]
    ManifestDigest(String),
    #[error("an image index points to another index")]
    NestedIndex,
    #[error("image has {count} layers, more than {max}")]
    TooManyLayers { count: usize, max: usize },
    #[error("layer {digest} is {size} bytes, more than {max}")]
    LayerTooLarge { digest: String, size: u64, max: u64 },
    #[error("image is {size} bytes compressed, more than {max}")]
    ImageTooLarge { size: u64, max: u64 },
    #[error("image configuration is larger than {MAX_CONFIG_BYTES} bytes")]
    ConfigTooLarge,
    #[error("cannot fetch a blob")]
    Blob(#[from] BlobError),
    #[error("cannot unpack layer {digest}")]
    Layer {
        digest: String,
        #[source]
        source: UnpackError,
    },
    #[error("cannot unpack the image")]
    Unpack(#[from] UnpackError),
    #[error("the unpacking task failed")]
    UnpackTask,
}

/// Parses `[registry/]name[:tag][@digest]` (e.g. `library/python:3.11`,
/// `myapp@sha256:...`); a bare name means `:latest`.
pub fn parse_reference(s: &str) -> Result<Reference, OciError> {
    Ok(reference::parse(s)?)
}

fn is_docker_hub(host: &str) -> bool {
    matches!(
        host,
        "docker.io" | "index.docker.io" | "registry-1.docker.io"
    )
}

/// The host to connect to for a configured registry name.
fn registry_host(registry: &str) -> &str {
    if is_docker_hub(registry) {
        "registry-1.docker.io"
    } else {
        registry
    }
}

fn short(digest: &str) -> &str {
    digest.get(..19).unwrap_or(digest)
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Sets the flag when dropped: a cancelled pull stops its unpacking thread.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Resolves `reference` on the configured registry, downloads what the cache
/// lacks, and unpacks the layers in order into `dest`, an existing empty
/// directory. `progress` gets one line per step (`resolving ...`,
/// `downloading <digest> (<size>)`, `cached <digest>`, `unpacking layer i/n ...`).
pub async fn pull(
    config: &RegistryConfig,
    reference: &Reference,
    cache_dir: &Path,
    dest: &Path,
    limits: &Limits,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<PulledImage, OciError> {
    if let Some(named) = &reference.registry {
        if registry_host(named) != registry_host(&config.registry) {
            return Err(OciError::OtherRegistry(named.clone()));
        }
    }
    let mut repository = reference.repository.clone();
    if is_docker_hub(&config.registry) && !repository.contains('/') {
        repository = format!("library/{repository}");
    }
    // Refuse a bad destination before any download.
    let empty = std::fs::read_dir(dest)
        .map(|mut d| d.next().is_none())
        .unwrap_or(false);
    if !empty {
        return Err(UnpackError::Destination(dest.to_owned()).into());
    }
    let cache = BlobCache::open(cache_dir)?;
    let credentials = config.username.as_ref().map(|username| Credentials {
        username: username.clone(),
        password: config.password.clone().unwrap_or_default(),
    });
    let registry = Registry::new(
        registry_host(&config.registry),
        config.insecure_http,
        &repository,
        credentials,
    )?;

    progress(&format!(
        "resolving {}/{repository}:{}",
        registry.host(),
        reference.manifest_reference()
    ));
    let (digest, top) = fetch_manifest(
        &registry,
        &cache,
        reference.manifest_reference(),
        reference.digest.as_deref(),
    )
    .await?;
    let (manifest_digest, image) = match top {
        Manifest::Image(image) => (digest.clone(), image),
        Manifest::Index(list) => {
            let chosen = manifest::select_platform(&list)?;
            match fetch_manifest(&registry, &cache, &chosen.digest, Some(&chosen.digest)).await? {
                (d, Manifest::Image(image)) => (d, image),
                (_, Manifest::Index(_)) => return Err(OciError::NestedIndex),
            }
        }
    };

    if image.layers.len() > limits.max_layers {
        return Err(OciError::TooManyLayers {
            count: image.layers.len(),
            max: limits.max_layers,
        });
    }
    let mut compressed_total: u64 = 0;
    let mut layers = Vec::with_capacity(image.layers.len());
    for layer in &image.layers {
        if layer.size > limits.max_layer_bytes {
            return Err(OciError::LayerTooLarge {
                digest: layer.digest.clone(),
                size: layer.size,
                max: limits.max_layer_bytes,
            });
        }
        compressed_total = compressed_total.saturating_add(layer.size);
        blob::digest_hex(&layer.digest)?;
        layers.push((
            layer.clone(),
            manifest::layer_compression(&layer.media_type)?,
        ));
    }
    if compressed_total > limits.max_total_bytes {
        return Err(OciError::ImageTooLarge {
            size: compressed_total,
            max: limits.max_total_bytes,
        });
    }
    if image.config.size > MAX_CONFIG_BYTES {
        return Err(OciError::ConfigTooLarge);
    }

    let downloaded = AtomicUsize::new(0);
    let downloaded_bytes = AtomicU64::new(0);
    let cached = AtomicUsize::new(0);
    let fetch = |digest: String, size: u64| {
        let (cache, registry) = (&cache, &registry);
        let (downloaded, downloaded_bytes, cached) = (&downloaded, &downloaded_bytes, &cached);
        async move {
            let (path, source) = cache
                .fetch(registry, &digest, size, || {
                    progress(&format!("downloading {} ({})", short(&digest), human(size)));
                })
                .await?;
            match source {
                Source::Downloaded => {
                    downloaded.fetch_add(1, Ordering::Relaxed);
                    downloaded_bytes.fetch_add(size, Ordering::Relaxed);
                }
                Source::Cache => {
                    cached.fetch_add(1, Ordering::Relaxed);
                    progress(&format!("cached {}", short(&digest)));
                }
            }
            Ok::<PathBuf, BlobError>(path)
        }
    };

    let config_path = fetch(image.config.digest.clone(), image.config.size).await?;
    let config_bytes = std::fs::read(&config_path).map_err(|source| BlobError::Cache {
        path: config_path.clone(),
        source,
    })?;
    let image_config = manifest::parse_config(&config_bytes)?;

    // Owned (digest, size) pairs: a closure over borrowed items would make
    // this future not Send for every lifetime (so not spawnable).
    let wanted: Vec<(String, u64)> = layers
        .iter()
        .map(|(layer, _)| (layer.digest.clone(), layer.size))
        .collect();
    let paths: Vec<PathBuf> =
        futures::stream::iter(wanted.into_iter().map(|(digest, size)| fetch(digest, size)))
            .buffered(PARALLEL_DOWNLOADS)
            .try_collect()
            .await?;

    let unpack_limits = UnpackLimits {
        max_layer_bytes: limits.max_layer_bytes,
        max_total_bytes: limits.max_total_bytes,
        max_entries: limits.max_entries,
    };
    let plan: Vec<(PathBuf, Compression, String)> = paths
        .into_iter()
        .zip(&layers)
        .map(|(path, (layer, compression))| (path, *compression, layer.digest.clone()))
        .collect();
    let layer_count = plan.len();
    let cancel = Arc::new(AtomicBool::new(false));
    let _cancel_on_drop = CancelOnDrop(cancel.clone());
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let dest = dest.to_owned();
    let task = tokio::task::spawn_blocking(move || -> Result<unpack::Unpacked, OciError> {
        let mut unpacker = Unpacker::new(&dest, unpack_limits, cancel)?;
        for (i, (path, compression, digest)) in plan.iter().enumerate() {
            let _ = tx.send(format!(
                "unpacking layer {}/{} {}",
                i + 1,
                plan.len(),
                short(digest)
            ));
            let file = std::fs::File::open(path).map_err(|source| BlobError::Cache {
                path: path.clone(),
                source,
            })?;
            unpacker
                .apply_layer(file, *compression)
                .map_err(|source| OciError::Layer {
                    digest: digest.clone(),
                    source,
                })?;
        }
        Ok(unpacker.finish()?)
    });
    while let Some(message) = rx.recv().await {
        progress(&message);
    }
    let unpacked = task.await.map_err(|_| OciError::UnpackTask)??;

    Ok(PulledImage {
        digest,
        manifest_digest,
        config: image_config,
        owners: unpacked.owners,
        stats: PullStats {
            blobs_downloaded: downloaded.load(Ordering::Relaxed),
            bytes_downloaded: downloaded_bytes.load(Ordering::Relaxed),
            blobs_cached: cached.load(Ordering::Relaxed),
            layers: layer_count,
            entries: unpacked.entries,
            unpacked_bytes: unpacked.bytes,
            skipped_special: unpacked.skipped_special,
        },
    })
}

/// Fetches a manifest by tag or digest; a digest-pinned one comes from the
/// cache when there. Returns its digest (checked against `expected`).
async fn fetch_manifest(
    registry: &Registry,
    cache: &BlobCache,
    reference: &str,
    expected: Option<&str>,
) -> Result<(String, Manifest), OciError> {
    if let Some(expected) = expected {
        if let Some(bytes) = cache.read_small(expected, MAX_MANIFEST_BYTES)? {
            return Ok((expected.to_owned(), manifest::parse_manifest(&bytes, None)?));
        }
    }
    let what = format!("manifest {}:{reference}", registry.repository());
    let response = registry
        .get(
            &format!("manifests/{reference}"),
            Some(manifest::ACCEPT_MANIFESTS),
            &what,
        )
        .await?;
    let content_type = response
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = transport::read_body(response, registry.host(), MAX_MANIFEST_BYTES)
        .await
        .map_err(RegistryError::from)?;
    let digest = sha256_digest(&body);
    if expected.is_some_and(|expected| expected != digest) {
        return Err(OciError::ManifestDigest(
            expected.unwrap_or_default().to_owned(),
        ));
    }
    let parsed = manifest::parse_manifest(&body, content_type.as_deref())?;
    cache.store_small(&digest, &body)?;
    Ok((digest, parsed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_sizes_and_digests() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(3 << 20), "3.0 MiB");
        assert_eq!(short("sha256:0123456789abcdef"), "sha256:0123456789ab");
        assert_eq!(short("x"), "x");
    }

    #[test]
    fn maps_docker_hub() {
        assert_eq!(registry_host("docker.io"), "registry-1.docker.io");
        assert_eq!(registry_host("127.0.0.1:5000"), "127.0.0.1:5000");
    }

    #[test]
    fn redacts_the_password() {
        let config = RegistryConfig {
            registry: "r".into(),
            insecure_http: false,
            username: Some("u".into()),
            password: Some("hunter2".into()),
        };
        assert!(!format!("{config:?}").contains("hunter2"));
    }

    #[tokio::test]
    async fn refuses_other_registries_and_busy_destinations() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = RegistryConfig {
            registry: "127.0.0.1:1".into(),
            insecure_http: true,
            username: None,
            password: None,
        };
        let quiet = |_: &str| {};
        let other = parse_reference("example.com/a:b").expect("reference");
        let err = pull(
            &config,
            &other,
            dir.path(),
            dir.path(),
            &Limits::default(),
            &quiet,
        )
        .await
        .expect_err("other registry");
        assert!(matches!(err, OciError::OtherRegistry(_)), "{err:?}");
        std::fs::write(dir.path().join("file"), b"x").expect("write");
        let mine = parse_reference("a:b").expect("reference");
        let err = pull(
            &config,
            &mine,
            dir.path(),
            dir.path(),
            &Limits::default(),
            &quiet,
        )
        .await
        .expect_err("busy destination");
        assert!(
            matches!(err, OciError::Unpack(UnpackError::Destination(_))),
            "{err:?}"
        );
    }
}

//! Test support: a real `docker-registry` (Debian's package of the CNCF
//! distribution registry) on loopback, and a pusher speaking the distribution
//! API over plain HTTP/1.1.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// Debian's package installs it here; `HEARTH_DOCKER_REGISTRY` overrides.
pub fn registry_binary() -> PathBuf {
    std::env::var_os("HEARTH_DOCKER_REGISTRY")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/docker-registry"))
}

pub fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// A `docker-registry serve` process with its storage in a temporary
/// directory; killed when dropped.
pub struct LocalRegistry {
    child: Child,
    pub addr: String,
    pub dir: tempfile::TempDir,
}

impl LocalRegistry {
    /// Starts the registry; panics with a pointer to scripts/setup-host when
    /// the package is missing (this test must not be skipped silently).
    pub fn start() -> LocalRegistry {
        let binary = registry_binary();
        assert!(
            binary.exists(),
            "{} is missing: run scripts/setup-host (it installs Debian's docker-registry package)",
            binary.display()
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let port = {
            let listener = TcpListener::bind("127.0.0.1:0").expect("free port");
            listener.local_addr().expect("addr").port()
        };
        let addr = format!("127.0.0.1:{port}");
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
                 http:\n  addr: {addr}\n",
                dir.path().join("data").display()
            ),
        )
        .expect("config");
        let log = std::fs::File::create(dir.path().join("registry.log")).expect("log");
        let child = Command::new(&binary)
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start docker-registry");
        let mut registry = LocalRegistry { child, addr, dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(response) = registry.request("GET", "/v2/", &[], &[]) {
                if response.status == 200 {
                    break;
                }
            }
            if let Ok(Some(status)) = registry.child.try_wait() {
                panic!("docker-registry exited with {status}: {}", registry.log());
            }
            assert!(
                Instant::now() < deadline,
                "docker-registry did not start: {}",
                registry.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        registry
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// Where the registry keeps a blob's bytes.
    pub fn blob_data_path(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.dir
            .path()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    /// One HTTP/1.1 exchange (`Connection: close`).
    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> std::io::Result<HttpResponse> {
        let mut stream = TcpStream::connect(&self.addr)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: {}\r\n",
            self.addr,
            body.len()
        );
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes())?;
        stream.write_all(body)?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw)?;
        let split = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or_else(|| std::io::Error::other("no response head"))?;
        let head = String::from_utf8_lossy(&raw[..split]).into_owned();
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other("bad status line"))?;
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        Ok(HttpResponse {
            status,
            headers,
            body: raw[split + 4..].to_vec(),
        })
    }

    /// Pushes a blob (monolithic upload: POST, then PUT with the digest).
    pub fn push_blob(&self, name: &str, bytes: &[u8]) -> String {
        let digest = sha256(bytes);
        let started = self
            .request("POST", &format!("/v2/{name}/blobs/uploads/"), &[], &[])
            .expect("start upload");
        assert_eq!(
            started.status,
            202,
            "start upload: {}",
            String::from_utf8_lossy(&started.body)
        );
        let location = started.headers.get("location").expect("upload location");
        // The Location may be absolute: keep its path and query.
        let path = match location.split_once("://") {
            Some((_, rest)) => rest.find('/').map_or("/", |i| &rest[i..]).to_owned(),
            None => location.clone(),
        };
        let separator = if path.contains('?') { '&' } else { '?' };
        let put = self
            .request(
                "PUT",
                &format!("{path}{separator}digest={digest}"),
                &[("Content-Type", "application/octet-stream")],
                bytes,
            )
            .expect("finish upload");
        assert_eq!(
            put.status,
            201,
            "finish upload: {}",
            String::from_utf8_lossy(&put.body)
        );
        digest
    }

    /// Pushes a manifest (or index) under `reference` (a tag or its digest).
    pub fn push_manifest(
        &self,
        name: &str,
        reference: &str,
        media_type: &str,
        bytes: &[u8],
    ) -> String {
        let put = self
            .request(
                "PUT",
                &format!("/v2/{name}/manifests/{reference}"),
                &[("Content-Type", media_type)],
                bytes,
            )
            .expect("push manifest");
        assert_eq!(
            put.status,
            201,
            "push manifest: {}",
            String::from_utf8_lossy(&put.body)
        );
        sha256(bytes)
    }
}

impl Drop for LocalRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct HttpResponse {
    pub status: u16,
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
}

/// A tar layer built in memory.
pub struct LayerBuilder {
    builder: tar::Builder<Vec<u8>>,
}

impl Default for LayerBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl LayerBuilder {
    pub fn new() -> Self {
        LayerBuilder {
            builder: tar::Builder::new(Vec::new()),
        }
    }

    fn header(kind: tar::EntryType, size: u64, mode: u32, owner: (u64, u64)) -> tar::Header {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(kind);
        header.set_size(size);
        header.set_mode(mode);
        header.set_mtime(1_700_000_000);
        header.set_uid(owner.0);
        header.set_gid(owner.1);
        header
    }

    pub fn dir(mut self, path: &str) -> Self {
        let mut header = Self::header(tar::EntryType::Directory, 0, 0o755, (0, 0));
        self.builder
            .append_data(&mut header, path, &b""[..])
            .expect("dir");
        self
    }

    pub fn file(self, path: &str, data: &[u8]) -> Self {
        self.file_with(path, data, 0o644, (0, 0))
    }

    pub fn file_with(mut self, path: &str, data: &[u8], mode: u32, owner: (u64, u64)) -> Self {
        let mut header = Self::header(tar::EntryType::Regular, data.len() as u64, mode, owner);
        self.builder
            .append_data(&mut header, path, data)
            .expect("file");
        self
    }

    pub fn symlink(mut self, path: &str, target: &str) -> Self {
        let mut header = Self::header(tar::EntryType::Symlink, 0, 0o777, (0, 0));
        self.builder
            .append_link(&mut header, path, target)
            .expect("symlink");
        self
    }

    pub fn tar(self) -> Vec<u8> {
        self.builder.into_inner().expect("tar")
    }
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(data).expect("gzip");
    encoder.finish().expect("gzip")
}

pub fn zstd(data: &[u8]) -> Vec<u8> {
    ruzstd::encoding::compress_to_vec(data, ruzstd::encoding::CompressionLevel::Fastest)
}

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// A pushed layer: its blob and media type.
pub struct PushedLayer {
    pub media_type: &'static str,
    pub digest: String,
    pub size: usize,
    pub diff_id: String,
}

/// Pushes layers, a config and a manifest under `tag`; returns the
/// manifest's digest and bytes.
pub fn push_image(
    registry: &LocalRegistry,
    name: &str,
    tag: &str,
    manifest_type: &str,
    layers: &[(&'static str, Vec<u8>, Vec<u8>)],
    config: serde_json::Value,
) -> (String, Vec<u8>) {
    let pushed: Vec<PushedLayer> = layers
        .iter()
        .map(|(media_type, tar, blob)| PushedLayer {
            media_type,
            digest: registry.push_blob(name, blob),
            size: blob.len(),
            diff_id: sha256(tar),
        })
        .collect();
    let mut config = config;
    config["rootfs"] = serde_json::json!({
        "type": "layers",
        "diff_ids": pushed.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>(),
    });
    let config_bytes = serde_json::to_vec(&config).expect("config json");
    let config_digest = registry.push_blob(name, &config_bytes);
    let config_type = if manifest_type == OCI_MANIFEST {
        "application/vnd.oci.image.config.v1+json"
    } else {
        "application/vnd.docker.container.image.v1+json"
    };
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": manifest_type,
        "config": {"mediaType": config_type, "digest": config_digest, "size": config_bytes.len()},
        "layers": pushed.iter().map(|l| serde_json::json!({
            "mediaType": l.media_type, "digest": l.digest, "size": l.size,
        })).collect::<Vec<_>>(),
    });
    let bytes = serde_json::to_vec_pretty(&manifest).expect("manifest json");
    let digest = registry.push_manifest(name, tag, manifest_type, &bytes);
    (digest, bytes)
}

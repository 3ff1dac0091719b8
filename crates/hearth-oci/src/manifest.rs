//! Manifests (OCI image index / Docker manifest list, OCI image manifest,
//! Docker v2 schema 2) and the image configuration.

use std::collections::BTreeMap;

use serde::Deserialize;

pub(crate) const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub(crate) const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub(crate) const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub(crate) const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";

/// The `Accept` header of manifest requests.
pub(crate) const ACCEPT_MANIFESTS: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.v2+json";

/// The platform hearth's microVMs run.
pub(crate) const OS: &str = "linux";
pub(crate) const ARCHITECTURE: &str = "amd64";

/// Why a manifest or configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("malformed {what}")]
    Malformed {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("unsupported manifest media type {0:?}")]
    UnsupportedManifest(String),
    #[error("unsupported layer media type {0:?}")]
    UnsupportedLayer(String),
    #[error("not a container image (config media type {0:?})")]
    NotAnImage(String),
    #[error("no linux/amd64 image in the index (has {0})")]
    NoPlatform(String),
    #[error("image is for {0}, not linux/amd64")]
    WrongPlatform(String),
}

/// A content descriptor.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Descriptor {
    #[serde(rename = "mediaType", default)]
    pub(crate) media_type: String,
    pub(crate) digest: String,
    pub(crate) size: u64,
    #[serde(default)]
    pub(crate) platform: Option<Platform>,
}

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Platform {
    #[serde(default)]
    pub(crate) architecture: String,
    #[serde(default)]
    pub(crate) os: String,
    #[serde(default)]
    pub(crate) variant: Option<String>,
}

/// What a manifest endpoint answered.
#[derive(Debug)]
pub(crate) enum Manifest {
    Index(Vec<Descriptor>),
    Image(ImageManifest),
}

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct ImageManifest {
    pub(crate) config: Descriptor,
    #[serde(default)]
    pub(crate) layers: Vec<Descriptor>,
}

/// How a layer is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Compression {
    None,
    Gzip,
    Zstd,
}

/// Parses a manifest body. `content_type` is the response's `Content-Type`;
/// the body's own `mediaType` wins when present.
pub(crate) fn parse_manifest(
    body: &[u8],
    content_type: Option<&str>,
) -> Result<Manifest, ManifestError> {
    #[derive(Deserialize)]
    struct Probe {
        #[serde(rename = "schemaVersion", default)]
        schema_version: Option<u64>,
        #[serde(rename = "mediaType", default)]
        media_type: Option<String>,
        #[serde(default)]
        manifests: Option<serde_json::Value>,
        #[serde(default)]
        layers: Option<serde_json::Value>,
    }
    let malformed = |source| ManifestError::Malformed {
        what: "manifest",
        source,
    };
    let probe: Probe = serde_json::from_slice(body).map_err(malformed)?;
    let content_type = content_type
        .map(|c| c.split(';').next().unwrap_or("").trim().to_owned())
        .filter(|c| !c.is_empty() && c != "application/json");
    let media_type = probe.media_type.or(content_type).unwrap_or_else(|| {
        if probe.manifests.is_some() {
            OCI_INDEX.to_owned()
        } else if probe.layers.is_some() {
            OCI_MANIFEST.to_owned()
        } else {
            String::new()
        }
    });
    if probe.schema_version == Some(1) {
        return Err(ManifestError::UnsupportedManifest(format!(
            "{media_type} (schema 1)"
        )));
    }
    match media_type.as_str() {
        OCI_INDEX | DOCKER_LIST => {
            #[derive(Deserialize)]
            struct Index {
                manifests: Vec<Descriptor>,
            }
            let index: Index = serde_json::from_slice(body).map_err(malformed)?;
            Ok(Manifest::Index(index.manifests))
        }
        OCI_MANIFEST | DOCKER_MANIFEST => {
            let manifest: ImageManifest = serde_json::from_slice(body).map_err(malformed)?;
            if !manifest.config.media_type.is_empty()
                && manifest.config.media_type != OCI_CONFIG
                && manifest.config.media_type != DOCKER_CONFIG
            {
                return Err(ManifestError::NotAnImage(manifest.config.media_type));
            }
            for layer in &manifest.layers {
                layer_compression(&layer.media_type)?;
            }
            Ok(Manifest::Image(manifest))
        }
        other => Err(ManifestError::UnsupportedManifest(other.to_owned())),
    }
}

/// Picks the linux/amd64 entry of an index (an entry without a variant or
/// with `v1`..`v3` are all fine for amd64; the first one wins).
pub(crate) fn select_platform(manifests: &[Descriptor]) -> Result<&Descriptor, ManifestError> {
    manifests
        .iter()
        .find(|d| {
            d.platform.as_ref().is_some_and(|p| {
                p.os == OS
                    && p.architecture == ARCHITECTURE
                    && p.variant
                        .as_deref()
                        .is_none_or(|v| matches!(v, "" | "v1" | "v2" | "v3"))
            })
        })
        .ok_or_else(|| {
            let mut have: Vec<String> = manifests
                .iter()
                .filter_map(|d| d.platform.as_ref())
                .map(|p| match &p.variant {
                    Some(v) if !v.is_empty() => format!("{}/{}/{v}", p.os, p.architecture),
                    _ => format!("{}/{}", p.os, p.architecture),
                })
                .collect();
            have.dedup();
            ManifestError::NoPlatform(if have.is_empty() {
                "no platforms".to_owned()
            } else {
                have.join(", ")
            })
        })
}

/// A layer media type's compression, or an error for what hearth cannot unpack
/// (foreign and non-distributable layers, unknown types).
pub(crate) fn layer_compression(media_type: &str) -> Result<Compression, ManifestError> {
    match media_type {
        "application/vnd.oci.image.layer.v1.tar"
        | "application/vnd.docker.image.rootfs.diff.tar" => Ok(Compression::None),
        "application/vnd.oci.image.layer.v1.tar+gzip"
        | "application/vnd.docker.image.rootfs.diff.tar.gzip" => Ok(Compression::Gzip),
        "application/vnd.oci.image.layer.v1.tar+zstd"
        | "application/vnd.docker.image.rootfs.diff.tar.zstd" => Ok(Compression::Zstd),
        other => Err(ManifestError::UnsupportedLayer(other.to_owned())),
    }
}

/// The parts of an image's configuration a build or a run needs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageConfig {
    /// `KEY=value` strings.
    pub env: Vec<String>,
    pub cmd: Option<Vec<String>>,
    pub entrypoint: Option<Vec<String>>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
    /// `80/tcp`-style keys, sorted.
    pub exposed_ports: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub stop_signal: Option<String>,
}

/// Parses an image configuration blob and checks its platform.
pub(crate) fn parse_config(body: &[u8]) -> Result<ImageConfig, ManifestError> {
    #[derive(Deserialize)]
    struct File {
        #[serde(default)]
        architecture: Option<String>,
        #[serde(default)]
        os: Option<String>,
        #[serde(default)]
        config: Option<Config>,
    }
    #[derive(Deserialize, Default)]
    #[serde(rename_all = "PascalCase")]
    struct Config {
        #[serde(default)]
        env: Option<Vec<String>>,
        #[serde(default)]
        cmd: Option<Vec<String>>,
        #[serde(default)]
        entrypoint: Option<Vec<String>>,
        #[serde(default)]
        working_dir: Option<String>,
        #[serde(default)]
        user: Option<String>,
        #[serde(default)]
        exposed_ports: Option<BTreeMap<String, serde_json::Value>>,
        #[serde(default)]
        labels: Option<BTreeMap<String, String>>,
        #[serde(default)]
        stop_signal: Option<String>,
    }
    let file: File = serde_json::from_slice(body).map_err(|source| ManifestError::Malformed {
        what: "image configuration",
        source,
    })?;
    let os = file.os.unwrap_or_default();
    let architecture = file.architecture.unwrap_or_default();
    if (!os.is_empty() && os != OS) || (!architecture.is_empty() && architecture != ARCHITECTURE) {
        return Err(ManifestError::WrongPlatform(format!("{os}/{architecture}")));
    }
    let config = file.config.unwrap_or_default();
    let non_empty = |s: Option<String>| s.filter(|s| !s.is_empty());
    Ok(ImageConfig {
        env: config.env.unwrap_or_default(),
        cmd: config.cmd,
        entrypoint: config.entrypoint,
        working_dir: non_empty(config.working_dir),
        user: non_empty(config.user),
        exposed_ports: config
            .exposed_ports
            .map(|ports| ports.into_keys().collect())
            .unwrap_or_default(),
        labels: config.labels.unwrap_or_default(),
        stop_signal: non_empty(config.stop_signal),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn picks_linux_amd64_from_an_index() {
        let body = format!(
            r#"{{"schemaVersion":2,"mediaType":"{DOCKER_LIST}","manifests":[
              {{"mediaType":"{DOCKER_MANIFEST}","digest":"{D}","size":1,"platform":{{"architecture":"arm64","os":"linux","variant":"v8"}}}},
              {{"mediaType":"{DOCKER_MANIFEST}","digest":"sha256:aa","size":2,"platform":{{"architecture":"amd64","os":"linux"}}}},
              {{"mediaType":"{DOCKER_MANIFEST}","digest":"sha256:bb","size":3,"platform":{{"architecture":"amd64","os":"linux"}}}}]}}"#
        );
        let Ok(Manifest::Index(list)) = parse_manifest(body.as_bytes(), None) else {
            panic!("not an index");
        };
        assert_eq!(select_platform(&list).expect("amd64").digest, "sha256:aa");
        let err = select_platform(&list[..1]).expect_err("no amd64");
        assert_eq!(
            err.to_string(),
            "no linux/amd64 image in the index (has linux/arm64/v8)"
        );
    }

    #[test]
    fn reads_image_manifests_of_both_kinds() {
        for (media_type, content_type) in [
            (format!(r#""mediaType":"{OCI_MANIFEST}","#), None),
            (String::new(), Some(DOCKER_MANIFEST)),
            (String::new(), None),
        ] {
            let body = format!(
                r#"{{"schemaVersion":2,{media_type}"config":{{"mediaType":"{OCI_CONFIG}","digest":"{D}","size":7}},
                  "layers":[{{"mediaType":"application/vnd.docker.image.rootfs.diff.tar.gzip","digest":"{D}","size":9}}]}}"#
            );
            let Ok(Manifest::Image(m)) = parse_manifest(body.as_bytes(), content_type) else {
                panic!("not a manifest: {body}");
            };
            assert_eq!(m.layers.len(), 1);
            assert_eq!(m.config.size, 7);
        }
    }

    #[test]
    fn refuses_what_it_cannot_unpack() {
        let body = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"{OCI_CONFIG}","digest":"{D}","size":7}},
              "layers":[{{"mediaType":"application/vnd.docker.image.rootfs.foreign.diff.tar.gzip","digest":"{D}","size":9}}]}}"#
        );
        let err = parse_manifest(body.as_bytes(), None).expect_err("foreign");
        assert!(matches!(err, ManifestError::UnsupportedLayer(_)), "{err}");
        let helm = format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"application/vnd.cncf.helm.config.v1+json","digest":"{D}","size":7}},"layers":[]}}"#
        );
        assert!(matches!(
            parse_manifest(helm.as_bytes(), None),
            Err(ManifestError::NotAnImage(_))
        ));
        let v1 = br#"{"schemaVersion":1,"name":"x","fsLayers":[]}"#;
        assert!(matches!(
            parse_manifest(v1, None),
            Err(ManifestError::UnsupportedManifest(_))
        ));
        assert!(matches!(
            parse_manifest(b"[1", None),
            Err(ManifestError::Malformed { .. })
        ));
        assert_eq!(
            layer_compression("application/vnd.oci.image.layer.v1.tar+zstd").ok(),
            Some(Compression::Zstd)
        );
    }

    #[test]
    fn reads_the_image_config() {
        let body =
            br#"{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/usr/bin","A=b"],
            "Cmd":["python3","-m","http.server"],"Entrypoint":null,"WorkingDir":"/srv","User":"app",
            "ExposedPorts":{"8080/tcp":{},"53/udp":{}},"Labels":{"k":"v"},"StopSignal":"SIGTERM"},
            "rootfs":{"type":"layers","diff_ids":[]}}"#;
        let config = parse_config(body).expect("config");
        assert_eq!(config.env, ["PATH=/usr/bin", "A=b"]);
        assert_eq!(
            config.cmd.as_deref(),
            Some(&["python3".to_owned(), "-m".into(), "http.server".into()][..])
        );
        assert_eq!(config.entrypoint, None);
        assert_eq!(config.working_dir.as_deref(), Some("/srv"));
        assert_eq!(config.user.as_deref(), Some("app"));
        assert_eq!(config.exposed_ports, ["53/udp", "8080/tcp"]);
        assert_eq!(config.labels.get("k").map(String::as_str), Some("v"));
        assert_eq!(config.stop_signal.as_deref(), Some("SIGTERM"));
        let arm = br#"{"architecture":"arm64","os":"linux","config":{}}"#;
        assert!(matches!(
            parse_config(arm),
            Err(ManifestError::WrongPlatform(_))
        ));
        assert_eq!(parse_config(b"{}").expect("empty"), ImageConfig::default());
    }
}

//! The operator's settings for a server: where it keeps data and listens,
//! its endpoint, per-account quotas and build settings.

use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("quota {0:?} must look like NAME=NUMBER with NAME one of memory-mib, images, versions-per-image, concurrent-builds")]
    Quota(String),
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub region: String,
    /// `Operation=PER_SECOND` overrides of the default rate limits.
    pub rate_limits: Vec<String>,
    pub quotas: Quotas,
    /// MicroVM endpoints are `<microvm-id>.<endpoint_domain>[:port]`.
    pub endpoint_domain: String,
    /// Where the endpoint proxy listens (plain HTTP/1.1 and h2c); None: no proxy.
    pub endpoint_listen: Option<SocketAddr>,
    /// Where it also listens with TLS (certificate in `DATA/tls`, generated at
    /// first start unless the operator puts one there).
    pub endpoint_tls_listen: Option<SocketAddr>,
    /// Per-microVM endpoint limits (past them: 429).
    pub endpoint_limits: hearth_proxy::VmLimits,
    /// The port shown in `endpoint` values (set from the bound listener).
    pub endpoint_port: Option<u16>,
    /// Upper bound (and default) of `maximumDurationInSeconds`.
    pub max_lifetime_secs: u64,
    /// Where build artifacts come from (built-in S3 store, external store, file://).
    pub artifacts: hearth_s3::ArtifactsConfig,
    /// The OCI registry Dockerfile FROM lines may pull from (none: managed
    /// base images and scratch only).
    pub registry: Option<hearth_oci::RegistryConfig>,
    /// Step-cache entries unused for this many days are dropped at start.
    pub build_cache_days: u64,
    /// How QEMU processes are jailed (default: a uid range when root, the
    /// unprivileged jail otherwise).
    pub jail: hearth_vm::JailConfig,
    /// VM networks (`hearth_vm::net`); `None`: off, every VM's network card
    /// has no backend (a server without root, or the operator's choice).
    pub network: Option<hearth_vm::net::NetConfig>,
    /// Egress of a microVM whose RunMicrovm names no egress connector
    /// (`--default-egress`): internet, as the reference, unless turned off.
    pub default_egress: bool,
    /// Host memory and disk kept free: admission refuses VMs that would eat
    /// into it (see `vms::capacity`).
    pub reserve: crate::vms::capacity::Reserve,
    /// The machine sizes images may ask for (`--shapes FILE` adds to the
    /// reference's).
    pub sizes: crate::sizes::Sizes,
    /// What each usage type costs (`--price-sheet FILE`; the reference's
    /// us-east-1 rates by default).
    pub prices: crate::pricing::PriceSheet,
    /// How often the usage meter samples running microVMs.
    pub usage_interval: std::time::Duration,
    /// Warm pool bounds: slots of all versions together and per version
    /// (`--warm-pool-max`, `--warm-pool-per-version`; 0 turns the pool off).
    /// Off unless set: `hearth serve` sets it (default 4 slots).
    pub warm_pool: crate::vms::pool::PoolSettings,
}

impl ServerConfig {
    /// Defaults for everything but where to keep data and listen.
    pub fn new(data_dir: PathBuf, listen: SocketAddr, region: String) -> Self {
        Self {
            data_dir,
            listen,
            region,
            rate_limits: Vec::new(),
            quotas: Quotas::default(),
            endpoint_domain: "localhost".into(),
            endpoint_listen: None,
            endpoint_tls_listen: None,
            endpoint_limits: hearth_proxy::VmLimits::default(),
            endpoint_port: None,
            max_lifetime_secs: 28_800,
            artifacts: hearth_s3::ArtifactsConfig::default(),
            registry: None,
            build_cache_days: 14,
            jail: hearth_vm::JailConfig::for_current_user(),
            network: None,
            default_egress: true,
            reserve: crate::vms::capacity::Reserve::default(),
            sizes: crate::sizes::Sizes::default(),
            prices: crate::pricing::PriceSheet::default(),
            usage_interval: std::time::Duration::from_secs(10),
            warm_pool: crate::vms::pool::PoolSettings::off(),
        }
    }
}

/// Per-account limits (BEHAVIOUR.md's reference values by default).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quotas {
    /// Memory of non-terminated microVMs and running builds, in MiB.
    pub memory_mib: u64,
    pub images: u32,
    pub versions_per_image: u32,
    pub concurrent_builds: u32,
}

impl Default for Quotas {
    fn default() -> Self {
        Self {
            memory_mib: 400 * 1024,
            images: 100,
            versions_per_image: 50,
            concurrent_builds: 5,
        }
    }
}

/// Applies `NAME=NUMBER` quota overrides.
pub fn parse_quotas(entries: &[String]) -> Result<Quotas, ConfigError> {
    let mut quotas = Quotas::default();
    for entry in entries {
        let bad = || ConfigError::Quota(entry.clone());
        let (name, value) = entry.split_once('=').ok_or_else(bad)?;
        let value: u64 = value.parse().map_err(|_| bad())?;
        let small = || u32::try_from(value).map_err(|_| bad());
        match name {
            "memory-mib" => quotas.memory_mib = value,
            "images" => quotas.images = small()?,
            "versions-per-image" => quotas.versions_per_image = small()?,
            "concurrent-builds" => quotas.concurrent_builds = small()?,
            _ => return Err(bad()),
        }
    }
    Ok(quotas)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quota_overrides() {
        let quotas = parse_quotas(&["memory-mib=1024".into(), "images=3".into()]).expect("parse");
        assert_eq!(quotas.memory_mib, 1024);
        assert_eq!(quotas.images, 3);
        assert_eq!(
            quotas.concurrent_builds,
            Quotas::default().concurrent_builds
        );
        for bad in ["images", "images=x", "cpus=2", "images=99999999999"] {
            assert!(parse_quotas(&[bad.into()]).is_err(), "{bad}");
        }
    }
}

//! What every request handler reaches: the handles of the layers below
//! (store, engine, builds, endpoint tokens) and the server's configuration.
//! It lives in the top layer because it names every layer; the layers below
//! take only the handles they use.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use hearth_vm::Assets;

use crate::api::limits::RateLimits;
use crate::config::ServerConfig;
use crate::db::store::Store;
use crate::endpoint::tokens::TokenKeys;
use crate::endpoint::EndpointBackend;
use crate::images::build::Builds;
use crate::vms::capacity::Capacity;
use crate::vms::engine::Engine;
use crate::vms::meter::Meter;

#[derive(Debug, Default)]
pub(crate) struct Metrics {
    pub(crate) requests: AtomicU64,
    pub(crate) client_errors: AtomicU64,
    pub(crate) server_errors: AtomicU64,
    pub(crate) auth_failures: AtomicU64,
}

#[derive(Debug)]
pub struct AppState {
    pub config: ServerConfig,
    pub store: Store,
    pub assets: Assets,
    pub engine: Arc<Engine>,
    pub tokens: TokenKeys,
    pub(crate) limits: RateLimits,
    pub(crate) metrics: Metrics,
    /// Dockerfile builds (CreateMicrovmImage, UpdateMicrovmImage).
    pub builds: Arc<Builds>,
    /// Where the builder fetches `codeArtifact.uri` from.
    pub artifacts: hearth_s3::ArtifactSource,
    /// The built-in S3-compatible store, served on the API's listener.
    pub s3: hearth_s3::S3Service,
    /// Host capacity admission for launches, resumes and builds.
    pub capacity: Capacity,
    /// The usage meter (its latest per-VM figures feed `/metrics`).
    pub meter: Arc<Meter>,
}

impl AppState {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        config: ServerConfig,
        store: Store,
        assets: Assets,
        engine: Arc<Engine>,
        tokens: TokenKeys,
        limits: RateLimits,
        builds: Arc<Builds>,
        artifacts: hearth_s3::ArtifactSource,
        s3: hearth_s3::S3Service,
        meter: Arc<Meter>,
    ) -> Self {
        let capacity = Capacity::new(
            engine.shared_driver(),
            config.reserve,
            &assets.ram_dir,
            &config.data_dir,
        );
        Self {
            capacity,
            config,
            store,
            assets,
            engine,
            tokens,
            limits,
            metrics: Metrics::default(),
            builds,
            artifacts,
            s3,
            meter,
        }
    }

    /// The endpoint proxy's backend and configuration for this server.
    pub fn endpoint_proxy(&self) -> (Arc<EndpointBackend>, hearth_proxy::ProxyConfig) {
        crate::endpoint::proxy(
            self.engine.clone(),
            self.store.clone(),
            self.tokens.clone(),
            &self.config,
        )
    }

    /// A state over `dir` (data, cache and VM state all inside it) for tests.
    #[cfg(test)]
    pub(crate) fn for_tests(dir: &std::path::Path) -> Self {
        use std::time::Duration;

        use crate::images::build::BuildSettings;

        let assets = Assets {
            cache_dir: dir.to_path_buf(),
            state_dir: dir.join("engine"),
            ram_dir: dir.join("ram"),
        };
        let store = Store::open(dir).expect("store");
        let config = ServerConfig::new(
            dir.to_path_buf(),
            ([127, 0, 0, 1], 0).into(),
            "us-east-1".into(),
        );
        let (s3, artifacts) = crate::api::s3::build(&config, &store).expect("artifact store");
        let driver: Arc<dyn hearth_vm::Driver> = Arc::new(hearth_vm::QemuDriver::with_accel(
            assets.clone(),
            hearth_vm::Accel::Tcg,
        ));
        let builds = Arc::new(
            Builds::new(
                store.clone(),
                driver.clone(),
                assets.clone(),
                dir,
                Arc::new(artifacts.clone()),
                BuildSettings {
                    region: "us-east-1".into(),
                    max_artifact_bytes: config.artifacts.max_artifact_bytes,
                    registry: None,
                    cache_max_age: Duration::from_secs(14 * 86_400),
                    sizes: config.sizes.clone(),
                },
            )
            .expect("builds"),
        );
        let engine = Engine::new(driver.clone(), store.clone());
        let meter = Meter::new(driver, store.clone(), config.usage_interval);
        Self::new(
            config,
            store,
            assets,
            engine,
            TokenKeys::open_or_create(dir).expect("token keys"),
            RateLimits::new(&[]).expect("limits"),
            builds,
            artifacts,
            s3,
            meter,
        )
    }
}

//! `hearth serve`: the Lambda MicroVMs API (2025-09-09) over REST-JSON with SigV4.
//!
//! Layers, top to bottom (a module imports only from its own layer or below):
//! [`api`] (the HTTP pipeline and the operations) → [`endpoint`] (the
//! endpoint proxy's backend) → [`images`] (builds, imports) → [`vms`] (the
//! VMs behind microVM records) → [`db`] (the store, rows, typed specs) → the
//! base: [`config`], [`layout`] (paths and VM names), [`arn`], [`sizes`], [`pricing`].
//! This file wires them together: [`start`] and [`serve`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

pub mod api;
pub mod arn;
pub mod config;
pub mod db;
pub mod endpoint;
pub mod images;
pub mod layout;
pub mod pricing;
pub mod sizes;
pub mod vms;

pub use api::{app, AppState};
pub use config::{parse_quotas, Quotas, ServerConfig};
pub use db::store::Store;
pub use layout::{check_socket_room, engine_assets};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot create the data directory {0}")]
    DataDir(std::path::PathBuf, #[source] std::io::Error),
    #[error(transparent)]
    Layout(#[from] layout::LayoutError),
    #[error(transparent)]
    Store(#[from] db::store::StoreError),
    #[error("cannot listen on {0}")]
    Listen(SocketAddr, #[source] std::io::Error),
    #[error(transparent)]
    Limits(#[from] api::limits::LimitsError),
    #[error("server failed")]
    Serve(#[source] std::io::Error),
    #[error("cannot start the VM layer")]
    Vm(#[source] hearth_vm::VmError),
    #[error(transparent)]
    Tokens(#[from] endpoint::tokens::TokenError),
    #[error("cannot set up the endpoint certificate")]
    Tls(#[source] hearth_proxy::tls::TlsError),
    #[error(transparent)]
    Builds(#[from] images::build::BuildsError),
    #[error("cannot reconcile microVMs with their processes")]
    Reconcile(#[source] vms::engine::EngineError),
    #[error("cannot set up VM networks (run as root, or pass --no-vm-network)")]
    Network(#[source] hearth_vm::net::NetError),
    #[error("cannot open the artifact store")]
    Artifacts(#[source] hearth_s3::StoreError),
}

/// Opens the store and serves until the process ends.
pub async fn serve(mut config: ServerConfig) -> Result<(), ServerError> {
    let listen = config.listen;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| ServerError::Listen(listen, e))?;
    let bind = |addr: SocketAddr| async move {
        tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| ServerError::Listen(addr, e))
    };
    let endpoint = match config.endpoint_listen {
        Some(addr) => Some(bind(addr).await?),
        None => None,
    };
    let endpoint_tls = match config.endpoint_tls_listen {
        Some(addr) => Some(bind(addr).await?),
        None => None,
    };
    let shown = endpoint.as_ref().or(endpoint_tls.as_ref());
    config.endpoint_port = shown.and_then(|l| l.local_addr().ok()).map(|a| a.port());
    let state = start(config).await?;
    let api_local = listener.local_addr().map_err(ServerError::Serve)?;
    info!(address = %api_local, region = %state.config.region, data_dir = %state.config.data_dir.display(), "serving the Lambda MicroVMs API");
    println!("hearth: listening on http://{api_local}");
    let (backend, proxy_config) = state.endpoint_proxy();
    if let Some(listener) = endpoint {
        let local = listener.local_addr().map_err(ServerError::Serve)?;
        println!(
            "hearth: endpoints on http://<microvm-id>.{}:{}",
            state.config.endpoint_domain,
            local.port()
        );
        let (backend, config) = (backend.clone(), proxy_config.clone());
        tokio::spawn(async move {
            if let Err(err) = hearth_proxy::serve(listener, backend, config).await {
                warn!(error = %hearth_vm::error_chain(&err), "endpoint proxy stopped");
            }
        });
    }
    if let Some(listener) = endpoint_tls {
        let tls = hearth_proxy::tls::load_or_generate(
            &layout::tls_dir(&state.config.data_dir),
            &state.config.endpoint_domain,
        )
        .map_err(ServerError::Tls)?;
        let local = listener.local_addr().map_err(ServerError::Serve)?;
        println!(
            "hearth: endpoints on https://<microvm-id>.{}:{}",
            state.config.endpoint_domain,
            local.port()
        );
        tokio::spawn(async move {
            if let Err(err) = hearth_proxy::serve_tls(listener, tls, backend, proxy_config).await {
                warn!(error = %hearth_vm::error_chain(&err), "TLS endpoint proxy stopped");
            }
        });
    }
    // On SIGTERM or Ctrl-C: stop accepting, let requests in flight finish.
    // MicroVMs keep running; the next start adopts them. Warm pool slots end
    // (the next start would discard them anyway).
    let served = axum::serve(listener, app(state.clone()))
        .with_graceful_shutdown(shutdown_signal())
        .await
        .map_err(ServerError::Serve);
    state.engine.shutdown_pools().await;
    served
}

async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
    }
    info!("shutting down; microVMs keep running and are adopted at the next start");
}

/// Opens the store, reconciles microVMs with their processes and starts the
/// lifetime watcher: everything `serve` does before it listens.
pub async fn start(config: ServerConfig) -> Result<Arc<AppState>, ServerError> {
    protect_from_oom_killer();
    // Private, checked at every start: an existing 0755 directory is narrowed,
    // one owned by another user refused.
    hearth_vm::disk::ensure_private_dir(&config.data_dir)
        .map_err(|e| ServerError::DataDir(config.data_dir.clone(), std::io::Error::other(e)))?;
    let store = Store::open(&config.data_dir)?;
    let limits = api::limits::RateLimits::new(&config.rate_limits)?;
    let assets = engine_assets(&config.data_dir);
    check_socket_room(&assets)?;
    for dir in [assets.vms_dir(), assets.ram_dir.clone()] {
        hearth_vm::disk::ensure_private_dir(&dir)
            .map_err(|e| ServerError::DataDir(dir.clone(), std::io::Error::other(e)))?;
    }
    let mut qemu =
        hearth_vm::QemuDriver::with_jail(assets.clone(), config.jail).map_err(ServerError::Vm)?;
    if let Some(net) = &config.network {
        let network = hearth_vm::net::Network::start(net.clone())
            .await
            .map_err(ServerError::Network)?;
        info!(network = %net, "VM networks on; IPv4 forwarding enabled");
        let network = Arc::new(network);
        network.keep_spares();
        qemu = qemu.with_network(network);
    } else {
        warn!("VM networks off: microVMs and build steps have no network");
    }
    let driver: Arc<dyn hearth_vm::Driver> = Arc::new(qemu);
    let interrupted =
        images::import::reap_interrupted_builds(&store, driver.as_ref(), &config.data_dir).await?;
    let (s3, artifacts) = api::s3::build(&config, &store).map_err(ServerError::Artifacts)?;
    let builds = Arc::new(
        images::build::Builds::new(
            store.clone(),
            driver.clone(),
            assets.clone(),
            &config.data_dir,
            Arc::new(artifacts.clone()),
            images::build::BuildSettings {
                region: config.region.clone(),
                max_artifact_bytes: config.artifacts.max_artifact_bytes,
                registry: config.registry.clone(),
                cache_max_age: Duration::from_secs(config.build_cache_days * 86_400),
                sizes: config.sizes.clone(),
            },
        )
        .map_err(ServerError::Builds)?,
    );
    let engine = vms::engine::Engine::new(driver.clone(), store.clone());
    engine.set_default_egress(config.default_egress);
    engine.pools.set_settings(config.warm_pool);
    engine.reconcile().await.map_err(ServerError::Reconcile)?;
    // After reconcile: adopted VMs are metered on from their marks.
    let meter = vms::meter::Meter::new(driver, store.clone(), config.usage_interval);
    tokio::spawn(meter.clone().run());
    // Pools come back for the versions run recently (reconcile ended the old slots).
    // Without it pools fill again at the next launch: not worth refusing to start.
    if let Err(err) = engine.seed_pool_demand() {
        warn!(error = %hearth_vm::error_chain(&err), "cannot read recent launches for the warm pools");
    }
    tokio::spawn(engine.clone().run_pools());
    // No build runs yet: what interrupted builds left in the step cache can go.
    builds.sweep_cache();
    // Builds a restart interrupted run again; finished steps come from the cache.
    for build in interrupted {
        builds.spawn(images::build::BuildJob {
            account_id: build.account_id,
            image_name: build.image_name,
            version: build.version,
            build_id: build.build_id,
            memory_mib: build.memory_mib,
            spec: build.spec,
            build_args: Vec::new(),
            restarted: true,
        });
    }
    tokio::spawn(engine.clone().watch());
    let app_logs = vms::log_store::LogStore::new(&config.data_dir);
    tokio::spawn(vms::log_collector::LogCollector::new(engine.clone(), app_logs).run());
    let tokens = endpoint::tokens::TokenKeys::open_or_create(&config.data_dir)?;
    Ok(Arc::new(AppState::new(
        config, store, assets, engine, tokens, limits, builds, artifacts, s3, meter,
    )))
}

/// Makes the kernel's OOM killer pick a QEMU (500, set when each starts)
/// long before the server (-500): a tenant's runaway guest must never take the
/// server, and with it every other tenant's control plane, down. Only root may
/// lower its own score; otherwise this is a no-op.
fn protect_from_oom_killer() {
    if !rustix::process::geteuid().is_root() {
        return;
    }
    if let Err(err) = std::fs::write("/proc/self/oom_score_adj", "-500") {
        warn!(error = %err, "cannot lower the server's OOM score");
    }
}

//! `hearth serve`: the Lambda MicroVMs API (2025-09-09) over REST-JSON with SigV4.
//!
//! A request's path: [`http_api`] reads the body (bounded), finds the operation
//! in the model (`hearth_api::model().route`), verifies the SigV4 signature
//! against the caller's sealed secret (`hearth_auth::verify`, `store`), parses
//! and validates the input against the model, and hands it to the operation's
//! handler in [`ops`], which answers with JSON shaped by the model's output.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use hearth_api::{ApiError, ErrorCode};
use hearth_vm::Assets;
use tracing::{info, warn};

pub mod api;
pub mod db;
pub mod endpoint;
pub mod images;
pub mod vms;

// Old flat paths, until the moved files' imports are rewritten.
pub use api::{extensions, limits, ops, s3};
pub use db::{ids, records, resources, secrets, store};
pub use endpoint::{guest_api, tokens};
pub use images::{app, build, import};
pub use vms::{engine, hooks};

pub use records::Quotas;
pub use store::Store;

/// Largest request body accepted; the model's largest inputs are a few KiB.
const MAX_BODY: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot create the data directory {0}")]
    DataDir(PathBuf, #[source] std::io::Error),
    #[error("the data directory path {0} is too long: VM sockets beneath it would exceed the 107-byte limit of UNIX socket paths")]
    DataDirTooLong(PathBuf),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("cannot listen on {0}")]
    Listen(SocketAddr, #[source] std::io::Error),
    #[error(transparent)]
    Limits(#[from] limits::LimitsError),
    #[error("server failed")]
    Serve(#[source] std::io::Error),
    #[error("cannot start the VM layer")]
    Vm(#[source] hearth_vm::VmError),
    #[error(transparent)]
    Tokens(#[from] tokens::TokenError),
    #[error("cannot set up the endpoint certificate")]
    Tls(#[source] hearth_proxy::tls::TlsError),
    #[error(transparent)]
    Builds(#[from] build::BuildsError),
    #[error("cannot reconcile microVMs with their processes")]
    Reconcile(#[source] engine::EngineError),
    #[error("quota {0:?} must look like NAME=NUMBER with NAME one of memory-mib, images, versions-per-image, concurrent-builds")]
    Quota(String),
    #[error("cannot open the artifact store")]
    Artifacts(#[source] hearth_s3::StoreError),
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
    pub artifacts: s3::ArtifactsConfig,
    /// The OCI registry Dockerfile FROM lines may pull from (none: managed
    /// base images and scratch only).
    pub registry: Option<hearth_oci::RegistryConfig>,
    /// Step-cache entries unused for this many days are dropped at start.
    pub build_cache_days: u64,
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
            artifacts: s3::ArtifactsConfig::default(),
            registry: None,
            build_cache_days: 14,
        }
    }
}

/// QEMU's sockets live at `<vms dir>/<vm name>/agent.sock` (VM names up to 40
/// bytes); a UNIX socket path holds at most 107 bytes.
pub fn check_socket_room(assets: &Assets) -> Result<(), ServerError> {
    let longest = assets.vms_dir().as_os_str().len() + 1 + 40 + "/agent.sock".len();
    if longest > 107 {
        return Err(ServerError::DataDirTooLong(assets.state_dir.clone()));
    }
    Ok(())
}

/// Applies `NAME=NUMBER` quota overrides.
pub fn parse_quotas(entries: &[String]) -> Result<Quotas, ServerError> {
    let mut quotas = Quotas::default();
    for entry in entries {
        let bad = || ServerError::Quota(entry.clone());
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

/// The VM layer's paths for a server: the shared kernel and base-image cache,
/// and VM state under the data directory (so every VM there is the server's).
pub fn engine_assets(data_dir: &std::path::Path) -> Assets {
    let mut assets = Assets::from_env();
    assets.state_dir = data_dir.join("engine");
    assets
}

#[derive(Debug, Default)]
pub(crate) struct Metrics {
    requests: AtomicU64,
    client_errors: AtomicU64,
    server_errors: AtomicU64,
    auth_failures: AtomicU64,
}

#[derive(Debug)]
pub struct AppState {
    pub config: ServerConfig,
    pub store: Store,
    pub assets: Assets,
    pub engine: Arc<engine::Engine>,
    pub tokens: tokens::TokenKeys,
    pub(crate) limits: limits::RateLimits,
    pub(crate) metrics: Metrics,
    /// Dockerfile builds (CreateMicrovmImage, UpdateMicrovmImage).
    pub builds: Arc<build::Builds>,
    /// Where the builder fetches `codeArtifact.uri` from.
    pub artifacts: s3::ArtifactSource,
    /// The built-in S3-compatible store, served on the API's listener.
    pub s3: hearth_s3::S3Service,
}

impl AppState {
    /// A state over `dir` (data, cache and VM state all inside it) for tests.
    #[cfg(test)]
    pub(crate) fn for_tests(dir: &std::path::Path) -> Self {
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
        let (s3, artifacts) = s3::build(&config, &store).expect("artifact store");
        let driver = hearth_vm::QemuDriver::with_accel(assets.clone(), hearth_vm::Accel::Tcg);
        let builds = Arc::new(
            build::Builds::new(
                store.clone(),
                driver.clone(),
                assets.clone(),
                dir,
                Arc::new(artifacts.clone()),
                build::BuildSettings {
                    region: "us-east-1".into(),
                    max_artifact_bytes: config.artifacts.max_artifact_bytes,
                    registry: None,
                    cache_max_age: Duration::from_secs(14 * 86_400),
                },
            )
            .expect("builds"),
        );
        Self {
            builds,
            config,
            artifacts,
            s3,
            engine: engine::Engine::new(driver, store.clone()),
            tokens: tokens::TokenKeys::open_or_create(dir).expect("token keys"),
            store,
            assets,
            limits: limits::RateLimits::new(&[]).expect("limits"),
            metrics: Metrics::default(),
        }
    }
}

/// Builds the HTTP application (used by `serve` and by tests on any listener).
pub fn app(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/live", get(|| async { "ok" }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .fallback(http_api)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            s3::front_door,
        ))
        .with_state(state)
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
    let (backend, proxy_config) = endpoint::proxy(&state);
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
                warn!(error = %engine::error_chain(&err), "endpoint proxy stopped");
            }
        });
    }
    if let Some(listener) = endpoint_tls {
        let tls = hearth_proxy::tls::load_or_generate(
            &state.config.data_dir.join("tls"),
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
                warn!(error = %engine::error_chain(&err), "TLS endpoint proxy stopped");
            }
        });
    }
    // On SIGTERM or Ctrl-C: stop accepting, let requests in flight finish.
    // MicroVMs keep running; the next start adopts them.
    axum::serve(listener, app(state))
        .with_graceful_shutdown(shutdown_signal())
        .await
        .map_err(ServerError::Serve)
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
    hearth_vm::disk::create_private_dir_all(&config.data_dir)
        .map_err(|e| ServerError::DataDir(config.data_dir.clone(), std::io::Error::other(e)))?;
    let store = Store::open(&config.data_dir)?;
    let limits = limits::RateLimits::new(&config.rate_limits)?;
    let assets = engine_assets(&config.data_dir);
    check_socket_room(&assets)?;
    hearth_vm::disk::create_private_dir_all(&assets.vms_dir())
        .map_err(|e| ServerError::DataDir(assets.vms_dir(), std::io::Error::other(e)))?;
    let driver = hearth_vm::QemuDriver::new(assets.clone()).map_err(ServerError::Vm)?;
    import::reap_interrupted_builds(&store, &driver, &config.data_dir).await?;
    let (s3, artifacts) = s3::build(&config, &store)?;
    let builds = Arc::new(
        build::Builds::new(
            store.clone(),
            driver.clone(),
            assets.clone(),
            &config.data_dir,
            Arc::new(artifacts.clone()),
            build::BuildSettings {
                region: config.region.clone(),
                max_artifact_bytes: config.artifacts.max_artifact_bytes,
                registry: config.registry.clone(),
                cache_max_age: Duration::from_secs(config.build_cache_days * 86_400),
            },
        )
        .map_err(ServerError::Builds)?,
    );
    let engine = engine::Engine::new(driver, store.clone());
    engine.reconcile().await.map_err(ServerError::Reconcile)?;
    // No build runs yet: what interrupted builds left in the step cache can go.
    builds.sweep_cache();
    tokio::spawn(engine.clone().watch());
    let tokens = tokens::TokenKeys::open_or_create(&config.data_dir)?;
    Ok(Arc::new(AppState {
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
    }))
}

async fn ready(State(state): State<Arc<AppState>>) -> Response {
    match state.store.ping() {
        Ok(()) => (StatusCode::OK, "ready").into_response(),
        Err(err) => {
            warn!(error = %err, "not ready");
            (StatusCode::SERVICE_UNAVAILABLE, "database unavailable").into_response()
        }
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let m = &state.metrics;
    let body = format!(
        "# TYPE hearth_api_requests_total counter\nhearth_api_requests_total {}\n\
         # TYPE hearth_api_client_errors_total counter\nhearth_api_client_errors_total {}\n\
         # TYPE hearth_api_server_errors_total counter\nhearth_api_server_errors_total {}\n\
         # TYPE hearth_api_auth_failures_total counter\nhearth_api_auth_failures_total {}\n",
        m.requests.load(Ordering::Relaxed),
        m.client_errors.load(Ordering::Relaxed),
        m.server_errors.load(Ordering::Relaxed),
        m.auth_failures.load(Ordering::Relaxed),
    );
    let mut body = body;
    if let Ok(counts) = state.store.microvm_counts() {
        body.push_str("# TYPE hearth_microvms gauge\n");
        for (vm_state, count) in counts {
            body.push_str(&format!(
                "hearth_microvms{{state=\"{vm_state}\"}} {count}\n"
            ));
        }
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        body,
    )
        .into_response()
}

/// Every API operation goes through here.
async fn http_api(State(state): State<Arc<AppState>>, request: Request) -> Response {
    state.metrics.requests.fetch_add(1, Ordering::Relaxed);
    let request_id = ids::new_uuid();
    let response = match handle(&state, request).await {
        Ok(response) => response,
        Err(err) => {
            let counter = if err.code.status() >= 500 {
                &state.metrics.server_errors
            } else {
                &state.metrics.client_errors
            };
            counter.fetch_add(1, Ordering::Relaxed);
            let (parts, body) = err.to_http().into_parts();
            Response::from_parts(parts, Body::from(body))
        }
    };
    let mut response = response;
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert("x-amzn-requestid", value);
    }
    response
}

async fn handle(state: &AppState, request: Request) -> Result<Response, ApiError> {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, MAX_BODY).await.map_err(|_| {
        ApiError::new(
            ErrorCode::Validation,
            "Request body is too large or unreadable",
        )
    })?;
    let model = hearth_api::model();
    if let Some(route) = extensions::route(&parts.method, parts.uri.path(), parts.uri.query()) {
        let account = authenticate(state, &parts, &body)?;
        if !state.limits.allow(&account, route.operation()) {
            return Err(ApiError::new(ErrorCode::Throttling, "Rate exceeded"));
        }
        let caller = ops::Caller {
            account_id: account,
            region: state.config.region.clone(),
        };
        return extensions::handle(state, &caller, route, &body).await;
    }
    let (operation, labels) = model
        .route(&parts.method, parts.uri.path())
        .ok_or_else(|| ApiError::new(ErrorCode::UnknownOperation, "Unknown operation"))?;

    let account = authenticate(state, &parts, &body)?;

    if !state.limits.allow(&account, &operation.name) {
        return Err(ApiError::new(ErrorCode::Throttling, "Rate exceeded"));
    }
    let mut input =
        model.parse_input(operation, &labels, parts.uri.query(), &parts.headers, &body)?;
    if matches!(
        operation.name.as_str(),
        "CreateMicrovmImage" | "UpdateMicrovmImage"
    ) {
        if let Some(args) = build::build_args_header(&parts.headers)? {
            input[build::BUILD_ARGS_MEMBER] = args;
        }
    }
    let caller = ops::Caller {
        account_id: account,
        region: state.config.region.clone(),
    };
    let output = ops::dispatch(state, &caller, &operation.name, input).await?;
    let status = StatusCode::from_u16(operation.success_code).unwrap_or(StatusCode::OK);
    let body = if status == StatusCode::NO_CONTENT {
        Vec::new()
    } else {
        serde_json::to_vec(&output)
            .map_err(|_| ApiError::new(ErrorCode::InternalServer, "Internal error"))?
    };
    Ok((
        status,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response())
}

/// Verifies the request's SigV4 signature; returns the caller's account.
fn authenticate(
    state: &AppState,
    parts: &http::request::Parts,
    body: &[u8],
) -> Result<String, ApiError> {
    let mut account = None;
    let verified = hearth_auth::verify(
        parts,
        body,
        &hearth_auth::VerifyConfig {
            region: state.config.region.clone(),
            service: "lambda".into(),
            max_skew: Duration::from_secs(300),
        },
        SystemTime::now(),
        |access_key_id| match state.store.lookup_key(access_key_id) {
            Ok(Some((account_id, secret))) => {
                account = Some(account_id);
                Some(secret)
            }
            Ok(None) => None,
            Err(err) => {
                warn!(error = %err, "access key lookup failed");
                None
            }
        },
    );
    match (verified, account) {
        (Ok(_), Some(account)) => Ok(account),
        (Err(err), _) => {
            state.metrics.auth_failures.fetch_add(1, Ordering::Relaxed);
            let code =
                ErrorCode::from_type_name(err.error_code()).unwrap_or(ErrorCode::InvalidSignature);
            Err(ApiError::new(code, err.public_message()))
        }
        (Ok(_), None) => Err(ApiError::new(
            ErrorCode::InvalidSignature,
            "The security token included in the request is invalid.",
        )),
    }
}

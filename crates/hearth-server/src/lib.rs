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

pub mod limits;
pub mod ops;
pub mod secrets;
pub mod store;

pub use store::Store;

/// Largest request body accepted; the model's largest inputs are a few KiB.
const MAX_BODY: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot create the data directory {0}")]
    DataDir(PathBuf, #[source] std::io::Error),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("cannot listen on {0}")]
    Listen(SocketAddr, #[source] std::io::Error),
    #[error(transparent)]
    Limits(#[from] limits::LimitsError),
    #[error("server failed")]
    Serve(#[source] std::io::Error),
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub region: String,
    /// `Operation=PER_SECOND` overrides of the default rate limits.
    pub rate_limits: Vec<String>,
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
    pub(crate) limits: limits::RateLimits,
    pub(crate) metrics: Metrics,
}

/// Builds the HTTP application (used by `serve` and by tests on any listener).
pub fn app(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/live", get(|| async { "ok" }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .fallback(http_api)
        .with_state(state)
}

/// Opens the store and serves until the process ends.
pub async fn serve(config: ServerConfig) -> Result<(), ServerError> {
    hearth_vm::disk::create_private_dir_all(&config.data_dir)
        .map_err(|e| ServerError::DataDir(config.data_dir.clone(), std::io::Error::other(e)))?;
    let store = Store::open(&config.data_dir)?;
    let limits = limits::RateLimits::new(&config.rate_limits)?;
    let assets = Assets::from_env();
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| ServerError::Listen(config.listen, e))?;
    let local = listener.local_addr().map_err(ServerError::Serve)?;
    info!(address = %local, region = %config.region, data_dir = %config.data_dir.display(), "serving the Lambda MicroVMs API");
    println!("hearth: listening on http://{local}");
    let state = Arc::new(AppState {
        config,
        store,
        assets,
        limits,
        metrics: Metrics::default(),
    });
    axum::serve(listener, app(state))
        .await
        .map_err(ServerError::Serve)
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
    let request_id = new_request_id();
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
    let (operation, labels) = model
        .route(&parts.method, parts.uri.path())
        .ok_or_else(|| ApiError::new(ErrorCode::UnknownOperation, "Unknown operation"))?;

    let mut account = None;
    let verified = hearth_auth::verify(
        &parts,
        &body,
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
    let account = match (verified, account) {
        (Ok(_), Some(account)) => account,
        (Err(err), _) => {
            state.metrics.auth_failures.fetch_add(1, Ordering::Relaxed);
            let code =
                ErrorCode::from_type_name(err.error_code()).unwrap_or(ErrorCode::InvalidSignature);
            return Err(ApiError::new(code, err.public_message()));
        }
        (Ok(_), None) => {
            return Err(ApiError::new(
                ErrorCode::InvalidSignature,
                "The security token included in the request is invalid.",
            ));
        }
    };

    if !state.limits.allow(&account, &operation.name) {
        return Err(ApiError::new(ErrorCode::Throttling, "Rate exceeded"));
    }
    let input = model.parse_input(operation, &labels, parts.uri.query(), &parts.headers, &body)?;
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

fn new_request_id() -> String {
    let bytes: [u8; 16] = rand::random();
    let h = hex::encode(bytes);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

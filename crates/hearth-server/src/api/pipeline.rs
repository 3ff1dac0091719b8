//! The API pipeline: routes, body cap, SigV4, rate limits, model validation, dispatch.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use hearth_api::{ApiError, ErrorCode};
use tracing::warn;

use crate::api::state::AppState;
use crate::api::{extensions, ops, s3};
use crate::images::build::{build_args_header, BUILD_ARGS_MEMBER};

/// Largest request body accepted; the model's largest inputs are a few KiB.
const MAX_BODY: usize = 1024 * 1024;

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
    body.push_str(&usage_series(&state.meter));
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        body,
    )
        .into_response()
}

/// Per-microVM series from the usage meter's last round, and the meter's own cost.
fn usage_series(meter: &crate::vms::meter::Meter) -> String {
    let mut figures: Vec<_> = meter.figures().into_iter().collect();
    figures.sort_by(|a, b| a.0.cmp(&b.0));
    let mut body = String::new();
    type Series = (
        &'static str,
        &'static str,
        fn(&crate::vms::meter::VmFigures) -> f64,
    );
    let series: [Series; 4] = [
        ("hearth_microvm_cpu_seconds_total", "counter", |f| {
            f.cpu_seconds
        }),
        ("hearth_microvm_memory_bytes", "gauge", |f| {
            f.memory_bytes as f64
        }),
        ("hearth_microvm_burst_vcpu_seconds_total", "counter", |f| {
            f.burst_seconds
        }),
        ("hearth_microvm_egress_bytes_total", "counter", |f| {
            f.egress_bytes as f64
        }),
    ];
    for (name, kind, value) in series {
        body.push_str(&format!("# TYPE {name} {kind}\n"));
        for (id, f) in &figures {
            body.push_str(&format!("{name}{{microvm=\"{id}\"}} {}\n", value(f)));
        }
    }
    let (spent, rounds) = meter.cost();
    body.push_str(&format!(
        "# TYPE hearth_meter_cpu_seconds_total counter\nhearth_meter_cpu_seconds_total {spent}\n\
         # TYPE hearth_meter_rounds_total counter\nhearth_meter_rounds_total {rounds}\n"
    ));
    body
}

/// Every API operation goes through here.
async fn http_api(State(state): State<Arc<AppState>>, request: Request) -> Response {
    state.metrics.requests.fetch_add(1, Ordering::Relaxed);
    let request_id = crate::db::ids::new_uuid();
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

async fn handle(state: &Arc<AppState>, request: Request) -> Result<Response, ApiError> {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, MAX_BODY).await.map_err(|_| {
        ApiError::new(
            ErrorCode::Validation,
            "Request body is too large or unreadable",
        )
    })?;
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
    // The operations are synchronous SQLite work (the store's lock, fsyncs):
    // on the blocking pool, so the async workers keep serving the endpoint
    // proxy and launches meanwhile.
    let state = state.clone();
    let runtime = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || runtime.block_on(operation(&state, parts, body)))
        .await
        .map_err(|_| ApiError::new(ErrorCode::InternalServer, "Internal error"))?
}

/// Authenticates, validates and runs one model operation.
async fn operation(
    state: &AppState,
    parts: http::request::Parts,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let model = hearth_api::model();
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
        if let Some(args) = build_args_header(&parts.headers)? {
            input[BUILD_ARGS_MEMBER] = args;
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

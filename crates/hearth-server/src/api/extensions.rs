//! hearth extensions to the API, outside the 24 operations of the model, under
//! their own path prefix and signed with SigV4 like the rest:
//!
//! - `POST /hearth/2025-09-09/microvms/{id}/exec`: runs a command in a RUNNING
//!   microVM through its agent and returns its exit status and output.
//!   Body: `{"argv": [..], "env"?: {..}, "cwd"?: "/", "stdin"?: base64,
//!   "timeoutInSeconds"?: 1-3600}`. Answer: `{"exitCode"?, "signal"?,
//!   "timedOut", "stdout": base64, "stderr": base64}`.
//! - `GET /hearth/2025-09-09/builds/{buildId}/logs?offset=N`: the build's log
//!   from byte `offset` (at most 256 KiB per call). Answer: `{"buildState",
//!   "stateReason"?, "log", "nextOffset", "complete"}`; `complete` is true
//!   once the build has ended and the whole log was read.
//! - `GET /hearth/2025-09-09/microvms/{id}/logs?since=MS&offset=CURSOR&follow=BOOL`:
//!   the app's stdout and stderr (see [`super::app_logs`]).
//! - `GET /hearth/2025-09-09/usage?since=EPOCH&until=EPOCH`: the caller's
//!   metered usage and its cost (see [`super::usage`]).

use std::time::Duration;

use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use hearth_api::{ApiError, ErrorCode};
use hearth_proto::ExecRequest;
use hearth_vm::agent::CappedBuffer;
use http::Method;
use serde_json::json;

use crate::api::ops::input::{internal, Caller};
use crate::api::state::AppState;
use crate::db::resources::{BuildState, MicrovmState};
use crate::endpoint::guest_api::ExecBody;

const PREFIX: &str = "/hearth/2025-09-09/microvms/";
const BUILDS_PREFIX: &str = "/hearth/2025-09-09/builds/";
const USAGE_PATH: &str = "/hearth/2025-09-09/usage";
/// Most log bytes one call returns.
const LOG_CHUNK: u64 = 256 * 1024;
/// Output beyond this is refused rather than buffered (the agent caps at 64 MiB).
const MAX_OUTPUT: usize = 16 * 1024 * 1024;
const MAX_ARGS: usize = 4096;

/// An extension request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Exec {
        microvm_id: String,
    },
    BuildLogs {
        build_id: String,
        offset: u64,
    },
    /// The query is checked by the handler (a bad one is a 400).
    MicrovmLogs {
        microvm_id: String,
        query: String,
    },
    /// The caller's cost report; the query is checked by the handler.
    Usage {
        query: String,
    },
}

impl Route {
    /// The name rate limits know it by.
    pub fn operation(&self) -> &'static str {
        match self {
            Route::Exec { .. } => "HearthExec",
            Route::BuildLogs { .. } => "HearthBuildLogs",
            Route::MicrovmLogs { .. } => "HearthMicrovmLogs",
            Route::Usage { .. } => "HearthUsage",
        }
    }
}

pub fn route(method: &Method, path: &str, query: Option<&str>) -> Option<Route> {
    if path == USAGE_PATH {
        return (method == Method::GET).then(|| Route::Usage {
            query: query.unwrap_or("").to_string(),
        });
    }
    if let Some(rest) = path.strip_prefix(BUILDS_PREFIX) {
        let (id, action) = rest.split_once('/')?;
        if method != Method::GET || action != "logs" || id.is_empty() {
            return None;
        }
        let offset = form_urlencoded::parse(query.unwrap_or("").as_bytes())
            .find(|(k, _)| k == "offset")
            .map(|(_, v)| v.parse::<u64>().unwrap_or(u64::MAX))
            .unwrap_or(0);
        return Some(Route::BuildLogs {
            build_id: id.to_string(),
            offset,
        });
    }
    let rest = path.strip_prefix(PREFIX)?;
    let (id, action) = rest.split_once('/')?;
    match (method, action) {
        (&Method::POST, "exec") if !id.is_empty() => Some(Route::Exec {
            microvm_id: id.to_string(),
        }),
        (&Method::GET, "logs") if !id.is_empty() => Some(Route::MicrovmLogs {
            microvm_id: id.to_string(),
            query: query.unwrap_or("").to_string(),
        }),
        _ => None,
    }
}

pub async fn handle(
    state: &AppState,
    caller: &Caller,
    route: Route,
    body: &[u8],
) -> Result<Response, ApiError> {
    match route {
        Route::Exec { microvm_id } => exec(state, caller, &microvm_id, body).await,
        Route::BuildLogs { build_id, offset } => build_logs(state, caller, &build_id, offset),
        Route::MicrovmLogs { microvm_id, query } => {
            super::app_logs::handle(state, caller, &microvm_id, &query).await
        }
        Route::Usage { query } => super::usage::handle(state, caller, &query),
    }
}

fn build_logs(
    state: &AppState,
    caller: &Caller,
    build_id: &str,
    offset: u64,
) -> Result<Response, ApiError> {
    use std::io::{Read, Seek, SeekFrom};
    let build = state
        .store
        .build(&caller.account_id, build_id)
        .map_err(internal)?
        .ok_or_else(|| ApiError::not_found(format!("Build {build_id} not found")))?;
    let ended = matches!(build.state, BuildState::Successful | BuildState::Failed);
    let mut text = Vec::new();
    let mut size = 0;
    if let Ok(mut file) = std::fs::File::open(state.builds.log_path(build_id)) {
        size = file.metadata().map(|m| m.len()).unwrap_or(0);
        if offset > size {
            return Err(ApiError::validation(format!(
                "offset {offset} is past the end of the log ({size} bytes)"
            )));
        }
        if file.seek(SeekFrom::Start(offset)).is_ok() {
            let _ = file.take(LOG_CHUNK).read_to_end(&mut text);
        }
    } else if offset > 0 {
        return Err(ApiError::validation("offset is past the end of the log"));
    }
    let next = offset + text.len() as u64;
    let mut out = json!({
        "buildState": build.state.as_str(),
        "log": String::from_utf8_lossy(&text),
        "nextOffset": next,
        "complete": ended && next >= size,
    });
    if let Some(reason) = &build.state_reason {
        out["stateReason"] = json!(reason);
    }
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        out.to_string(),
    )
        .into_response())
}

async fn exec(
    state: &AppState,
    caller: &Caller,
    microvm_id: &str,
    body: &[u8],
) -> Result<Response, ApiError> {
    let request: ExecBody = serde_json::from_slice(body)
        .map_err(|e| ApiError::validation(format!("Invalid exec request: {e}")))?;
    if request.argv.is_empty() || request.argv.len() > MAX_ARGS {
        return Err(ApiError::validation(format!(
            "argv must hold 1 to {MAX_ARGS} strings"
        )));
    }
    let timeout = request.timeout_in_seconds.unwrap_or(60);
    if !(1..=3600).contains(&timeout) {
        return Err(ApiError::validation(
            "timeoutInSeconds must be between 1 and 3600",
        ));
    }
    let stdin = match &request.stdin {
        Some(text) => Some(
            base64::engine::general_purpose::STANDARD
                .decode(text)
                .map_err(|_| ApiError::validation("stdin must be base64"))?,
        ),
        None => None,
    };
    let row = state
        .store
        .microvm(&caller.account_id, microvm_id)
        .map_err(internal)?
        .ok_or_else(|| ApiError::not_found(format!("MicroVM {microvm_id} not found")))?;
    if row.state != MicrovmState::Running {
        return Err(ApiError::conflict(format!(
            "MicroVM {microvm_id} is {}; commands run only in RUNNING MicroVMs",
            row.state
        )));
    }
    let agent = state.engine.agent(&row).await.map_err(|err| {
        tracing::warn!(microvm = microvm_id, error = %hearth_vm::error_chain(&err), "no agent");
        ApiError::conflict(format!("MicroVM {microvm_id} cannot be reached"))
    })?;
    let exec = ExecRequest {
        argv: request.argv,
        env: request.env.into_iter().collect(),
        cwd: request.cwd,
        stdin: stdin.is_some(),
        timeout_ms: Some(timeout * 1000),
        ..Default::default()
    };
    let output = run(&agent, exec, stdin, Duration::from_secs(timeout + 10))
        .await
        .map_err(|err| {
            tracing::warn!(microvm = microvm_id, error = %err, "exec failed");
            ApiError::new(ErrorCode::InternalServer, format!("exec failed: {err}"))
        })?;
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
    let mut out = json!({
        "timedOut": output.status.timed_out,
        "stdout": b64(&output.stdout),
        "stderr": b64(&output.stderr),
    });
    if let Some(code) = output.status.code {
        out["exitCode"] = json!(code);
    }
    if let Some(signal) = output.status.signal {
        out["signal"] = json!(signal);
    }
    Ok((
        [(http::header::CONTENT_TYPE, "application/json")],
        out.to_string(),
    )
        .into_response())
}

#[derive(Debug, thiserror::Error)]
enum ExecError {
    #[error("{0}")]
    Agent(String),
    #[error("the command's output exceeds {MAX_OUTPUT} bytes")]
    TooLarge,
    #[error("the command did not finish in time")]
    Timeout,
}

async fn run(
    agent: &hearth_vm::AgentClient,
    request: ExecRequest,
    stdin: Option<Vec<u8>>,
    timeout: Duration,
) -> Result<hearth_vm::ExecOutput, ExecError> {
    let work = async {
        let output = match stdin {
            None => agent.exec_output(request).await,
            Some(bytes) => {
                let mut stdout = CappedBuffer::new(MAX_OUTPUT);
                let mut stderr = CappedBuffer::new(MAX_OUTPUT);
                let status = agent
                    .exec(
                        request,
                        Some(std::io::Cursor::new(bytes)),
                        &mut stdout,
                        &mut stderr,
                    )
                    .await;
                status.map(|status| hearth_vm::ExecOutput {
                    status,
                    stdout: stdout.into_bytes(),
                    stderr: stderr.into_bytes(),
                })
            }
        };
        output.map_err(|e| ExecError::Agent(hearth_vm::error_chain(&e)))
    };
    let output = tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| ExecError::Timeout)??;
    if output.stdout.len() + output.stderr.len() > MAX_OUTPUT {
        return Err(ExecError::TooLarge);
    }
    Ok(output)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(
            route(
                &Method::POST,
                "/hearth/2025-09-09/microvms/microvm-1/exec",
                None
            ),
            Some(Route::Exec {
                microvm_id: "microvm-1".into()
            })
        );
        assert_eq!(
            route(&Method::GET, "/hearth/2025-09-09/microvms/m/exec", None),
            None
        );
        assert_eq!(
            route(&Method::POST, "/hearth/2025-09-09/microvms//exec", None),
            None
        );
        assert_eq!(route(&Method::POST, "/2025-09-09/microvms/m", None), None);
        assert_eq!(
            route(
                &Method::GET,
                "/hearth/2025-09-09/microvms/microvm-1/logs",
                Some("follow=true")
            ),
            Some(Route::MicrovmLogs {
                microvm_id: "microvm-1".into(),
                query: "follow=true".into()
            })
        );
        assert_eq!(
            route(&Method::POST, "/hearth/2025-09-09/microvms/m/logs", None),
            None
        );
        assert_eq!(
            route(
                &Method::GET,
                "/hearth/2025-09-09/builds/b-1/logs",
                Some("offset=42")
            ),
            Some(Route::BuildLogs {
                build_id: "b-1".into(),
                offset: 42
            })
        );
        assert_eq!(
            route(&Method::GET, "/hearth/2025-09-09/builds/b-1/logs", None),
            Some(Route::BuildLogs {
                build_id: "b-1".into(),
                offset: 0
            })
        );
        // A bad offset is past any log (a validation error), not 0.
        assert_eq!(
            route(
                &Method::GET,
                "/hearth/2025-09-09/builds/b/logs",
                Some("offset=x")
            ),
            Some(Route::BuildLogs {
                build_id: "b".into(),
                offset: u64::MAX
            })
        );
        assert_eq!(
            route(&Method::POST, "/hearth/2025-09-09/builds/b/logs", None),
            None
        );
        assert_eq!(
            route(&Method::GET, "/hearth/2025-09-09/builds//logs", None),
            None
        );
    }
}

//! `GET /hearth/2025-09-09/microvms/{microvmId}/logs`: the app's stdout and
//! stderr as stored by the log collector (`vms::log_collector`).
//!
//! Query: `since` (epoch ms), `offset` (the opaque `nextOffset` of a previous
//! answer), `follow` (`true`/`false`). Without follow: `200 application/json`
//! `{"events": [{"timestamp", "stream", "message"}], "nextOffset"}`, at most
//! [`MAX_EVENTS`] events or [`MAX_BYTES`] of messages. With follow: `200
//! application/x-ndjson`, one event per line as they arrive, ending when the
//! microVM is TERMINATED (and everything stored was sent) or the client goes.

use std::time::Duration;

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use hearth_api::ApiError;
use serde_json::json;

use crate::api::ops::input::{internal, Caller};
use crate::api::state::AppState;
use crate::db::resources::MicrovmState;
use crate::db::store::Store;
use crate::vms::log_store::{LogEvent, LogPage, LogQuery, LogStore};

/// Most events in one answer (or one follow read).
pub const MAX_EVENTS: usize = 10_000;
/// Most bytes of messages in one answer.
pub const MAX_BYTES: usize = 1024 * 1024;
/// How often a follow looks for new events.
const FOLLOW_POLL: Duration = Duration::from_millis(300);

/// The route's query, checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LogParams {
    pub since_ms: Option<u64>,
    pub from: u64,
    pub follow: bool,
}

impl LogParams {
    pub fn parse(query: &str) -> Result<Self, ApiError> {
        let mut params = Self::default();
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            match key.as_ref() {
                "since" => {
                    let since = value.parse().map_err(|_| {
                        ApiError::validation("since must be a time in epoch milliseconds")
                    })?;
                    params.since_ms = Some(since);
                }
                "offset" => {
                    params.from = value.parse().map_err(|_| {
                        ApiError::validation("offset must be the nextOffset of an earlier answer")
                    })?;
                }
                "follow" => {
                    params.follow = match value.as_ref() {
                        "true" => true,
                        "false" => false,
                        _ => return Err(ApiError::validation("follow must be true or false")),
                    };
                }
                _ => {}
            }
        }
        Ok(params)
    }

    fn query(&self, from: u64) -> LogQuery {
        LogQuery {
            from,
            since_ms: self.since_ms,
            max_events: MAX_EVENTS,
            max_bytes: MAX_BYTES,
        }
    }
}

fn event_json(event: &LogEvent) -> serde_json::Value {
    json!({
        "timestamp": event.timestamp,
        "stream": event.stream.as_str(),
        "message": event.message,
    })
}

async fn read(logs: &LogStore, microvm_id: &str, query: LogQuery) -> Result<LogPage, ApiError> {
    let logs = logs.clone();
    let id = microvm_id.to_string();
    let page = tokio::task::spawn_blocking(move || logs.read(&id, &query))
        .await
        .map_err(|_| ApiError::new(hearth_api::ErrorCode::InternalServer, "log read failed"))?;
    page.map_err(|err| {
        tracing::warn!(microvm = microvm_id, error = %hearth_vm::error_chain(&err), "log read");
        ApiError::new(hearth_api::ErrorCode::InternalServer, "log read failed")
    })
}

pub async fn handle(
    state: &AppState,
    caller: &Caller,
    microvm_id: &str,
    query: &str,
) -> Result<Response, ApiError> {
    let params = LogParams::parse(query)?;
    let not_found = || ApiError::not_found(format!("MicroVM {microvm_id} not found"));
    if !microvm_id.starts_with("microvm-") {
        return Err(not_found());
    }
    state
        .store
        .microvm(&caller.account_id, microvm_id)
        .map_err(internal)?
        .ok_or_else(not_found)?;
    let logs = LogStore::new(&state.config.data_dir);
    if !params.follow {
        let page = read(&logs, microvm_id, params.query(params.from)).await?;
        let events: Vec<_> = page.events.iter().map(event_json).collect();
        let body = json!({"events": events, "nextOffset": page.next.to_string()});
        return Ok((
            [(http::header::CONTENT_TYPE, "application/json")],
            body.to_string(),
        )
            .into_response());
    }
    let follow = Follow {
        logs,
        store: state.store.clone(),
        microvm_id: microvm_id.to_string(),
        params,
        cursor: params.from,
        ended: false,
    };
    let stream = futures::stream::unfold(follow, |mut follow| async move {
        let chunk = follow.next_chunk().await?;
        Some((Ok::<Bytes, std::io::Error>(chunk), follow))
    });
    Ok((
        [(http::header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response())
}

/// A follow answer's state between chunks.
struct Follow {
    logs: LogStore,
    store: Store,
    microvm_id: String,
    params: LogParams,
    cursor: u64,
    /// The microVM was seen TERMINATED: one more read, then the end.
    ended: bool,
}

impl Follow {
    /// The next events as NDJSON; `None` at the end.
    async fn next_chunk(&mut self) -> Option<Bytes> {
        loop {
            let page = read(&self.logs, &self.microvm_id, self.params.query(self.cursor))
                .await
                .ok()?;
            self.cursor = page.next;
            if !page.events.is_empty() {
                let mut text = Vec::new();
                for event in &page.events {
                    text.extend(event_json(event).to_string().into_bytes());
                    text.push(b'\n');
                }
                return Some(Bytes::from(text));
            }
            if self.ended {
                return None;
            }
            let state = self.store.microvm_by_id(&self.microvm_id).ok()?;
            if state.is_none_or(|row| row.state == MicrovmState::Terminated) {
                self.ended = true;
                continue;
            }
            tokio::time::sleep(FOLLOW_POLL).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params() {
        assert_eq!(LogParams::parse("").ok(), Some(LogParams::default()));
        assert_eq!(
            LogParams::parse("since=1700000000000&offset=42&follow=true").ok(),
            Some(LogParams {
                since_ms: Some(1_700_000_000_000),
                from: 42,
                follow: true
            })
        );
        assert!(LogParams::parse("follow=yes").is_err());
        assert!(LogParams::parse("offset=-1").is_err());
        assert!(LogParams::parse("since=yesterday").is_err());
    }
}

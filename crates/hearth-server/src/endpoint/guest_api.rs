//! What the endpoint serves itself instead of forwarding to the app:
//!
//! - `GET /shell` upgraded to a WebSocket (the reference's shell protocol): a
//!   first text frame `{"type":"session_init","session_id":...}`, binary frames
//!   carrying a root PTY's bytes both ways, text `{"type":"resize","cols","rows"}`,
//!   close 1000 when the shell exits. Other text is typed into the shell, as
//!   the reference does with unknown control JSON.
//! - The agent API (hearth extension) under `/.hearth/v1/`, authorised by a
//!   shell token (`CreateMicrovmShellAuthToken`: it already grants a root shell):
//!   `POST /.hearth/v1/exec` (JSON `{"argv","env"?,"cwd"?,"stdin"?: base64,
//!   "timeoutInSeconds"?}`, answered as a stream of JSON lines
//!   `{"stdout": base64}`, `{"stderr": base64}`, then `{"exitCode"?, "signal"?,
//!   "timedOut"}`; a client that closes the request kills the process),
//!   `PUT /.hearth/v1/files?path=/abs&mode=644` (streamed body),
//!   `GET /.hearth/v1/files?path=/abs` (streamed content),
//!   `GET /.hearth/v1/ls?path=/dir` (`{"entries": [{"name","type","size","mode","modifiedAt"}]}`,
//!   listed with the image's `find`).
//! - `GET /.hearth/v1/exec` upgraded to a WebSocket: an interactive exec (the
//!   CLI's `hearth exec`). The client's first text frame is
//!   `{"argv","env"?,"cwd"?,"timeoutInSeconds"?,"tty"?: {"cols","rows","term"?}}`;
//!   then binary frames are stdin (typed into the terminal with `tty`), and
//!   text frames `{"type":"eof"}`, `{"type":"resize","cols","rows"}`,
//!   `{"type":"signal","signal":N}`. The server sends binary frames whose
//!   first byte is 1 (stdout) or 2 (stderr) followed by the bytes, then a text
//!   `{"type":"exit","exitCode"?,"signal"?,"timedOut"}` and close 1000; a
//!   command that cannot start gets `{"type":"error","message"}` and close 1011.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use hearth_proto::{ExecRequest, FrameKind, WriteFileRequest};
use hearth_proxy::{
    Access, Backend, BoxFuture, ExtensionHandler, ExtensionRequest, ExtensionRoute, ProxyBody,
};
use http::{Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::tungstenite::Message;
use tracing::{info, warn};

use serde::Deserialize;

use crate::endpoint::backend::EndpointBackend;
use crate::vms::engine::Engine;

/// How long a request may wait for a suspended VM to resume.
const RESUME_WAIT: Duration = Duration::from_secs(30);
/// Largest exec request body.
const MAX_EXEC_BODY: usize = 1024 * 1024;
/// The shell a session runs: bash when the image has it.
const SHELL: &str = "if [ -x /bin/bash ]; then exec /bin/bash -l; else exec /bin/sh -l; fi";

#[derive(Debug)]
pub struct GuestApi {
    engine: Arc<Engine>,
    backend: Arc<EndpointBackend>,
}

impl GuestApi {
    pub fn new(engine: Arc<Engine>, backend: Arc<EndpointBackend>) -> Arc<Self> {
        Arc::new(Self { engine, backend })
    }
}

/// The body of an exec request, here and in the API's exec extension.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct ExecBody {
    pub(crate) argv: Vec<String>,
    #[serde(default)]
    pub(crate) env: std::collections::BTreeMap<String, String>,
    pub(crate) cwd: Option<String>,
    /// Base64.
    pub(crate) stdin: Option<String>,
    pub(crate) timeout_in_seconds: Option<u64>,
}

fn text(status: StatusCode, message: &str) -> Response<ProxyBody> {
    let body = http_body_util::Full::new(Bytes::from(json!({ "message": message }).to_string()))
        .map_err(|never| match never {})
        .boxed_unsync();
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

impl ExtensionHandler for GuestApi {
    fn handle(&self, request: ExtensionRequest) -> BoxFuture<'_, Response<ProxyBody>> {
        Box::pin(async move {
            let Some(token) = request.token.as_deref() else {
                return text(StatusCode::FORBIDDEN, "Missing authentication token");
            };
            // Shell sessions and the agent API both need a shell token.
            if self
                .backend
                .authorize(&request.microvm_id, token, Access::Shell)
                .await
                .is_err()
            {
                return text(StatusCode::FORBIDDEN, "Forbidden");
            }
            match request.route {
                ExtensionRoute::Shell => self.shell(request).await,
                ExtensionRoute::Reserved => self.agent_api(request).await,
            }
        })
    }
}

impl GuestApi {
    async fn agent(
        &self,
        microvm_id: &str,
    ) -> Result<Arc<hearth_vm::AgentClient>, Response<ProxyBody>> {
        self.engine
            .running_agent(microvm_id, RESUME_WAIT)
            .await
            .map_err(|err| text(StatusCode::BAD_GATEWAY, &err.to_string()))
    }

    async fn shell(&self, request: ExtensionRequest) -> Response<ProxyBody> {
        let ExtensionRequest {
            microvm_id,
            mut request,
            ..
        } = request;
        let Some(key) = request
            .headers()
            .get("sec-websocket-key")
            .map(|k| k.as_bytes().to_vec())
        else {
            return text(StatusCode::BAD_REQUEST, "Not a WebSocket request");
        };
        let offered_ours = offers_our_protocol(request.headers());
        let agent = match self.agent(&microvm_id).await {
            Ok(agent) => agent,
            Err(response) => return response,
        };
        let upgrade = hyper::upgrade::on(&mut request);
        let engine = self.engine.clone();
        tokio::spawn(async move {
            match upgrade.await {
                Ok(upgraded) => {
                    let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
                        TokioIo::new(upgraded),
                        Role::Server,
                        None,
                    )
                    .await;
                    run_shell(engine, agent, &microvm_id, ws).await;
                }
                Err(err) => warn!(error = %err, "shell upgrade failed"),
            }
        });
        switching_protocols(&key, offered_ours)
    }

    /// `GET /.hearth/v1/exec` as a WebSocket: an interactive exec.
    fn exec_socket(
        &self,
        microvm_id: String,
        agent: Arc<hearth_vm::AgentClient>,
        mut request: http::Request<hyper::body::Incoming>,
    ) -> Response<ProxyBody> {
        let Some(key) = request
            .headers()
            .get("sec-websocket-key")
            .map(|k| k.as_bytes().to_vec())
        else {
            return text(
                StatusCode::BAD_REQUEST,
                "GET /.hearth/v1/exec is a WebSocket; POST runs a command without one",
            );
        };
        let offered_ours = offers_our_protocol(request.headers());
        let upgrade = hyper::upgrade::on(&mut request);
        let engine = self.engine.clone();
        tokio::spawn(async move {
            match upgrade.await {
                Ok(upgraded) => {
                    let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
                        TokioIo::new(upgraded),
                        Role::Server,
                        None,
                    )
                    .await;
                    run_exec_socket(engine, agent, &microvm_id, ws).await;
                }
                Err(err) => warn!(error = %err, "exec upgrade failed"),
            }
        });
        switching_protocols(&key, offered_ours)
    }

    async fn agent_api(&self, request: ExtensionRequest) -> Response<ProxyBody> {
        let ExtensionRequest {
            microvm_id,
            request,
            ..
        } = request;
        let path = request.uri().path().to_string();
        let query = request.uri().query().unwrap_or_default().to_string();
        let method = request.method().clone();
        let agent = match self.agent(&microvm_id).await {
            Ok(agent) => agent,
            Err(response) => return response,
        };
        self.engine.note_traffic(&microvm_id);
        match (method, path.as_str()) {
            (http::Method::GET, "/.hearth/v1/exec") => self.exec_socket(microvm_id, agent, request),
            (http::Method::POST, "/.hearth/v1/exec") => exec(agent, request).await,
            (http::Method::PUT, "/.hearth/v1/files") => put_file(agent, &query, request).await,
            (http::Method::GET, "/.hearth/v1/files") => get_file(agent, &query).await,
            (http::Method::GET, "/.hearth/v1/ls") => list_dir(agent, &query).await,
            _ => text(StatusCode::NOT_FOUND, "Unknown agent API route"),
        }
    }
}

async fn run_shell<S>(
    engine: Arc<Engine>,
    agent: Arc<hearth_vm::AgentClient>,
    microvm_id: &str,
    mut ws: tokio_tungstenite::WebSocketStream<S>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let session_id = crate::db::ids::new_uuid();
    let init = json!({"type": "session_init", "session_id": session_id}).to_string();
    if ws.send(Message::text(init)).await.is_err() {
        return;
    }
    let request = ExecRequest {
        argv: vec!["/bin/sh".into(), "-c".into(), SHELL.into()],
        cwd: Some("/root".into()),
        ..Default::default()
    };
    let mut stream = match agent.exec_pty(request, 80, 24).await {
        Ok(stream) => stream,
        Err(err) => {
            warn!(microvm = microvm_id, error = %err, "shell did not start");
            let _ = ws
                .send(Message::Close(Some(CloseFrame {
                    code: CloseCode::Error,
                    reason: "shell could not start".into(),
                })))
                .await;
            return;
        }
    };
    info!(microvm = microvm_id, session = %session_id, "shell session");
    let sender = stream.sender();
    loop {
        tokio::select! {
            incoming = ws.next() => {
                engine.note_traffic(microvm_id);
                let message = match incoming {
                    Some(Ok(message)) => message,
                    _ => break,
                };
                let sent = match message {
                    Message::Binary(bytes) => sender.send_data(bytes).await,
                    Message::Text(text) => match resize_of(text.as_str()) {
                        Some((cols, rows)) => sender.resize(cols, rows).await,
                        None => sender.send_data(Bytes::copy_from_slice(text.as_bytes())).await,
                    },
                    Message::Close(_) => break,
                    _ => Ok(()),
                };
                if sent.is_err() {
                    break;
                }
            }
            event = stream.next_pty_event() => {
                engine.note_traffic(microvm_id);
                match event {
                    Ok(hearth_vm::agent::PtyEvent::Output(bytes)) => {
                        if ws.send(Message::Binary(bytes)).await.is_err() {
                            break;
                        }
                    }
                    Ok(hearth_vm::agent::PtyEvent::Exited(_)) => {
                        let _ = ws
                            .send(Message::Close(Some(CloseFrame {
                                code: CloseCode::Normal,
                                reason: "shell exited".into(),
                            })))
                            .await;
                        // Let the close handshake finish.
                        let _ = tokio::time::timeout(Duration::from_secs(2), async {
                            while let Some(Ok(_)) = ws.next().await {}
                        })
                        .await;
                        return;
                    }
                    Err(_) => break,
                }
            }
        }
    }
    let _ = ws.close(None).await;
}

/// The 101 answer to a WebSocket upgrade; names the `lambda-microvms`
/// subprotocol when the client offered it.
fn switching_protocols(key: &[u8], offered_ours: bool) -> Response<ProxyBody> {
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key);
    let mut response = Response::new(
        http_body_util::Empty::new()
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("upgrade"),
    );
    headers.insert(
        http::header::UPGRADE,
        http::HeaderValue::from_static("websocket"),
    );
    if let Ok(value) = http::HeaderValue::from_str(&accept) {
        headers.insert("sec-websocket-accept", value);
    }
    if offered_ours {
        headers.insert(
            "sec-websocket-protocol",
            http::HeaderValue::from_static("lambda-microvms"),
        );
    }
    response
}

/// Whether the request offers the `lambda-microvms` WebSocket subprotocol.
fn offers_our_protocol(headers: &http::HeaderMap) -> bool {
    headers
        .get_all("sec-websocket-protocol")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim() == "lambda-microvms")
}

/// The first message of an interactive exec (see the module doc).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct InteractiveExec {
    argv: Vec<String>,
    #[serde(default)]
    env: std::collections::BTreeMap<String, String>,
    cwd: Option<String>,
    timeout_in_seconds: Option<u64>,
    tty: Option<TtyRequest>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TtyRequest {
    cols: u16,
    rows: u16,
    term: Option<String>,
}

/// What an interactive exec's client sends in text frames.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
enum ExecControl {
    Eof,
    Resize { cols: u16, rows: u16 },
    Signal { signal: i32 },
}

/// First byte of the server's binary frames in an interactive exec.
const STDOUT_TAG: u8 = 1;
const STDERR_TAG: u8 = 2;
/// How long the client has to send the request after the upgrade.
const EXEC_REQUEST_WAIT: Duration = Duration::from_secs(30);

async fn close_with_error<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>, message: &str)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let error = json!({"type": "error", "message": message}).to_string();
    let _ = ws.send(Message::text(error)).await;
    let _ = ws
        .send(Message::Close(Some(CloseFrame {
            code: CloseCode::Error,
            reason: "exec failed".into(),
        })))
        .await;
}

/// An interactive exec over a WebSocket (see the module doc).
async fn run_exec_socket<S>(
    engine: Arc<Engine>,
    agent: Arc<hearth_vm::AgentClient>,
    microvm_id: &str,
    mut ws: tokio_tungstenite::WebSocketStream<S>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let first = tokio::time::timeout(EXEC_REQUEST_WAIT, ws.next()).await;
    let parsed: InteractiveExec = match first {
        Ok(Some(Ok(Message::Text(text)))) => match serde_json::from_str(text.as_str()) {
            Ok(parsed) => parsed,
            Err(err) => {
                return close_with_error(&mut ws, &format!("Invalid exec request: {err}")).await
            }
        },
        _ => return close_with_error(&mut ws, "Expected the exec request as a text frame").await,
    };
    if parsed.argv.is_empty() {
        return close_with_error(&mut ws, "argv must not be empty").await;
    }
    let request = ExecRequest {
        argv: parsed.argv,
        env: parsed.env.into_iter().collect(),
        cwd: parsed.cwd,
        stdin: true,
        timeout_ms: parsed
            .timeout_in_seconds
            .map(|secs| secs.clamp(1, 86_400) * 1000),
        ..Default::default()
    };
    let opened = match parsed.tty {
        Some(tty) => {
            let mut request = request;
            request.pty = Some(hearth_proto::PtyRequest {
                cols: tty.cols,
                rows: tty.rows,
                term: tty.term,
            });
            agent.exec_pty(request, tty.cols, tty.rows).await
        }
        None => agent.open(&hearth_proto::Request::Exec(request)).await,
    };
    let mut stream = match opened {
        Ok(stream) => stream,
        Err(err) => return close_with_error(&mut ws, &format!("exec failed: {err}")).await,
    };
    let sender = stream.sender();
    loop {
        tokio::select! {
            incoming = ws.next() => {
                engine.note_traffic(microvm_id);
                let sent = match incoming {
                    Some(Ok(Message::Binary(bytes))) => sender.send_data(bytes).await,
                    Some(Ok(Message::Text(text))) => match serde_json::from_str(text.as_str()) {
                        Ok(ExecControl::Eof) => sender.send_eof().await,
                        Ok(ExecControl::Resize { cols, rows }) => sender.resize(cols, rows).await,
                        Ok(ExecControl::Signal { signal }) => sender.signal(signal).await,
                        // An unknown control message is ignored, not fatal.
                        Err(_) => Ok(()),
                    },
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                    Some(Ok(_)) => Ok(()),
                };
                if let Err(err) = sent {
                    // A refused resize or a late eof does not end the command.
                    tracing::debug!(microvm = microvm_id, error = %err, "exec input refused");
                }
            }
            frame = stream.recv() => {
                engine.note_traffic(microvm_id);
                match frame {
                    Ok(frame) if frame.kind == FrameKind::Data => {
                        let tag = if frame.flags == hearth_proto::FLAG_STDERR {
                            STDERR_TAG
                        } else {
                            STDOUT_TAG
                        };
                        let mut bytes = Vec::with_capacity(frame.payload.len() + 1);
                        bytes.push(tag);
                        bytes.extend_from_slice(&frame.payload);
                        if ws.send(Message::binary(bytes)).await.is_err() {
                            break;
                        }
                    }
                    Ok(frame) if frame.kind == FrameKind::Exit => {
                        let Ok(status) = frame.parse::<hearth_proto::ExitStatus>() else {
                            return close_with_error(&mut ws, "the agent sent a bad exit status").await;
                        };
                        let mut end = json!({"type": "exit", "timedOut": status.timed_out});
                        if let Some(code) = status.code {
                            end["exitCode"] = json!(code);
                        }
                        if let Some(signal) = status.signal {
                            end["signal"] = json!(signal);
                        }
                        let _ = ws.send(Message::text(end.to_string())).await;
                        let _ = ws
                            .send(Message::Close(Some(CloseFrame {
                                code: CloseCode::Normal,
                                reason: "exited".into(),
                            })))
                            .await;
                        // Let the close handshake finish.
                        let _ = tokio::time::timeout(Duration::from_secs(2), async {
                            while let Some(Ok(_)) = ws.next().await {}
                        })
                        .await;
                        return;
                    }
                    Ok(_) => {}
                    Err(err) => return close_with_error(&mut ws, &format!("exec failed: {err}")).await,
                }
            }
        }
    }
    // The client went away: dropping the stream kills the command.
    let _ = ws.close(None).await;
}

/// `{"type":"resize","cols":C,"rows":R}` with a sane size.
fn resize_of(text: &str) -> Option<(u16, u16)> {
    let value: serde_json::Value = serde_json::from_str(text).ok()?;
    if value["type"] != "resize" {
        return None;
    }
    let cols = u16::try_from(value["cols"].as_u64()?).ok()?;
    let rows = u16::try_from(value["rows"].as_u64()?).ok()?;
    hearth_proto::window_size_is_valid(cols, rows).then_some((cols, rows))
}

async fn exec(
    agent: Arc<hearth_vm::AgentClient>,
    request: http::Request<hyper::body::Incoming>,
) -> Response<ProxyBody> {
    let body = match http_body_util::Limited::new(request.into_body(), MAX_EXEC_BODY)
        .collect()
        .await
    {
        Ok(body) => body.to_bytes(),
        Err(_) => return text(StatusCode::PAYLOAD_TOO_LARGE, "Request body too large"),
    };
    let parsed: ExecBody = match serde_json::from_slice(&body) {
        Ok(parsed) => parsed,
        Err(err) => {
            return text(
                StatusCode::BAD_REQUEST,
                &format!("Invalid exec request: {err}"),
            )
        }
    };
    if parsed.argv.is_empty() {
        return text(StatusCode::BAD_REQUEST, "argv must not be empty");
    }
    let stdin = match parsed
        .stdin
        .as_deref()
        .map(|s| base64::engine::general_purpose::STANDARD.decode(s))
    {
        None => None,
        Some(Ok(bytes)) => Some(bytes),
        Some(Err(_)) => return text(StatusCode::BAD_REQUEST, "stdin must be base64"),
    };
    let timeout = parsed.timeout_in_seconds.unwrap_or(300).clamp(1, 86_400);
    let mut stream = match agent
        .open(&hearth_proto::Request::Exec(ExecRequest {
            argv: parsed.argv,
            env: parsed.env.into_iter().collect(),
            cwd: parsed.cwd,
            stdin: stdin.is_some(),
            timeout_ms: Some(timeout * 1000),
            ..Default::default()
        }))
        .await
    {
        Ok(stream) => stream,
        Err(err) => return text(StatusCode::BAD_GATEWAY, &format!("exec failed: {err}")),
    };
    if let Some(bytes) = stdin {
        let sender = stream.sender();
        tokio::spawn(async move { sender.send_all(std::io::Cursor::new(bytes)).await });
    }
    // Output streams out as JSON lines while the process runs.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, hearth_proxy::BoxError>>(16);
    tokio::spawn(async move {
        let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
        loop {
            // A client that goes away (a closed connection drops the response
            // body, so `rx`) ends the exec: dropping `stream` closes the agent
            // stream, whose guard kills the process group. Waiting on output
            // alone would leave a silent process running until its timeout.
            let received = tokio::select! {
                received = stream.recv() => received,
                () = tx.closed() => break,
            };
            let line = match received {
                Ok(frame) if frame.kind == FrameKind::Data => {
                    let key = if frame.flags == hearth_proto::FLAG_STDERR {
                        "stderr"
                    } else {
                        "stdout"
                    };
                    json!({ key: b64(&frame.payload) })
                }
                Ok(frame) if frame.kind == FrameKind::Exit => {
                    let status: hearth_proto::ExitStatus = match frame.parse() {
                        Ok(status) => status,
                        Err(_) => break,
                    };
                    let mut end = json!({"timedOut": status.timed_out});
                    if let Some(code) = status.code {
                        end["exitCode"] = json!(code);
                    }
                    if let Some(signal) = status.signal {
                        end["signal"] = json!(signal);
                    }
                    let _ = tx
                        .send(Ok(Frame::data(Bytes::from(format!("{end}\n")))))
                        .await;
                    break;
                }
                Ok(_) => continue,
                Err(err) => json!({ "error": err.to_string() }),
            };
            let done = line.get("error").is_some();
            if tx
                .send(Ok(Frame::data(Bytes::from(format!("{line}\n")))))
                .await
                .is_err()
                || done
            {
                break;
            }
        }
    });
    let lines = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    let body = StreamBody::new(lines).boxed_unsync();
    let mut response = Response::new(body);
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/x-ndjson"),
    );
    response
}

/// `path` (absolute) and `mode` (octal) from a query string.
fn file_params(query: &str) -> Result<(String, Option<u32>), &'static str> {
    let mut path = None;
    let mut mode = None;
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        match key.as_ref() {
            "path" => path = Some(value.into_owned()),
            "mode" => {
                let bits =
                    u32::from_str_radix(&value, 8).map_err(|_| "mode must be octal, e.g. 644")?;
                mode = Some(bits);
            }
            _ => {}
        }
    }
    match path {
        Some(path) if path.starts_with('/') && path.len() <= 4096 => Ok((path, mode)),
        _ => Err("path must be an absolute path"),
    }
}

async fn put_file(
    agent: Arc<hearth_vm::AgentClient>,
    query: &str,
    request: http::Request<hyper::body::Incoming>,
) -> Response<ProxyBody> {
    let (path, mode) = match file_params(query) {
        Ok(params) => params,
        Err(message) => return text(StatusCode::BAD_REQUEST, message),
    };
    // The body streams into the guest through a pipe; nothing is buffered whole.
    let (reader, mut writer) = tokio::io::duplex(256 * 1024);
    let mut body = request.into_body();
    tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else { return };
            if let Ok(data) = frame.into_data() {
                if writer.write_all(&data).await.is_err() {
                    return;
                }
            }
        }
        let _ = writer.shutdown().await;
    });
    match agent
        .write_file(
            WriteFileRequest {
                path,
                mode,
                uid: None,
                gid: None,
                create_parents: true,
            },
            reader,
        )
        .await
    {
        Ok(bytes) => {
            let mut response = text(StatusCode::CREATED, "written");
            *response.body_mut() =
                http_body_util::Full::new(Bytes::from(json!({ "bytes": bytes }).to_string()))
                    .map_err(|never| match never {})
                    .boxed_unsync();
            response
        }
        Err(err) => text(StatusCode::BAD_REQUEST, &format!("write failed: {err}")),
    }
}

async fn get_file(agent: Arc<hearth_vm::AgentClient>, query: &str) -> Response<ProxyBody> {
    let (path, _) = match file_params(query) {
        Ok(params) => params,
        Err(message) => return text(StatusCode::BAD_REQUEST, message),
    };
    let (mut writer, reader) = tokio::io::duplex(256 * 1024);
    let (status_tx, status_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let result = agent.read_file(&path, &mut writer).await;
        let _ = status_tx.send(result.as_ref().map(|_| ()).map_err(|e| e.to_string()));
    });
    // Wait for the first bytes or the error before choosing the status.
    let stream = tokio_util::io::ReaderStream::new(reader).map(|chunk| {
        chunk
            .map(Frame::data)
            .map_err(|e| Box::new(e) as hearth_proxy::BoxError)
    });
    let mut stream = Box::pin(stream.peekable());
    let first_ready = stream.as_mut().peek().await.is_some();
    if !first_ready {
        if let Ok(Err(message)) = status_rx.await {
            return text(StatusCode::NOT_FOUND, &format!("read failed: {message}"));
        }
    }
    let mut response = Response::new(StreamBody::new(stream).boxed_unsync());
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/octet-stream"),
    );
    response
}

/// Most entries one listing returns.
const MAX_LISTING: usize = 10_000;

async fn list_dir(agent: Arc<hearth_vm::AgentClient>, query: &str) -> Response<ProxyBody> {
    let (path, _) = match file_params(query) {
        Ok(params) => params,
        Err(message) => return text(StatusCode::BAD_REQUEST, message),
    };
    // The agent has no listing primitive; GNU find (Essential in Debian) prints
    // one NUL-terminated record per entry, so names may hold any byte but NUL.
    let output = agent
        .exec_output(ExecRequest {
            argv: vec![
                "find".into(),
                path.clone(),
                "-mindepth".into(),
                "1".into(),
                "-maxdepth".into(),
                "1".into(),
                "-printf".into(),
                "%y %s %m %T@ %f\\0".into(),
            ],
            timeout_ms: Some(30_000),
            ..Default::default()
        })
        .await;
    let output = match output {
        Ok(output) if output.status.code == Some(0) => output,
        Ok(output) => {
            let stderr = String::from_utf8_lossy(&output.stderr);
            return text(
                StatusCode::NOT_FOUND,
                &format!("cannot list {path}: {}", stderr.trim()),
            );
        }
        Err(err) => return text(StatusCode::BAD_GATEWAY, &format!("listing failed: {err}")),
    };
    let entries: Vec<serde_json::Value> = output
        .stdout
        .split(|b| *b == 0)
        .filter(|record| !record.is_empty())
        .take(MAX_LISTING)
        .filter_map(|record| {
            let record = String::from_utf8_lossy(record);
            let mut fields = record.splitn(5, ' ');
            let kind = match fields.next()? {
                "f" => "file",
                "d" => "directory",
                "l" => "symlink",
                _ => "other",
            };
            let size: u64 = fields.next()?.parse().ok()?;
            let mode = fields.next()?.to_string();
            let modified: f64 = fields.next()?.parse().ok()?;
            let name = fields.next()?.to_string();
            Some(json!({"name": name, "type": kind, "size": size, "mode": mode, "modifiedAt": modified}))
        })
        .collect();
    let mut response = text(StatusCode::OK, "");
    *response.body_mut() = http_body_util::Full::new(Bytes::from(
        json!({ "path": path, "entries": entries }).to_string(),
    ))
    .map_err(|never| match never {})
    .boxed_unsync();
    response
}

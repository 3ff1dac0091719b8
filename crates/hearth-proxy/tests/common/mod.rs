//! Test fixtures: a `Backend` double that connects to real local TCP servers
//! standing in for guest ports, a small hyper app, a WebSocket echo app, and
//! HTTP clients.
#![allow(clippy::unwrap_used, clippy::result_large_err, dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use hearth_proxy::{Access, Backend, BoxFuture, ConnectError, Denied, Io, ProxyConfig};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use sha2::{Digest, Sha256};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::handshake::server::{
    Request as WsRequest, Response as WsResponse,
};

pub const VM: &str = "microvm-0f5c7a52-9d1e-4c1a-8a53-3b7d2f1e6c90";
pub const OTHER_VM: &str = "microvm-11111111-2222-4333-8444-555555555555";
/// Allows ports 8080, 8081 and 9000 (WebSocket app), 7000 (refused), 7001 (unmapped),
/// 7002 (garbage), 7003 (silent) on VM.
pub const TOKEN: &str = "hm1.good-token";
/// Allows port 8080 on VM only.
pub const TOKEN_8080: &str = "hm1.port-8080-only";
/// Allows port 8080 on OTHER_VM.
pub const OTHER_TOKEN: &str = "hm1.other-vm";
pub const SHELL_TOKEN: &str = "hm1.shell";

pub type TestBody = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

struct Grant {
    vm: &'static str,
    ports: Vec<u16>,
    shell: bool,
}

/// The Backend double: guest ports are local TCP addresses.
pub struct TestBackend {
    grants: HashMap<&'static str, Grant>,
    ports: Mutex<HashMap<(String, u16), SocketAddr>>,
    pub connects: AtomicUsize,
    pub authorizations: AtomicUsize,
    pub traffic: AtomicU64,
}

impl TestBackend {
    pub fn new() -> Arc<Self> {
        let mut grants = HashMap::new();
        let all = vec![8080, 8081, 9000, 7000, 7001, 7002, 7003];
        grants.insert(
            TOKEN,
            Grant {
                vm: VM,
                ports: all,
                shell: false,
            },
        );
        grants.insert(
            TOKEN_8080,
            Grant {
                vm: VM,
                ports: vec![8080],
                shell: false,
            },
        );
        grants.insert(
            OTHER_TOKEN,
            Grant {
                vm: OTHER_VM,
                ports: vec![8080],
                shell: false,
            },
        );
        grants.insert(
            SHELL_TOKEN,
            Grant {
                vm: VM,
                ports: vec![],
                shell: true,
            },
        );
        Arc::new(TestBackend {
            grants,
            ports: Mutex::new(HashMap::new()),
            connects: AtomicUsize::new(0),
            authorizations: AtomicUsize::new(0),
            traffic: AtomicU64::new(0),
        })
    }

    pub fn map(&self, vm: &str, port: u16, addr: SocketAddr) {
        self.ports
            .lock()
            .unwrap()
            .insert((vm.to_owned(), port), addr);
    }

    pub fn connects(&self) -> usize {
        self.connects.load(Ordering::SeqCst)
    }

    pub fn traffic(&self) -> u64 {
        self.traffic.load(Ordering::SeqCst)
    }
}

impl Backend for TestBackend {
    fn authorize(&self, microvm_id: &str, token: &str, access: Access) -> Result<(), Denied> {
        self.authorizations.fetch_add(1, Ordering::SeqCst);
        let allowed = self.grants.get(token).is_some_and(|g| {
            g.vm == microvm_id
                && match access {
                    Access::Port(port) => g.ports.contains(&port),
                    Access::Shell => g.shell,
                }
        });
        if allowed {
            Ok(())
        } else {
            Err(Denied::Forbidden("Access to port denied".into()))
        }
    }

    fn connect(
        &self,
        microvm_id: &str,
        port: u16,
    ) -> BoxFuture<'_, Result<Box<dyn Io>, ConnectError>> {
        self.connects.fetch_add(1, Ordering::SeqCst);
        let addr = self
            .ports
            .lock()
            .unwrap()
            .get(&(microvm_id.to_owned(), port))
            .copied();
        Box::pin(async move {
            let Some(addr) = addr else {
                return Err(ConnectError::Unreachable("no such port mapping".into()));
            };
            match TcpStream::connect(addr).await {
                Ok(stream) => Ok(Box::new(stream) as Box<dyn Io>),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    Err(ConnectError::Refused)
                }
                Err(e) => Err(ConnectError::Io(e)),
            }
        })
    }

    fn traffic(&self, _microvm_id: &str, bytes: u64) {
        self.traffic.fetch_add(bytes, Ordering::SeqCst);
    }
}

/// State shared with the app, for tests that steer it.
#[derive(Default)]
pub struct AppControl {
    /// Released by the test to let `/sse` send its second event and end.
    pub sse_gate: Notify,
    /// Requests served.
    pub requests: AtomicUsize,
}

/// The HTTP app on a "guest port": routes
/// - `/headers`: JSON of what it saw (method, path, version, headers);
/// - `/upload`: JSON {len, sha256} of the request body, read as a stream;
/// - `/echo`: the request body streamed back;
/// - `/download?bytes=N`: N generated bytes (see [`pattern`]), streamed;
/// - `/sse`: one event, then (after `sse_gate`) a second, then the end;
/// - `/hold`: headers, then a body that never ends.
///
/// Every response carries `x-app: <name>`.
pub async fn start_app(name: &'static str) -> (SocketAddr, Arc<AppControl>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let control = Arc::new(AppControl::default());
    let ctl = Arc::clone(&control);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let ctl = Arc::clone(&ctl);
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let ctl = Arc::clone(&ctl);
                    async move { Ok::<_, Infallible>(app(name, ctl, req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, control)
}

async fn app(
    name: &'static str,
    ctl: Arc<AppControl>,
    req: Request<Incoming>,
) -> Response<TestBody> {
    ctl.requests.fetch_add(1, Ordering::SeqCst);
    let mut response = match req.uri().path() {
        "/upload" => {
            let mut body = req.into_body();
            let mut hasher = Sha256::new();
            let mut len = 0u64;
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame.unwrap().into_data() {
                    len += data.len() as u64;
                    hasher.update(&data);
                }
            }
            let sha = hex(&hasher.finalize());
            json_response(serde_json::json!({ "len": len, "sha256": sha }))
        }
        "/echo" => Response::new(req.into_body().map_err(Into::into).boxed()),
        "/download" => {
            let n: u64 = req
                .uri()
                .query()
                .and_then(|q| q.strip_prefix("bytes="))
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            Response::new(pattern_body(n))
        }
        "/sse" => {
            let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
            tokio::spawn(async move {
                let _ = tx.send(Bytes::from_static(b"data: one\n\n")).await;
                ctl.sse_gate.notified().await;
                let _ = tx.send(Bytes::from_static(b"data: two\n\n")).await;
            });
            let stream = futures::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|b| {
                    (
                        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(Frame::data(b)),
                        rx,
                    )
                })
            });
            let mut response = Response::new(BodyExt::boxed(StreamBody::new(stream)));
            response
                .headers_mut()
                .insert("content-type", "text/event-stream".parse().unwrap());
            response
        }
        "/hold" => {
            let stream = futures::stream::once(async {
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(Frame::data(Bytes::from_static(
                    b"held",
                )))
            })
            .chain(futures::stream::pending());
            Response::new(BodyExt::boxed(StreamBody::new(stream)))
        }
        _ => {
            let headers: serde_json::Map<String, serde_json::Value> = req
                .headers()
                .keys()
                .map(|name| {
                    let values: Vec<serde_json::Value> = req
                        .headers()
                        .get_all(name)
                        .iter()
                        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned().into())
                        .collect();
                    (name.as_str().to_owned(), values.into())
                })
                .collect();
            json_response(serde_json::json!({
                "method": req.method().as_str(),
                "path": req.uri().to_string(),
                "version": format!("{:?}", req.version()),
                "headers": headers,
            }))
        }
    };
    response
        .headers_mut()
        .insert("x-app", name.parse().unwrap());
    response
}

fn json_response(value: serde_json::Value) -> Response<TestBody> {
    let mut response = Response::new(full(value.to_string()));
    response
        .headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    response
}

pub fn full(data: impl Into<Bytes>) -> TestBody {
    Full::new(data.into())
        .map_err(|never| match never {})
        .boxed()
}

pub fn empty() -> TestBody {
    full(Bytes::new())
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

const CHUNK: usize = 64 * 1024;

/// Deterministic bytes: chunk `i` of [`CHUNK`] bytes comes from an xorshift seeded by `i`.
pub fn pattern_chunk(index: u64, len: usize) -> Bytes {
    let mut state = index.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    Bytes::from(out)
}

/// A body of `total` pattern bytes, generated chunk by chunk as it is polled.
pub fn pattern_body(total: u64) -> TestBody {
    let stream = futures::stream::unfold(0u64, move |index| async move {
        let sent = index * CHUNK as u64;
        if sent >= total {
            return None;
        }
        let len = (total - sent).min(CHUNK as u64) as usize;
        Some((
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(Frame::data(pattern_chunk(
                index, len,
            ))),
            index + 1,
        ))
    });
    BodyExt::boxed(StreamBody::new(stream))
}

/// The SHA-256 of `total` pattern bytes.
pub fn pattern_sha256(total: u64) -> String {
    let mut hasher = Sha256::new();
    let mut index = 0;
    let mut sent = 0;
    while sent < total {
        let len = (total - sent).min(CHUNK as u64) as usize;
        hasher.update(pattern_chunk(index, len));
        sent += len as u64;
        index += 1;
    }
    hex(&hasher.finalize())
}

/// Hashes a body as it streams in; returns (length, sha256).
pub async fn hash_body(mut body: Incoming) -> (u64, String) {
    let mut hasher = Sha256::new();
    let mut len = 0u64;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            len += data.len() as u64;
            hasher.update(&data);
        }
    }
    (len, hex(&hasher.finalize()))
}

/// A WebSocket echo app. It records the `Sec-WebSocket-Protocol` it was offered
/// (None when absent) and picks `chat.v2` when offered.
pub async fn start_ws_app() -> (SocketAddr, Arc<Mutex<Vec<Option<String>>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = Arc::clone(&seen);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let seen = Arc::clone(&seen2);
            tokio::spawn(async move {
                let callback = |req: &WsRequest, mut resp: WsResponse| {
                    let offered = req
                        .headers()
                        .get("sec-websocket-protocol")
                        .map(|v| v.to_str().unwrap().to_owned());
                    if offered
                        .as_deref()
                        .is_some_and(|o| o.split(',').any(|p| p.trim() == "chat.v2"))
                    {
                        resp.headers_mut()
                            .insert("sec-websocket-protocol", "chat.v2".parse().unwrap());
                    }
                    seen.lock().unwrap().push(offered);
                    Ok(resp)
                };
                let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, callback).await else {
                    return;
                };
                while let Some(Ok(message)) = ws.next().await {
                    if message.is_text() || message.is_binary() {
                        if ws.send(message).await.is_err() {
                            return;
                        }
                    } else if message.is_close() {
                        return;
                    }
                }
            });
        }
    });
    (addr, seen)
}

/// Starts the proxy on a local port.
pub async fn start_proxy(backend: Arc<TestBackend>, config: ProxyConfig) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let result = hearth_proxy::serve(listener, backend, config).await;
        panic!("proxy stopped: {result:?}");
    });
    addr
}

/// A backend with the usual app on 8080, a second app on 8081, the WebSocket
/// app on 9000, a refused port 7000, and the proxy in front.
pub struct Fixture {
    pub backend: Arc<TestBackend>,
    pub proxy: SocketAddr,
    pub app: Arc<AppControl>,
    pub ws_seen: Arc<Mutex<Vec<Option<String>>>>,
}

pub async fn fixture(config: ProxyConfig) -> Fixture {
    let backend = TestBackend::new();
    let (app_addr, app) = start_app("8080").await;
    let (second_addr, _) = start_app("8081").await;
    let (ws_addr, ws_seen) = start_ws_app().await;
    let refused = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    backend.map(VM, 8080, app_addr);
    backend.map(VM, 8081, second_addr);
    backend.map(VM, 9000, ws_addr);
    backend.map(VM, 7000, refused);
    backend.map(OTHER_VM, 8080, second_addr);
    let proxy = start_proxy(Arc::clone(&backend), config).await;
    Fixture {
        backend,
        proxy,
        app,
        ws_seen,
    }
}

impl Fixture {
    pub fn host(&self, vm: &str) -> String {
        format!("{vm}.localhost:{}", self.proxy.port())
    }
}

/// An HTTP/1.1 client connection to the proxy.
pub async fn h1(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<TestBody> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    sender
}

/// An HTTP/2 (prior knowledge) client connection to the proxy.
pub async fn h2(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<TestBody> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    sender
}

/// A request builder with Host and optional token.
pub fn request(
    method: &str,
    host: &str,
    path: &str,
    token: Option<&str>,
) -> http::request::Builder {
    let mut builder = Request::builder()
        .method(method)
        .uri(path)
        .header("host", host);
    if let Some(token) = token {
        builder = builder.header("x-aws-proxy-auth", token);
    }
    builder
}

/// One GET on a fresh connection; returns status, headers and body.
pub async fn get(
    addr: SocketAddr,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, HeaderMap, Bytes) {
    let mut builder = Request::builder().uri(path).header("host", host);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let mut sender = h1(addr).await;
    let response = sender
        .send_request(builder.body(empty()).unwrap())
        .await
        .unwrap();
    let (parts, body) = response.into_parts();
    let body = tokio::time::timeout(Duration::from_secs(10), body.collect())
        .await
        .unwrap()
        .unwrap()
        .to_bytes();
    (parts.status, parts.headers, body)
}

/// The JSON `/headers` reported.
pub fn seen(body: &Bytes) -> serde_json::Value {
    serde_json::from_slice(body).unwrap()
}

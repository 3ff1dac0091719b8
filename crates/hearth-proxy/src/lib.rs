//! The microVM endpoint proxy.
//!
//! Every microVM has an endpoint host `<microvm-id>.<domain>`. The proxy listens on
//! one address, finds the microVM from the request's `Host` (or `:authority`, which
//! under TLS is what SNI routing amounts to), checks the endpoint token through
//! [`Backend::authorize`], applies the per-microVM limits and forwards the request
//! over HTTP/1.1 to a port inside the guest, on a byte stream that
//! [`Backend::connect`] opens. Clients may speak HTTP/1.1 or HTTP/2 (h2c prior
//! knowledge on plain TCP, ALPN `h2` under TLS); WebSockets are spliced through
//! after the guest answers `101`. Bodies stream both ways, never buffered whole.
//!
//! The server integration (token verification, agent streams, auto-resume, idle
//! timers) lives behind [`Backend`]; this crate knows nothing of it.
//!
//! ```text
//! client ──HTTP/1.1|h2──▶ serve / serve_tls ──▶ host ──▶ /.hearth/? ──▶ port, token
//!        ──▶ Backend::authorize ──▶ limits ──▶ Backend::connect ──HTTP/1.1──▶ guest port
//! ```
//!
//! Status codes the proxy answers itself (bodies are JSON `{"message": ...}`):
//! 400 bad `X-aws-proxy-port` or Host, 403 token missing or refused, 404 unknown
//! endpoint host or the reserved `/.hearth/` prefix without a handler, 429 over a
//! microVM's limits, 502 the guest could not be reached or answered badly, 504 the
//! guest did not answer in time.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

mod auth;
mod body;
mod forward;
pub mod host;
mod limits;
mod server;
pub mod tls;
mod websocket;

pub use body::{BoxError, ProxyBody};
pub use server::{serve, serve_tls};

/// A boxed, sendable future, as the traits here return.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The request header carrying the endpoint token.
pub const AUTH_HEADER: &str = "x-aws-proxy-auth";
/// The request header choosing the guest port.
pub const PORT_HEADER: &str = "x-aws-proxy-port";
/// The request id header added to the request the app sees and to the response.
pub const REQUEST_ID_HEADER: &str = "x-amzn-requestid";
/// Requests under this path prefix never reach the app (see [`ExtensionHandler`]).
pub const RESERVED_PREFIX: &str = "/.hearth/";
/// The WebSocket path served by [`ExtensionRoute::Shell`] when a shell token opens it.
pub const SHELL_PATH: &str = "/shell";

/// What a request asks a token to grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// HTTP or WebSocket traffic to this port inside the guest.
    Port(u16),
    /// The `/shell` WebSocket (a shell token; no port).
    Shell,
}

/// Why [`Backend::authorize`] refused a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// 403 with this message. Use it for every token problem (expired, wrong
    /// microVM, wrong port, bad signature) and for an unknown microVM when the
    /// token does not prove its holder may know about it.
    #[error("{0}")]
    Forbidden(String),
    /// 404: only for a valid token whose microVM no longer exists.
    #[error("microVM not found")]
    NotFound,
}

/// Why [`Backend::connect`] could not open a stream to the guest. All answer 502.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Nothing listens on the port inside the guest.
    #[error("connection refused in the microVM")]
    Refused,
    /// The microVM is not running and could not be reached (stopped, still
    /// restoring, agent gone). The text is logged, not shown to the client.
    #[error("microVM unreachable: {0}")]
    Unreachable(String),
    /// Auto-resume was tried and failed. The text is logged, not shown.
    #[error("microVM resume failed: {0}")]
    ResumeFailed(String),
    /// Any other failure opening the stream.
    #[error("stream to the microVM failed")]
    Io(#[source] std::io::Error),
}

/// A byte stream to a port inside the guest.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// What the proxy needs from the server.
pub trait Backend: Send + Sync + 'static {
    /// Checks `token` (the `X-aws-proxy-auth` value, or the one carried in the
    /// WebSocket subprotocol `lambda-microvms.authentication.<token>`) for this
    /// microVM and access. Called once per request, before anything else touches
    /// the microVM; must not block. The proxy answers a missing token with 403
    /// itself, so `token` is never empty.
    fn authorize(&self, microvm_id: &str, token: &str, access: Access) -> Result<(), Denied>;

    /// Opens a byte stream to `127.0.0.1:port` inside the guest. May take a
    /// while (auto-resume); the proxy gives up after
    /// [`ProxyConfig::connect_timeout`]. Only called after `authorize` succeeded.
    fn connect(
        &self,
        microvm_id: &str,
        port: u16,
    ) -> BoxFuture<'_, Result<Box<dyn Io>, ConnectError>>;

    /// Bytes moved through the endpoint for this microVM, in either direction
    /// (request and response heads and bodies, upgraded streams). Called for
    /// every chunk: must be cheap.
    fn traffic(&self, microvm_id: &str, bytes: u64);
}

/// Which reserved route an [`ExtensionRequest`] arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtensionRoute {
    /// A path under [`RESERVED_PREFIX`]. The proxy has **not** authorised it: the
    /// handler must check [`ExtensionRequest::token`] itself.
    Reserved,
    /// A WebSocket upgrade on [`SHELL_PATH`] whose token
    /// [`Backend::authorize`] accepted for [`Access::Shell`].
    Shell,
}

/// A request handed to the [`ExtensionHandler`].
#[derive(Debug)]
pub struct ExtensionRequest {
    pub microvm_id: String,
    pub route: ExtensionRoute,
    /// The endpoint token from the header or the WebSocket subprotocol, if any.
    pub token: Option<String>,
    /// The request as received (headers untouched); upgrades work through
    /// `hyper::upgrade::on(&mut request)`.
    pub request: http::Request<hyper::body::Incoming>,
}

/// Serves the routes the proxy keeps from the app (`/.hearth/...`, and `/shell`
/// WebSockets opened with a shell token). The proxy adds `x-amzn-requestid` to
/// the response.
pub trait ExtensionHandler: Send + Sync + 'static {
    fn handle(&self, request: ExtensionRequest) -> BoxFuture<'_, http::Response<ProxyBody>>;
}

/// Per-microVM limits; 0 means unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmLimits {
    /// Requests in flight plus open WebSocket streams to one microVM.
    pub max_connections: usize,
    /// Sustained requests per second to one microVM (a token bucket holding one
    /// second's worth).
    pub requests_per_second: u32,
}

impl Default for VmLimits {
    fn default() -> Self {
        VmLimits {
            max_connections: 64,
            requests_per_second: 160,
        }
    }
}

/// How the proxy behaves.
#[derive(Clone)]
pub struct ProxyConfig {
    /// Endpoint hosts are `<microvm-id>.<domain>`.
    pub domain: String,
    /// The guest port when the request names none.
    pub default_port: u16,
    pub limits: VmLimits,
    /// Largest request head (request line and headers) accepted from a client.
    pub max_request_header_bytes: usize,
    /// Largest response head accepted from the guest (guests are untrusted).
    pub max_response_header_bytes: usize,
    /// How long [`Backend::connect`] may take (this includes auto-resume).
    pub connect_timeout: Duration,
    /// How long the guest may take to send its response head.
    pub response_timeout: Duration,
    /// How long a client may take to send a request head.
    pub header_read_timeout: Duration,
    /// How long a TLS handshake may take.
    pub tls_handshake_timeout: Duration,
    /// Client connections served at once, all microVMs together; past this the
    /// proxy stops accepting until one closes.
    pub max_client_connections: usize,
    /// Serves `/.hearth/...` and shell WebSockets; without it they answer 404.
    pub extension: Option<Arc<dyn ExtensionHandler>>,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            domain: "localhost".to_owned(),
            default_port: 8080,
            limits: VmLimits::default(),
            max_request_header_bytes: 64 * 1024,
            max_response_header_bytes: 64 * 1024,
            connect_timeout: Duration::from_secs(30),
            response_timeout: Duration::from_secs(300),
            header_read_timeout: Duration::from_secs(30),
            tls_handshake_timeout: Duration::from_secs(10),
            max_client_connections: 8192,
            extension: None,
        }
    }
}

impl fmt::Debug for ProxyConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProxyConfig")
            .field("domain", &self.domain)
            .field("default_port", &self.default_port)
            .field("limits", &self.limits)
            .field("max_request_header_bytes", &self.max_request_header_bytes)
            .field("max_response_header_bytes", &self.max_response_header_bytes)
            .field("connect_timeout", &self.connect_timeout)
            .field("response_timeout", &self.response_timeout)
            .field("header_read_timeout", &self.header_read_timeout)
            .field("tls_handshake_timeout", &self.tls_handshake_timeout)
            .field("max_client_connections", &self.max_client_connections)
            .field("extension", &self.extension.is_some())
            .finish()
    }
}

/// Why [`serve`] or [`serve_tls`] stopped.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("invalid proxy configuration: {0}")]
    Config(&'static str),
    #[error("cannot accept connections")]
    Accept(#[source] std::io::Error),
}

//! What the proxy asks of the server: [`Backend`] checks tokens, opens streams
//! into guests and hears about traffic.

use std::future::Future;
use std::pin::Pin;

use tokio::io::{AsyncRead, AsyncWrite};

/// A boxed, sendable future, as the traits here return.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

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
    /// the microVM; a future, so that a lookup that blocks (a database) can run
    /// off the async workers. The proxy answers a missing token with 403
    /// itself, so `token` is never empty.
    fn authorize<'a>(
        &'a self,
        microvm_id: &'a str,
        token: &'a str,
        access: Access,
    ) -> BoxFuture<'a, Result<(), Denied>>;

    /// Opens a byte stream to `127.0.0.1:port` inside the guest. May take a
    /// while (auto-resume); the proxy gives up after
    /// [`ProxyConfig::connect_timeout`](crate::ProxyConfig::connect_timeout). Only called after `authorize` succeeded.
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

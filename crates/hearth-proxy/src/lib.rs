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

mod auth;
mod backend;
mod body;
mod config;
mod extension;
mod forward;
pub mod host;
mod limits;
mod server;
mod shared;
pub mod tls;
mod websocket;

pub use auth::{AUTH_HEADER, PORT_HEADER};
pub use backend::{Access, Backend, BoxFuture, ConnectError, Denied, Io};
pub use body::{BoxError, ProxyBody};
pub use config::ProxyConfig;
pub use extension::{
    ExtensionHandler, ExtensionRequest, ExtensionRoute, RESERVED_PREFIX, SHELL_PATH,
};
pub use forward::REQUEST_ID_HEADER;
pub use limits::VmLimits;
pub use server::{serve, serve_tls, ProxyError};

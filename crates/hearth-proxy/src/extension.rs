//! The routes the proxy keeps from the app (`/.hearth/...` and shell
//! WebSockets), served by the server's [`ExtensionHandler`].

use crate::backend::BoxFuture;
use crate::body::ProxyBody;

/// Requests under this path prefix never reach the app (see [`ExtensionHandler`]).
pub const RESERVED_PREFIX: &str = "/.hearth/";
/// The WebSocket path served by [`ExtensionRoute::Shell`] when a shell token opens it.
pub const SHELL_PATH: &str = "/shell";

/// Which reserved route an [`ExtensionRequest`] arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtensionRoute {
    /// A path under [`RESERVED_PREFIX`]. The proxy has **not** authorised it: the
    /// handler must check [`ExtensionRequest::token`] itself.
    Reserved,
    /// A WebSocket upgrade on [`SHELL_PATH`] whose token
    /// [`Backend::authorize`](crate::Backend::authorize) accepted for [`Access::Shell`](crate::Access::Shell).
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

//! What every request handler of one listener shares.

use std::sync::Arc;

use hyper::client::conn::http1;

use crate::backend::Backend;
use crate::config::ProxyConfig;
use crate::limits::Limiter;

/// What every request handler shares.
pub(crate) struct Shared {
    pub(crate) backend: Arc<dyn Backend>,
    pub(crate) config: ProxyConfig,
    pub(crate) limiter: Arc<Limiter>,
    pub(crate) client: http1::Builder,
}

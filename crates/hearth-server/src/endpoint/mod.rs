//! MicroVM endpoints: the proxy backend, what the endpoint serves itself, and endpoint tokens.

use std::sync::Arc;

use crate::config::ServerConfig;
use crate::db::store::Store;
use crate::vms::engine::Engine;

pub mod backend;
pub mod guest_api;
pub mod tokens;

pub use backend::EndpointBackend;

/// The proxy's backend and configuration for a server: its endpoint domain
/// and limits, and the shell and agent API served by [`guest_api`].
pub fn proxy(
    engine: Arc<Engine>,
    store: Store,
    tokens: tokens::TokenKeys,
    config: &ServerConfig,
) -> (Arc<EndpointBackend>, hearth_proxy::ProxyConfig) {
    let backend = EndpointBackend::new(engine.clone(), store, tokens);
    let proxy_config = hearth_proxy::ProxyConfig {
        domain: config.endpoint_domain.clone(),
        limits: config.endpoint_limits,
        extension: Some(guest_api::GuestApi::new(engine, backend.clone())),
        ..Default::default()
    };
    (backend, proxy_config)
}

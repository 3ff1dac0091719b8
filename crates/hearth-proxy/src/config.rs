//! How the proxy behaves: [`ProxyConfig`].

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::extension::ExtensionHandler;
use crate::limits::VmLimits;

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
    /// How long [`Backend::connect`](crate::Backend::connect) may take (this includes auto-resume).
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

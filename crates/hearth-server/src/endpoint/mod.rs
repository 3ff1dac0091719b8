//! MicroVM endpoints: the proxy backend, what the endpoint serves itself, and endpoint tokens.

pub mod backend;
pub mod guest_api;
pub mod tokens;
pub use backend::{proxy, EndpointBackend};

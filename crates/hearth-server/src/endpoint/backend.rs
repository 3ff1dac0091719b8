//! The server's side of the endpoint proxy (`hearth-proxy`): who may reach
//! which microVM port (endpoint tokens), how bytes get there (the agent's TCP
//! stream, resuming a suspended VM first when its idle policy allows), and
//! traffic for the idle timers.

use std::sync::Arc;
use std::time::Duration;

use hearth_proxy::{Access, Backend, BoxFuture, ConnectError, Denied, Io};

use crate::engine;
use crate::resources::MicrovmState;
use crate::tokens::{TokenError, TokenKind};
use crate::AppState;

/// How long a request may wait for its microVM to resume.
const RESUME_WAIT: Duration = Duration::from_secs(30);

#[derive(Debug)]
pub struct EndpointBackend {
    state: Arc<AppState>,
}

impl EndpointBackend {
    pub fn new(state: Arc<AppState>) -> Arc<Self> {
        Arc::new(Self { state })
    }
}

/// The proxy's backend and configuration for a server: its endpoint domain,
/// and the shell and agent API served by [`crate::guest_api`].
pub fn proxy(state: &Arc<AppState>) -> (Arc<EndpointBackend>, hearth_proxy::ProxyConfig) {
    let backend = EndpointBackend::new(state.clone());
    let config = hearth_proxy::ProxyConfig {
        domain: state.config.endpoint_domain.clone(),
        limits: state.config.endpoint_limits,
        extension: Some(crate::guest_api::GuestApi::new(
            state.clone(),
            backend.clone(),
        )),
        ..Default::default()
    };
    (backend, config)
}

/// The reference answers every token problem with a bare 403.
fn forbidden() -> Denied {
    Denied::Forbidden("Forbidden".into())
}

impl Backend for EndpointBackend {
    fn authorize(&self, microvm_id: &str, token: &str, access: Access) -> Result<(), Denied> {
        let now = crate::store::unix_now().max(0) as u64;
        let claims = self
            .state
            .tokens
            .verify(token, now)
            .map_err(|err| match err {
                TokenError::Expired => Denied::Forbidden("Token expired".into()),
                _ => forbidden(),
            })?;
        if claims.microvm != microvm_id {
            return Err(forbidden());
        }
        let row = match self.state.store.microvm(&claims.account, microvm_id) {
            Ok(Some(row)) if row.state != MicrovmState::Terminated => row,
            Ok(_) => return Err(Denied::NotFound),
            Err(err) => {
                tracing::warn!(error = %engine::error_chain(&err), "endpoint authorisation lookup failed");
                return Err(forbidden());
            }
        };
        match access {
            Access::Shell if claims.kind == TokenKind::Shell => Ok(()),
            Access::Shell => Err(forbidden()),
            Access::Port(port) => {
                if !claims.allows_port(port) {
                    return Err(Denied::Forbidden("Access to port denied".into()));
                }
                // The hooks port only with a token that names it explicitly.
                let hooks_port = row.spec["hooks"]["port"].as_u64();
                if hooks_port == Some(u64::from(port)) && !claims.names_port(port) {
                    return Err(Denied::Forbidden("Access to port denied".into()));
                }
                Ok(())
            }
        }
    }

    fn connect(
        &self,
        microvm_id: &str,
        port: u16,
    ) -> BoxFuture<'_, Result<Box<dyn Io>, ConnectError>> {
        let microvm_id = microvm_id.to_string();
        Box::pin(async move {
            let io = self
                .state
                .engine
                .connect_port(&microvm_id, port, RESUME_WAIT)
                .await
                .map_err(|err| match err {
                    engine::ConnectError::Refused => ConnectError::Refused,
                    engine::ConnectError::Timeout => ConnectError::ResumeFailed(err.to_string()),
                    engine::ConnectError::Suspended | engine::ConnectError::Unavailable => {
                        ConnectError::Unreachable(err.to_string())
                    }
                })?;
            Ok(Box::new(io) as Box<dyn Io>)
        })
    }

    fn traffic(&self, microvm_id: &str, _bytes: u64) {
        self.state.engine.note_traffic(microvm_id);
    }
}

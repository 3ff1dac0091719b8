//! The server's side of the endpoint proxy (`hearth-proxy`): who may reach
//! which microVM port (endpoint tokens), how bytes get there (the agent's TCP
//! stream, resuming a suspended VM first when its idle policy allows), and
//! traffic for the idle timers.

use std::sync::Arc;
use std::time::Duration;

use hearth_proxy::{Access, Backend, BoxFuture, ConnectError, Denied, Io};

use crate::db::resources::MicrovmState;
use crate::db::store::{unix_now, Store};
use crate::endpoint::tokens::{TokenError, TokenKeys, TokenKind};
use crate::vms::engine::{self, Engine};

/// How long a request may wait for its microVM to resume.
const RESUME_WAIT: Duration = Duration::from_secs(30);

#[derive(Debug)]
pub struct EndpointBackend {
    engine: Arc<Engine>,
    store: Store,
    tokens: TokenKeys,
}

impl EndpointBackend {
    pub fn new(engine: Arc<Engine>, store: Store, tokens: TokenKeys) -> Arc<Self> {
        Arc::new(Self {
            engine,
            store,
            tokens,
        })
    }
}

/// The reference answers every token problem with a bare 403.
fn forbidden() -> Denied {
    Denied::Forbidden("Forbidden".into())
}

impl Backend for EndpointBackend {
    fn authorize<'a>(
        &'a self,
        microvm_id: &'a str,
        token: &'a str,
        access: Access,
    ) -> BoxFuture<'a, Result<(), Denied>> {
        Box::pin(async move {
            let now = unix_now().max(0) as u64;
            let claims = self.tokens.verify(token, now).map_err(|err| match err {
                TokenError::Expired => Denied::Forbidden("Token expired".into()),
                _ => forbidden(),
            })?;
            if claims.microvm != microvm_id {
                return Err(forbidden());
            }
            // SQLite blocks (disk, the connection's lock): off the async workers.
            let (account, id) = (claims.account.clone(), microvm_id.to_string());
            let found = self
                .store
                .blocking(move |store| store.microvm(&account, &id))
                .await;
            let row = match found {
                Ok(Some(row)) if row.state != MicrovmState::Terminated => row,
                Ok(_) => return Err(Denied::NotFound),
                Err(err) => {
                    tracing::warn!(error = %hearth_vm::error_chain(&err), "endpoint authorisation lookup failed");
                    return Err(forbidden());
                }
            };
            match access {
                Access::Shell if claims.kind == TokenKind::Shell => Ok(()),
                Access::Shell => Err(forbidden()),
                Access::Port(port) => {
                    // NO_INGRESS: nothing reaches the app, whatever the token says.
                    if row.spec.no_ingress() {
                        return Err(forbidden());
                    }
                    if !claims.allows_port(port) {
                        return Err(Denied::Forbidden("Access to port denied".into()));
                    }
                    // The hooks port only with a token that names it explicitly.
                    if row.spec.hooks_port() == Some(port) && !claims.names_port(port) {
                        return Err(Denied::Forbidden("Access to port denied".into()));
                    }
                    Ok(())
                }
            }
        })
    }

    fn connect(
        &self,
        microvm_id: &str,
        port: u16,
    ) -> BoxFuture<'_, Result<Box<dyn Io>, ConnectError>> {
        let microvm_id = microvm_id.to_string();
        Box::pin(async move {
            let io = self
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
        self.engine.note_traffic(microvm_id);
    }
}

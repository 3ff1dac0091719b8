//! How the client verbs reach a running microVM's endpoint: where to dial it
//! (`Endpoint`), the shell token the agent API wants (`agent_access`), and the
//! endpoint's error bodies. Shared by `hearth exec`, `cp` and `port-forward`.

use anyhow::{anyhow, Context, Result};
use bytes::Bytes;
use hearth_client::Client;
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

use crate::shell;

/// How long a shell token minted for one connection lives (it is checked
/// when the connection opens, not afterwards).
const SHELL_TOKEN_MINUTES: u64 = 5;

/// A microVM's endpoint: its name (for `Host`) and where to dial it.
#[derive(Debug, Clone)]
pub(crate) struct Endpoint {
    pub(crate) authority: http::uri::Authority,
    pub(crate) dial: (String, u16),
}

impl Endpoint {
    /// GetMicrovm's `endpoint` of microVM `id`.
    pub(crate) async fn of(client: &Client, id: &str) -> Result<Self> {
        let vm = client
            .call("GetMicrovm", json!({ "microvmIdentifier": id }))
            .await?;
        let endpoint = vm
            .get("endpoint")
            .and_then(Value::as_str)
            .filter(|e| !e.is_empty())
            .with_context(|| format!("{id} has no endpoint"))?;
        let authority = shell::authority(endpoint)?;
        let dial = shell::dial_address(&authority);
        Ok(Self { authority, dial })
    }

    pub(crate) async fn connect(&self) -> Result<tokio::net::TcpStream> {
        let (host, port) = &self.dial;
        let tcp = tokio::net::TcpStream::connect((host.as_str(), *port))
            .await
            .with_context(|| format!("cannot connect to the endpoint at {host}:{port}"))?;
        let _ = tcp.set_nodelay(true);
        Ok(tcp)
    }

    /// A new HTTP/1.1 connection to the endpoint (upgrades allowed).
    pub(crate) async fn http1<B>(&self) -> Result<hyper::client::conn::http1::SendRequest<B>>
    where
        B: hyper::body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let tcp = self.connect().await?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .context("HTTP handshake with the endpoint failed")?;
        tokio::spawn(async move {
            if let Err(err) = connection.with_upgrades().await {
                tracing::debug!(error = %err, "endpoint connection ended");
            }
        });
        Ok(sender)
    }
}

/// The endpoint of `id` and a shell token for it (the agent API's credential).
pub(crate) async fn agent_access(client: &Client, id: &str) -> Result<(Endpoint, String)> {
    let minted = client
        .call(
            "CreateMicrovmShellAuthToken",
            json!({ "microvmIdentifier": id, "expirationInMinutes": SHELL_TOKEN_MINUTES }),
        )
        .await
        .map_err(|err| {
            let hint = if err.code() == Some("ValidationException")
                && err.to_string().contains("SHELL_INGRESS")
            {
                format!(
                    "; {id} was run without SHELL_INGRESS, which exec and cp need \
                     (run the image with `hearth run IMAGE --shell`)"
                )
            } else {
                String::new()
            };
            anyhow!(err).context(format!("cannot get a shell token for {id}{hint}"))
        })?;
    let token = minted["authToken"]["X-aws-proxy-auth"]
        .as_str()
        .context("CreateMicrovmShellAuthToken answered without a token")?
        .to_string();
    Ok((Endpoint::of(client, id).await?, token))
}

/// The message of an error answer from the endpoint (`{"message"}` JSON,
/// else the text), at most 64 KiB of it read.
pub(crate) async fn error_message(response: http::Response<hyper::body::Incoming>) -> String {
    let status = response.status();
    let body = http_body_util::Limited::new(response.into_body(), 64 * 1024)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_else(|_| Bytes::new());
    let message = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(&body).trim().to_string());
    if message.is_empty() {
        status.to_string()
    } else {
        format!("{status}: {message}")
    }
}

//! The client verbs that reach into a running microVM through its endpoint:
//! `hearth exec`, `hearth cp` (the agent API under `/.hearth/v1/`, with a
//! shell token, so the microVM needs SHELL_INGRESS) and `hearth port-forward`
//! (the app's ports, with an endpoint token).

use std::process::ExitCode;

use anyhow::{anyhow, Context, Result};
use bytes::Bytes;
use clap::Subcommand;
use hearth_client::Client;
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

use crate::connect::{self, EXIT_FAILURE};
use crate::cp_cli::{self, CpArgs};
use crate::exec_cli::{self, ExecArgs};
use crate::port_forward::{self, PortForwardArgs};
use crate::shell;

/// How long a shell token minted for one connection lives (it is checked
/// when the connection opens, not afterwards).
const SHELL_TOKEN_MINUTES: u64 = 5;

#[derive(Debug, Subcommand)]
pub enum GuestCommand {
    /// Run a command in a microVM, streaming its output; exits with its status.
    ///
    /// Needs SHELL_INGRESS (`hearth run IMAGE --shell`): the command runs as
    /// root through the endpoint's agent API, streamed both ways over a
    /// WebSocket. Exit status: the command's; 128+N when a signal N killed it;
    /// 124 when --timeout killed it; 1 when hearth itself failed.
    Exec(ExecArgs),
    /// Copy a file into or out of a microVM (streamed; any size).
    ///
    /// `hearth cp LOCAL ID:/path` or `hearth cp ID:/path LOCAL`. Needs SHELL_INGRESS. An upload keeps the local file's mode (or --mode)
    /// and creates missing parent directories; a path ending in `/` (or a
    /// local directory as DST) receives the file under its own name.
    /// Directories are not copied: pipe tar through `hearth exec -i`.
    Cp(CpArgs),
    /// Forward a local port to a microVM's port, adding the token (as kubectl port-forward).
    ///
    /// `hearth port-forward ID [LOCAL:]REMOTE` listens on 127.0.0.1:LOCAL. HTTP/1.1 only (WebSocket upgrades included): each request on a local
    /// connection is sent to the endpoint with X-aws-proxy-auth and
    /// X-aws-proxy-port. The token (CreateMicrovmAuthToken for that port) is
    /// renewed before it expires. Runs until interrupted (then exits 0).
    PortForward(PortForwardArgs),
}

pub async fn main(command: GuestCommand) -> ExitCode {
    match command {
        GuestCommand::Exec(args) => {
            let json = args.connect.json;
            match exec_cli::exec(args).await {
                Ok(code) => code,
                Err(err) => {
                    connect::print_error(&err, json);
                    ExitCode::from(EXIT_FAILURE)
                }
            }
        }
        GuestCommand::Cp(args) => {
            let json = args.connect.json;
            connect::report(cp_cli::cp(args).await, json)
        }
        GuestCommand::PortForward(args) => {
            let json = args.connect.json;
            connect::report(port_forward::run(args).await, json)
        }
    }
}

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

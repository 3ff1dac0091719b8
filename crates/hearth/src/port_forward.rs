//! `hearth port-forward ID [LOCAL:]REMOTE`: a local HTTP/1.1 listener that
//! sends every request to the microVM's endpoint with the endpoint token
//! (`X-aws-proxy-auth`) and the port (`X-aws-proxy-port`) added. A raw byte
//! forward cannot add headers, so each local connection gets its own
//! connection to the endpoint and requests go through one by one; WebSocket
//! (and other) upgrades are spliced byte for byte once both sides switched.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::Args;
use hearth_client::Client;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::sync::Mutex;

use crate::connect::ConnectArgs;
use crate::guest_endpoint::Endpoint;

/// Lifetime of each minted token; a new one is minted this long before the
/// old one expires.
const TOKEN_MINUTES: u64 = 60;
const RENEW_BEFORE: Duration = Duration::from_secs(5 * 60);

#[derive(Debug, Args)]
pub struct PortForwardArgs {
    /// MicroVM ID.
    id: String,
    /// `REMOTE` (the same port locally), `LOCAL:REMOTE`, or `:REMOTE` (any free local port).
    ports: String,
    /// Local address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    address: IpAddr,
    #[command(flatten)]
    pub(crate) connect: ConnectArgs,
}

/// `[LOCAL:]REMOTE` → (local, remote); local 0 is any free port.
fn parse_ports(spec: &str) -> Result<(u16, u16)> {
    let port = |text: &str| -> Result<u16> {
        text.parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .with_context(|| format!("{text:?} is not a port (1-65535)"))
    };
    match spec.split_once(':') {
        None => {
            let remote = port(spec)?;
            Ok((remote, remote))
        }
        Some(("", remote)) => Ok((0, port(remote)?)),
        Some((local, remote)) => {
            let local = if local == "0" { 0 } else { port(local)? };
            Ok((local, port(remote)?))
        }
    }
}

/// Endpoint tokens for one port, minted when needed.
struct Tokens {
    client: Client,
    id: String,
    port: u16,
    current: Mutex<Option<(String, Instant)>>,
}

impl Tokens {
    async fn get(&self) -> Result<String> {
        let mut current = self.current.lock().await;
        if let Some((token, expires)) = current.as_ref() {
            if Instant::now() + RENEW_BEFORE < *expires {
                return Ok(token.clone());
            }
        }
        let minted = self
            .client
            .call(
                "CreateMicrovmAuthToken",
                json!({
                    "microvmIdentifier": self.id,
                    "expirationInMinutes": TOKEN_MINUTES,
                    "allowedPorts": [{ "port": self.port }],
                }),
            )
            .await
            .with_context(|| format!("cannot get an endpoint token for {}", self.id))?;
        let token = minted["authToken"]["X-aws-proxy-auth"]
            .as_str()
            .context("CreateMicrovmAuthToken answered without a token")?
            .to_string();
        let expires = Instant::now() + Duration::from_secs(TOKEN_MINUTES * 60);
        *current = Some((token.clone(), expires));
        Ok(token)
    }
}

struct Forwarder {
    endpoint: Endpoint,
    tokens: Tokens,
    remote_port: u16,
}

type Body = BoxBody<Bytes, hyper::Error>;

fn text_response(status: http::StatusCode, message: &str) -> http::Response<Body> {
    let mut response = http::Response::new(
        Full::new(Bytes::from(format!("hearth port-forward: {message}\n")))
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    response
}

impl Forwarder {
    /// One request: headers added, sent on this local connection's endpoint
    /// connection (opened again when the endpoint closed it).
    async fn forward(
        &self,
        upstream: &Mutex<Option<SendRequest<Incoming>>>,
        mut request: http::Request<Incoming>,
    ) -> Result<http::Response<Body>> {
        let token = self.tokens.get().await?;
        let headers = request.headers_mut();
        headers.insert(
            http::header::HOST,
            http::HeaderValue::from_str(self.endpoint.authority.as_str())?,
        );
        headers.insert(
            hearth_proxy::AUTH_HEADER,
            http::HeaderValue::from_str(&token)?,
        );
        headers.insert(hearth_proxy::PORT_HEADER, self.remote_port.into());
        let upgrading = request.headers().contains_key(http::header::UPGRADE);
        let local_upgrade = upgrading.then(|| hyper::upgrade::on(&mut request));

        let mut slot = upstream.lock().await;
        let reusable = match slot.take() {
            Some(mut sender) => sender.ready().await.is_ok().then_some(sender),
            None => None,
        };
        let mut sender = match reusable {
            Some(sender) => sender,
            None => self.endpoint.http1::<Incoming>().await?,
        };
        let mut response = sender
            .send_request(request)
            .await
            .context("the endpoint did not answer")?;
        if response.status() == http::StatusCode::SWITCHING_PROTOCOLS {
            // The endpoint connection now belongs to the upgraded stream.
            let Some(local_upgrade) = local_upgrade else {
                bail!("the endpoint switched protocols without being asked");
            };
            let remote_upgrade = hyper::upgrade::on(&mut response);
            tokio::spawn(async move {
                let (Ok(local), Ok(remote)) = (local_upgrade.await, remote_upgrade.await) else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(
                    &mut TokioIo::new(local),
                    &mut TokioIo::new(remote),
                )
                .await;
            });
        } else {
            *slot = Some(sender);
        }
        Ok(response.map(BodyExt::boxed))
    }

    async fn serve(self: Arc<Self>, tcp: tokio::net::TcpStream) {
        let upstream: Arc<Mutex<Option<SendRequest<Incoming>>>> = Arc::new(Mutex::new(None));
        let service = hyper::service::service_fn(move |request| {
            let this = self.clone();
            let upstream = upstream.clone();
            async move {
                let response = match this.forward(&upstream, request).await {
                    Ok(response) => response,
                    Err(err) => {
                        eprintln!("hearth: port-forward: {err:#}");
                        text_response(http::StatusCode::BAD_GATEWAY, &format!("{err:#}"))
                    }
                };
                Ok::<_, std::convert::Infallible>(response)
            }
        });
        let connection = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(tcp), service)
            .with_upgrades();
        if let Err(err) = connection.await {
            tracing::debug!(error = %err, "local connection ended");
        }
    }
}

pub(crate) async fn run(args: PortForwardArgs) -> Result<()> {
    let (local_port, remote_port) = parse_ports(&args.ports)?;
    let client = args.connect.client()?;
    let endpoint = Endpoint::of(&client, &args.id).await?;
    let tokens = Tokens {
        client,
        id: args.id.clone(),
        port: remote_port,
        current: Mutex::new(None),
    };
    // Fail now, not at the first request, when no token can be had.
    tokens.get().await?;
    let listener = tokio::net::TcpListener::bind(SocketAddr::new(args.address, local_port))
        .await
        .with_context(|| format!("cannot listen on {}:{local_port}", args.address))?;
    let local = listener.local_addr()?;
    if args.connect.json {
        let line = json!({
            "localAddress": local.to_string(),
            "microvmId": args.id,
            "remotePort": remote_port,
        });
        println!("{line}");
    } else {
        println!("Forwarding from {local} -> {}:{remote_port}", args.id);
    }
    if args.address != IpAddr::V4(Ipv4Addr::LOCALHOST) && !args.address.is_loopback() {
        eprintln!("warning: anyone who reaches {local} reaches the microVM's port {remote_port} with your token");
    }
    let forwarder = Arc::new(Forwarder {
        endpoint,
        tokens,
        remote_port,
    });
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (tcp, _) = accepted.context("cannot accept a connection")?;
                let _ = tcp.set_nodelay(true);
                tokio::spawn(forwarder.clone().serve(tcp));
            }
            () = crate::signals::interrupted() => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_specs() {
        assert_eq!(parse_ports("8080").expect("ok"), (8080, 8080));
        assert_eq!(parse_ports("9000:8080").expect("ok"), (9000, 8080));
        assert_eq!(parse_ports(":8080").expect("ok"), (0, 8080));
        assert_eq!(parse_ports("0:8080").expect("ok"), (0, 8080));
        for bad in ["", "0", "x", "1:70000", "a:1", "1:"] {
            assert!(parse_ports(bad).is_err(), "{bad}");
        }
    }
}

//! `hearth token` and `hearth open`: reaching a microVM's endpoint from this
//! machine. A token is CreateMicrovmAuthToken for one port; the endpoint
//! proxy takes it only in the `X-aws-proxy-auth` header (or a WebSocket
//! subprotocol), never in the URL, so `open` prints the URL with the header
//! and a curl command that carries both.

use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use clap::Args;
use hearth_client::Client;
use serde_json::{json, Value};

use crate::connect::ConnectArgs;

/// The port the endpoint proxy forwards to when no `X-aws-proxy-port` is sent.
const DEFAULT_APP_PORT: u16 = 8080;
/// The reference's longest token lifetime.
const MAX_EXPIRY_MINUTES: u32 = 60;

#[derive(Debug, Args)]
pub struct TokenArgs {
    /// MicroVM ID.
    id: String,
    /// The port the token opens (the app's port, e.g. 8080).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    port: u16,
    /// Minutes until the token expires (at most 60).
    #[arg(long, value_name = "MINUTES", default_value_t = 15,
          value_parser = clap::value_parser!(u32).range(1..=MAX_EXPIRY_MINUTES as i64))]
    expires: u32,
    #[command(flatten)]
    connect: ConnectArgs,
}

#[derive(Debug, Args)]
pub struct OpenArgs {
    /// MicroVM ID.
    id: String,
    /// The app's port behind the endpoint.
    #[arg(long, default_value_t = DEFAULT_APP_PORT, value_parser = clap::value_parser!(u16).range(1..))]
    port: u16,
    /// Minutes until the token expires (at most 60).
    #[arg(long, value_name = "MINUTES", default_value_t = 15,
          value_parser = clap::value_parser!(u32).range(1..=MAX_EXPIRY_MINUTES as i64))]
    expires: u32,
    #[command(flatten)]
    connect: ConnectArgs,
}

/// A token minted for one port, with the time it stops working.
struct Minted {
    token: String,
    expires_at: SystemTime,
}

/// `hearth token`: prints the token alone (for `T=$(hearth token ...)`), or
/// with `--json` `{"microvmId","port","token","expiresAt"}`.
pub async fn token(args: TokenArgs) -> ExitCode {
    report(print_token(args).await)
}

/// `hearth open`: prints a URL that works from this machine and how to send
/// the token with it; `--json` gives `{"url","headers","curl","expiresAt"}`.
pub async fn open(args: OpenArgs) -> ExitCode {
    report(print_open(args).await)
}

async fn print_token(args: TokenArgs) -> Result<()> {
    let client = args.connect.client()?;
    let minted = mint(&client, &args.id, args.port, args.expires).await?;
    if args.connect.json {
        return print_json(&json!({
            "microvmId": args.id,
            "port": args.port,
            "token": minted.token,
            "expiresAt": rfc3339(minted.expires_at),
        }));
    }
    println!("{}", minted.token);
    Ok(())
}

async fn print_open(args: OpenArgs) -> Result<()> {
    let client = args.connect.client()?;
    let vm = client
        .call("GetMicrovm", json!({ "microvmIdentifier": args.id }))
        .await?;
    let endpoint = vm
        .get("endpoint")
        .and_then(Value::as_str)
        .filter(|e| !e.is_empty())
        .with_context(|| format!("{} has no endpoint (run it with HTTP_INGRESS)", args.id))?;
    let minted = mint(&client, &args.id, args.port, args.expires).await?;
    let target = Target::new(endpoint, args.port, &minted.token);
    if args.connect.json {
        return print_json(&json!({
            "microvmId": args.id,
            "url": target.url,
            "headers": target.headers_json(),
            "curl": target.curl(),
            "expiresAt": rfc3339(minted.expires_at),
        }));
    }
    println!("{}", target.url);
    println!(
        "send these headers with every request (token valid until {}):",
        rfc3339(minted.expires_at)
    );
    for (name, value) in &target.headers {
        println!("  {name}: {value}");
    }
    println!("for example:");
    println!("  {}", target.curl());
    Ok(())
}

/// Where a request goes and the headers it needs.
#[derive(Debug, PartialEq)]
struct Target {
    url: String,
    headers: Vec<(&'static str, String)>,
}

impl Target {
    /// `endpoint` as GetMicrovm gives it (`<id>.<domain>:PORT`, a scheme
    /// optional). `*.localhost` names are loopback (curl and browsers know);
    /// another port than the default needs `X-aws-proxy-port`.
    fn new(endpoint: &str, port: u16, token: &str) -> Self {
        let url = if endpoint.contains("://") {
            format!("{}/", endpoint.trim_end_matches('/'))
        } else {
            format!("http://{}/", endpoint.trim_end_matches('/'))
        };
        let mut headers = vec![("X-aws-proxy-auth", token.to_string())];
        if port != DEFAULT_APP_PORT {
            headers.push(("X-aws-proxy-port", port.to_string()));
        }
        Self { url, headers }
    }

    fn headers_json(&self) -> Value {
        self.headers
            .iter()
            .map(|(name, value)| ((*name).to_string(), json!(value)))
            .collect::<serde_json::Map<_, _>>()
            .into()
    }

    fn curl(&self) -> String {
        let mut command = String::from("curl");
        for (name, value) in &self.headers {
            command.push_str(&format!(" -H '{name}: {value}'"));
        }
        command.push_str(&format!(" {}", self.url));
        command
    }
}

async fn mint(client: &Client, id: &str, port: u16, minutes: u32) -> Result<Minted> {
    let asked_at = SystemTime::now();
    let response = client
        .call(
            "CreateMicrovmAuthToken",
            json!({
                "microvmIdentifier": id,
                "expirationInMinutes": minutes,
                "allowedPorts": [{ "port": port }],
            }),
        )
        .await?;
    let token = response
        .get("authToken")
        .and_then(|t| t.get("X-aws-proxy-auth"))
        .and_then(Value::as_str)
        .context("CreateMicrovmAuthToken answered without a token")?
        .to_string();
    // The answer carries no expiry: it is the asked lifetime from the request.
    let expires_at = asked_at + Duration::from_secs(u64::from(minutes) * 60);
    Ok(Minted { token, expires_at })
}

/// Errors go to stderr as `error: ...`, exit code 1, as the other client commands.
fn report(result: Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(1)
        }
    }
}

fn rfc3339(at: SystemTime) -> String {
    let seconds = at
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    hearth_client::rfc3339(seconds).unwrap_or_default()
}

fn print_json(value: &Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_port_needs_only_the_token_header() {
        let target = Target::new("microvm-abc.localhost:9080", 8080, "T0K");
        assert_eq!(target.url, "http://microvm-abc.localhost:9080/");
        assert_eq!(
            target.curl(),
            "curl -H 'X-aws-proxy-auth: T0K' http://microvm-abc.localhost:9080/"
        );
        assert_eq!(target.headers_json(), json!({"X-aws-proxy-auth": "T0K"}));
    }

    #[test]
    fn another_port_adds_the_port_header_and_a_scheme_is_kept() {
        let target = Target::new("https://microvm-abc.hearth.test:9443/", 9000, "T");
        assert_eq!(target.url, "https://microvm-abc.hearth.test:9443/");
        assert_eq!(
            target.headers,
            vec![
                ("X-aws-proxy-auth", "T".to_string()),
                ("X-aws-proxy-port", "9000".to_string())
            ]
        );
    }
}

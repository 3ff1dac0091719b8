//! `hearth exec ID -- CMD...`: a command in a microVM through the endpoint's
//! interactive exec WebSocket (`GET /.hearth/v1/exec`, see the server's
//! `guest_api.rs`): output streams as it comes, `-i` streams stdin, `-t`
//! runs the command on a terminal (local raw mode, window size forwarded).

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::os::fd::AsFd;
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::connect::ConnectArgs;
use crate::guest_endpoint::{agent_access, Endpoint};
use crate::shell;
use crate::terminal::{RawMode, WindowSize};

/// Exit status when `--timeout` killed the command (as timeout(1)).
const EXIT_TIMED_OUT: u8 = 124;
/// Exit status when hearth was interrupted before the command ended.
const EXIT_INTERRUPTED: u8 = 130;
const DEFAULT_SIZE: WindowSize = WindowSize { cols: 80, rows: 24 };

#[derive(Debug, Args)]
pub struct ExecArgs {
    /// MicroVM ID (run with SHELL_INGRESS, e.g. `hearth run IMAGE --shell`).
    id: String,
    /// Environment variable for the command (repeatable).
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Working directory in the microVM.
    #[arg(long, short = 'w')]
    cwd: Option<String>,
    /// Kill the command after this many seconds (exit status 124).
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=86_400))]
    timeout: Option<u64>,
    /// Forward standard input to the command (its end closes the command's stdin).
    #[arg(long, short = 'i')]
    interactive: bool,
    /// Run the command on a terminal (implies -i): the local one goes to raw
    /// mode and its size follows; output arrives on stdout only.
    #[arg(long, short = 't')]
    tty: bool,
    #[command(flatten)]
    pub(crate) connect: ConnectArgs,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<String>,
}

/// The server's text frames.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
enum ServerMessage {
    #[serde(rename_all = "camelCase")]
    Exit {
        exit_code: Option<i32>,
        signal: Option<i32>,
        #[serde(default)]
        timed_out: bool,
    },
    Error {
        message: String,
    },
}

/// `KEY=VALUE` pairs.
fn parse_env(pairs: &[String]) -> Result<BTreeMap<String, String>> {
    pairs
        .iter()
        .map(|pair| match pair.split_once('=') {
            Some((key, value)) if !key.is_empty() => Ok((key.to_string(), value.to_string())),
            _ => bail!("--env wants KEY=VALUE, got {pair:?}"),
        })
        .collect()
}

/// The exit status hearth exits with for the command's end.
fn exit_status(code: Option<i32>, signal: Option<i32>, timed_out: bool) -> u8 {
    if timed_out {
        return EXIT_TIMED_OUT;
    }
    match (code, signal) {
        (Some(code), _) => code.clamp(0, 255) as u8,
        (None, Some(signal)) => (128 + signal).clamp(0, 255) as u8,
        (None, None) => 255,
    }
}

/// What besides bytes the session reacts to.
enum Control {
    Resize(WindowSize),
    /// A terminating signal arrived locally (its number, and a word for it).
    Signal(i32, &'static str),
}

fn watch_signals(tty: bool) -> Result<mpsc::Receiver<Control>> {
    use tokio::signal::unix::{signal, SignalKind};
    let (tx, rx) = mpsc::channel(8);
    for (kind, number, why) in [
        (SignalKind::interrupt(), libc::SIGINT, "interrupted"),
        (SignalKind::terminate(), libc::SIGTERM, "terminated"),
        (SignalKind::hangup(), libc::SIGHUP, "hung up"),
    ] {
        let mut stream = signal(kind).context("cannot watch signals")?;
        let tx = tx.clone();
        tokio::spawn(async move {
            while stream.recv().await.is_some() {
                if tx.send(Control::Signal(number, why)).await.is_err() {
                    break;
                }
            }
        });
    }
    if tty {
        let mut winch = signal(SignalKind::window_change()).context("cannot watch SIGWINCH")?;
        tokio::spawn(async move {
            while winch.recv().await.is_some() {
                if let Some(size) = shell::current_size() {
                    if tx.send(Control::Resize(size)).await.is_err() {
                        break;
                    }
                }
            }
        });
    }
    Ok(rx)
}

type Socket = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// Opens `ws://<endpoint>/.hearth/v1/exec` with the shell token.
async fn open(endpoint: &Endpoint, token: &str) -> Result<Socket> {
    let tcp = endpoint.connect().await?;
    let uri: http::Uri = format!("ws://{}/.hearth/v1/exec", endpoint.authority)
        .parse()
        .context("endpoint URI")?;
    let mut request = uri.into_client_request()?;
    request.headers_mut().insert(
        hearth_proxy::AUTH_HEADER,
        http::HeaderValue::from_str(token).context("the token is not a valid header value")?,
    );
    let (ws, _) = tokio_tungstenite::client_async(request, tcp)
        .await
        .map_err(shell::handshake_error)?;
    Ok(ws)
}

pub(crate) async fn exec(args: ExecArgs) -> Result<ExitCode> {
    let env = parse_env(&args.env)?;
    let client = args.connect.client()?;
    let (endpoint, token) = agent_access(&client, &args.id).await?;
    let stdin_is_tty = std::io::stdin().is_terminal();
    let mut request = json!({ "argv": args.command, "env": env });
    if let Some(cwd) = &args.cwd {
        request["cwd"] = json!(cwd);
    }
    if let Some(timeout) = args.timeout {
        request["timeoutInSeconds"] = json!(timeout);
    }
    if args.tty {
        let size = shell::current_size().unwrap_or(DEFAULT_SIZE);
        let term = std::env::var("TERM").ok().filter(|t| !t.is_empty());
        request["tty"] = json!({ "cols": size.cols, "rows": size.rows, "term": term });
    }
    let mut ws = open(&endpoint, &token).await?;
    ws.send(Message::text(request.to_string()))
        .await
        .context("exec connection lost")?;
    let forward_stdin = args.interactive || args.tty;
    let input = if forward_stdin {
        Some(shell::spawn_stdin_reader()?)
    } else {
        ws.send(Message::text(json!({"type": "eof"}).to_string()))
            .await
            .context("exec connection lost")?;
        None
    };
    let controls = watch_signals(args.tty)?;
    // Raw mode only with -t on a terminal; the guard restores it on every way out.
    let stdin = std::io::stdin();
    let raw_mode = if args.tty && stdin_is_tty {
        Some(RawMode::enable(stdin.as_fd()).context("cannot put the terminal in raw mode")?)
    } else {
        None
    };
    let outcome = pump(ws, input, controls).await;
    drop(raw_mode);
    outcome.map(ExitCode::from)
}

/// Moves bytes until the command's exit status arrives; returns the exit
/// status hearth ends with.
async fn pump(
    mut ws: Socket,
    mut input: Option<mpsc::Receiver<Vec<u8>>>,
    mut controls: mpsc::Receiver<Control>,
) -> Result<u8> {
    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    let mut status = None;
    let mut signalled = false;
    let mut controls_open = true;
    loop {
        tokio::select! {
            message = ws.next() => match message {
                Some(Ok(Message::Binary(bytes))) => match bytes.split_first() {
                    Some((1, data)) => {
                        stdout.write_all(data).await.context("writing the output")?;
                        stdout.flush().await.context("writing the output")?;
                    }
                    Some((2, data)) => {
                        stderr.write_all(data).await.context("writing the output")?;
                        stderr.flush().await.context("writing the output")?;
                    }
                    _ => {}
                },
                Some(Ok(Message::Text(text))) => match serde_json::from_str(text.as_str()) {
                    Ok(ServerMessage::Exit { exit_code, signal, timed_out }) => {
                        if timed_out {
                            eprintln!("hearth: the command timed out and was killed");
                        }
                        status = Some(exit_status(exit_code, signal, timed_out));
                    }
                    Ok(ServerMessage::Error { message }) => bail!("{message}"),
                    Err(_) => tracing::debug!(%text, "unknown exec message"),
                },
                Some(Ok(Message::Close(_))) | None => break,
                Some(Ok(_)) => {}
                Some(Err(err)) => {
                    if status.is_some() {
                        break;
                    }
                    return Err(anyhow!(err).context("exec connection lost"));
                }
            },
            chunk = async { match input.as_mut() { Some(rx) => rx.recv().await, None => std::future::pending().await } } => {
                match chunk {
                    Some(bytes) => ws.send(Message::binary(bytes)).await.context("exec connection lost")?,
                    None => {
                        input = None;
                        ws.send(Message::text(json!({"type": "eof"}).to_string()))
                            .await
                            .context("exec connection lost")?;
                    }
                }
            },
            control = controls.recv(), if controls_open => match control {
                Some(Control::Resize(size)) => {
                    let resize = json!({"type": "resize", "cols": size.cols, "rows": size.rows});
                    ws.send(Message::text(resize.to_string())).await.context("exec connection lost")?;
                }
                // The first signal goes to the command; a second one ends hearth.
                Some(Control::Signal(number, why)) => {
                    if signalled {
                        let _ = ws.close(None).await;
                        eprintln!("hearth: {why}");
                        return Ok(EXIT_INTERRUPTED);
                    }
                    signalled = true;
                    let signal = json!({"type": "signal", "signal": number});
                    ws.send(Message::text(signal.to_string())).await.context("exec connection lost")?;
                }
                None => controls_open = false,
            },
        }
    }
    status.context("the connection ended before the command's exit status arrived")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_statuses() {
        assert_eq!(exit_status(Some(0), None, false), 0);
        assert_eq!(exit_status(Some(3), None, false), 3);
        assert_eq!(exit_status(None, Some(9), false), 137);
        assert_eq!(exit_status(None, Some(9), true), EXIT_TIMED_OUT);
        assert_eq!(exit_status(Some(300), None, false), 255);
    }

    #[test]
    fn environment_pairs() {
        let env = parse_env(&["A=1".into(), "B=x=y".into(), "C=".into()]).expect("parses");
        assert_eq!(env["B"], "x=y");
        assert_eq!(env["C"], "");
        assert!(parse_env(&["novalue".into()]).is_err());
        assert!(parse_env(&["=v".into()]).is_err());
    }
}

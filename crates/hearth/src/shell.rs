//! `hearth shell ID`: an interactive root terminal in a microVM through its
//! endpoint's `/shell` WebSocket, as the reference service serves it:
//! CreateMicrovmShellAuthToken, GetMicrovm for the endpoint, then
//! `ws://<endpoint>/shell` with the token in `X-aws-proxy-auth` and in the
//! subprotocol `lambda-microvms.authentication.<token>` (beside
//! `lambda-microvms`). The server's first text frame is `session_init`;
//! binary frames carry the PTY's bytes both ways; the client sends
//! `{"type":"resize","cols","rows"}` at the start and on SIGWINCH; the server
//! closes with 1000 when the shell exits.
//!
//! On a terminal, stdin is put in raw mode (restored on every way out); from
//! a pipe, bytes are streamed as they are and end of input is sent as ^D.

use std::io::{IsTerminal, Read};
use std::os::fd::AsFd;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;

use crate::connect::ServerArgs;
use crate::terminal::{self, RawMode, WindowSize};

/// The managed ingress connectors are `<ARN prefix><NAME>`.
const CONNECTOR_ARN: &str = "aws:network-connector:aws-network-connector:";
/// How long the connection, the upgrade and `session_init` may take (the
/// server may have to resume the microVM first).
const OPEN_TIMEOUT: Duration = Duration::from_secs(60);
/// After the server's close frame, how long to wait for the connection to end.
const CLOSE_WAIT: Duration = Duration::from_secs(2);
/// End of input for a shell reading from a pipe (^D).
const EOT: u8 = 0x04;
/// After piped input ends, ^D is sent once the output has been quiet this
/// long (the shell waits for input), and again after each quiet spell: a ^D
/// that reaches the PTY while it is still in canonical mode (the shell
/// starting, or running a command) becomes a NUL, not an end of file.
const EOT_QUIET: Duration = Duration::from_millis(500);

#[derive(Debug, Args)]
pub struct ShellArgs {
    /// MicroVM ID (run with SHELL_INGRESS, e.g. `hearth run IMAGE --shell`).
    id: String,
    #[command(flatten)]
    server: ServerArgs,
}

/// Runs a shell session; 0 when the shell exited (close 1000), else
/// `error: ...` and 1.
pub async fn main(args: ShellArgs) -> ExitCode {
    match shell(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // The terminal is back in its own mode here (the guard is dropped).
            eprintln!("error: {err:#}");
            ExitCode::from(1)
        }
    }
}

async fn shell(args: ShellArgs) -> Result<()> {
    let client = args.server.client()?;
    let minted = client
        .call(
            "CreateMicrovmShellAuthToken",
            json!({ "microvmIdentifier": args.id, "expirationInMinutes": 5 }),
        )
        .await?;
    let token = minted["authToken"]["X-aws-proxy-auth"]
        .as_str()
        .context("CreateMicrovmShellAuthToken answered without a token")?
        .to_string();
    let vm = client
        .call("GetMicrovm", json!({ "microvmIdentifier": args.id }))
        .await?;
    let endpoint = vm
        .get("endpoint")
        .and_then(Value::as_str)
        .filter(|e| !e.is_empty())
        .with_context(|| format!("{} has no endpoint", args.id))?;

    let ws = tokio::time::timeout(OPEN_TIMEOUT, open(endpoint, &token))
        .await
        .map_err(|_| anyhow!("the shell did not open within {} s", OPEN_TIMEOUT.as_secs()))??;

    let stdin = std::io::stdin();
    let tty = stdin.is_terminal();
    // Raw mode only on a terminal; the guard restores it on every way out.
    let raw_mode = if tty {
        Some(RawMode::enable(stdin.as_fd()).context("cannot put the terminal in raw mode")?)
    } else {
        None
    };
    let controls = watch_signals(tty)?;
    let input = spawn_stdin_reader()?;
    let mut stdout = tokio::io::stdout();
    let eof = (!tty).then_some(EOT);
    let outcome = pump(ws, input, controls, &mut stdout, eof, current_size()).await;
    drop(raw_mode);
    outcome
}

/// `host[:port]` of an endpoint (an `http://`-like scheme is ignored).
pub(crate) fn authority(endpoint: &str) -> Result<http::uri::Authority> {
    let bare = endpoint
        .split_once("://")
        .map_or(endpoint, |(_, rest)| rest)
        .trim_end_matches('/');
    bare.parse()
        .map_err(|_| anyhow!("cannot use the endpoint {endpoint:?}"))
}

/// Where to open the TCP connection: `<id>.localhost` names are served on
/// the loopback address (not every resolver knows them).
pub(crate) fn dial_address(authority: &http::uri::Authority) -> (String, u16) {
    let host = authority.host();
    let port = authority.port_u16().unwrap_or(80);
    if host == "localhost" || host.ends_with(".localhost") {
        ("127.0.0.1".into(), port)
    } else {
        (host.to_string(), port)
    }
}

/// Opens `ws://<endpoint>/shell` with `token` and reads `session_init`.
async fn open(endpoint: &str, token: &str) -> Result<WebSocketStream<tokio::net::TcpStream>> {
    let authority = authority(endpoint)?;
    let (host, port) = dial_address(&authority);
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .with_context(|| format!("cannot connect to the endpoint at {host}:{port}"))?;
    let _ = tcp.set_nodelay(true);
    let (mut ws, _) = tokio_tungstenite::client_async(request(&authority, token)?, tcp)
        .await
        .map_err(handshake_error)?;
    match ws.next().await {
        Some(Ok(Message::Text(text))) => {
            let init: Value = serde_json::from_str(text.as_str()).unwrap_or(Value::Null);
            if init["type"] != "session_init" {
                bail!("the shell did not start: unexpected first message {text}");
            }
            tracing::debug!(session = %init["session_id"], "shell session");
            Ok(ws)
        }
        Some(Ok(Message::Close(frame))) => bail!("the shell did not start: {}", closed(frame)),
        Some(Ok(other)) => bail!("the shell did not start: unexpected first message {other}"),
        Some(Err(err)) => Err(anyhow!(err).context("the shell did not start")),
        None => bail!("the shell did not start: connection closed"),
    }
}

/// The upgrade request: Host is the endpoint; the token goes in the header
/// and in the subprotocol (as the reference's clients send it).
fn request(
    authority: &http::uri::Authority,
    token: &str,
) -> Result<tungstenite::handshake::client::Request> {
    let uri: http::Uri = format!("ws://{authority}/shell")
        .parse()
        .context("endpoint URI")?;
    let mut request = uri.into_client_request()?;
    let headers = request.headers_mut();
    headers.insert(
        hearth_proxy::AUTH_HEADER,
        http::HeaderValue::from_str(token).context("the token is not a valid header value")?,
    );
    headers.insert(
        http::header::SEC_WEBSOCKET_PROTOCOL,
        http::HeaderValue::from_str(&format!(
            "lambda-microvms, lambda-microvms.authentication.{token}"
        ))
        .context("the token is not a valid subprotocol")?,
    );
    Ok(request)
}

/// A refused upgrade shows its status and the proxy's message.
pub(crate) fn handshake_error(err: tungstenite::Error) -> anyhow::Error {
    match err {
        tungstenite::Error::Http(response) => {
            let message = response
                .body()
                .as_deref()
                .and_then(|b| serde_json::from_slice::<Value>(b).ok())
                .and_then(|v| v["message"].as_str().map(str::to_string));
            match message {
                Some(message) => anyhow!(
                    "the endpoint refused the shell: {} ({message})",
                    response.status()
                ),
                None => anyhow!("the endpoint refused the shell: {}", response.status()),
            }
        }
        other => anyhow!(other).context("WebSocket handshake with the endpoint failed"),
    }
}

pub(crate) fn closed(frame: Option<CloseFrame>) -> String {
    match frame {
        Some(frame) if frame.reason.is_empty() => format!("closed with {}", u16::from(frame.code)),
        Some(frame) => format!("closed with {} ({})", u16::from(frame.code), frame.reason),
        None => "closed without a status".into(),
    }
}

/// What the session reacts to besides bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Control {
    Resize(WindowSize),
    /// A terminating signal: close the session and fail with this text.
    Stop(&'static str),
}

/// The size of the terminal on stdin, stdout or stderr (the first that has one).
pub(crate) fn current_size() -> Option<WindowSize> {
    terminal::window_size(std::io::stdin().as_fd())
        .or_else(|| terminal::window_size(std::io::stdout().as_fd()))
        .or_else(|| terminal::window_size(std::io::stderr().as_fd()))
}

/// SIGWINCH (on a terminal) becomes `Resize`; SIGTERM, SIGHUP and SIGINT
/// become `Stop`, so the terminal is restored before the process ends.
fn watch_signals(tty: bool) -> Result<mpsc::Receiver<Control>> {
    use tokio::signal::unix::{signal, SignalKind};
    let (tx, rx) = mpsc::channel(8);
    let mut stops = Vec::new();
    for (kind, why) in [
        (SignalKind::terminate(), "terminated"),
        (SignalKind::hangup(), "hung up"),
        (SignalKind::interrupt(), "interrupted"),
    ] {
        stops.push((signal(kind).context("cannot watch signals")?, why));
    }
    for (mut stream, why) in stops {
        let tx = tx.clone();
        tokio::spawn(async move {
            if stream.recv().await.is_some() {
                let _ = tx.send(Control::Stop(why)).await;
            }
        });
    }
    if tty {
        let mut winch = signal(SignalKind::window_change()).context("cannot watch SIGWINCH")?;
        tokio::spawn(async move {
            while winch.recv().await.is_some() {
                if let Some(size) = current_size() {
                    if tx.send(Control::Resize(size)).await.is_err() {
                        break;
                    }
                }
            }
        });
    }
    Ok(rx)
}

/// Reads stdin on its own thread (a blocking read cannot be cancelled, and
/// must not hold up the runtime's shutdown); the channel closes at end of input.
pub(crate) fn spawn_stdin_reader() -> Result<mpsc::Receiver<Vec<u8>>> {
    let (tx, rx) = mpsc::channel(16);
    std::thread::Builder::new()
        .name("shell-stdin".into())
        .spawn(move || {
            let mut stdin = std::io::stdin().lock();
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        if tx.blocking_send(buf[..n].to_vec()).is_err() {
                            break;
                        }
                    }
                    Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
        })
        .context("cannot start the stdin reader")?;
    Ok(rx)
}

fn resize_message(size: WindowSize) -> Message {
    Message::text(json!({"type": "resize", "cols": size.cols, "rows": size.rows}).to_string())
}

/// Moves bytes until the server closes: stdin chunks → binary frames (then,
/// if given, `eof` after each [`EOT_QUIET`] without output once input has
/// ended), binary frames → `out`, controls → resize messages or a
/// client-side close. Ok only for a close with 1000.
async fn pump<S, W>(
    mut ws: WebSocketStream<S>,
    mut input: mpsc::Receiver<Vec<u8>>,
    mut controls: mpsc::Receiver<Control>,
    out: &mut W,
    eof: Option<u8>,
    size: Option<WindowSize>,
) -> Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
    W: AsyncWrite + Unpin,
{
    if let Some(size) = size {
        ws.send(resize_message(size))
            .await
            .context("shell connection")?;
    }
    let mut input_open = true;
    let mut controls_open = true;
    // Output or the last ^D: when the next ^D is due (input ended, `eof` given).
    let mut last_activity = tokio::time::Instant::now();
    let close = loop {
        let eot_due = last_activity + EOT_QUIET;
        tokio::select! {
            message = ws.next() => match message {
                Some(Ok(Message::Binary(bytes))) => {
                    last_activity = tokio::time::Instant::now();
                    out.write_all(&bytes).await.context("writing the output")?;
                    out.flush().await.context("writing the output")?;
                }
                Some(Ok(Message::Close(frame))) => break frame,
                // session_init repeats, pings (answered by the library), pongs.
                Some(Ok(_)) => {}
                Some(Err(err)) => return Err(anyhow!(err).context("shell connection lost")),
                None => bail!("shell connection lost (no close frame)"),
            },
            chunk = input.recv(), if input_open => match chunk {
                Some(bytes) => ws.send(Message::binary(bytes)).await.context("shell connection lost")?,
                None => input_open = false,
            },
            () = tokio::time::sleep_until(eot_due), if !input_open && eof.is_some() => {
                last_activity = tokio::time::Instant::now();
                tracing::debug!("end of input: sending ^D");
                let bytes = eof.map(|b| vec![b]).unwrap_or_default();
                ws.send(Message::binary(bytes)).await.context("shell connection lost")?;
            },
            control = controls.recv(), if controls_open => match control {
                Some(Control::Resize(size)) => {
                    ws.send(resize_message(size)).await.context("shell connection lost")?;
                }
                Some(Control::Stop(why)) => {
                    let frame = CloseFrame { code: CloseCode::Away, reason: "client exiting".into() };
                    let _ = tokio::time::timeout(CLOSE_WAIT, ws.close(Some(frame))).await;
                    bail!("{why}");
                }
                None => controls_open = false,
            },
        }
    };
    // The library answers the close; let the connection wind down.
    let _ = tokio::time::timeout(CLOSE_WAIT, async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
    match close {
        Some(frame) if frame.code == CloseCode::Normal => Ok(()),
        other => bail!("the shell session ended: {}", closed(other)),
    }
}

/// `ingressNetworkConnectors` for `hearth run`: `--ingress` values (a
/// managed connector's name, e.g. `SHELL_INGRESS`, or a full ARN) and, with
/// `--shell`, SHELL_INGRESS and HTTP_INGRESS; each once, in order.
pub(crate) fn ingress_connectors(values: &[String], shell: bool, region: &str) -> Vec<String> {
    let mut names: Vec<String> = values.to_vec();
    if shell {
        names.push("SHELL_INGRESS".into());
        names.push("HTTP_INGRESS".into());
    }
    let mut arns: Vec<String> = Vec::new();
    for name in names {
        let arn = if name.starts_with("arn:") {
            name
        } else {
            format!(
                "arn:aws:lambda:{region}:{CONNECTOR_ARN}{}",
                name.to_ascii_uppercase()
            )
        };
        if !arns.contains(&arn) {
            arns.push(arn);
        }
    }
    arns
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};

    #[test]
    fn ingress_names_become_arns() {
        let arn = |n: &str| {
            format!("arn:aws:lambda:eu-west-1:aws:network-connector:aws-network-connector:{n}")
        };
        assert_eq!(
            ingress_connectors(&["shell_ingress".into()], true, "eu-west-1"),
            vec![arn("SHELL_INGRESS"), arn("HTTP_INGRESS")]
        );
        let full = arn("ALL_INGRESS");
        assert_eq!(
            ingress_connectors(std::slice::from_ref(&full), false, "us-east-1"),
            vec![full]
        );
        assert!(ingress_connectors(&[], false, "us-east-1").is_empty());
    }

    #[test]
    fn endpoints_and_where_to_dial() {
        let a = authority("microvm-1.localhost:9080").expect("authority");
        assert_eq!(dial_address(&a), ("127.0.0.1".into(), 9080));
        let a = authority("https://abc.lambda-microvm.us-east-1.on.aws/").expect("authority");
        assert_eq!(
            dial_address(&a),
            ("abc.lambda-microvm.us-east-1.on.aws".into(), 80)
        );
        assert!(authority("a b").is_err());
    }

    /// A fake endpoint: checks the upgrade, sends session_init, answers
    /// binary frames with `out:` + the bytes, and closes with `close_code`
    /// on `exit`. Returns its address and the messages it received.
    // The handshake callback's error type is tungstenite's (a whole response).
    #[allow(clippy::result_large_err)]
    async fn fake_endpoint(
        close_code: u16,
    ) -> (std::net::SocketAddr, tokio::task::JoinHandle<Vec<Message>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.expect("accept");
            let check = |req: &Request, mut resp: Response| {
                let h = req.headers();
                assert_eq!(req.uri().path(), "/shell");
                assert_eq!(
                    h["host"],
                    format!("vm-1.localhost:{}", addr.port()).as_str()
                );
                assert_eq!(h["x-aws-proxy-auth"], "tok.en");
                let protocols = h["sec-websocket-protocol"].to_str().expect("ascii");
                assert!(protocols.contains("lambda-microvms.authentication.tok.en"));
                resp.headers_mut().insert(
                    "sec-websocket-protocol",
                    http::HeaderValue::from_static("lambda-microvms"),
                );
                Ok(resp)
            };
            let mut ws = tokio_tungstenite::accept_hdr_async(tcp, check)
                .await
                .expect("accept ws");
            ws.send(Message::text(
                r#"{"type":"session_init","session_id":"s-1"}"#,
            ))
            .await
            .expect("init");
            let mut seen = Vec::new();
            while let Some(Ok(message)) = ws.next().await {
                seen.push(message.clone());
                if let Message::Binary(bytes) = &message {
                    let mut reply = b"out:".to_vec();
                    reply.extend_from_slice(bytes);
                    // Input may still arrive after the close: not answered.
                    let _ = ws.send(Message::binary(reply)).await;
                    if bytes.ends_with(b"exit\n") || bytes[..] == [EOT] {
                        let frame = CloseFrame {
                            code: CloseCode::from(close_code),
                            reason: "shell exited".into(),
                        };
                        ws.close(Some(frame)).await.expect("close");
                    }
                }
            }
            seen
        });
        (addr, task)
    }

    async fn session(
        close_code: u16,
        chunks: &[&[u8]],
        eof: Option<u8>,
    ) -> (Result<()>, Vec<u8>, Vec<Message>) {
        let (addr, server) = fake_endpoint(close_code).await;
        let ws = open(&format!("vm-1.localhost:{}", addr.port()), "tok.en")
            .await
            .expect("open");
        let (tx, input) = mpsc::channel(8);
        for chunk in chunks {
            tx.send(chunk.to_vec()).await.expect("queue");
        }
        drop(tx);
        let (_controls_tx, controls) = mpsc::channel(1);
        let mut out = Vec::new();
        let size = Some(WindowSize {
            cols: 100,
            rows: 30,
        });
        let result = tokio::time::timeout(
            Duration::from_secs(10),
            pump(ws, input, controls, &mut out, eof, size),
        )
        .await
        .expect("session ends");
        (result, out, server.await.expect("server"))
    }

    #[tokio::test]
    async fn a_session_streams_resizes_and_ends_with_1000() {
        let (result, out, seen) = session(1000, &[b"echo hi\n", b"exit\n"], None).await;
        result.expect("closed with 1000");
        assert_eq!(out, b"out:echo hi\nout:exit\n");
        let Message::Text(resize) = &seen[0] else {
            panic!("first message: {:?}", seen[0]);
        };
        let resize: Value = serde_json::from_str(resize.as_str()).expect("json");
        assert_eq!(resize, json!({"type": "resize", "cols": 100, "rows": 30}));
        assert_eq!(seen[1], Message::binary(b"echo hi\n".to_vec()));
    }

    #[tokio::test]
    async fn end_of_piped_input_is_sent_as_eot() {
        // No `exit`: the ^D (after the output went quiet) ends the session.
        let (result, out, seen) = session(1000, &[b"echo hi\n"], Some(EOT)).await;
        result.expect("closed with 1000");
        assert_eq!(out, b"out:echo hi\nout:\x04");
        assert_eq!(
            seen[1..3],
            [
                Message::binary(b"echo hi\n".to_vec()),
                Message::binary(vec![EOT])
            ],
            "{seen:?}"
        );
    }

    #[tokio::test]
    async fn another_close_code_is_an_error() {
        let (result, _, _) = session(1011, &[b"exit\n"], None).await;
        let err = result.expect_err("1011 is a failure").to_string();
        assert!(
            err.contains("1011") && err.contains("shell exited"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_refused_upgrade_shows_the_status_and_message() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.expect("accept");
            let mut buf = vec![0u8; 8192];
            let _ = tokio::io::AsyncReadExt::read(&mut tcp, &mut buf).await;
            let body = r#"{"message":"Forbidden"}"#;
            let head = format!(
                "HTTP/1.1 403 Forbidden\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            tcp.write_all(head.as_bytes()).await.expect("write");
        });
        let err = open(&format!("vm-1.localhost:{}", addr.port()), "t")
            .await
            .expect_err("refused")
            .to_string();
        assert!(err.contains("403") && err.contains("Forbidden"), "{err}");
    }
}

//! The host's agent client against the real agent (served on a Unix socket, no
//! VM), and against a hostile peer that breaks the protocol.

use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use hearth_proto::{
    raw_header, ErrorKind, ExecRequest, Frame, FrameCodec, FrameKind, Hello, Incoming,
    WriteFileRequest, CONTROL_STREAM, FLAG_STDOUT, MAX_PAYLOAD, PROTOCOL_VERSION,
};
use hearth_vm::{AgentClient, AgentError, Assets};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;
use tokio_util::codec::Framed;

struct RealAgent {
    child: std::process::Child,
    dir: tempfile::TempDir,
}

impl RealAgent {
    fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let agent = Assets::from_env().agent_binary().expect("agent binary");
        let child = std::process::Command::new(agent)
            .arg("--unix-listen")
            .arg(dir.path().join("agent.sock"))
            .spawn()
            .expect("start agent");
        Self { child, dir }
    }

    async fn client(&self) -> AgentClient {
        AgentClient::connect(&self.dir.path().join("agent.sock"), Duration::from_secs(10))
            .await
            .expect("connect")
    }
}

impl Drop for RealAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn exec_files_and_tcp_through_the_client() {
    let agent = RealAgent::start();
    let client = agent.client().await;
    client.ping().await.expect("ping");

    let out = client
        .exec_output(ExecRequest {
            argv: vec![
                "sh".into(),
                "-c".into(),
                "echo out; echo err >&2; exit 3".into(),
            ],
            ..Default::default()
        })
        .await
        .expect("exec");
    assert_eq!(out.stdout, b"out\n");
    assert_eq!(out.stderr, b"err\n");
    assert_eq!(out.status.code, Some(3));

    let err = client
        .exec_output(ExecRequest {
            argv: vec!["/no/such/program".into()],
            ..Default::default()
        })
        .await
        .expect_err("missing program");
    assert_eq!(err.remote_kind(), Some(ErrorKind::NotFound), "{err}");

    // Files: 3 MiB there and back.
    let data: Vec<u8> = (0..3 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let path = agent.dir.path().join("file.bin");
    let written = client
        .write_file(
            WriteFileRequest {
                path: path.display().to_string(),
                mode: Some(0o600),
                uid: None,
                gid: None,
                create_parents: false,
            },
            std::io::Cursor::new(data.clone()),
        )
        .await
        .expect("write");
    assert_eq!(written, data.len() as u64);
    let mut back = Vec::new();
    let (size, mode) = client
        .read_file(&path.display().to_string(), &mut back)
        .await
        .expect("read");
    assert_eq!(size, data.len() as u64);
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(back, data);

    // TCP to a listener "inside the guest" (here: on the host's loopback).
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let server = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.expect("accept");
        let mut buf = [0u8; 5];
        socket.read_exact(&mut buf).await.expect("read");
        socket
            .write_all(&buf.to_ascii_uppercase())
            .await
            .expect("write");
    });
    let mut stream = client.connect_tcp(port).await.expect("connect");
    stream
        .sender()
        .send_data(Bytes::from_static(b"hello"))
        .await
        .expect("send");
    let frame = stream.recv().await.expect("echo");
    assert_eq!(frame.kind, FrameKind::Data);
    assert_eq!(&frame.payload[..], b"HELLO");
    server.await.expect("server");
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let closed_port = closed.local_addr().expect("addr").port();
    drop(closed);
    let err = client.connect_tcp(closed_port).await.expect_err("refused");
    assert_eq!(
        err.remote_kind(),
        Some(ErrorKind::ConnectionRefused),
        "{err}"
    );
}

/// A peer that says hello, then answers the first request with an oversized
/// frame, then with garbage JSON: the client reports errors and keeps working.
#[tokio::test]
async fn hostile_guest_cannot_break_the_client() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("agent.sock");
    let listener = UnixListener::bind(&socket).expect("bind");
    let peer = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.expect("accept");
        let mut framed = Framed::new(stream, FrameCodec::default());
        let mut requests = Vec::new();
        while let Some(Ok(Incoming::Frame(frame))) = framed.next().await {
            match frame.kind {
                FrameKind::Hello => {
                    let hello = Hello {
                        version: PROTOCOL_VERSION,
                        software: "hostile".into(),
                    };
                    framed
                        .send(Frame::json(CONTROL_STREAM, FrameKind::Hello, &hello))
                        .await
                        .expect("hello");
                }
                FrameKind::Open => {
                    requests.push(frame.stream);
                    let io = framed.get_mut();
                    match requests.len() {
                        1 => {
                            // Oversized: header claims more than the limit.
                            let len = (MAX_PAYLOAD + 1) as u32;
                            io.write_all(&raw_header(
                                len,
                                frame.stream,
                                FrameKind::Data as u8,
                                FLAG_STDOUT,
                            ))
                            .await
                            .expect("write");
                            io.write_all(&vec![b'x'; MAX_PAYLOAD + 1])
                                .await
                                .expect("write");
                        }
                        2 => {
                            let bad = Frame::new(frame.stream, FrameKind::Reply, &b"{nope"[..]);
                            framed.send(bad).await.expect("send");
                        }
                        _ => {
                            let pong = hearth_proto::Reply::Pong { uptime_ms: 1 };
                            framed
                                .send(Frame::json(frame.stream, FrameKind::Reply, &pong))
                                .await
                                .expect("send");
                        }
                    }
                }
                _ => {}
            }
        }
    });
    let client = AgentClient::connect(&socket, Duration::from_secs(5))
        .await
        .expect("connect");
    let err = client.ping().await.expect_err("oversized frame");
    assert!(
        matches!(&err, AgentError::Remote(reply) if reply.kind == ErrorKind::Protocol),
        "{err}"
    );
    let err = client.ping().await.expect_err("bad json");
    assert!(matches!(err, AgentError::Protocol(_)), "{err}");
    assert_eq!(client.ping().await.expect("still alive"), 1);
    drop(client);
    peer.await.expect("peer");
}

/// A port left mid-frame by an earlier host (cut off by a suspend or a
/// snapshot) delivers the rest of that frame first: the client skips it and
/// every other stale byte until the agent's answer to its hello.
#[tokio::test]
async fn stale_bytes_before_the_hello_are_skipped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("agent.sock");
    let listener = UnixListener::bind(&socket).expect("bind");
    let peer = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.expect("accept");
        // The tail of an old Data frame, then a header claiming a huge frame,
        // then a well-formed frame of an old stream.
        stream
            .write_all(b"tail of old output {\"x\":1}")
            .await
            .expect("write");
        stream
            .write_all(&raw_header(200_000, 7, FrameKind::Data as u8, FLAG_STDOUT))
            .await
            .expect("write");
        stream.write_all(&[0u8; 100]).await.expect("write");
        let mut framed = Framed::new(stream, FrameCodec::default());
        framed
            .send(Frame::new(9, FrameKind::Data, &b"old"[..]))
            .await
            .expect("old frame");
        while let Some(Ok(Incoming::Frame(frame))) = framed.next().await {
            if frame.kind == FrameKind::Hello {
                let hello = Hello {
                    version: PROTOCOL_VERSION,
                    software: "restored".into(),
                };
                framed
                    .send(Frame::json(CONTROL_STREAM, FrameKind::Hello, &hello))
                    .await
                    .expect("hello");
            } else if frame.kind == FrameKind::Open {
                let pong = hearth_proto::Reply::Pong { uptime_ms: 7 };
                framed
                    .send(Frame::json(frame.stream, FrameKind::Reply, &pong))
                    .await
                    .expect("pong");
            }
        }
    });
    let client = AgentClient::connect(&socket, Duration::from_secs(5))
        .await
        .expect("connect past stale bytes");
    assert_eq!(client.agent_software(), "restored");
    assert_eq!(client.ping().await.expect("ping"), 7);
    drop(client);
    peer.abort();
}

/// A connection on which the hello goes unanswered (QEMU can stall a port's
/// guest-to-host direction until the host disconnects) is dropped and made
/// again; the hello on the new connection is answered.
#[tokio::test]
async fn an_unanswered_hello_is_sent_again_on_a_new_connection() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("agent.sock");
    let listener = UnixListener::bind(&socket).expect("bind");
    let peer = tokio::spawn(async move {
        // First connection: read the hello, never answer, notice the hang-up.
        let (mut stalled, _) = listener.accept().await.expect("accept");
        let mut sink = Vec::new();
        let _ = stalled.read_to_end(&mut sink).await;
        assert!(!sink.is_empty(), "the first hello never came");
        // Second connection: a working agent.
        let (stream, _) = listener.accept().await.expect("accept again");
        let mut framed = Framed::new(stream, FrameCodec::default());
        while let Some(Ok(Incoming::Frame(frame))) = framed.next().await {
            if frame.kind == FrameKind::Hello {
                let hello = Hello {
                    version: PROTOCOL_VERSION,
                    software: "second".into(),
                };
                framed
                    .send(Frame::json(CONTROL_STREAM, FrameKind::Hello, &hello))
                    .await
                    .expect("hello");
            }
        }
    });
    let started = std::time::Instant::now();
    let client = AgentClient::connect(&socket, Duration::from_secs(10))
        .await
        .expect("connect on the second attempt");
    assert_eq!(client.agent_software(), "second");
    // The first attempt waited about a second, not the whole timeout.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    drop(client);
    peer.abort();
}

/// The overall timeout still holds when no attempt is ever answered.
#[tokio::test]
async fn a_silent_agent_times_out_at_the_deadline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("agent.sock");
    let listener = UnixListener::bind(&socket).expect("bind");
    let peer = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    let started = std::time::Instant::now();
    let err = AgentClient::connect(&socket, Duration::from_secs(3))
        .await
        .expect_err("nobody answers");
    assert!(
        matches!(err, AgentError::Timeout(t) if t == Duration::from_secs(3)),
        "{err}"
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(3) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    peer.abort();
}

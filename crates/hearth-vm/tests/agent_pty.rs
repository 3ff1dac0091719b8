//! `AgentClient::exec_pty` and `StreamSender::resize` against the real agent
//! (served on a Unix socket, no VM). Like `agent_client.rs`, this uses the agent
//! binary `Assets` finds (the one built into hearth-vm, or `HEARTH_AGENT`).

use std::time::{Duration, Instant};

use bytes::Bytes;
use hearth_proto::{ErrorKind, ExecRequest, PtyRequest};
use hearth_vm::agent::{AgentStream, PtyEvent};
use hearth_vm::{AgentClient, AgentError, Assets};

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

/// Reads terminal output until `needle` appears after `from`; returns the end
/// of the match.
async fn wait_for(
    stream: &mut AgentStream,
    screen: &mut Vec<u8>,
    from: usize,
    needle: &str,
) -> usize {
    let started = Instant::now();
    loop {
        if let Some(at) = screen[from.min(screen.len())..]
            .windows(needle.len())
            .position(|window| window == needle.as_bytes())
        {
            return from + at + needle.len();
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no {needle:?} in {:?}",
            String::from_utf8_lossy(screen)
        );
        let event = tokio::time::timeout(Duration::from_secs(20), stream.next_pty_event())
            .await
            .expect("an event in time")
            .expect("terminal event");
        match event {
            PtyEvent::Output(bytes) => screen.extend_from_slice(&bytes),
            PtyEvent::Exited(status) => panic!(
                "exited ({status:?}) before {needle:?}: {:?}",
                String::from_utf8_lossy(screen)
            ),
        }
    }
}

#[tokio::test]
async fn shell_through_the_client() {
    let agent = RealAgent::start();
    let client = agent.client().await;

    let request = ExecRequest {
        argv: vec!["sh".into(), "-i".into()],
        ..Default::default()
    };
    let mut stream = client.exec_pty(request, 100, 33).await.expect("exec_pty");
    let sender = stream.sender();
    let mut screen = Vec::new();

    sender
        .send_data(Bytes::from_static(
            b"echo hi-$((1+1)); echo \"<$(stty size)>\"\n",
        ))
        .await
        .expect("type");
    let at = wait_for(&mut stream, &mut screen, 0, "hi-2").await;
    let at = wait_for(&mut stream, &mut screen, at, "<33 100>").await;

    sender.resize(132, 43).await.expect("resize");
    sender
        .send_data(Bytes::from_static(b"echo \"<$(stty size)>\" \"<$TERM>\"\n"))
        .await
        .expect("type");
    let at = wait_for(&mut stream, &mut screen, at, "<43 132>").await;
    wait_for(&mut stream, &mut screen, at, "<xterm-256color>").await;

    // Out-of-range sizes never leave the host.
    for (cols, rows) in [(0, 10), (10, 0), (1001, 10), (10, 1001)] {
        let err = sender.resize(cols, rows).await.expect_err("bad size");
        assert!(matches!(err, AgentError::WindowSize { .. }), "{err}");
    }

    sender
        .send_data(Bytes::from_static(b"exit 0\n"))
        .await
        .expect("type");
    let status = loop {
        match stream.next_pty_event().await.expect("event") {
            PtyEvent::Output(bytes) => screen.extend_from_slice(&bytes),
            PtyEvent::Exited(status) => break status,
        }
    };
    assert_eq!(status.code, Some(0), "{status:?}");

    // A chosen TERM is kept, bad sizes are refused before anything is sent, and
    // a missing program fails the stream.
    let request = ExecRequest {
        argv: vec!["sh".into(), "-c".into(), "echo \"<$TERM>\"".into()],
        pty: Some(PtyRequest {
            cols: 1,
            rows: 1,
            term: Some("vt100".into()),
        }),
        ..Default::default()
    };
    let mut stream = client.exec_pty(request, 80, 24).await.expect("exec_pty");
    let mut screen = Vec::new();
    wait_for(&mut stream, &mut screen, 0, "<vt100>").await;

    let err = client
        .exec_pty(ExecRequest::default(), 0, 24)
        .await
        .expect_err("zero columns");
    assert!(matches!(err, AgentError::WindowSize { .. }), "{err}");

    let request = ExecRequest {
        argv: vec!["/no/such/program".into()],
        ..Default::default()
    };
    let mut stream = client.exec_pty(request, 80, 24).await.expect("open");
    let err = stream.next_pty_event().await.expect_err("missing program");
    assert_eq!(err.remote_kind(), Some(ErrorKind::NotFound), "{err}");

    // Plain exec is unchanged.
    let out = client
        .exec_output(ExecRequest {
            argv: vec!["sh".into(), "-c".into(), "test -t 0 || echo no-tty".into()],
            ..Default::default()
        })
        .await
        .expect("exec");
    assert_eq!(out.stdout, b"no-tty\n");
    client.ping().await.expect("still serving");
}

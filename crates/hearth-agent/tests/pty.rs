//! Exec streams on a pseudo-terminal, against the real agent binary served over
//! `--unix-listen` (no VM).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use hearth_proto::{
    ErrorKind, ErrorReply, ExecRequest, ExitStatus, Frame, FrameCodec, FrameKind, Hello, Incoming,
    PtyRequest, Reply, Request, ResizeRequest, FLAG_STDOUT, MAX_PAYLOAD, PROTOCOL_VERSION,
};
use tokio::net::UnixStream;
use tokio_util::codec::Framed;

const FRAME_TIMEOUT: Duration = Duration::from_secs(20);

/// The agent binary under test; `HEARTH_AGENT_BIN` overrides it (e.g. to run this
/// suite against the static release build).
fn agent_binary() -> PathBuf {
    std::env::var_os("HEARTH_AGENT_BIN").map_or_else(
        || PathBuf::from(env!("CARGO_BIN_EXE_hearth-agent")),
        PathBuf::from,
    )
}

/// A running agent on a temporary socket; killed and cleaned up on drop.
struct AgentProcess {
    child: Child,
    dir: PathBuf,
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

struct Client {
    framed: Framed<UnixStream, FrameCodec>,
    _agent: AgentProcess,
}

impl Client {
    async fn start(tag: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock after epoch")
            .as_nanos();
        let dir = std::env::temp_dir().join(format!(
            "hearth-agent-pty-{tag}-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        let socket = dir.join("agent.sock");
        let child = Command::new(agent_binary())
            .arg("--unix-listen")
            .arg(&socket)
            .stdin(Stdio::null())
            .spawn()
            .expect("start agent");
        let agent = AgentProcess { child, dir };
        let started = Instant::now();
        let stream = loop {
            match UnixStream::connect(&socket).await {
                Ok(stream) => break stream,
                Err(_) if started.elapsed() < Duration::from_secs(10) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(err) => panic!("agent socket never came up: {err}"),
            }
        };
        let mut client = Self {
            framed: Framed::new(stream, FrameCodec::default()),
            _agent: agent,
        };
        let hello = Hello {
            version: PROTOCOL_VERSION,
            software: "pty-test".into(),
        };
        client.send(Frame::json(0, FrameKind::Hello, &hello)).await;
        let answer = client.next().await;
        assert_eq!((answer.stream, answer.kind), (0, FrameKind::Hello));
        client
    }

    async fn send(&mut self, frame: Frame) {
        self.framed.send(frame).await.expect("send frame");
    }

    async fn next(&mut self) -> Frame {
        let item = tokio::time::timeout(FRAME_TIMEOUT, self.framed.next())
            .await
            .expect("a frame within the timeout")
            .expect("connection open")
            .expect("decodable");
        match item {
            Incoming::Frame(frame) => frame,
            Incoming::Rejected { stream, reason } => {
                panic!("agent sent a bad frame on {stream}: {reason}")
            }
        }
    }

    async fn open_pty(&mut self, stream: u32, argv: &[&str], cols: u16, rows: u16) {
        let request = ExecRequest {
            argv: argv.iter().map(|word| (*word).to_owned()).collect(),
            pty: Some(PtyRequest {
                cols,
                rows,
                term: None,
            }),
            ..ExecRequest::default()
        };
        self.send(Frame::json(
            stream,
            FrameKind::Open,
            &Request::Exec(request),
        ))
        .await;
    }

    async fn type_in(&mut self, stream: u32, text: &str) {
        self.send(Frame::new(
            stream,
            FrameKind::Data,
            text.as_bytes().to_vec(),
        ))
        .await;
    }

    async fn resize(&mut self, stream: u32, cols: u16, rows: u16) {
        self.send(Frame::json(
            stream,
            FrameKind::Resize,
            &ResizeRequest { cols, rows },
        ))
        .await;
    }
}

/// One terminal's output as seen so far, and how far the checks have read it.
#[derive(Default)]
struct Screen {
    output: Vec<u8>,
    cursor: usize,
    eof: bool,
    exit: Option<ExitStatus>,
    error: Option<ErrorReply>,
}

impl Screen {
    fn take(&mut self, frame: Frame) {
        match frame.kind {
            FrameKind::Data => {
                assert_eq!(frame.flags, FLAG_STDOUT, "terminal output is stdout");
                assert!(self.exit.is_none(), "output after Exit");
                self.output.extend_from_slice(&frame.payload);
            }
            FrameKind::Eof => {
                assert_eq!(frame.flags, FLAG_STDOUT);
                assert!(!self.eof, "a second Eof");
                self.eof = true;
            }
            FrameKind::Exit => {
                assert!(self.eof, "Eof before Exit");
                self.exit = Some(frame.parse().expect("exit json"));
            }
            FrameKind::Error => self.error = Some(frame.parse().expect("error json")),
            other => panic!("unexpected {other:?}: {:?}", frame.payload),
        }
    }

    /// Finds `needle` after the cursor and moves the cursor past it.
    fn find(&mut self, needle: &str) -> Option<usize> {
        let at = self.output[self.cursor..]
            .windows(needle.len())
            .position(|window| window == needle.as_bytes())?;
        self.cursor += at + needle.len();
        Some(self.cursor)
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.output).into_owned()
    }
}

/// Reads frames of `stream` until `needle` shows up in its output (after what
/// earlier checks consumed), returning the output that follows it.
async fn wait_for(client: &mut Client, stream: u32, screen: &mut Screen, needle: &str) -> String {
    let started = Instant::now();
    loop {
        if let Some(end) = screen.find(needle) {
            return String::from_utf8_lossy(&screen.output[end..]).into_owned();
        }
        assert!(
            screen.exit.is_none() && screen.error.is_none(),
            "stream {stream} ended before {needle:?}: {:?} {:?}\n{}",
            screen.exit,
            screen.error,
            screen.text()
        );
        assert!(
            started.elapsed() < FRAME_TIMEOUT,
            "no {needle:?} in {:?}",
            screen.text()
        );
        let frame = client.next().await;
        assert_eq!(frame.stream, stream, "{frame:?}");
        screen.take(frame);
    }
}

async fn wait_for_exit(client: &mut Client, stream: u32, screen: &mut Screen) -> ExitStatus {
    while screen.exit.is_none() {
        assert!(screen.error.is_none(), "{:?}", screen.error);
        let frame = client.next().await;
        assert_eq!(frame.stream, stream, "{frame:?}");
        screen.take(frame);
    }
    screen.exit.clone().expect("exit status")
}

#[tokio::test]
async fn interactive_shell_on_a_pty() {
    let mut client = Client::start("shell").await;
    let mut screen = Screen::default();
    client.open_pty(1, &["sh", "-i"], 91, 37).await;

    // Markers are computed by the shell, so the terminal's echo of the typed
    // command never matches them.
    client.type_in(1, "echo hi-$((1+1))\n").await;
    wait_for(&mut client, 1, &mut screen, "hi-2").await;

    client.type_in(1, "echo \"<$(tty)>\"\n").await;
    let after = wait_for(&mut client, 1, &mut screen, "</dev/pts/").await;
    let number = after.split('>').next().unwrap_or_default();
    assert!(
        !number.is_empty() && number.bytes().all(|b| b.is_ascii_digit()),
        "tty printed {after:?}"
    );

    client.type_in(1, "echo \"<$(stty size)>\"\n").await;
    wait_for(&mut client, 1, &mut screen, "<37 91>").await;

    client.type_in(1, "echo \"<$TERM>\"\n").await;
    wait_for(&mut client, 1, &mut screen, "<xterm-256color>").await;

    // A session leader with its controlling terminal: its own process group is
    // the foreground one, and /dev/tty opens.
    client
        .type_in(
            1,
            "echo \"<sid$((0))-$(cut -d' ' -f6 /proc/$$/stat)-$$>\"; : < /dev/tty && echo tty-$((3+4))\n",
        )
        .await;
    let after = wait_for(&mut client, 1, &mut screen, "<sid0-").await;
    let ids: Vec<&str> = after
        .split('>')
        .next()
        .unwrap_or_default()
        .split('-')
        .collect();
    assert_eq!(ids.len(), 2, "{after:?}");
    assert_eq!(ids[0], ids[1], "the shell leads its session: {after:?}");
    wait_for(&mut client, 1, &mut screen, "tty-7").await;

    client.resize(1, 120, 50).await;
    client.type_in(1, "echo \"<$(stty size)>\"\n").await;
    wait_for(&mut client, 1, &mut screen, "<50 120>").await;

    // The kernel sends SIGWINCH to the foreground process group on a resize.
    client
        .type_in(
            1,
            "sh -c 'trap \"echo got-\\$((6*7)); exit 0\" WINCH; echo armed-$((2+3)); while :; do sleep 0.05; done'\n",
        )
        .await;
    wait_for(&mut client, 1, &mut screen, "armed-5").await;
    client.resize(1, 100, 30).await;
    wait_for(&mut client, 1, &mut screen, "got-42").await;

    // Host Eof means nothing to a terminal: the shell keeps going.
    client
        .send(Frame::new(1, FrameKind::Eof, Bytes::new()))
        .await;
    client.type_in(1, "echo still-$((5+5))\n").await;
    wait_for(&mut client, 1, &mut screen, "still-10").await;

    client.type_in(1, "exit\n").await;
    let status = wait_for_exit(&mut client, 1, &mut screen).await;
    assert_eq!(status.code, Some(0), "{status:?}");
    assert!(!status.timed_out);
}

#[tokio::test]
async fn flood_of_output_arrives_whole() {
    let mut client = Client::start("flood").await;
    let mut screen = Screen::default();
    client
        .open_pty(1, &["sh", "-c", "yes | head -c 5000000"], 80, 24)
        .await;
    // Another stream is served while the terminal floods.
    let mut pong = false;
    let mut asked = false;
    while screen.exit.is_none() {
        let frame = client.next().await;
        if frame.stream == 2 {
            assert_eq!(frame.kind, FrameKind::Reply);
            assert!(matches!(
                frame.parse::<Reply>().expect("reply"),
                Reply::Pong { .. }
            ));
            pong = true;
            continue;
        }
        assert_eq!(frame.stream, 1, "{frame:?}");
        assert!(frame.payload.len() <= MAX_PAYLOAD);
        screen.take(frame);
        if !asked && !screen.output.is_empty() {
            asked = true;
            client
                .send(Frame::json(2, FrameKind::Open, &Request::Ping))
                .await;
        }
    }
    let status = screen.exit.clone().expect("exit");
    assert_eq!(status.code, Some(0), "{status:?}");
    // 2.5 million "y\n" lines, each ending "\r\n" on the terminal (ONLCR).
    let count = |byte: u8| screen.output.iter().filter(|b| **b == byte).count();
    assert_eq!(count(b'y'), 2_500_000);
    assert_eq!(count(b'\n'), 2_500_000);
    assert_eq!(count(b'\r'), 2_500_000);
    assert_eq!(screen.output.len(), 7_500_000);
    if !pong {
        let frame = client.next().await;
        assert_eq!((frame.stream, frame.kind), (2, FrameKind::Reply));
    }
}

#[tokio::test]
async fn bad_resize_fails_only_its_stream() {
    let mut client = Client::start("resize").await;
    let (mut one, mut two, mut three) = (Screen::default(), Screen::default(), Screen::default());
    client.open_pty(1, &["sh", "-i"], 80, 24).await;
    client.open_pty(2, &["sh", "-i"], 80, 24).await;
    client.type_in(1, "echo \"<$$>\"; echo up-$((1+2))\n").await;
    let pid_line = {
        let mut seen = String::new();
        while !seen.contains("up-3") {
            let frame = client.next().await;
            match frame.stream {
                1 => one.take(frame),
                2 => two.take(frame),
                other => panic!("frame on {other}"),
            }
            seen = one.text();
        }
        seen
    };
    let pid: u32 = pid_line
        .split('<')
        .filter_map(|part| part.split('>').next())
        .find_map(|candidate| candidate.parse().ok())
        .expect("the shell's pid");

    // Zero columns: stream 1 fails, its shell is killed.
    client.resize(1, 0, 24).await;
    let error = loop {
        let frame = client.next().await;
        match frame.stream {
            1 => {
                one.take(frame);
                if let Some(error) = one.error.take() {
                    break error;
                }
            }
            2 => two.take(frame),
            other => panic!("frame on {other}"),
        }
    };
    assert_eq!(error.kind, ErrorKind::InvalidRequest, "{}", error.message);
    assert!(one.exit.is_none());
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    let started = Instant::now();
    while proc_dir.exists() {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the failed stream's shell survived"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Too many rows and a malformed payload fail their streams too.
    client.open_pty(3, &["sh", "-i"], 80, 24).await;
    client.resize(3, 80, 1001).await;
    let error = loop {
        let frame = client.next().await;
        match frame.stream {
            2 => two.take(frame),
            3 => {
                three.take(frame);
                if let Some(error) = three.error.take() {
                    break error;
                }
            }
            other => panic!("frame on {other}"),
        }
    };
    assert_eq!(error.kind, ErrorKind::InvalidRequest);
    let mut four = Screen::default();
    client.open_pty(4, &["sh", "-i"], 80, 24).await;
    client
        .send(Frame::new(
            4,
            FrameKind::Resize,
            &b"{\"cols\":\"wide\"}"[..],
        ))
        .await;
    let error = loop {
        let frame = client.next().await;
        match frame.stream {
            2 => two.take(frame),
            4 => {
                four.take(frame);
                if let Some(error) = four.error.take() {
                    break error;
                }
            }
            other => panic!("frame on {other}"),
        }
    };
    assert_eq!(error.kind, ErrorKind::Protocol);

    // Stream 2 is untouched: it still answers and resizes.
    client.resize(2, 70, 20).await;
    client.type_in(2, "echo \"<$(stty size)>\"\n").await;
    wait_for(&mut client, 2, &mut two, "<20 70>").await;
    client.type_in(2, "exit 5\n").await;
    let status = wait_for_exit(&mut client, 2, &mut two).await;
    assert_eq!(status.code, Some(5));
}

#[tokio::test]
async fn bad_requests_and_plain_streams() {
    let mut client = Client::start("requests").await;
    // An out-of-range size or TERM is refused at open.
    client.open_pty(1, &["sh"], 0, 24).await;
    let frame = client.next().await;
    assert_eq!((frame.stream, frame.kind), (1, FrameKind::Error));
    let error: ErrorReply = frame.parse().expect("error json");
    assert_eq!(error.kind, ErrorKind::InvalidRequest);

    let request = ExecRequest {
        argv: vec!["sh".into()],
        pty: Some(PtyRequest {
            cols: 80,
            rows: 24,
            term: Some("bad term".into()),
        }),
        ..ExecRequest::default()
    };
    client
        .send(Frame::json(2, FrameKind::Open, &Request::Exec(request)))
        .await;
    let frame = client.next().await;
    assert_eq!((frame.stream, frame.kind), (2, FrameKind::Error));

    // A missing program is NotFound, as without a terminal.
    client
        .open_pty(3, &["no-such-program-hearth"], 80, 24)
        .await;
    let frame = client.next().await;
    assert_eq!((frame.stream, frame.kind), (3, FrameKind::Error));
    let error: ErrorReply = frame.parse().expect("error json");
    assert_eq!(error.kind, ErrorKind::NotFound);

    // A chosen TERM, and a direct command's exit code.
    let request = ExecRequest {
        argv: vec!["sh".into(), "-c".into(), "echo \"<$TERM>\"; exit 7".into()],
        pty: Some(PtyRequest {
            cols: 80,
            rows: 24,
            term: Some("vt100".into()),
        }),
        ..ExecRequest::default()
    };
    client
        .send(Frame::json(4, FrameKind::Open, &Request::Exec(request)))
        .await;
    let mut screen = Screen::default();
    let status = wait_for_exit(&mut client, 4, &mut screen).await;
    assert_eq!(screen.text(), "<vt100>\r\n");
    assert_eq!(status.code, Some(7));

    // The timeout kills a process on a terminal too.
    let request = ExecRequest {
        argv: vec!["sleep".into(), "10".into()],
        pty: Some(PtyRequest {
            cols: 80,
            rows: 24,
            term: None,
        }),
        timeout_ms: Some(300),
        ..ExecRequest::default()
    };
    client
        .send(Frame::json(6, FrameKind::Open, &Request::Exec(request)))
        .await;
    let started = Instant::now();
    let mut screen = Screen::default();
    let status = wait_for_exit(&mut client, 6, &mut screen).await;
    assert!(status.timed_out, "{status:?}");
    assert_eq!(status.signal, Some(9));
    assert!(started.elapsed() < Duration::from_secs(5));

    // Resize on a stream without a terminal is ignored.
    let request = ExecRequest {
        argv: vec!["sh".into(), "-c".into(), "sleep 0.2; echo plain".into()],
        ..ExecRequest::default()
    };
    client
        .send(Frame::json(5, FrameKind::Open, &Request::Exec(request)))
        .await;
    client.resize(5, 0, 0).await;
    let mut stdout = Vec::new();
    loop {
        let frame = client.next().await;
        assert_eq!(frame.stream, 5, "{frame:?}");
        match frame.kind {
            FrameKind::Data => stdout.extend_from_slice(&frame.payload),
            FrameKind::Eof => {}
            FrameKind::Exit => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(stdout, b"plain\n");
}

//! Drives the real agent binary over `--unix-listen` with the hearth protocol.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use hearth_proto::{
    decode_app_log_batch, raw_header, AppLogRecord, AppLogsRequest, AppStream, ConnectRequest,
    DiscardAppLogRequest, ErrorKind, ErrorReply, ExecRequest, ExitStatus, Frame, FrameCodec,
    FrameKind, Hello, Incoming, PtyRequest, ReadFileRequest, Reply, Request, SignalRequest,
    WriteFileRequest, FLAG_STDERR, FLAG_STDOUT, MAX_PAYLOAD, PROTOCOL_VERSION,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UnixStream};
use tokio_util::codec::Framed;

const FRAME_TIMEOUT: Duration = Duration::from_secs(10);
const SIGKILL: i32 = 9;

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
    agent: AgentProcess,
}

fn temp_dir(tag: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after epoch")
        .as_nanos();
    let dir = std::env::temp_dir().join(format!(
        "hearth-agent-test-{tag}-{}-{nanos}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

impl Client {
    async fn start(tag: &str) -> Self {
        let dir = temp_dir(tag);
        let socket = dir.join("agent.sock");
        let child = Command::new(agent_binary())
            .arg("--unix-listen")
            .arg(&socket)
            .env("HEARTH_AGENT_APP_PIPE_DIR", dir.join("pipes"))
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
            agent,
        };
        client.hello().await;
        client
    }

    async fn hello(&mut self) {
        let hello = Hello {
            version: PROTOCOL_VERSION,
            software: "test".into(),
        };
        self.send(Frame::json(0, FrameKind::Hello, &hello)).await;
        let reply = self.next().await;
        assert_eq!(reply.stream, 0);
        assert_eq!(reply.kind, FrameKind::Hello);
        let hello: Hello = reply.parse().expect("hello json");
        assert_eq!(hello.version, PROTOCOL_VERSION);
        assert!(hello.software.starts_with("hearth-agent "));
    }

    async fn send(&mut self, frame: Frame) {
        self.framed.send(frame).await.expect("send frame");
    }

    async fn open(&mut self, stream: u32, request: &Request) {
        self.send(Frame::json(stream, FrameKind::Open, request))
            .await;
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

    async fn ping(&mut self, stream: u32) {
        self.open(stream, &Request::Ping).await;
        let frame = self.next().await;
        assert_eq!((frame.stream, frame.kind), (stream, FrameKind::Reply));
        let reply: Reply = frame.parse().expect("reply json");
        assert!(matches!(reply, Reply::Pong { .. }), "{reply:?}");
    }

    async fn expect_error(&mut self, stream: u32) -> ErrorReply {
        let frame = self.next().await;
        assert_eq!(
            (frame.stream, frame.kind),
            (stream, FrameKind::Error),
            "{frame:?}"
        );
        frame.parse().expect("error json")
    }

    /// Runs an exec stream to its end: (stdout, stderr, status).
    async fn exec(
        &mut self,
        stream: u32,
        request: ExecRequest,
        stdin: Option<&[u8]>,
    ) -> (Vec<u8>, Vec<u8>, ExitStatus) {
        self.open(stream, &Request::Exec(request)).await;
        if let Some(input) = stdin {
            self.send(Frame::new(stream, FrameKind::Data, input.to_vec()))
                .await;
            self.send(Frame::new(stream, FrameKind::Eof, Bytes::new()))
                .await;
        }
        self.collect_exec(stream).await
    }

    async fn collect_exec(&mut self, stream: u32) -> (Vec<u8>, Vec<u8>, ExitStatus) {
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        let mut eofs = Vec::new();
        loop {
            let frame = self.next().await;
            assert_eq!(frame.stream, stream, "{frame:?}");
            match frame.kind {
                FrameKind::Data if frame.flags == FLAG_STDOUT => {
                    stdout.extend_from_slice(&frame.payload)
                }
                FrameKind::Data if frame.flags == FLAG_STDERR => {
                    stderr.extend_from_slice(&frame.payload)
                }
                FrameKind::Eof => eofs.push(frame.flags),
                FrameKind::Exit => {
                    eofs.sort_unstable();
                    assert_eq!(
                        eofs,
                        vec![FLAG_STDOUT, FLAG_STDERR],
                        "both EOFs before Exit"
                    );
                    return (stdout, stderr, frame.parse().expect("exit json"));
                }
                other => panic!("unexpected {other:?}: {:?}", frame.payload),
            }
        }
    }
}

fn argv(words: &[&str]) -> ExecRequest {
    ExecRequest {
        argv: words.iter().map(|w| (*w).to_owned()).collect(),
        ..ExecRequest::default()
    }
}

#[tokio::test]
async fn exec_echo_stdin_and_exit_codes() {
    let mut client = Client::start("exec").await;
    let (stdout, stderr, status) = client.exec(1, argv(&["echo", "hi"]), None).await;
    assert_eq!(stdout, b"hi\n");
    assert!(stderr.is_empty());
    assert_eq!(status.code, Some(0));
    assert!(!status.timed_out);

    let mut cat = argv(&["cat"]);
    cat.stdin = true;
    let (stdout, _, status) = client.exec(2, cat, Some(b"through stdin\n")).await;
    assert_eq!(stdout, b"through stdin\n");
    assert_eq!(status.code, Some(0));

    let mut shell = argv(&["sh", "-c", "echo err >&2; echo \"$GREETING $HOME\"; exit 3"]);
    shell.env = vec![("GREETING".into(), "hello".into())];
    let (stdout, stderr, status) = client.exec(3, shell, None).await;
    assert_eq!(stdout, b"hello /root\n");
    assert_eq!(stderr, b"err\n");
    assert_eq!(status.code, Some(3));
}

#[tokio::test]
async fn missing_binary_is_not_found_and_agent_keeps_serving() {
    let mut client = Client::start("missing").await;
    client
        .open(1, &Request::Exec(argv(&["no-such-binary-hearth"])))
        .await;
    let error = client.expect_error(1).await;
    assert_eq!(error.kind, ErrorKind::NotFound);
    assert!(
        error.message.contains("no-such-binary-hearth"),
        "{}",
        error.message
    );
    client.ping(2).await;
}

#[tokio::test]
async fn timeout_kills_and_background_children_do_not_block_exit() {
    let mut client = Client::start("timeout").await;
    let mut sleeper = argv(&["sleep", "10"]);
    sleeper.timeout_ms = Some(300);
    let started = Instant::now();
    let (_, _, status) = client.exec(1, sleeper, None).await;
    assert!(status.timed_out);
    assert_eq!(status.signal, Some(SIGKILL));
    assert!(started.elapsed() < Duration::from_secs(5));

    // The background sleep keeps the pipes open; the exit is still reported.
    let started = Instant::now();
    let (stdout, _, status) = client
        .exec(2, argv(&["sh", "-c", "sleep 3 & echo started"]), None)
        .await;
    assert_eq!(stdout, b"started\n");
    assert_eq!(status.code, Some(0));
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn signal_reaches_the_process() {
    let mut client = Client::start("signal").await;
    client.open(1, &Request::Exec(argv(&["sleep", "10"]))).await;
    // Give the spawn a moment so the pid is known.
    tokio::time::sleep(Duration::from_millis(200)).await;
    client
        .send(Frame::json(
            1,
            FrameKind::Signal,
            &SignalRequest { signal: 15 },
        ))
        .await;
    let (_, _, status) = client.collect_exec(1).await;
    assert_eq!(status.signal, Some(15));
}

#[tokio::test]
async fn write_then_read_a_large_file() {
    let mut client = Client::start("files").await;
    let path = client.agent.dir.join("sub/dir/blob.bin");
    let content: Vec<u8> = (0..5 * 1024 * 1024u32)
        .map(|i| (i * 31 % 251) as u8)
        .collect();
    let request = WriteFileRequest {
        path: path.display().to_string(),
        mode: Some(0o600),
        uid: None,
        gid: None,
        create_parents: true,
    };
    client.open(1, &Request::WriteFile(request)).await;
    for chunk in content.chunks(200 * 1024) {
        client
            .send(Frame::new(1, FrameKind::Data, chunk.to_vec()))
            .await;
    }
    client
        .send(Frame::new(1, FrameKind::Eof, Bytes::new()))
        .await;
    let frame = client.next().await;
    assert_eq!(frame.kind, FrameKind::Reply, "{frame:?}");
    assert_eq!(
        frame.parse::<Reply>().expect("reply"),
        Reply::Written {
            bytes: content.len() as u64
        }
    );

    let request = ReadFileRequest {
        path: path.display().to_string(),
    };
    client.open(2, &Request::ReadFile(request)).await;
    let info: Reply = client.next().await.parse().expect("file info");
    assert_eq!(
        info,
        Reply::FileInfo {
            size: content.len() as u64,
            mode: 0o600
        }
    );
    let mut read_back = Vec::new();
    loop {
        let frame = client.next().await;
        assert_eq!(frame.stream, 2);
        match frame.kind {
            FrameKind::Data => {
                assert!(frame.payload.len() <= MAX_PAYLOAD);
                read_back.extend_from_slice(&frame.payload);
            }
            FrameKind::Eof => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(read_back == content, "read back differs");

    // Missing files and directories are errors; the directory still has no temp files.
    client
        .open(
            3,
            &Request::ReadFile(ReadFileRequest {
                path: "/no/such/file".into(),
            }),
        )
        .await;
    assert_eq!(client.expect_error(3).await.kind, ErrorKind::NotFound);
    let dir = client.agent.dir.display().to_string();
    client
        .open(4, &Request::ReadFile(ReadFileRequest { path: dir }))
        .await;
    assert_eq!(client.expect_error(4).await.kind, ErrorKind::InvalidRequest);
    let leftovers = std::fs::read_dir(path.parent().expect("parent"))
        .expect("list")
        .count();
    assert_eq!(leftovers, 1);
}

#[tokio::test]
async fn tcp_connect_relays_both_ways() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("address").port();
    tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.expect("accept");
        let mut received = Vec::new();
        socket.read_to_end(&mut received).await.expect("read");
        socket.write_all(b"echo:").await.expect("write");
        socket.write_all(&received).await.expect("write");
    });
    let mut client = Client::start("tcp").await;
    client
        .open(1, &Request::Connect(ConnectRequest { port }))
        .await;
    let reply: Reply = client.next().await.parse().expect("reply");
    assert_eq!(reply, Reply::Connected);
    client
        .send(Frame::new(1, FrameKind::Data, &b"hello tcp"[..]))
        .await;
    client
        .send(Frame::new(1, FrameKind::Eof, Bytes::new()))
        .await;
    let mut received = Vec::new();
    loop {
        let frame = client.next().await;
        match frame.kind {
            FrameKind::Data => received.extend_from_slice(&frame.payload),
            FrameKind::Eof => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(received, b"echo:hello tcp");

    // Nothing listens on the listener's port any more.
    client
        .open(2, &Request::Connect(ConnectRequest { port }))
        .await;
    assert_eq!(
        client.expect_error(2).await.kind,
        ErrorKind::ConnectionRefused
    );
}

#[tokio::test]
async fn hostile_frames_fail_only_their_stream() {
    let mut client = Client::start("hostile").await;
    // Oversized frame.
    let big = MAX_PAYLOAD + 1;
    let mut raw = raw_header(big as u32, 5, FrameKind::Data as u8, 0).to_vec();
    raw.extend(std::iter::repeat_n(0x55u8, big));
    client
        .framed
        .get_mut()
        .write_all(&raw)
        .await
        .expect("write raw");
    assert_eq!(client.expect_error(5).await.kind, ErrorKind::Protocol);
    // Unknown kind.
    let mut raw = raw_header(3, 6, 99, 0).to_vec();
    raw.extend_from_slice(b"xyz");
    client
        .framed
        .get_mut()
        .write_all(&raw)
        .await
        .expect("write raw");
    assert_eq!(client.expect_error(6).await.kind, ErrorKind::Protocol);
    // Garbage JSON in an Open.
    client
        .send(Frame::new(7, FrameKind::Open, &b"{not json"[..]))
        .await;
    assert_eq!(client.expect_error(7).await.kind, ErrorKind::Protocol);
    // Unknown op, data for an unknown stream, a bogus signal.
    client
        .send(Frame::new(
            8,
            FrameKind::Open,
            &br#"{"op":"format_disk"}"#[..],
        ))
        .await;
    assert_eq!(client.expect_error(8).await.kind, ErrorKind::Protocol);
    client
        .send(Frame::new(99, FrameKind::Data, &b"stray"[..]))
        .await;
    client
        .send(Frame::new(99, FrameKind::Signal, &b"[]"[..]))
        .await;
    // Bad entropy is refused.
    let restored = Request::Restored(hearth_proto::RestoredRequest {
        unix_time_ns: 1,
        entropy_hex: "zz".into(),
    });
    client.open(9, &restored).await;
    assert_eq!(client.expect_error(9).await.kind, ErrorKind::InvalidRequest);
    client.ping(10).await;
}

#[tokio::test]
async fn new_hello_resets_the_session() {
    let mut client = Client::start("hello").await;
    client
        .open(
            1,
            &Request::Exec(argv(&["sh", "-c", "sleep 0.3; echo late"])),
        )
        .await;
    client.hello().await;
    // Stream 1 is free again and the old process's output never arrives.
    client.ping(1).await;
    let quiet = tokio::time::timeout(Duration::from_millis(700), client.framed.next()).await;
    assert!(quiet.is_err(), "unexpected frame after reset: {quiet:?}");

    // A wrong version is refused on stream 0.
    let hello = Hello {
        version: PROTOCOL_VERSION + 1,
        software: "future".into(),
    };
    client.send(Frame::json(0, FrameKind::Hello, &hello)).await;
    assert_eq!(client.expect_error(0).await.kind, ErrorKind::InvalidRequest);
    client.hello().await;
    client.ping(2).await;
}

#[tokio::test]
async fn reconnect_starts_a_new_session() {
    let mut client = Client::start("reconnect").await;
    client.ping(1).await;
    let Client { framed, agent } = client;
    drop(framed);
    let stream = UnixStream::connect(agent.dir.join("agent.sock"))
        .await
        .expect("reconnect");
    let mut client = Client {
        framed: Framed::new(stream, FrameCodec::default()),
        agent,
    };
    client.hello().await;
    client.ping(1).await;
}

#[tokio::test]
async fn close_kills_the_process() {
    let mut client = Client::start("close").await;
    client
        .open(
            1,
            &Request::Exec(argv(&["sh", "-c", "echo $$; exec sleep 10"])),
        )
        .await;
    let frame = client.next().await;
    assert_eq!((frame.kind, frame.flags), (FrameKind::Data, FLAG_STDOUT));
    let pid: u32 = std::str::from_utf8(&frame.payload)
        .expect("utf8")
        .trim()
        .parse()
        .expect("pid");
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    assert!(proc_dir.exists());
    client
        .send(Frame::new(1, FrameKind::Close, Bytes::new()))
        .await;
    let started = Instant::now();
    // Killed and reaped by the agent, so the pid disappears.
    while proc_dir.exists() {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "process survived Close"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    client.ping(2).await;
}

#[tokio::test]
async fn shutdown_outside_a_vm_replies_and_exits() {
    let mut client = Client::start("shutdown").await;
    client.open(1, &Request::Shutdown).await;
    let reply: Reply = client.next().await.parse().expect("reply");
    assert_eq!(reply, Reply::ShuttingDown);
    let started = Instant::now();
    loop {
        if let Some(status) = client.agent.child.try_wait().expect("wait") {
            assert!(status.success());
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "agent did not exit"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs the agent as PID 1 of fresh pid, mount, network and UTS namespaces (root
/// only; skipped otherwise): the init path must set up the system without a VM,
/// bring `lo` up and reap orphans.
#[tokio::test]
async fn as_pid1_in_namespaces() {
    let can_unshare = Command::new("unshare")
        .args(["--pid", "--fork", "--mount", "--net", "--uts", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if !can_unshare {
        eprintln!("skipping: cannot create namespaces here");
        return;
    }
    let dir = temp_dir("pid1");
    let socket = dir.join("agent.sock");
    let child = Command::new("unshare")
        .args([
            "--pid",
            "--fork",
            "--kill-child",
            "--mount",
            "--net",
            "--uts",
        ])
        .arg(agent_binary())
        .arg("--unix-listen")
        .arg(&socket)
        .stdin(Stdio::null())
        .spawn()
        .expect("start agent in namespaces");
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
    let mut client = Client {
        framed: Framed::new(stream, FrameCodec::default()),
        agent,
    };
    client.hello().await;

    let (stdout, _, _) = client
        .exec(1, argv(&["cat", "/proc/1/cmdline"]), None)
        .await;
    assert!(String::from_utf8_lossy(&stdout).contains("hearth-agent"));
    let (stdout, _, _) = client
        .exec(2, argv(&["cat", "/sys/class/net/lo/flags"]), None)
        .await;
    let flags = u32::from_str_radix(
        String::from_utf8_lossy(&stdout)
            .trim()
            .trim_start_matches("0x"),
        16,
    )
    .expect("hex flags");
    assert_eq!(flags & 1, 1, "lo is up");

    // The background sleep is orphaned to the agent, which must reap it.
    client
        .exec(3, argv(&["sh", "-c", "sleep 0.2 & exit 0"]), None)
        .await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (stdout, _, _) = client
        .exec(4, argv(&["sh", "-c", "cat /proc/[0-9]*/stat"]), None)
        .await;
    let zombies: Vec<_> = String::from_utf8_lossy(&stdout)
        .lines()
        .filter(|line| line.contains(") Z "))
        .map(str::to_owned)
        .collect();
    assert!(zombies.is_empty(), "zombies left: {zombies:?}");
    let (stdout, _, _) = client
        .exec(
            5,
            argv(&[
                "sh",
                "-c",
                "grep -c ' /dev/pts devpts .*mode=620,ptmxmode=666' /proc/mounts",
            ]),
            None,
        )
        .await;
    assert_eq!(stdout, b"1\n");

    // Pseudo-terminals come from the agent's own devpts instance.
    let mut on_pty = argv(&["sh", "-c", "tty; stty size"]);
    on_pty.pty = Some(PtyRequest {
        cols: 70,
        rows: 21,
        term: None,
    });
    client.open(6, &Request::Exec(on_pty)).await;
    let mut output = Vec::new();
    let status: ExitStatus = loop {
        let frame = client.next().await;
        assert_eq!(frame.stream, 6, "{frame:?}");
        match frame.kind {
            FrameKind::Data => output.extend_from_slice(&frame.payload),
            FrameKind::Eof => {}
            FrameKind::Exit => break frame.parse().expect("exit json"),
            other => panic!("unexpected {other:?}: {:?}", frame.payload),
        }
    };
    assert_eq!(status.code, Some(0));
    assert_eq!(String::from_utf8_lossy(&output), "/dev/pts/0\r\n21 70\r\n");
}

impl Client {
    /// Records of an `AppLogs` stream until its `Eof`.
    async fn app_logs(&mut self, stream: u32, from: u64) -> Vec<AppLogRecord> {
        self.open(
            stream,
            &Request::AppLogs(AppLogsRequest {
                from,
                follow: false,
            }),
        )
        .await;
        let mut records = Vec::new();
        loop {
            let frame = self.next().await;
            assert_eq!(frame.stream, stream, "{frame:?}");
            match frame.kind {
                FrameKind::Data => {
                    records.extend(decode_app_log_batch(&frame.payload).expect("valid batch"))
                }
                FrameKind::Eof => return records,
                other => panic!("unexpected {other:?}"),
            }
        }
    }
}

#[tokio::test]
async fn app_output_is_captured_numbered_followed_and_discarded() {
    let mut client = Client::start("applog").await;
    let pipes = client.agent.dir.join("pipes");
    let started = Instant::now();
    while !(pipes.join("app.stdout").exists() && pipes.join("app.stderr").exists()) {
        assert!(started.elapsed() < FRAME_TIMEOUT, "the agent made no pipes");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let script = format!(
        "cd {} && echo one > app.stdout && echo two > app.stderr && \
         head -c 40000 /dev/zero | tr '\\0' a > app.stdout && echo >> app.stdout",
        pipes.display()
    );
    let (_, stderr, status) = client.exec(1, argv(&["sh", "-c", &script]), None).await;
    assert_eq!(status.code, Some(0), "{}", String::from_utf8_lossy(&stderr));

    // Lines arrive as the agent reads them; wait for all five.
    let mut records = Vec::new();
    let mut stream = 2;
    while records.len() < 5 {
        assert!(started.elapsed() < FRAME_TIMEOUT, "captured: {records:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
        records = client.app_logs(stream, 0).await;
        stream += 1;
    }
    let seqs: Vec<u64> = records.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, vec![0, 1, 2, 3, 4]);
    let text = |stream: AppStream| -> Vec<(usize, bool)> {
        records
            .iter()
            .filter(|r| r.stream == stream)
            .map(|r| (r.line.len(), r.line.bytes().all(|b| b == b'a')))
            .collect()
    };
    // The 40000-byte line is cut into pieces of at most 16 KiB.
    let stdout: Vec<&str> = records
        .iter()
        .filter(|r| r.stream == AppStream::Stdout)
        .map(|r| r.line.as_str())
        .collect();
    assert_eq!(stdout[0], "one");
    assert_eq!(
        text(AppStream::Stdout)[1..],
        [(16384, true), (16384, true), (7232, true)]
    );
    assert_eq!(
        records
            .iter()
            .filter(|r| r.stream == AppStream::Stderr)
            .map(|r| r.line.as_str())
            .collect::<Vec<_>>(),
        vec!["two"]
    );
    // From a later number: only the newer lines.
    assert_eq!(client.app_logs(stream, 3).await.len(), 2);
    stream += 1;

    // A following stream gets a line written after it opened.
    let follow = stream;
    client
        .open(
            follow,
            &Request::AppLogs(AppLogsRequest {
                from: 5,
                follow: true,
            }),
        )
        .await;
    let write_three = format!("echo three > {}/app.stderr", pipes.display());
    client
        .open(
            follow + 1,
            &Request::Exec(argv(&["sh", "-c", &write_three])),
        )
        .await;
    // The exec's frames and the follow's data interleave.
    let (mut exited, mut batch) = (false, Vec::new());
    while !exited || batch.is_empty() {
        let frame = client.next().await;
        match (frame.stream, frame.kind) {
            (s, FrameKind::Data) if s == follow => {
                batch.extend(decode_app_log_batch(&frame.payload).expect("valid batch"))
            }
            (s, FrameKind::Exit) if s == follow + 1 => {
                let status: ExitStatus = frame.parse().expect("exit json");
                assert_eq!(status.code, Some(0));
                exited = true;
            }
            (s, FrameKind::Eof) if s == follow + 1 => {}
            _ => panic!("unexpected {frame:?}"),
        }
    }
    assert_eq!(
        batch
            .iter()
            .map(|r| (r.seq, r.stream, r.line.as_str()))
            .collect::<Vec<_>>(),
        vec![(5, AppStream::Stderr, "three")]
    );
    client
        .send(Frame::new(follow, FrameKind::Close, Bytes::new()))
        .await;

    // Discarding keeps the numbering and drops only the older lines.
    let discard = follow + 2;
    client
        .open(
            discard,
            &Request::DiscardAppLog(DiscardAppLogRequest { before: 4 }),
        )
        .await;
    let frame = client.next().await;
    assert_eq!((frame.stream, frame.kind), (discard, FrameKind::Reply));
    assert_eq!(
        frame.parse::<Reply>().expect("reply"),
        Reply::AppLogDiscarded { next_seq: 6 }
    );
    let left: Vec<u64> = client
        .app_logs(discard + 1, 0)
        .await
        .iter()
        .map(|r| r.seq)
        .collect();
    assert_eq!(left, vec![4, 5]);
}

//! Host side of the agent protocol: one connection to a guest's agent over the
//! VM's virtio-serial chardev socket, multiplexing many streams.
//!
//! A background task reads frames and routes each to the stream that owns it; a
//! second task owns the write half. Streams are bounded channels, so a reader
//! that stops consuming slows down the guest rather than growing memory.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use hearth_proto::{
    window_size_is_valid, AppLogRecord, AppLogsRequest, ConnectRequest, DiscardAppLogRequest,
    ErrorKind, ErrorReply, ExecRequest, ExitStatus, Frame, FrameCodec, FrameKind, Hello, Incoming,
    PtyRequest, ReadFileRequest, Reply, Request, ResizeRequest, RestoredRequest, SignalRequest,
    WriteFileRequest, CONTROL_STREAM, FLAG_STDERR, FLAG_STDOUT, HEADER_LEN, MAX_WINDOW_DIMENSION,
    PROTOCOL_VERSION,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio_util::codec::{Encoder, Framed, FramedParts};
use tracing::debug;

/// Frames buffered per stream before the reader task waits.
const STREAM_QUEUE: usize = 64;
/// Chunk size for data we send (well under the protocol's frame limit).
const CHUNK: usize = 128 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot reach the agent socket")]
    Connect(#[source] std::io::Error),
    #[error("agent connection failed")]
    Io(#[source] std::io::Error),
    #[error("agent did not answer within {0:?}")]
    Timeout(Duration),
    #[error("agent connection closed")]
    Closed,
    #[error("agent speaks protocol version {0}, expected {PROTOCOL_VERSION}")]
    Version(u32),
    #[error("agent broke the protocol: {0}")]
    Protocol(String),
    #[error("{}", .0.message)]
    Remote(ErrorReply),
    #[error("window size {cols}x{rows} is out of range (1 to {MAX_WINDOW_DIMENSION} each)")]
    WindowSize { cols: u16, rows: u16 },
}

impl AgentError {
    /// The guest's error kind, when the guest refused the request.
    pub fn remote_kind(&self) -> Option<ErrorKind> {
        match self {
            Self::Remote(reply) => Some(reply.kind),
            _ => None,
        }
    }
}

type Routes = Arc<Mutex<HashMap<u32, mpsc::Sender<Frame>>>>;

/// A live connection to one guest's agent.
#[derive(Debug, Clone)]
pub struct AgentClient {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    outgoing: mpsc::Sender<Frame>,
    routes: Routes,
    next_stream: AtomicU32,
    software: String,
    /// The task reading the socket; it owns the read half, so it must end with
    /// the client or the connection stays open (QEMU serves one at a time).
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl AgentClient {
    /// Connects to the agent socket and completes the `Hello` handshake, retrying
    /// until `timeout` (the guest may still be booting or being restored).
    ///
    /// An attempt that gets no answer is dropped and made again on a new
    /// connection, waiting twice as long each time. QEMU's virtio-serial port
    /// can stall in one direction for as long as a host connection lasts: when
    /// the guest writes while no host is connected (a clone restored from a
    /// snapshot whose guest still believed its host there), QEMU throttles the
    /// port and only a disconnect releases it. The guest then got our `Hello`
    /// but its answer never left QEMU. Closing the connection discards the
    /// stalled bytes; the agent starts a new session on the next one.
    pub async fn connect(socket: &Path, timeout: Duration) -> Result<Self, AgentError> {
        Self::connect_patiently(socket, timeout, FIRST_HELLO_PATIENCE).await
    }

    /// [`Self::connect`] for a guest that is booting: one connection waits
    /// for the agent's answer until `timeout`. A cold boot's agent is not up
    /// for seconds, so new connections would only churn its port (a quick
    /// disconnect and reconnect is what once left agents spinning: see
    /// `hearth-agent` `channel.rs`).
    pub async fn connect_booting(socket: &Path, timeout: Duration) -> Result<Self, AgentError> {
        Self::connect_patiently(socket, timeout, timeout).await
    }

    async fn connect_patiently(
        socket: &Path,
        timeout: Duration,
        first_patience: Duration,
    ) -> Result<Self, AgentError> {
        let deadline = Instant::now() + timeout;
        let mut patience = first_patience;
        let (stream, answer, rest) = loop {
            let stream = connect_socket(socket, deadline).await?;
            let attempt_end = (Instant::now() + patience).min(deadline);
            match handshake(stream, attempt_end).await {
                Ok(done) => break done,
                Err(AgentError::Timeout(_)) if Instant::now() < deadline => {
                    debug!(socket = %socket.display(), waited_ms = patience.as_millis() as u64, "no hello yet; reconnecting");
                    patience *= 2;
                }
                Err(AgentError::Timeout(_)) => return Err(AgentError::Timeout(timeout)),
                Err(err) => return Err(err),
            }
        };
        let software = match answer.kind {
            FrameKind::Hello => {
                let hello: Hello = answer
                    .parse()
                    .map_err(|err| AgentError::Protocol(err.to_string()))?;
                if hello.version != PROTOCOL_VERSION {
                    return Err(AgentError::Version(hello.version));
                }
                hello.software
            }
            FrameKind::Error => return Err(remote_error(&answer)),
            other => return Err(AgentError::Protocol(format!("{other:?} before Hello"))),
        };
        let mut parts = FramedParts::new::<Frame>(stream, FrameCodec::default());
        parts.read_buf = rest;
        let framed = Framed::from_parts(parts);

        let (mut sink, mut source) = framed.split();
        let (outgoing, mut outgoing_rx) = mpsc::channel::<Frame>(STREAM_QUEUE);
        tokio::spawn(async move {
            while let Some(frame) = outgoing_rx.recv().await {
                if sink.send(frame).await.is_err() {
                    break;
                }
            }
        });
        let routes: Routes = Arc::default();
        let reader_routes = routes.clone();
        let reader = tokio::spawn(async move {
            while let Some(Ok(incoming)) = source.next().await {
                let (stream, frame) = match incoming {
                    Incoming::Frame(frame) => (frame.stream, frame),
                    Incoming::Rejected { stream, reason } => (
                        stream,
                        Frame::error(stream, ErrorKind::Protocol, reason.to_string()),
                    ),
                };
                let closes = matches!(
                    frame.kind,
                    FrameKind::Exit | FrameKind::Error | FrameKind::Close
                );
                let route = lock(&reader_routes).get(&stream).cloned();
                if let Some(route) = route {
                    // A stream whose owner went away is simply dropped.
                    let _ = route.send(frame).await;
                }
                if closes {
                    lock(&reader_routes).remove(&stream);
                }
            }
            // Connection gone: dropping the senders ends every open stream.
            lock(&reader_routes).clear();
        });
        Ok(Self {
            inner: Arc::new(Inner {
                outgoing,
                routes,
                next_stream: AtomicU32::new(1),
                software,
                reader,
            }),
        })
    }

    /// What the agent said it is in the handshake.
    pub fn agent_software(&self) -> &str {
        &self.inner.software
    }

    /// Opens a new stream with `request`.
    pub async fn open(&self, request: &Request) -> Result<AgentStream, AgentError> {
        let id = self
            .inner
            .next_stream
            .fetch_add(1, Ordering::Relaxed)
            .max(1);
        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        lock(&self.inner.routes).insert(id, tx);
        let stream = AgentStream {
            id,
            rx,
            client: self.inner.clone(),
            finished: false,
        };
        stream
            .send(Frame::json(id, FrameKind::Open, request))
            .await?;
        Ok(stream)
    }

    /// Round trip to the agent.
    pub async fn ping(&self) -> Result<u64, AgentError> {
        let mut stream = self.open(&Request::Ping).await?;
        match stream.reply().await? {
            Reply::Pong { uptime_ms } => Ok(uptime_ms),
            other => Err(unexpected(&other)),
        }
    }

    /// Tells the guest it was restored: sets its clock to ours and reseeds its RNG.
    /// Returns the guest's clock before the change.
    pub async fn restored(&self) -> Result<SystemTime, AgentError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64;
        let mut entropy = [0u8; 64];
        rand::Rng::fill(&mut rand::rngs::OsRng, &mut entropy[..]);
        let request = Request::Restored(RestoredRequest {
            unix_time_ns: now,
            entropy_hex: hex::encode(entropy),
        });
        let mut stream = self.open(&request).await?;
        match stream.reply().await? {
            Reply::Restored { previous_time_ns } => {
                Ok(UNIX_EPOCH + Duration::from_nanos(previous_time_ns))
            }
            other => Err(unexpected(&other)),
        }
    }

    /// Runs a process, streaming its output to `stdout`/`stderr` and feeding it
    /// `stdin` when given.
    pub async fn exec<R, O, E>(
        &self,
        mut request: ExecRequest,
        stdin: Option<R>,
        stdout: &mut O,
        stderr: &mut E,
    ) -> Result<ExitStatus, AgentError>
    where
        R: AsyncRead + Unpin + Send + 'static,
        O: AsyncWrite + Unpin,
        E: AsyncWrite + Unpin,
    {
        request.stdin = stdin.is_some();
        let mut stream = self.open(&Request::Exec(request)).await?;
        let feeder = stdin.map(|input| {
            let sender = stream.sender();
            tokio::spawn(async move { sender.send_all(input).await })
        });
        let result = async {
            loop {
                let frame = stream.recv().await?;
                match frame.kind {
                    FrameKind::Data if frame.flags == FLAG_STDERR => {
                        stderr
                            .write_all(&frame.payload)
                            .await
                            .map_err(AgentError::Io)?;
                    }
                    FrameKind::Data if frame.flags == FLAG_STDOUT => {
                        stdout
                            .write_all(&frame.payload)
                            .await
                            .map_err(AgentError::Io)?;
                    }
                    FrameKind::Eof | FrameKind::Data => {}
                    FrameKind::Exit => {
                        stream.finished = true;
                        stdout.flush().await.map_err(AgentError::Io)?;
                        stderr.flush().await.map_err(AgentError::Io)?;
                        return frame
                            .parse::<ExitStatus>()
                            .map_err(|err| AgentError::Protocol(err.to_string()));
                    }
                    _ => return Err(stream.unexpected_frame(&frame)),
                }
            }
        }
        .await;
        if let Some(feeder) = feeder {
            feeder.abort();
        }
        result
    }

    /// Runs a process on a new pseudo-terminal of `cols` x `rows` (each 1 to
    /// [`MAX_WINDOW_DIMENSION`]), for interactive sessions. `request.pty.term`
    /// is kept when set (`TERM` is `xterm-256color` otherwise); stdin is always
    /// connected. The process is the leader of a new session with the terminal as
    /// its controlling tty.
    ///
    /// Read the terminal's output with [`AgentStream::next_pty_event`] (or raw
    /// frames with [`AgentStream::recv`]: `Data` flagged stdout, one `Eof`, then
    /// `Exit`; a failure to start arrives there as an error). Type into it with
    /// [`StreamSender::send_data`] and change its size with
    /// [`StreamSender::resize`]; `Eof` means nothing to a terminal and is ignored.
    /// Dropping the stream before the exit kills the process.
    pub async fn exec_pty(
        &self,
        mut request: ExecRequest,
        cols: u16,
        rows: u16,
    ) -> Result<AgentStream, AgentError> {
        if !window_size_is_valid(cols, rows) {
            return Err(AgentError::WindowSize { cols, rows });
        }
        let term = request.pty.take().and_then(|pty| pty.term);
        request.pty = Some(PtyRequest { cols, rows, term });
        request.stdin = true;
        self.open(&Request::Exec(request)).await
    }

    /// Runs a process and collects its output, each stream up to
    /// [`MAX_COLLECTED_OUTPUT`] bytes (the guest is untrusted: stream larger output
    /// with [`Self::exec`] instead).
    pub async fn exec_output(&self, request: ExecRequest) -> Result<ExecOutput, AgentError> {
        let mut stdout = CappedBuffer::new(MAX_COLLECTED_OUTPUT);
        let mut stderr = CappedBuffer::new(MAX_COLLECTED_OUTPUT);
        let status = self
            .exec(request, None::<tokio::io::Empty>, &mut stdout, &mut stderr)
            .await?;
        Ok(ExecOutput {
            status,
            stdout: stdout.into_bytes(),
            stderr: stderr.into_bytes(),
        })
    }

    /// Writes a file in the guest from `content`; returns the bytes written.
    pub async fn write_file<R: AsyncRead + Unpin + Send + 'static>(
        &self,
        request: WriteFileRequest,
        content: R,
    ) -> Result<u64, AgentError> {
        let mut stream = self.open(&Request::WriteFile(request)).await?;
        let sender = stream.sender();
        let feeder = tokio::spawn(async move { sender.send_all(content).await });
        let reply = stream.reply().await;
        feeder.abort();
        match reply? {
            Reply::Written { bytes } => Ok(bytes),
            other => Err(unexpected(&other)),
        }
    }

    /// Reads a file from the guest into `out`; returns its size and mode.
    pub async fn read_file<W: AsyncWrite + Unpin>(
        &self,
        path: &str,
        out: &mut W,
    ) -> Result<(u64, u32), AgentError> {
        let mut stream = self
            .open(&Request::ReadFile(ReadFileRequest { path: path.into() }))
            .await?;
        let (size, mode) = match stream.reply().await? {
            Reply::FileInfo { size, mode } => (size, mode),
            other => return Err(unexpected(&other)),
        };
        let mut copied = 0u64;
        loop {
            let frame = stream.recv().await?;
            match frame.kind {
                FrameKind::Data => {
                    copied += frame.payload.len() as u64;
                    out.write_all(&frame.payload)
                        .await
                        .map_err(AgentError::Io)?;
                }
                FrameKind::Eof => break,
                _ => return Err(stream.unexpected_frame(&frame)),
            }
        }
        stream.finished = true;
        out.flush().await.map_err(AgentError::Io)?;
        let _ = size;
        Ok((copied, mode))
    }

    /// Opens a TCP connection to `127.0.0.1:port` inside the guest.
    pub async fn connect_tcp(&self, port: u16) -> Result<AgentStream, AgentError> {
        let mut stream = self
            .open(&Request::Connect(ConnectRequest { port }))
            .await?;
        match stream.reply().await? {
            Reply::Connected => Ok(stream),
            other => Err(unexpected(&other)),
        }
    }

    /// Asks the guest to write all dirty data to its disks.
    pub async fn sync(&self) -> Result<(), AgentError> {
        let mut stream = self.open(&Request::Sync).await?;
        match stream.reply().await? {
            Reply::Synced => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    /// Opens a stream of the app's output records from sequence number
    /// `from`; read it with [`AgentStream::next_app_logs`].
    pub async fn app_logs(&self, from: u64, follow: bool) -> Result<AgentStream, AgentError> {
        self.open(&Request::AppLogs(AppLogsRequest { from, follow }))
            .await
    }

    /// Makes the guest forget the app's output numbered below `before`;
    /// returns the number the next line will get.
    pub async fn discard_app_log(&self, before: u64) -> Result<u64, AgentError> {
        let mut stream = self
            .open(&Request::DiscardAppLog(DiscardAppLogRequest { before }))
            .await?;
        match stream.reply().await? {
            Reply::AppLogDiscarded { next_seq } => Ok(next_seq),
            other => Err(unexpected(&other)),
        }
    }

    /// Asks the guest to sync and power off.
    pub async fn shutdown(&self) -> Result<(), AgentError> {
        let mut stream = self.open(&Request::Shutdown).await?;
        match stream.reply().await? {
            Reply::ShuttingDown => Ok(()),
            other => Err(unexpected(&other)),
        }
    }
}

/// Most bytes [`AgentClient::exec_output`] keeps of one output stream.
pub const MAX_COLLECTED_OUTPUT: usize = 64 * 1024 * 1024;

/// An in-memory sink that fails once it would hold more than its limit (for
/// what a guest sends: output, files read back).
#[derive(Debug)]
pub struct CappedBuffer {
    bytes: Vec<u8>,
    limit: usize,
}

impl CappedBuffer {
    pub fn new(limit: usize) -> Self {
        Self {
            bytes: Vec::new(),
            limit,
        }
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }
}

impl AsyncWrite for CappedBuffer {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if self.bytes.len() + buf.len() > self.limit {
            return std::task::Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::OutOfMemory,
                "more bytes than the collection limit",
            )));
        }
        self.bytes.extend_from_slice(buf);
        std::task::Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// Output of [`AgentClient::exec_output`].
#[derive(Debug, Clone)]
pub struct ExecOutput {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// One open stream. Dropping it before the guest ended it tells the guest to
/// abandon it (an exec'd process is killed, a socket closed).
#[derive(Debug)]
pub struct AgentStream {
    id: u32,
    rx: mpsc::Receiver<Frame>,
    client: Arc<Inner>,
    finished: bool,
}

/// What a pseudo-terminal stream yields (see [`AgentStream::next_pty_event`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PtyEvent {
    /// Bytes the terminal displayed (output and echoed input, with the
    /// terminal's line endings).
    Output(Bytes),
    /// The process ended; no further events follow.
    Exited(ExitStatus),
}

/// The sending half of a stream, usable from another task.
#[derive(Debug, Clone)]
pub struct StreamSender {
    id: u32,
    outgoing: mpsc::Sender<Frame>,
}

impl StreamSender {
    pub async fn send_data(&self, data: Bytes) -> Result<(), AgentError> {
        self.outgoing
            .send(Frame::new(self.id, FrameKind::Data, data))
            .await
            .map_err(|_| AgentError::Closed)
    }

    pub async fn send_eof(&self) -> Result<(), AgentError> {
        self.outgoing
            .send(Frame::new(self.id, FrameKind::Eof, Bytes::new()))
            .await
            .map_err(|_| AgentError::Closed)
    }

    /// Sets the window size of the stream's pseudo-terminal (see
    /// [`AgentClient::exec_pty`]); the process sees `SIGWINCH`. A size outside 1 to
    /// [`MAX_WINDOW_DIMENSION`] is refused here, before it would fail the stream.
    pub async fn resize(&self, cols: u16, rows: u16) -> Result<(), AgentError> {
        if !window_size_is_valid(cols, rows) {
            return Err(AgentError::WindowSize { cols, rows });
        }
        self.outgoing
            .send(Frame::json(
                self.id,
                FrameKind::Resize,
                &ResizeRequest { cols, rows },
            ))
            .await
            .map_err(|_| AgentError::Closed)
    }

    pub async fn signal(&self, signal: i32) -> Result<(), AgentError> {
        self.outgoing
            .send(Frame::json(
                self.id,
                FrameKind::Signal,
                &SignalRequest { signal },
            ))
            .await
            .map_err(|_| AgentError::Closed)
    }

    /// Copies `input` into the stream as `Data` frames, then sends `Eof`.
    pub async fn send_all<R: AsyncRead + Unpin>(&self, mut input: R) -> Result<u64, AgentError> {
        let mut total = 0u64;
        loop {
            let mut buf = vec![0u8; CHUNK];
            let n = input.read(&mut buf).await.map_err(AgentError::Io)?;
            if n == 0 {
                break;
            }
            buf.truncate(n);
            total += n as u64;
            self.send_data(Bytes::from(buf)).await?;
        }
        self.send_eof().await?;
        Ok(total)
    }
}

impl AgentStream {
    pub fn id(&self) -> u32 {
        self.id
    }

    pub fn sender(&self) -> StreamSender {
        StreamSender {
            id: self.id,
            outgoing: self.client.outgoing.clone(),
        }
    }

    async fn send(&self, frame: Frame) -> Result<(), AgentError> {
        self.client
            .outgoing
            .send(frame)
            .await
            .map_err(|_| AgentError::Closed)
    }

    /// Next frame of this stream; `Error` frames become `Err`.
    pub async fn recv(&mut self) -> Result<Frame, AgentError> {
        let frame = self.rx.recv().await.ok_or(AgentError::Closed)?;
        if frame.kind == FrameKind::Error {
            self.finished = true;
            return Err(remote_error(&frame));
        }
        Ok(frame)
    }

    /// Turns a TCP stream (from [`AgentClient::connect_tcp`]) into a plain
    /// byte stream, for code written against `AsyncRead + AsyncWrite` (an HTTP
    /// client, a proxy). A task pumps frames both ways; half-closes travel as
    /// `Eof`, and the guest's socket closes when both directions are done or
    /// the returned stream is dropped.
    pub fn into_io(self) -> tokio::io::DuplexStream {
        let (ours, theirs) = tokio::io::duplex(IO_BUFFER);
        tokio::spawn(pump(self, ours));
        theirs
    }

    /// Next event of a stream opened with [`AgentClient::exec_pty`]: terminal
    /// output, or the process's exit (after all of its output). `Error` frames
    /// become `Err`.
    pub async fn next_pty_event(&mut self) -> Result<PtyEvent, AgentError> {
        loop {
            let frame = self.recv().await?;
            match frame.kind {
                FrameKind::Data => return Ok(PtyEvent::Output(frame.payload)),
                FrameKind::Eof => {}
                FrameKind::Exit => {
                    self.finished = true;
                    return frame
                        .parse()
                        .map(PtyEvent::Exited)
                        .map_err(|err| AgentError::Protocol(err.to_string()));
                }
                _ => return Err(self.unexpected_frame(&frame)),
            }
        }
    }

    /// Next batch of a stream opened with [`AgentClient::app_logs`], checked
    /// as untrusted input (see [`hearth_proto::decode_app_log_batch`]); `None`
    /// at its end.
    pub async fn next_app_logs(&mut self) -> Result<Option<Vec<AppLogRecord>>, AgentError> {
        let frame = self.recv().await?;
        match frame.kind {
            FrameKind::Data => hearth_proto::decode_app_log_batch(&frame.payload)
                .map(Some)
                .map_err(|err| AgentError::Protocol(err.to_string())),
            FrameKind::Eof => {
                self.finished = true;
                Ok(None)
            }
            _ => Err(self.unexpected_frame(&frame)),
        }
    }

    /// Waits for a `Reply` frame.
    pub async fn reply(&mut self) -> Result<Reply, AgentError> {
        let frame = self.recv().await?;
        if frame.kind != FrameKind::Reply {
            return Err(self.unexpected_frame(&frame));
        }
        frame
            .parse()
            .map_err(|err| AgentError::Protocol(err.to_string()))
    }

    fn unexpected_frame(&self, frame: &Frame) -> AgentError {
        AgentError::Protocol(format!(
            "unexpected {:?} frame on stream {}",
            frame.kind, self.id
        ))
    }
}

impl Drop for AgentStream {
    fn drop(&mut self) {
        lock(&self.client.routes).remove(&self.id);
        if !self.finished {
            let _ =
                self.client
                    .outgoing
                    .try_send(Frame::new(self.id, FrameKind::Close, Bytes::new()));
        }
    }
}

/// Most bytes of an earlier session skipped while looking for the agent's hello.
const MAX_STALE_BYTES: usize = 64 * 1024 * 1024;
/// A hello is a small JSON document.
const MAX_HELLO: usize = 4096;

/// How long the first `Hello` to a restored guest waits for its answer before
/// the connection is made again (see [`AgentClient::connect`]); each later
/// attempt waits twice as long. A restored guest answers in tens of
/// milliseconds, on a busy host in a second or two: not sooner, so a busy
/// host does not churn the port.
const FIRST_HELLO_PATIENCE: Duration = Duration::from_secs(2);

/// Connects to the agent's socket, retrying until `deadline` (QEMU may not be
/// listening yet).
async fn connect_socket(socket: &Path, deadline: Instant) -> Result<UnixStream, AgentError> {
    loop {
        match UnixStream::connect(socket).await {
            Ok(stream) => return Ok(stream),
            Err(err) if Instant::now() >= deadline => return Err(AgentError::Connect(err)),
            Err(_) => tokio::time::sleep(Duration::from_millis(2)).await,
        }
    }
}

/// Sends our `Hello` and reads the answer, until `deadline`
/// ([`AgentError::Timeout`] then).
async fn handshake(
    mut stream: UnixStream,
    deadline: Instant,
) -> Result<(UnixStream, Frame, BytesMut), AgentError> {
    let hello = Hello {
        version: PROTOCOL_VERSION,
        software: format!("hearth-vm {}", env!("CARGO_PKG_VERSION")),
    };
    let mut greeting = BytesMut::new();
    FrameCodec::default()
        .encode(
            Frame::json(CONTROL_STREAM, FrameKind::Hello, &hello),
            &mut greeting,
        )
        .map_err(AgentError::Io)?;
    let exchange = async {
        stream.write_all(&greeting).await.map_err(AgentError::Io)?;
        read_greeting(&mut stream).await
    };
    let remaining = deadline.saturating_duration_since(Instant::now());
    let (answer, rest) = tokio::time::timeout(remaining, exchange)
        .await
        .map_err(|_| AgentError::Timeout(remaining))??;
    Ok((stream, answer, rest))
}

/// Reads until the agent's answer to our hello: a frame on stream 0 of kind
/// `Hello` or `Error`. Bytes before it belong to an earlier session and may
/// start in the middle of a frame (a host that went away mid-frame before a
/// snapshot or suspend leaves the rest in the port), so the header is searched
/// for byte by byte instead of decoding frames from the first byte.
/// Returns the answer and the bytes after it.
async fn read_greeting(stream: &mut UnixStream) -> Result<(Frame, BytesMut), AgentError> {
    let mut buf = BytesMut::with_capacity(8192);
    let mut skipped = 0usize;
    loop {
        let mut offset = 0;
        while buf.len() >= offset + HEADER_LEN {
            let h = &buf[offset..offset + HEADER_LEN];
            let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
            let plausible = h[4..8] == [0, 0, 0, 0]
                && (h[8] == FrameKind::Hello as u8 || h[8] == FrameKind::Error as u8)
                && h[9..12] == [0, 0, 0]
                && (2..=MAX_HELLO).contains(&len)
                && buf.get(offset + HEADER_LEN).is_none_or(|b| *b == b'{');
            if !plausible {
                offset += 1;
                continue;
            }
            if buf.len() < offset + HEADER_LEN + len {
                break; // wait for the rest of this candidate
            }
            let payload =
                Bytes::copy_from_slice(&buf[offset + HEADER_LEN..offset + HEADER_LEN + len]);
            let kind = if h[8] == FrameKind::Hello as u8 {
                FrameKind::Hello
            } else {
                FrameKind::Error
            };
            if serde_json::from_slice::<serde_json::Value>(&payload).is_ok() {
                let rest = buf.split_off(offset + HEADER_LEN + len);
                return Ok((Frame::new(CONTROL_STREAM, kind, payload), rest));
            }
            offset += 1;
        }
        // Keep only what may still start a header.
        let drop = offset.min(buf.len());
        skipped += drop;
        let _ = buf.split_to(drop);
        if skipped > MAX_STALE_BYTES {
            return Err(AgentError::Protocol("no hello from the agent".into()));
        }
        buf.reserve(8192);
        if stream.read_buf(&mut buf).await.map_err(AgentError::Io)? == 0 {
            return Err(AgentError::Closed);
        }
    }
}

/// Buffer between a TCP stream's frames and its byte-stream side.
const IO_BUFFER: usize = 256 * 1024;

async fn pump(mut stream: AgentStream, local: tokio::io::DuplexStream) {
    let sender = stream.sender();
    let (mut from_local, mut to_local) = tokio::io::split(local);
    let mut buf = vec![0u8; CHUNK];
    let (mut inbound_open, mut outbound_open) = (true, true);
    while inbound_open || outbound_open {
        tokio::select! {
            frame = stream.recv(), if inbound_open => match frame {
                Ok(frame) if frame.kind == FrameKind::Data => {
                    if to_local.write_all(&frame.payload).await.is_err() {
                        break;
                    }
                }
                Ok(frame) if frame.kind == FrameKind::Eof => {
                    let _ = to_local.shutdown().await;
                    inbound_open = false;
                }
                // Anything else ends the stream (an error, the guest closing it).
                _ => break,
            },
            read = from_local.read(&mut buf), if outbound_open => match read {
                Ok(0) => {
                    if sender.send_eof().await.is_err() {
                        break;
                    }
                    outbound_open = false;
                }
                Ok(n) => {
                    if sender.send_data(Bytes::copy_from_slice(&buf[..n])).await.is_err() {
                        break;
                    }
                }
                Err(_) => break,
            },
        }
    }
    // Dropping `stream` tells the guest to close its socket if still open.
}

fn remote_error(frame: &Frame) -> AgentError {
    match frame.parse::<ErrorReply>() {
        Ok(reply) => AgentError::Remote(reply),
        Err(err) => AgentError::Protocol(err.to_string()),
    }
}

fn unexpected(reply: &Reply) -> AgentError {
    AgentError::Protocol(format!("unexpected reply {reply:?}"))
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding this lock cannot leave the map inconsistent.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

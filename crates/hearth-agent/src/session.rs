//! One host session: decodes frames, opens streams, routes stream traffic to the
//! per-stream tasks, and owns the single writer.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::BytesMut;
use futures::{SinkExt, StreamExt};
use hearth_proto::{
    ErrorKind, Frame, FrameCodec, FrameKind, Hello, Incoming, Reply, Request, SignalRequest,
    CONTROL_STREAM, MAX_PAYLOAD, PROTOCOL_VERSION,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::codec::{Decoder, FramedRead, FramedWrite};

use crate::stream::{
    error_frame, Agent, FrameSink, Outgoing, SessionError, StreamControl, StreamFailure,
};
use crate::{applog_stream, exec, files, log, system, tcp};

/// Frames queued for the writer (across all streams) before senders wait.
const OUTGOING_QUEUE: usize = 64;
/// Host frames queued per stream before the reader waits (backpressure to the host).
const STREAM_INBOX: usize = 16;

/// Why a session ended.
#[derive(Debug)]
pub enum SessionEnd {
    /// The host went away (EOF); it may come back.
    Disconnected,
    /// The transport failed.
    Failed(SessionError),
}

struct StreamHandle {
    inbox: mpsc::Sender<Frame>,
    task: JoinHandle<()>,
    control: Arc<StreamControl>,
}

/// `FrameCodec`, except that a partial frame cut off by EOF (the host vanished
/// mid-frame) just ends the session instead of being an error.
#[derive(Debug, Default)]
struct SessionCodec(FrameCodec);

impl Decoder for SessionCodec {
    type Item = Incoming;
    type Error = io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Incoming>, io::Error> {
        self.0.decode(src)
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Incoming>, io::Error> {
        let item = self.0.decode(src)?;
        if item.is_none() {
            src.clear();
        }
        Ok(item)
    }
}

/// Runs one session until the host disconnects or the transport fails. Streams
/// still open at the end are dropped; their processes keep running.
pub async fn run_session<R, W>(reader: R, writer: W, agent: Arc<Agent>) -> SessionEnd
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (sender, outgoing) = mpsc::channel(OUTGOING_QUEUE);
    let epoch = Arc::new(AtomicU64::new(0));
    let mut writer_task = tokio::spawn(write_frames(writer, outgoing, epoch.clone()));
    let mut frames = FramedRead::new(reader, SessionCodec::default());
    let mut session = Session {
        agent,
        streams: HashMap::new(),
        sink: FrameSink::new(sender),
        epoch,
        greeted: false,
    };
    let end = loop {
        tokio::select! {
            item = frames.next() => match item {
                None => break SessionEnd::Disconnected,
                Some(Err(err)) => break SessionEnd::Failed(SessionError::Read(err)),
                Some(Ok(incoming)) => session.handle(incoming).await,
            },
            result = &mut writer_task => break match result {
                // The host hung up while we were writing to it.
                Ok(Err(SessionError::Write(err))) if err.kind() == io::ErrorKind::BrokenPipe => {
                    SessionEnd::Disconnected
                }
                Ok(Err(err)) => SessionEnd::Failed(err),
                _ => SessionEnd::Failed(SessionError::WriterGone),
            },
        }
    };
    session.detach_all();
    writer_task.abort();
    end
}

/// The single writer: batches queued frames and flushes when the queue drains.
async fn write_frames<W>(
    writer: W,
    mut outgoing: mpsc::Receiver<Outgoing>,
    current_epoch: Arc<AtomicU64>,
) -> Result<(), SessionError>
where
    W: AsyncWrite + Unpin,
{
    let mut framed = FramedWrite::new(writer, FrameCodec::default());
    while let Some(first) = outgoing.recv().await {
        let mut item = first;
        loop {
            match item {
                Outgoing::Frame { epoch, frame } => {
                    if epoch != current_epoch.load(Ordering::Acquire) {
                        // Output of a stream from before the latest Hello.
                    } else if frame.payload.len() > MAX_PAYLOAD {
                        log!("dropping an oversized frame for stream {}", frame.stream);
                    } else {
                        framed.feed(frame).await.map_err(SessionError::Write)?;
                    }
                }
                Outgoing::Flush(done) => {
                    framed.flush().await.map_err(SessionError::Write)?;
                    let _ = done.send(());
                }
            }
            // Keep feeding while frames are queued; flush once the queue is empty.
            match outgoing.try_recv() {
                Ok(next) => item = next,
                Err(_) => break,
            }
        }
        framed.flush().await.map_err(SessionError::Write)?;
    }
    Ok(())
}

struct Session {
    agent: Arc<Agent>,
    streams: HashMap<u32, StreamHandle>,
    sink: FrameSink,
    epoch: Arc<AtomicU64>,
    /// Set by the first accepted `Hello`. Until then every other frame is dropped:
    /// bytes left in the port by a previous host connection must not run as
    /// requests of the new one.
    greeted: bool,
}

impl Session {
    async fn handle(&mut self, incoming: Incoming) {
        let is_hello = matches!(&incoming, Incoming::Frame(f) if f.kind == FrameKind::Hello);
        if !self.greeted && !is_hello {
            log!("ignoring a frame that arrived before the host's hello");
            return;
        }
        match incoming {
            Incoming::Rejected { stream, reason } => {
                log!("rejected a frame on stream {stream}: {reason}");
                self.drop_stream(stream);
                self.send(error_frame(
                    stream,
                    ErrorKind::Protocol,
                    &reason.to_string(),
                ))
                .await;
            }
            Incoming::Frame(frame) => match frame.kind {
                FrameKind::Hello => self.hello(frame).await,
                FrameKind::Open => self.open(frame).await,
                // Resize travels with the stream's data so that it is applied in
                // order with keystrokes; streams without a terminal ignore it.
                FrameKind::Data | FrameKind::Eof | FrameKind::Resize => self.forward(frame).await,
                FrameKind::Signal => self.signal(&frame),
                FrameKind::Close => self.drop_stream(frame.stream),
                FrameKind::Exit | FrameKind::Error | FrameKind::Reply => {
                    log!("ignoring a {:?} frame from the host", frame.kind);
                }
            },
        }
    }

    async fn send(&self, frame: Frame) {
        // Only fails when the writer is gone, which ends the session anyway.
        let _ = self.sink.send(frame).await;
    }

    async fn hello(&mut self, frame: Frame) {
        if frame.stream != CONTROL_STREAM {
            self.drop_stream(frame.stream);
            let message = "hello is only valid on stream 0";
            self.send(error_frame(frame.stream, ErrorKind::Protocol, message))
                .await;
            return;
        }
        let hello: Hello = match frame.parse() {
            Ok(hello) => hello,
            Err(err) => {
                self.send(error_frame(
                    CONTROL_STREAM,
                    ErrorKind::Protocol,
                    &err.to_string(),
                ))
                .await;
                return;
            }
        };
        // Any hello starts a new session: the previous one's streams are dropped
        // and their queued output discarded.
        self.reset();
        if hello.version != PROTOCOL_VERSION {
            let message = format!(
                "unsupported protocol version {} (agent speaks {PROTOCOL_VERSION})",
                hello.version
            );
            self.send(error_frame(
                CONTROL_STREAM,
                ErrorKind::InvalidRequest,
                &message,
            ))
            .await;
            return;
        }
        self.greeted = true;
        log!("host connected ({})", hello.software);
        let answer = Hello {
            version: PROTOCOL_VERSION,
            software: format!("hearth-agent {}", env!("CARGO_PKG_VERSION")),
        };
        self.send(Frame::json(CONTROL_STREAM, FrameKind::Hello, &answer))
            .await;
    }

    fn reset(&mut self) {
        self.detach_all();
        let epoch = self.epoch.fetch_add(1, Ordering::AcqRel) + 1;
        self.sink = self.sink.for_epoch(epoch);
    }

    /// Forgets every stream without killing its process.
    fn detach_all(&mut self) {
        for (_, handle) in self.streams.drain() {
            handle.control.detached.store(true, Ordering::Release);
            handle.task.abort();
        }
    }

    /// Frees a stream; an exec'd process still running is killed by its task's
    /// guard when the task is dropped.
    fn drop_stream(&mut self, stream: u32) {
        if let Some(handle) = self.streams.remove(&stream) {
            handle.task.abort();
        }
    }

    async fn open(&mut self, frame: Frame) {
        let stream = frame.stream;
        if stream == CONTROL_STREAM {
            let message = "streams cannot be opened on stream 0";
            self.send(error_frame(stream, ErrorKind::InvalidRequest, message))
                .await;
            return;
        }
        self.streams.retain(|_, handle| !handle.task.is_finished());
        if self.streams.contains_key(&stream) {
            let message = format!("stream {stream} is already open");
            self.send(error_frame(stream, ErrorKind::InvalidRequest, &message))
                .await;
            return;
        }
        let request: Request = match serde_json::from_slice(&frame.payload) {
            Ok(request) => request,
            Err(err) => {
                let message = format!("malformed request: {err}");
                self.send(error_frame(stream, ErrorKind::Protocol, &message))
                    .await;
                return;
            }
        };
        let (inbox, inbox_receiver) = mpsc::channel(STREAM_INBOX);
        let control = Arc::new(StreamControl::default());
        let task = tokio::spawn(run_stream(
            stream,
            request,
            inbox_receiver,
            self.sink.clone(),
            self.agent.clone(),
            control.clone(),
        ));
        self.streams.insert(
            stream,
            StreamHandle {
                inbox,
                task,
                control,
            },
        );
    }

    async fn forward(&mut self, frame: Frame) {
        let stream = frame.stream;
        let Some(handle) = self.streams.get(&stream) else {
            return;
        };
        // A stream that does not (or no longer) read host data has dropped its
        // inbox; the frame is then ignored.
        if handle.inbox.send(frame).await.is_err() && handle.task.is_finished() {
            self.streams.remove(&stream);
        }
    }

    fn signal(&self, frame: &Frame) {
        let Some(handle) = self.streams.get(&frame.stream) else {
            return;
        };
        let request: SignalRequest = match frame.parse() {
            Ok(request) => request,
            Err(err) => {
                log!("stream {}: {err}", frame.stream);
                return;
            }
        };
        let pid = handle.control.pid.load(Ordering::Acquire);
        if pid <= 0 {
            log!("stream {}: no process to signal", frame.stream);
            return;
        }
        if let Err(err) = self.agent.children.signal(pid, request.signal) {
            log!("signal {} to {pid}: {err}", request.signal);
        }
    }
}

/// Runs one stream to completion, turning a failure into an `Error` frame.
async fn run_stream(
    stream: u32,
    request: Request,
    inbox: mpsc::Receiver<Frame>,
    sink: FrameSink,
    agent: Arc<Agent>,
    control: Arc<StreamControl>,
) {
    let failure: Option<Box<dyn StreamFailure + Send>> = match request {
        Request::Ping => {
            let uptime_ms = system::uptime_ms(&agent);
            let _ = sink.reply(stream, &Reply::Pong { uptime_ms }).await;
            None
        }
        Request::Exec(request) => exec::run(stream, request, inbox, &sink, &agent, &control)
            .await
            .err()
            .map(|err| Box::new(err) as _),
        Request::WriteFile(request) => files::write_file(stream, request, inbox, &sink)
            .await
            .err()
            .map(|err| Box::new(err) as _),
        Request::ReadFile(request) => {
            drop(inbox);
            files::read_file(stream, request, &sink)
                .await
                .err()
                .map(|err| Box::new(err) as _)
        }
        Request::Connect(request) => tcp::connect(stream, request, inbox, &sink)
            .await
            .err()
            .map(|err| Box::new(err) as _),
        Request::Restored(request) => system::restored(stream, request, &sink, &agent)
            .await
            .err()
            .map(|err| Box::new(err) as _),
        Request::Shutdown => system::shutdown(stream, &sink, &agent)
            .await
            .err()
            .map(|err| Box::new(err) as _),
        Request::Sync => system::sync(stream, &sink)
            .await
            .err()
            .map(|err| Box::new(err) as _),
        Request::AppLogs(request) => {
            drop(inbox);
            applog_stream::serve(stream, request, &sink, &agent.app_log)
                .await
                .err()
                .map(|err| Box::new(err) as _)
        }
        Request::DiscardAppLog(request) => {
            applog_stream::discard(stream, request, &sink, &agent.app_log)
                .await
                .err()
                .map(|err| Box::new(err) as _)
        }
    };
    if let Some(failure) = failure {
        let _ = sink
            .send(error_frame(stream, failure.kind(), &failure.to_string()))
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_frame_at_eof_is_dropped() {
        let mut codec = SessionCodec::default();
        let mut buf = BytesMut::from(&hearth_proto::raw_header(10, 1, 3, 0)[..]);
        buf.extend_from_slice(b"abc");
        assert!(matches!(codec.decode_eof(&mut buf), Ok(None)));
    }
}

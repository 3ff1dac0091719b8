//! What a stream's handler works with: the state every session shares
//! ([`Agent`]), the sink its frames go out through, the control it shares with
//! the session, and how its failure becomes an `Error` frame.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicI32};
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use hearth_proto::{ErrorKind, Frame, FrameKind, Reply};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::{mpsc, oneshot};

use crate::children::Children;

/// Longest error message sent to the host.
const MAX_ERROR_MESSAGE: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("reading from the host: {0}")]
    Read(io::Error),
    #[error("writing to the host: {0}")]
    Write(io::Error),
    #[error("the writer stopped")]
    WriterGone,
}

/// What every session shares: the child registry and the agent's mode.
#[derive(Debug)]
pub struct Agent {
    pub children: Arc<Children>,
    /// True when running as the guest's PID 1 (and so allowed to set the clock,
    /// power off, ...).
    pub is_init: bool,
    pub started: Instant,
    /// The app's captured output.
    pub app_log: Arc<crate::applog::AppLog>,
}

/// An error that ends a stream with an `Error` frame.
pub trait StreamFailure: std::fmt::Display {
    fn kind(&self) -> ErrorKind;
}

pub enum Outgoing {
    Frame {
        epoch: u64,
        frame: Frame,
    },
    /// Acknowledged once everything queued before it has been written.
    Flush(oneshot::Sender<()>),
}

/// The sending side of the writer, stamped with the session epoch it belongs to;
/// the writer drops frames of an older epoch (streams of a session that a new
/// `Hello` replaced).
#[derive(Clone)]
pub struct FrameSink {
    sender: mpsc::Sender<Outgoing>,
    epoch: u64,
}

impl std::fmt::Debug for FrameSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameSink")
            .field("epoch", &self.epoch)
            .finish()
    }
}

impl FrameSink {
    /// A sink for the first session epoch (0).
    pub fn new(sender: mpsc::Sender<Outgoing>) -> Self {
        Self { sender, epoch: 0 }
    }

    /// The same writer, stamped with a later epoch.
    pub fn for_epoch(&self, epoch: u64) -> Self {
        Self {
            sender: self.sender.clone(),
            epoch,
        }
    }

    /// Queues a frame; fails only when the session is gone.
    pub async fn send(&self, frame: Frame) -> Result<(), SessionError> {
        self.sender
            .send(Outgoing::Frame {
                epoch: self.epoch,
                frame,
            })
            .await
            .map_err(|_| SessionError::WriterGone)
    }

    /// Sends a JSON `Reply`.
    pub async fn reply(&self, stream: u32, reply: &Reply) -> Result<(), SessionError> {
        self.send(Frame::json(stream, FrameKind::Reply, reply))
            .await
    }

    /// Streams what `reader` yields to the host as `Data` frames of up to
    /// `chunk` bytes on `stream`, then `Eof`. Stops quietly if the session ends.
    pub async fn send_from<R: AsyncRead + Unpin>(
        &self,
        stream: u32,
        mut reader: R,
        chunk: usize,
    ) -> io::Result<()> {
        loop {
            let mut buf = BytesMut::with_capacity(chunk);
            if reader.read_buf(&mut buf).await? == 0 {
                break;
            }
            if self
                .send(Frame::new(stream, FrameKind::Data, buf.freeze()))
                .await
                .is_err()
            {
                return Ok(());
            }
        }
        let _ = self
            .send(Frame::new(stream, FrameKind::Eof, bytes::Bytes::new()))
            .await;
        Ok(())
    }

    /// Waits until everything queued so far has been written out.
    pub async fn flush(&self) -> Result<(), SessionError> {
        let (done, flushed) = oneshot::channel();
        self.sender
            .send(Outgoing::Flush(done))
            .await
            .map_err(|_| SessionError::WriterGone)?;
        flushed.await.map_err(|_| SessionError::WriterGone)
    }
}

/// Builds an `Error` frame, keeping the message to a sane size.
pub fn error_frame(stream: u32, kind: ErrorKind, message: &str) -> Frame {
    let mut end = message.len().min(MAX_ERROR_MESSAGE);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    Frame::error(stream, kind, &message[..end])
}

/// Shared between the session and an exec stream's task.
#[derive(Debug, Default)]
pub struct StreamControl {
    /// The exec'd process, once spawned (0 before).
    pub pid: AtomicI32,
    /// Set when the session is reset: the stream's process is left running.
    pub detached: AtomicBool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_messages_are_truncated_on_char_boundaries() {
        let message = "é".repeat(MAX_ERROR_MESSAGE);
        let frame = error_frame(3, ErrorKind::Internal, &message);
        let reply: hearth_proto::ErrorReply = frame.parse().expect("json");
        assert!(reply.message.len() <= MAX_ERROR_MESSAGE);
        assert_eq!(frame.stream, 3);
    }
}

//! `Connect` streams: a TCP connection to a port on the guest's loopback, with
//! bytes relayed both ways and half-closes passed through.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};

use hearth_proto::{ConnectRequest, ErrorKind, Frame, FrameKind, Reply};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::log;
use crate::stream::{FrameSink, StreamFailure};

const READ_CHUNK: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum TcpError {
    #[error("connect to 127.0.0.1:{port}: {source}")]
    Connect { port: u16, source: io::Error },
    #[error("connection to port {port} failed: {source}")]
    Relay { port: u16, source: io::Error },
}

impl StreamFailure for TcpError {
    fn kind(&self) -> ErrorKind {
        match self {
            Self::Connect { source, .. } if source.kind() == io::ErrorKind::ConnectionRefused => {
                ErrorKind::ConnectionRefused
            }
            _ => ErrorKind::Internal,
        }
    }
}

/// Runs a `Connect` stream until both directions have ended.
pub async fn connect(
    stream: u32,
    request: ConnectRequest,
    inbox: mpsc::Receiver<Frame>,
    sink: &FrameSink,
) -> Result<(), TcpError> {
    let port = request.port;
    let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let socket = TcpStream::connect(address)
        .await
        .map_err(|source| TcpError::Connect { port, source })?;
    let _ = socket.set_nodelay(true);
    if sink.reply(stream, &Reply::Connected).await.is_err() {
        return Ok(());
    }
    let (reader, writer) = socket.into_split();
    let to_socket = host_to_socket(inbox, writer, port);
    let from_socket = sink.send_from(stream, reader, READ_CHUNK);
    tokio::pin!(to_socket, from_socket);
    let mut host_done = false;
    let mut socket_done = false;
    while !(host_done && socket_done) {
        tokio::select! {
            () = &mut to_socket, if !host_done => host_done = true,
            result = &mut from_socket, if !socket_done => {
                result.map_err(|source| TcpError::Relay { port, source })?;
                socket_done = true;
            }
        }
    }
    Ok(())
}

/// Host `Data` into the socket; host `Eof` half-closes it. A failed write (the
/// peer closed) stops writing but keeps consuming the host's frames, so the other
/// direction can still finish.
async fn host_to_socket(mut inbox: mpsc::Receiver<Frame>, mut writer: OwnedWriteHalf, port: u16) {
    let mut writable = true;
    while let Some(frame) = inbox.recv().await {
        match frame.kind {
            FrameKind::Data if writable => {
                if let Err(err) = writer.write_all(&frame.payload).await {
                    log!("writing to port {port}: {err}");
                    writable = false;
                }
            }
            FrameKind::Eof => break,
            _ => {}
        }
    }
    let _ = writer.shutdown().await;
}

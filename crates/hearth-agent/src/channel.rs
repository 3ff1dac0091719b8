//! The transport: the virtio-serial port (found by name), driven through tokio's
//! `AsyncFd`, with the host's disconnects and reconnects; or, for tests, a Unix
//! socket served one connection at a time.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixListener;

use crate::session::{run_session, SessionEnd};
use crate::stream::Agent;
use crate::{log, sys};

const PORTS_DIR: &str = "/sys/class/virtio-ports";
/// How often to look for the host while it is away (snapshot restore wants the
/// reconnect noticed within a few milliseconds).
const HOST_POLL: Duration = Duration::from_millis(2);
const DISCOVERY_POLL: Duration = Duration::from_millis(20);

#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("open {path}: {source}")]
    Open { path: String, source: io::Error },
    #[error("register {path} with the reactor: {source}")]
    Register { path: String, source: io::Error },
    #[error("listen on {path}: {source}")]
    Listen { path: String, source: io::Error },
}

/// Finds `/dev/<port>` for the virtio-serial port named `name`, if present.
pub fn find_port(ports_dir: &Path, name: &str) -> Option<PathBuf> {
    let entries = std::fs::read_dir(ports_dir).ok()?;
    for entry in entries.flatten() {
        let Ok(port_name) = std::fs::read_to_string(entry.path().join("name")) else {
            continue;
        };
        if port_name.trim_end() == name {
            return Some(Path::new("/dev").join(entry.file_name()));
        }
    }
    None
}

/// Waits until the agent's port shows up (its module may still be probing).
async fn discover_port() -> PathBuf {
    let mut announced = false;
    loop {
        if let Some(path) = find_port(Path::new(PORTS_DIR), hearth_proto::PORT_NAME) {
            if path.exists() {
                return path;
            }
        }
        if !announced {
            log!("waiting for virtio port {}", hearth_proto::PORT_NAME);
            announced = true;
        }
        tokio::time::sleep(DISCOVERY_POLL).await;
    }
}

/// An open character device in non-blocking mode. Each session registers its
/// own copy of the descriptor with the reactor (see [`Port::session`]).
#[derive(Debug)]
pub struct Port {
    file: File,
}

impl Port {
    pub fn open(path: &Path) -> Result<Self, ChannelError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(path)
            .map_err(|source| ChannelError::Open {
                path: path.display().to_string(),
                source,
            })?;
        Ok(Self { file })
    }

    /// Returns once the host side is connected. While it is not, virtio_console
    /// reports POLLHUP (and reads return EOF), so poll on a short timer.
    ///
    /// Nothing is read here: the host may reconnect between the poll and a read,
    /// and its `Hello` must reach the new session. Bytes a previous connection
    /// left behind are dropped by the session until it sees a `Hello`.
    pub async fn wait_for_host(&self) {
        loop {
            match sys::poll_now(&self.file, libc::POLLIN) {
                Ok(revents) if revents & libc::POLLHUP == 0 => return,
                Ok(_) => {}
                Err(err) => log!("poll on the agent port: {err}"),
            }
            tokio::time::sleep(HOST_POLL).await;
        }
    }

    /// The two halves of one session, on a new registration with the reactor.
    ///
    /// A new one per session because tokio keeps a hang-up for good (closed
    /// readiness is final): once the host has gone away, a registration
    /// reports the port ready forever, and reads and writes that would block
    /// would spin. A session ends when its host goes; the next host gets a
    /// registration that has never seen a hang-up.
    pub fn session(&self) -> Result<(PortReader, PortWriter), ChannelError> {
        let register = || sys::register_async(self.file.try_clone()?);
        let fd = Arc::new(register().map_err(|source| ChannelError::Register {
            path: "the agent port".into(),
            source,
        })?);
        Ok((PortReader { fd: fd.clone() }, PortWriter { fd }))
    }
}

/// The read half of a [`Port`].
#[derive(Debug)]
pub struct PortReader {
    fd: Arc<AsyncFd<File>>,
}

/// The write half of a [`Port`].
#[derive(Debug)]
pub struct PortWriter {
    fd: Arc<AsyncFd<File>>,
}

impl AsyncRead for PortReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            // Read before `try_io`: on would-block it clears the guard's event,
            // after which `guard.ready()` is empty.
            let hung_up = guard.ready().is_read_closed();
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|inner| inner.get_ref().read(unfilled)) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(err)) => return Poll::Ready(Err(err)),
                // The host hung up and came back before this read (it would
                // block, not return EOF). End of this session, rather than
                // spinning on a closed readiness, which never clears.
                Err(_would_block) if hung_up => return Poll::Ready(Ok(())),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for PortWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.fd.poll_write_ready(cx))?;
            let hung_up = guard.ready().is_write_closed();
            match guard.try_io(|inner| inner.get_ref().write(buf)) {
                Ok(result) => return Poll::Ready(result),
                // The host hung up: see `PortReader::poll_read`.
                Err(_would_block) if hung_up => {
                    return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
                }
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Writes go straight to the device.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Serves the virtio port forever: one session per host connection.
pub async fn serve_port(fixed_path: Option<PathBuf>, agent: Arc<Agent>) {
    loop {
        let path = match &fixed_path {
            Some(path) => path.clone(),
            None => discover_port().await,
        };
        let port = match Port::open(&path) {
            Ok(port) => port,
            Err(err) => {
                log!("{err}");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        log!("serving on {}", path.display());
        loop {
            port.wait_for_host().await;
            let (reader, writer) = match port.session() {
                Ok(halves) => halves,
                Err(err) => {
                    log!("{err}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    break;
                }
            };
            match run_session(reader, writer, agent.clone()).await {
                SessionEnd::Disconnected => {}
                SessionEnd::Failed(err) => {
                    // Possibly a dead device: reopen it after a pause.
                    log!("agent port failed: {err}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    break;
                }
            }
        }
    }
}

/// Serves the protocol on a Unix socket, one connection (= one session) at a time.
pub async fn serve_unix(path: PathBuf, agent: Arc<Agent>) -> Result<(), ChannelError> {
    // A stale socket file from an earlier run would make bind fail.
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).map_err(|source| ChannelError::Listen {
        path: path.display().to_string(),
        source,
    })?;
    log!("listening on {}", path.display());
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(err) => {
                log!("accept: {err}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (reader, writer) = stream.into_split();
        if let SessionEnd::Failed(err) = run_session(reader, writer, agent.clone()).await {
            log!("session ended: {err}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_port_by_name() {
        let dir = std::env::temp_dir().join(format!("hearth-ports-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for (port, name) in [("vport0p1", "other\n"), ("vport1p1", "hearth.agent\n")] {
            std::fs::create_dir_all(dir.join(port)).expect("mkdir");
            std::fs::write(dir.join(port).join("name"), name).expect("write name");
        }
        assert_eq!(
            find_port(&dir, "hearth.agent"),
            Some(PathBuf::from("/dev/vport1p1"))
        );
        assert_eq!(find_port(&dir, "missing"), None);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

//! `Exec` streams on a pseudo-terminal ([`ExecRequest::pty`]): the process runs
//! as the leader of a new session whose controlling terminal (and stdin, stdout,
//! stderr) is the slave side; the agent drives the non-blocking master through
//! tokio's `AsyncFd`.
//!
//! Output from the master goes out as `Data` frames flagged stdout, then one
//! `Eof` flagged stdout, then `Exit`. Host `Data` is written to the master (it is
//! typed into the terminal); host `Eof` is ignored (a terminal has no end of
//! input: the host ends the session by ending the process, or with `Close`);
//! `Resize` sets the window size, and the kernel sends `SIGWINCH` to the
//! terminal's foreground process group.

use std::fs::File;
use std::io::{self, Read, Write};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hearth_proto::{
    window_size_is_valid, ExecRequest, ExitStatus, Frame, FrameKind, PtyRequest, ResizeRequest,
    FLAG_STDOUT,
};
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::process::{build_command, spawn, ExecError};
use crate::stream::{Agent, FrameSink, StreamControl};
use crate::{log, sys};

/// Largest output chunk per `Data` frame.
const OUTPUT_CHUNK: usize = 64 * 1024;
/// After the process exits, its remaining output is relayed until every holder
/// of the terminal has closed it, or until the terminal has been quiet this long
/// (a background process may keep it open forever).
const DRAIN_QUIET: Duration = Duration::from_millis(200);
/// Most output relayed after the process exited (a background process may keep
/// writing); what the terminal buffers at the exit is far less.
const DRAIN_LIMIT: usize = 1024 * 1024;

fn pty_error(err: io::Error) -> ExecError {
    log!("pseudo-terminal: {err}");
    ExecError::Pty(err)
}

/// Runs a PTY `Exec` stream to its `Exit` frame.
pub async fn run(
    stream: u32,
    request: ExecRequest,
    pty: PtyRequest,
    inbox: mpsc::Receiver<Frame>,
    sink: &FrameSink,
    agent: &Agent,
    control: &Arc<StreamControl>,
) -> Result<(), ExecError> {
    if !window_size_is_valid(pty.cols, pty.rows) {
        return Err(ExecError::BadWindowSize {
            cols: pty.cols,
            rows: pty.rows,
        });
    }
    let mut command = build_command(&request, true)?;
    let (master, slave) = sys::open_pty().map_err(pty_error)?;
    sys::set_window_size(&master, pty.cols, pty.rows).map_err(pty_error)?;
    if let Some(uid) = request.uid {
        // As grantpt(3) does: the terminal belongs to the user who runs on it.
        if let Err(err) = std::os::unix::fs::fchown(&slave, Some(uid), None) {
            log!("stream {stream}: giving the terminal to uid {uid}: {err}");
        }
    }
    command
        .stdin(Stdio::from(slave.try_clone().map_err(pty_error)?))
        .stdout(Stdio::from(slave.try_clone().map_err(pty_error)?))
        .stderr(Stdio::from(slave));
    // Registered while the slave is open (the command holds it), so the master
    // does not start out hung up.
    let master = Arc::new(sys::register_async(master).map_err(pty_error)?);
    let program = request.argv.first().cloned().unwrap_or_default();
    // The command, and with it the agent's copies of the slave, is dropped once
    // the child has it: the master then reads EIO when the child's side closes.
    let (spawned, mut guard) = spawn(command, program, agent, control).await?;
    let pid = spawned.pid;

    // Aborted when this function returns or is dropped.
    let mut input = JoinSet::new();
    input.spawn(feed_terminal(master.clone(), inbox, stream));
    let mut input_open = true;

    let deadline = request
        .timeout_ms
        .and_then(|ms| Instant::now().checked_add(Duration::from_millis(ms)));
    let mut timed_out = false;
    let mut exited = spawned.exited;
    // Some(raw status) once the process has been reaped.
    let mut status: Option<Option<i32>> = None;
    let mut output_open = true;
    let mut drained = 0usize;
    let mut buffer = vec![0u8; OUTPUT_CHUNK];
    let quiet = tokio::time::sleep(DRAIN_QUIET);
    tokio::pin!(quiet);

    while status.is_none() || output_open {
        let timer = async {
            match deadline {
                Some(deadline) => tokio::time::sleep_until(deadline).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            result = &mut exited, if status.is_none() => {
                status = Some(result.ok());
                // Reaped: its pid may be reused from now on.
                guard.disarm();
                quiet.as_mut().reset(Instant::now() + DRAIN_QUIET);
            }
            () = timer, if status.is_none() && !timed_out => {
                timed_out = true;
                if let Err(err) = sys::kill(-pid, libc::SIGKILL) {
                    log!("stream {stream}: killing timed-out process {pid}: {err}");
                }
            }
            joined = input.join_next(), if input_open => match joined {
                Some(Ok(Err(err))) => return Err(err),
                _ => input_open = false,
            },
            read = read_chunk(&master, &mut buffer), if output_open => match read {
                Ok(Some(chunk)) => {
                    let len = chunk.len();
                    let data = Frame::new(stream, FrameKind::Data, chunk).with_flags(FLAG_STDOUT);
                    if sink.send(data).await.is_err() {
                        // The session is gone.
                        return Ok(());
                    }
                    if status.is_some() {
                        drained += len;
                        if drained >= DRAIN_LIMIT {
                            output_open = false;
                        }
                        quiet.as_mut().reset(Instant::now() + DRAIN_QUIET);
                    }
                }
                Ok(None) => output_open = false,
                Err(err) => {
                    log!("stream {stream}: reading the terminal: {err}");
                    output_open = false;
                }
            },
            () = &mut quiet, if status.is_some() => output_open = false,
        }
    }

    let eof = Frame::new(stream, FrameKind::Eof, Bytes::new()).with_flags(FLAG_STDOUT);
    let _ = sink.send(eof).await;
    let (code, signal) = status
        .flatten()
        .map_or((None, None), sys::decode_wait_status);
    let exit = ExitStatus {
        code,
        signal,
        timed_out,
    };
    let _ = sink.send(Frame::json(stream, FrameKind::Exit, &exit)).await;
    Ok(())
}

/// Reads what the terminal has, up to `buffer.len()` bytes: `Ok(None)` once no
/// one holds the slave side any more. Cancel-safe: bytes are only taken from the
/// terminal between the last wait and the return.
async fn read_chunk(master: &AsyncFd<File>, buffer: &mut [u8]) -> io::Result<Option<Bytes>> {
    loop {
        let mut ready = master.readable().await?;
        let mut filled = 0;
        let mut closed = false;
        while filled < buffer.len() {
            match ready.try_io(|fd| fd.get_ref().read(&mut buffer[filled..])) {
                Ok(Ok(0)) => {
                    closed = true;
                    break;
                }
                Ok(Ok(n)) => filled += n,
                Ok(Err(err)) if err.kind() == io::ErrorKind::Interrupted => {}
                // EIO: every descriptor of the slave side is closed.
                Ok(Err(err)) if err.raw_os_error() == Some(libc::EIO) => {
                    closed = true;
                    break;
                }
                Ok(Err(err)) if filled == 0 => return Err(err),
                // Reported by the next call.
                Ok(Err(_)) => break,
                // Nothing more for now; readiness was cleared.
                Err(_would_block) => break,
            }
        }
        if filled > 0 {
            return Ok(Some(Bytes::copy_from_slice(&buffer[..filled])));
        }
        if closed {
            return Ok(None);
        }
    }
}

/// Writes all of `data` to the terminal, waiting while its input is full.
async fn write_all(master: &AsyncFd<File>, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        let mut ready = master.writable().await?;
        match ready.try_io(|fd| fd.get_ref().write(data)) {
            Ok(Ok(0)) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
            Ok(Ok(n)) => data = &data[n..],
            Ok(Err(err)) if err.kind() == io::ErrorKind::Interrupted => {}
            Ok(Err(err)) => return Err(err),
            Err(_would_block) => {}
        }
    }
    Ok(())
}

/// Types host `Data` into the terminal and applies `Resize` frames, in order. A
/// malformed or out-of-range resize fails the stream.
async fn feed_terminal(
    master: Arc<AsyncFd<File>>,
    mut inbox: mpsc::Receiver<Frame>,
    stream: u32,
) -> Result<(), ExecError> {
    let mut writable = true;
    while let Some(frame) = inbox.recv().await {
        match frame.kind {
            FrameKind::Data if writable => {
                if let Err(err) = write_all(&master, &frame.payload).await {
                    // EIO: the terminal's other side is closed; the exit follows.
                    if err.raw_os_error() != Some(libc::EIO) {
                        log!("stream {stream}: writing to the terminal: {err}");
                    }
                    writable = false;
                }
            }
            FrameKind::Resize => {
                let size: ResizeRequest = frame.parse().map_err(|_| ExecError::BadResize)?;
                if !window_size_is_valid(size.cols, size.rows) {
                    return Err(ExecError::BadWindowSize {
                        cols: size.cols,
                        rows: size.rows,
                    });
                }
                if let Err(err) = sys::set_window_size(master.get_ref(), size.cols, size.rows) {
                    log!("stream {stream}: resizing the terminal: {err}");
                }
            }
            // Host `Eof` has no meaning for a terminal.
            _ => {}
        }
    }
    Ok(())
}

//! `Exec` streams: spawn a process, stream its output, feed its stdin, report how
//! it ended.

use std::io;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use hearth_proto::{ExecRequest, ExitStatus, Frame, FrameKind, FLAG_STDERR, FLAG_STDOUT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::process::{build_command, spawn, ExecError};
use crate::stream::{Agent, FrameSink, StreamControl};
use crate::{log, pty, sys};

/// Largest output chunk per `Data` frame.
const OUTPUT_CHUNK: usize = 64 * 1024;
/// After the process exits, how long to wait for its pipes to close (a background
/// grandchild may hold them open forever).
const PIPE_GRACE: Duration = Duration::from_millis(200);

/// Runs an `Exec` stream to its `Exit` frame.
pub async fn run(
    stream: u32,
    request: ExecRequest,
    inbox: mpsc::Receiver<Frame>,
    sink: &FrameSink,
    agent: &Agent,
    control: &Arc<StreamControl>,
) -> Result<(), ExecError> {
    if let Some(pty) = request.pty.clone() {
        return pty::run(stream, request, pty, inbox, sink, agent, control).await;
    }
    let command = build_command(&request, false)?;
    let program = request.argv.first().cloned().unwrap_or_default();
    let (mut spawned, mut guard) = spawn(command, program, agent, control).await?;
    let pid = spawned.pid;

    let mut pumps = JoinSet::new();
    let outputs = [
        (spawned.child.stdout.take().map(OwnedFd::from), FLAG_STDOUT),
        (spawned.child.stderr.take().map(OwnedFd::from), FLAG_STDERR),
    ];
    for (fd, flag) in outputs {
        let Some(fd) = fd else { continue };
        match pipe::Receiver::from_owned_fd(fd) {
            Ok(receiver) => {
                pumps.spawn(pump_output(receiver, flag, stream, sink.clone()));
            }
            Err(err) => log!("stream {stream}: output pipe: {err}"),
        }
    }
    // Aborted when this function returns or is dropped.
    let mut stdin_feeder = JoinSet::new();
    match spawned.child.stdin.take().map(OwnedFd::from) {
        Some(fd) => match pipe::Sender::from_owned_fd(fd) {
            Ok(stdin) => {
                stdin_feeder.spawn(feed_stdin(stdin, inbox));
            }
            Err(err) => log!("stream {stream}: stdin pipe: {err}"),
        },
        // No stdin: host data for this stream is dropped.
        None => drop(inbox),
    }

    let deadline = request
        .timeout_ms
        .and_then(|ms| Instant::now().checked_add(Duration::from_millis(ms)));
    let mut timed_out = false;
    let mut exited = spawned.exited;
    let status = loop {
        let timer = async {
            match deadline {
                Some(deadline) if !timed_out => tokio::time::sleep_until(deadline).await,
                _ => std::future::pending().await,
            }
        };
        tokio::select! {
            status = &mut exited => break status.ok(),
            () = timer => {
                timed_out = true;
                if let Err(err) = sys::kill(-pid, libc::SIGKILL) {
                    log!("stream {stream}: killing timed-out process {pid}: {err}");
                }
            }
        }
    };
    // Reaped: its pid may be reused from now on, so never signal it again.
    guard.disarm();

    let mut closed = Vec::new();
    let grace = tokio::time::sleep(PIPE_GRACE);
    tokio::pin!(grace);
    loop {
        tokio::select! {
            biased;
            joined = pumps.join_next() => match joined {
                Some(Ok(flag)) => closed.push(flag),
                Some(Err(_)) => {}
                None => break,
            },
            () = &mut grace => break,
        }
    }
    pumps.abort_all();
    while let Some(joined) = pumps.join_next().await {
        if let Ok(flag) = joined {
            closed.push(flag);
        }
    }
    for flag in [FLAG_STDOUT, FLAG_STDERR] {
        if !closed.contains(&flag) {
            let eof = Frame::new(stream, FrameKind::Eof, Bytes::new()).with_flags(flag);
            let _ = sink.send(eof).await;
        }
    }

    let (code, signal) = status.map_or((None, None), sys::decode_wait_status);
    let exit = ExitStatus {
        code,
        signal,
        timed_out,
    };
    let _ = sink.send(Frame::json(stream, FrameKind::Exit, &exit)).await;
    Ok(())
}

/// Copies one output pipe into `Data` frames, then sends its `Eof`. Returns the
/// flag once the `Eof` has been queued.
async fn pump_output(mut pipe: pipe::Receiver, flag: u8, stream: u32, sink: FrameSink) -> u8 {
    loop {
        let mut chunk = BytesMut::with_capacity(OUTPUT_CHUNK);
        match pipe.read_buf(&mut chunk).await {
            Ok(0) => break,
            Ok(_) => {
                let data = Frame::new(stream, FrameKind::Data, chunk.freeze()).with_flags(flag);
                if sink.send(data).await.is_err() {
                    return flag;
                }
            }
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => {
                log!("stream {stream}: reading output: {err}");
                break;
            }
        }
    }
    let eof = Frame::new(stream, FrameKind::Eof, Bytes::new()).with_flags(flag);
    let _ = sink.send(eof).await;
    flag
}

/// Writes host `Data` to the process's stdin; closes it on the host's `Eof`.
async fn feed_stdin(mut stdin: pipe::Sender, mut inbox: mpsc::Receiver<Frame>) {
    while let Some(frame) = inbox.recv().await {
        match frame.kind {
            FrameKind::Data => {
                if let Err(err) = stdin.write_all(&frame.payload).await {
                    if err.kind() != io::ErrorKind::BrokenPipe {
                        log!("writing to stdin: {err}");
                    }
                    return;
                }
            }
            FrameKind::Eof => return,
            _ => {}
        }
    }
}

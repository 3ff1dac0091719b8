//! Whole-system requests: uptime, clock and entropy after a restore, power-off.

use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

use hearth_proto::{ErrorKind, Reply, RestoredRequest};

use crate::stream::{Agent, FrameSink, SessionError, StreamFailure};
use crate::{log, sys};

/// Most entropy accepted in one `Restored` request.
const MAX_ENTROPY_BYTES: usize = 4096;
/// How long processes get between SIGTERM and SIGKILL at shutdown.
const TERM_GRACE: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum SystemError {
    #[error("entropy is not valid hex")]
    BadEntropy,
    #[error("entropy of {0} bytes exceeds the limit of {MAX_ENTROPY_BYTES}")]
    TooMuchEntropy(usize),
    #[error("reading the clock: {0}")]
    Clock(io::Error),
    #[error("{0}")]
    Session(#[from] SessionError),
}

impl StreamFailure for SystemError {
    fn kind(&self) -> ErrorKind {
        match self {
            Self::BadEntropy | Self::TooMuchEntropy(_) => ErrorKind::InvalidRequest,
            Self::Clock(_) | Self::Session(_) => ErrorKind::Internal,
        }
    }
}

/// System uptime (CLOCK_BOOTTIME) in milliseconds; the agent's own age if that
/// clock cannot be read.
pub fn uptime_ms(agent: &Agent) -> u64 {
    match sys::clock_ns(libc::CLOCK_BOOTTIME) {
        Ok(ns) => ns / 1_000_000,
        Err(_) => u64::try_from(agent.started.elapsed().as_millis()).unwrap_or(u64::MAX),
    }
}

/// Handles `Restored`: set the wall clock to the host's, feed and reseed the RNG
/// (clones of one snapshot must not share random state). Only as PID 1: in test
/// mode the agent runs on the host and must not touch its clock or pool.
pub async fn restored(
    stream: u32,
    request: RestoredRequest,
    sink: &FrameSink,
    agent: &Agent,
) -> Result<(), SystemError> {
    let entropy = hex::decode(request.entropy_hex.trim()).map_err(|_| SystemError::BadEntropy)?;
    if entropy.len() > MAX_ENTROPY_BYTES {
        return Err(SystemError::TooMuchEntropy(entropy.len()));
    }
    let previous_time_ns = sys::clock_ns(libc::CLOCK_REALTIME).map_err(SystemError::Clock)?;
    if agent.is_init {
        if let Err(err) = sys::set_realtime_ns(request.unix_time_ns) {
            log!("setting the clock: {err}");
        }
        add_entropy(&entropy);
    } else {
        log!("not PID 1: leaving the clock and entropy pool alone");
    }
    sink.reply(stream, &Reply::Restored { previous_time_ns })
        .await?;
    Ok(())
}

fn add_entropy(entropy: &[u8]) {
    let random = match std::fs::OpenOptions::new().write(true).open("/dev/urandom") {
        Ok(random) => random,
        Err(err) => {
            log!("opening /dev/urandom: {err}");
            return;
        }
    };
    if !entropy.is_empty() {
        if let Err(err) = sys::add_entropy(&random, entropy) {
            log!("RNDADDENTROPY: {err}");
        }
    }
    if let Err(err) = sys::reseed_crng(&random) {
        log!("RNDRESEEDCRNG: {err}");
    }
}

/// Handles `Shutdown`: acknowledge, then (as PID 1) stop every process, sync and
/// power off. Outside a VM the agent just exits.
/// sync(2) off the runtime's threads (it can take seconds), then `Synced`.
pub async fn sync(stream: u32, sink: &FrameSink) -> Result<(), SystemError> {
    let _ = tokio::task::spawn_blocking(sys::sync).await;
    sink.reply(stream, &Reply::Synced).await?;
    Ok(())
}

pub async fn shutdown(stream: u32, sink: &FrameSink, agent: &Agent) -> Result<(), SystemError> {
    sink.reply(stream, &Reply::ShuttingDown).await?;
    sink.flush().await?;
    if !agent.is_init {
        log!("shutdown requested; exiting");
        std::process::exit(0);
    }
    // A task of its own: the host usually disconnects right after the reply, which
    // drops this stream, and the power-off must not be dropped with it.
    tokio::spawn(power_off());
    Ok(())
}

async fn power_off() {
    log!("shutting down");
    let _ = sys::kill(-1, libc::SIGTERM);
    let started = Instant::now();
    while started.elapsed() < TERM_GRACE && user_processes_remain() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = sys::kill(-1, libc::SIGKILL);
    tokio::time::sleep(Duration::from_millis(50)).await;
    sys::sync();
    if let Err(err) = sys::mount(
        "none",
        Path::new("/"),
        None,
        libc::MS_REMOUNT | libc::MS_RDONLY,
        None,
    ) {
        log!("remounting / read-only: {err}");
    }
    sys::sync();
    let err = sys::power_off();
    // PID 1 must not exit: log and carry on serving.
    log!("power off failed: {err}");
}

/// Whether any process other than us is still alive (kernel threads and zombies
/// have an empty command line and do not count).
fn user_processes_remain() -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    let own_pid = std::process::id();
    entries.flatten().any(|entry| {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|s| s.parse::<u32>().ok()) else {
            return false;
        };
        pid != own_pid
            && std::fs::read(entry.path().join("cmdline")).is_ok_and(|cmdline| !cmdline.is_empty())
    })
}

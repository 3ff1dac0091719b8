//! The agent reaps every child itself. Processes it spawns are registered with a
//! oneshot that receives their wait status; anything else that exits (orphans
//! re-parented to PID 1) is reaped and forgotten. Spawning and reaping share one
//! lock, so a child cannot be reaped before it is registered.

use std::collections::HashMap;
use std::process::{Child, Command};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;

use crate::{log, sys};

/// Raw wait status of a reaped child.
pub type RawStatus = i32;

/// A spawned, registered child.
#[derive(Debug)]
pub struct Spawned {
    pub child: Child,
    pub pid: i32,
    /// Receives the wait status once the reaper collects the child.
    pub exited: oneshot::Receiver<RawStatus>,
}

/// The registry of children the agent is waiting for.
#[derive(Debug, Default)]
pub struct Children {
    waiting: Mutex<HashMap<i32, oneshot::Sender<RawStatus>>>,
}

impl Children {
    fn lock(&self) -> MutexGuard<'_, HashMap<i32, oneshot::Sender<RawStatus>>> {
        // A panic while holding the lock leaves the map consistent (single inserts
        // and removals), so a poisoned lock is still usable.
        self.waiting
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Spawns `command` and registers the child before anyone can reap it.
    /// Blocks for the fork and exec; call from a blocking context.
    pub fn spawn(&self, command: &mut Command) -> std::io::Result<Spawned> {
        let mut waiting = self.lock();
        let child = command.spawn()?;
        let pid = i32::try_from(child.id()).map_err(|_| std::io::Error::other("pid overflow"))?;
        let (sender, exited) = oneshot::channel();
        waiting.insert(pid, sender);
        Ok(Spawned { child, pid, exited })
    }

    /// Collects every exited child, delivering statuses of registered ones.
    pub fn reap(&self) {
        let mut waiting = self.lock();
        loop {
            match sys::reap_any() {
                Ok(Some((pid, status))) => {
                    if let Some(sender) = waiting.remove(&pid) {
                        // The receiver is gone when its stream was dropped; fine.
                        let _ = sender.send(status);
                    }
                }
                Ok(None) => break,
                Err(err) => {
                    log!("waitpid failed: {err}");
                    break;
                }
            }
        }
    }

    /// Signals `pid` if it is still a registered, unreaped child (so a recycled
    /// pid is never hit).
    pub fn signal(&self, pid: i32, signal: i32) -> std::io::Result<()> {
        let waiting = self.lock();
        if waiting.contains_key(&pid) {
            sys::kill(pid, signal)
        } else {
            Err(std::io::Error::from_raw_os_error(libc::ESRCH))
        }
    }

    /// Signals the process group of every registered child.
    pub fn signal_all_groups(&self, signal: i32) {
        let waiting = self.lock();
        for pid in waiting.keys() {
            // ESRCH: the group is already gone.
            let _ = sys::kill(-pid, signal);
        }
    }
}

/// Reaps children forever: on every SIGCHLD, and on a slow tick in case a signal
/// was coalesced or arrived before the handler was installed.
pub async fn run_reaper(children: std::sync::Arc<Children>) {
    let mut sigchld = match signal(SignalKind::child()) {
        Ok(stream) => Some(stream),
        Err(err) => {
            log!("cannot watch SIGCHLD, polling instead: {err}");
            None
        }
    };
    let tick = if sigchld.is_some() {
        Duration::from_millis(500)
    } else {
        Duration::from_millis(20)
    };
    loop {
        match sigchld.as_mut() {
            Some(stream) => {
                tokio::select! {
                    _ = stream.recv() => {}
                    _ = tokio::time::sleep(tick) => {}
                }
            }
            None => tokio::time::sleep(tick).await,
        }
        children.reap();
    }
}

/// As PID 1, passes termination-type signals on to every exec'd process group
/// instead of letting them vanish (PID 1 ignores signals it has no handler for).
pub async fn forward_signals(children: std::sync::Arc<Children>) {
    let kinds = [
        libc::SIGTERM,
        libc::SIGINT,
        libc::SIGHUP,
        libc::SIGQUIT,
        libc::SIGUSR1,
        libc::SIGUSR2,
    ];
    let mut tasks = tokio::task::JoinSet::new();
    for number in kinds {
        let children = children.clone();
        match signal(SignalKind::from_raw(number)) {
            Ok(mut stream) => {
                tasks.spawn(async move {
                    while stream.recv().await.is_some() {
                        log!("forwarding signal {number} to exec'd processes");
                        children.signal_all_groups(number);
                    }
                });
            }
            Err(err) => log!("cannot watch signal {number}: {err}"),
        }
    }
    while tasks.join_next().await.is_some() {}
}

//! A warm pool: clones of one snapshot prepared ahead of time and refilled in the
//! background, so that a launch does not pay for starting QEMU (about 100 ms
//! under TCG). Two depths of preparation ([`PoolMode`]):
//!
//! - `Deferred`: QEMU started and waiting in `-incoming defer`; a launch loads the
//!   snapshot's state (a few ms), runs the guest and greets its agent.
//! - `Prewarmed`: the state is already loaded, the agent greeted and one command
//!   run, then the VM is paused. Under TCG a new QEMU process starts with an empty
//!   translation cache, and translating the guest's exec path dominates the first
//!   command (about 120 ms of it). A launch resumes the paused VM and sends
//!   `restored` (clock, RNG reseed), so no two clones share RNG state.
//!
//! A slot lives in `vms/.pool-ID/`; when launched as NAME it keeps that directory
//! (QEMU reopens its disk by path) and `vms/NAME` becomes a symlink to it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tracing::warn;

use crate::agent::AgentClient;
use crate::driver::{Driver, VmError};
use crate::qemu::{new_instance_id, BootGuard, QemuDriver};
use crate::qmp::Qmp;
use crate::record::{validate_name, VmRecord, POOL_SLOT_PREFIX};
use crate::slot::Prewarmed;
use crate::snapshot::Snapshot;

impl QemuDriver {
    /// Restores a new slot of `snapshot`, runs one command in it and pauses it.
    pub(crate) async fn prewarm_slot(&self, snapshot: &Snapshot) -> Result<Prewarmed, VmError> {
        let name = format!("{POOL_SLOT_PREFIX}{}", new_instance_id());
        let (vm, mut qmp) = self.prepare_clone(snapshot, &name, true, true).await?;
        // Ends the slot's QEMU if this future is dropped mid-way (a server
        // shutting down while it refills): nothing else knows of it yet.
        let mut guard = BootGuard {
            network: self.network().cloned(),
            process: vm.pid.map(|pid| (pid, vm.instance.clone())),
            paths: vec![vm.dir.clone()],
        };
        let warmed = async {
            let agent = self.restore_clone(&vm, &mut qmp, snapshot).await?;
            // One command translates the guest's exec path into QEMU's cache.
            agent
                .exec_output(hearth_proto::ExecRequest {
                    argv: vec!["true".into()],
                    ..Default::default()
                })
                .await?;
            qmp.stop().await?;
            Ok::<_, VmError>(agent)
        }
        .await;
        guard.disarm();
        match warmed {
            Ok(agent) => Ok(Prewarmed { vm, agent, qmp }),
            Err(err) => {
                let _ = self.remove(&vm).await;
                Err(err)
            }
        }
    }

    /// Launches a prewarmed slot as VM `name` (see [`Driver::launch_prewarmed`]).
    pub(crate) async fn launch_prewarmed_slot(
        &self,
        slot: Prewarmed,
        name: &str,
    ) -> Result<(VmRecord, AgentClient), VmError> {
        let Prewarmed {
            mut vm,
            agent,
            mut qmp,
        } = slot;
        if !validate_name(name) {
            let _ = self.remove(&vm).await;
            return Err(VmError::BadName(name.into()));
        }
        if !self.is_alive(&vm) {
            let log = crate::qemu::read_tail(&vm.qemu_log());
            let _ = self.remove(&vm).await;
            return Err(VmError::QemuDied { log });
        }
        // `vms/NAME -> .pool-ID`: the slot's directory never moves.
        let link = self.assets().vms_dir().join(name);
        let slot_dir_name = vm
            .dir
            .file_name()
            .map(|n| n.to_os_string())
            .unwrap_or_default();
        if let Err(err) = std::os::unix::fs::symlink(&slot_dir_name, &link) {
            let _ = self.remove(&vm).await;
            return Err(if err.kind() == std::io::ErrorKind::AlreadyExists {
                VmError::Exists(name.into())
            } else {
                VmError::Io(link, err)
            });
        }
        vm.name = name.to_string();
        // The record's two fsyncs run beside `cont` + `restored` (off the async
        // workers), not before them: nothing about the slot's process changes
        // but its name, and the launch waits for both.
        let record = {
            let (driver, vm) = (self.clone(), vm.clone());
            tokio::task::spawn_blocking(move || driver.save(&vm))
        };
        let resumed = async {
            qmp.cont().await?;
            agent.restored().await?;
            Ok::<_, VmError>(())
        };
        let (saved, resumed) = tokio::join!(record, resumed);
        let launched = saved
            .map_err(|_| VmError::Io(vm.dir.clone(), std::io::Error::other("record task failed")))
            .and_then(|saved| saved)
            .and(resumed);
        match launched {
            Ok(()) => Ok((vm, agent)),
            Err(err) => {
                let _ = self.remove(&vm).await;
                Err(err)
            }
        }
    }
}

/// How far pool slots are prepared; see the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolMode {
    Deferred,
    Prewarmed,
}

/// Whether a launch found a warm process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LaunchPath {
    Warm,
    Cold,
}

#[derive(Debug)]
struct Slot {
    vm: VmRecord,
    qmp: Qmp,
    /// Set for prewarmed slots: the VM is paused with its agent connected.
    agent: Option<AgentClient>,
}

#[derive(Debug)]
struct Shared {
    driver: QemuDriver,
    snapshot: Snapshot,
    mode: PoolMode,
    target: usize,
    slots: Mutex<VecDeque<Slot>>,
    /// Slots being prepared right now.
    filling: Mutex<usize>,
    wake: Notify,
    filled: Notify,
    /// Set by `shutdown`: the refiller finishes the slot it is preparing (so
    /// nothing is left half-created on disk) and exits.
    closing: AtomicBool,
}

/// A pool of prepared clones of one snapshot.
#[derive(Debug)]
pub struct WarmPool {
    shared: Arc<Shared>,
    refiller: tokio::task::JoinHandle<()>,
}

impl WarmPool {
    /// Starts a pool that keeps `size` processes ready (0: every launch is cold).
    pub fn new(driver: QemuDriver, snapshot: Snapshot, mode: PoolMode, size: usize) -> Self {
        let shared = Arc::new(Shared {
            driver,
            snapshot,
            mode,
            target: size,
            slots: Mutex::default(),
            filling: Mutex::new(0),
            wake: Notify::new(),
            filled: Notify::new(),
            closing: AtomicBool::new(false),
        });
        let refiller = tokio::spawn(refill(shared.clone()));
        shared.wake.notify_one();
        Self { shared, refiller }
    }

    /// Processes ready now.
    pub fn ready(&self) -> usize {
        lock(&self.shared.slots).len()
    }

    /// Waits until the pool holds its target number of processes.
    pub async fn wait_full(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.ready() < self.shared.target {
            let notified = self.shared.filled.notified();
            if self.ready() >= self.shared.target {
                break;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return false;
            }
        }
        true
    }

    /// Launches VM `name` from the pool's snapshot, from a warm process when one
    /// is ready, and returns it with a connected agent.
    pub async fn launch(&self, name: &str) -> Result<(VmRecord, AgentClient, LaunchPath), VmError> {
        if !validate_name(name) {
            return Err(VmError::BadName(name.into()));
        }
        let slot = lock(&self.shared.slots).pop_front();
        self.shared.wake.notify_one();
        let driver = &self.shared.driver;
        let Some(Slot {
            mut vm,
            mut qmp,
            agent,
        }) = slot
        else {
            let (vm, agent) = driver
                .launch_with_agent(&self.shared.snapshot, name)
                .await?;
            return Ok((vm, agent, LaunchPath::Cold));
        };
        // Give the slot its name with a symlink `vms/NAME -> .pool-ID`. The slot's
        // directory itself never moves: QEMU reopens its disk by path when the
        // restored VM starts running.
        let link = driver.assets().vms_dir().join(name);
        let slot_dir_name = vm
            .dir
            .file_name()
            .map(|n| n.to_os_string())
            .unwrap_or_default();
        if let Err(err) = std::os::unix::fs::symlink(&slot_dir_name, &link) {
            lock(&self.shared.slots).push_front(Slot { vm, qmp, agent });
            return Err(if err.kind() == std::io::ErrorKind::AlreadyExists {
                VmError::Exists(name.into())
            } else {
                VmError::Io(link, err)
            });
        }
        vm.name = name.to_string();
        let launched = async {
            driver.save(&vm)?;
            match agent {
                Some(agent) => {
                    qmp.cont().await?;
                    agent.restored().await?;
                    Ok(agent)
                }
                None => {
                    driver
                        .restore_clone(&vm, &mut qmp, &self.shared.snapshot)
                        .await
                }
            }
        }
        .await;
        match launched {
            Ok(agent) => Ok((vm, agent, LaunchPath::Warm)),
            Err(err) => {
                let _ = driver.remove(&vm).await;
                Err(err)
            }
        }
    }

    /// Stops the refiller and removes every prepared process. A slot being
    /// prepared is finished first rather than abandoned mid-way: aborting the
    /// refiller there would leave a QEMU process and its directory behind.
    pub async fn shutdown(self) {
        self.shared.closing.store(true, Ordering::SeqCst);
        self.shared.wake.notify_one();
        let mut refiller = self.refiller;
        if tokio::time::timeout(SHUTDOWN_GRACE, &mut refiller)
            .await
            .is_err()
        {
            warn!("warm pool refiller did not stop in time; aborting it");
            refiller.abort();
            let _ = refiller.await;
        }
        let slots: Vec<Slot> = lock(&self.shared.slots).drain(..).collect();
        for slot in slots {
            let _ = self.shared.driver.remove(&slot.vm).await;
        }
    }
}

/// How long `shutdown` waits for a slot in preparation.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(60);

async fn refill(shared: Arc<Shared>) {
    loop {
        shared.wake.notified().await;
        loop {
            if shared.closing.load(Ordering::SeqCst) {
                return;
            }
            {
                let ready = lock(&shared.slots).len();
                let mut filling = lock(&shared.filling);
                if ready + *filling >= shared.target {
                    break;
                }
                *filling += 1;
            }
            let name = format!("{POOL_SLOT_PREFIX}{}", new_instance_id());
            let prepared = prepare_slot(&shared, &name).await;
            *lock(&shared.filling) -= 1;
            match prepared {
                Ok(slot) => {
                    lock(&shared.slots).push_back(slot);
                    shared.filled.notify_waiters();
                }
                Err(err) => {
                    warn!(error = %err, "warm pool could not prepare a process");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = shared.wake.notified() => {}
                    }
                }
            }
        }
    }
}

async fn prepare_slot(shared: &Shared, name: &str) -> Result<Slot, VmError> {
    let driver = &shared.driver;
    let (vm, mut qmp) = driver
        .prepare_clone(&shared.snapshot, name, true, true)
        .await?;
    if shared.mode == PoolMode::Deferred {
        return Ok(Slot {
            vm,
            qmp,
            agent: None,
        });
    }
    // Ends the slot's QEMU if this future is dropped mid-way (a shutdown that
    // ran out of patience aborts the refiller): nothing else knows of it yet.
    let mut guard = BootGuard {
        network: driver.network().cloned(),
        process: vm.pid.map(|pid| (pid, vm.instance.clone())),
        paths: vec![vm.dir.clone()],
    };
    let warmed = async {
        let agent = driver
            .restore_clone(&vm, &mut qmp, &shared.snapshot)
            .await?;
        // One command translates the guest's exec path into QEMU's cache.
        agent
            .exec_output(hearth_proto::ExecRequest {
                argv: vec!["true".into()],
                ..Default::default()
            })
            .await?;
        qmp.stop().await?;
        Ok::<_, VmError>(agent)
    }
    .await;
    guard.disarm();
    match warmed {
        Ok(agent) => Ok(Slot {
            vm,
            qmp,
            agent: Some(agent),
        }),
        Err(err) => {
            let _ = driver.remove(&vm).await;
            Err(err)
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

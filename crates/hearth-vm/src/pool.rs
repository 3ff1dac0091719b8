//! A warm pool: QEMU processes for one snapshot started ahead of time and waiting
//! in `-incoming defer`, so that a launch pays only the state load (milliseconds)
//! and not the QEMU start (about 100 ms under TCG). Refilled in the background.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tracing::warn;

use crate::agent::AgentClient;
use crate::qemu::{new_instance_id, QemuDriver, VmError};
use crate::qmp::Qmp;
use crate::snapshot::Snapshot;
use crate::{validate_name, Driver, VmRecord};

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
}

#[derive(Debug)]
struct Shared {
    driver: QemuDriver,
    snapshot: Snapshot,
    target: usize,
    slots: Mutex<VecDeque<Slot>>,
    /// Slots being prepared right now.
    filling: Mutex<usize>,
    wake: Notify,
    filled: Notify,
}

/// A pool of prepared clones of one snapshot.
#[derive(Debug)]
pub struct WarmPool {
    shared: Arc<Shared>,
    refiller: tokio::task::JoinHandle<()>,
}

impl WarmPool {
    /// Starts a pool that keeps `size` processes ready (0: every launch is cold).
    pub fn new(driver: QemuDriver, snapshot: Snapshot, size: usize) -> Self {
        let shared = Arc::new(Shared {
            driver,
            snapshot,
            target: size,
            slots: Mutex::default(),
            filling: Mutex::new(0),
            wake: Notify::new(),
            filled: Notify::new(),
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
        let Some(Slot { mut vm, mut qmp }) = slot else {
            let (vm, agent) = driver
                .launch_with_agent(&self.shared.snapshot, name)
                .await?;
            return Ok((vm, agent, LaunchPath::Cold));
        };
        // Give the slot its name with a symlink `vms/NAME -> .pool-ID`. The slot's
        // directory itself never moves: QEMU reopens its disk by path when the
        // restored VM starts running.
        let link = driver.assets().vms_dir().join(name);
        let slot_dir_name = vm.dir.file_name().map(|n| n.to_os_string()).unwrap_or_default();
        if let Err(err) = std::os::unix::fs::symlink(&slot_dir_name, &link) {
            lock(&self.shared.slots).push_front(Slot { vm, qmp });
            return Err(if err.kind() == std::io::ErrorKind::AlreadyExists {
                VmError::Exists(name.into())
            } else {
                VmError::Io(link, err)
            });
        }
        vm.name = name.to_string();
        let launched = async {
            driver.save(&vm)?;
            driver
                .restore_clone(&vm, &mut qmp, &self.shared.snapshot)
                .await
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

    /// Stops the refiller and removes every prepared process.
    pub async fn shutdown(self) {
        self.refiller.abort();
        let _ = self.refiller.await;
        let slots: Vec<Slot> = lock(&self.shared.slots).drain(..).collect();
        for slot in slots {
            let _ = self.shared.driver.remove(&slot.vm).await;
        }
    }
}

async fn refill(shared: Arc<Shared>) {
    loop {
        shared.wake.notified().await;
        loop {
            {
                let ready = lock(&shared.slots).len();
                let mut filling = lock(&shared.filling);
                if ready + *filling >= shared.target {
                    break;
                }
                *filling += 1;
            }
            let name = format!(".pool-{}", new_instance_id());
            let prepared = shared
                .driver
                .prepare_clone(&shared.snapshot, &name, true)
                .await;
            *lock(&shared.filling) -= 1;
            match prepared {
                Ok((vm, qmp)) => {
                    lock(&shared.slots).push_back(Slot { vm, qmp });
                    shared.filled.notify_waiters();
                }
                Err(err) => {
                    warn!(error = %err, "warm pool could not prepare a process");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

//! The server's side of the VM layer: runs, suspends, resumes and terminates
//! the VMs behind microVM records, reconciles records with processes at start,
//! and enforces lifetimes.
//!
//! Every change follows one pattern: the API handler moves the record to a
//! transitional state (PENDING, SUSPENDING, TERMINATING) with a compare-and-set,
//! then a task here does the work under the VM's lock and moves the record on.
//! The record is written before the VM changes, so after a crash
//! [`Engine::reconcile`] (in [`super::reconcile`]) can tell what was in
//! flight and finish or undo it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hearth_vm::agent::AgentClient;
use hearth_vm::error_chain;
use hearth_vm::{Driver, Snapshot, Verify, VmError, VmState};
use serde_json::json;
use tokio::sync::Mutex as AsyncMutex;
use tracing::{debug, info, warn};

use crate::db::records::MicrovmRow;
use crate::db::resources::{MicrovmState, VersionState, VersionStatus};
use crate::db::spec::{HookCall, RuntimeHook};
use crate::db::store::{unix_now_ms, Store, StoreError};
use crate::db::usage::Increment;
use crate::pricing::UsageType;
use crate::vms::hooks::{self, HookError};
use crate::vms::meter;
use crate::vms::pool::{available_mib, PoolKey, PoolSettings, WarmPools};

/// How often lifetimes and VM processes are checked.
const WATCH_INTERVAL: Duration = Duration::from_secs(1);
/// How often the pool refiller looks again when it has nothing to do.
const POOL_TICK: Duration = Duration::from_secs(1);
/// How long [`Engine::shutdown_pools`] waits for a slot in preparation.
const POOL_SHUTDOWN_GRACE: Duration = Duration::from_secs(60);
/// How many watch ticks apart running VMs are checked for a pause on a disk
/// write error.
const IO_CHECK_TICKS: u64 = 5;
/// How long an adopted VM's agent may take to answer after a restart.
pub(super) const ADOPT_TIMEOUT: Duration = Duration::from_secs(5);
/// The reason of a launch that could not start its VM (also after a restart).
pub(super) const LAUNCH_FAILED: &str =
    "Launch failed: the MicroVM could not be started from its image snapshot.";

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("microVM {0} is not running")]
    NotRunning(String),
    #[error("guest agent failed")]
    Agent(#[from] hearth_vm::AgentError),
}

#[derive(Debug)]
pub struct Engine {
    pub(super) driver: Arc<dyn Driver>,
    pub(super) store: Store,
    /// One agent connection per running VM (QEMU's chardev serves one at a time).
    pub(super) agents: Mutex<HashMap<String, Arc<AgentClient>>>,
    /// Serialises the work on each VM.
    locks: Mutex<HashMap<String, Arc<AsyncMutex<()>>>>,
    /// Opened (size-checked) snapshots by directory.
    snapshots: Mutex<HashMap<PathBuf, Snapshot>>,
    /// Latest endpoint traffic per microVM (unix ms), not yet written to the store.
    activity: Mutex<HashMap<String, i64>>,
    /// Egress of microVMs that name no egress connector (`--default-egress`).
    default_egress: AtomicBool,
    /// Prewarmed VMs per image version ([`Self::run_pools`] fills them).
    pub pools: WarmPools,
    /// Watch ticks so far.
    ticks: AtomicU64,
    /// Whether launches, resumes and suspends record their snapshot
    /// transfers (always in `hearth serve`; `hearth bench api` turns it off
    /// for half its launches to measure what metering adds).
    metering: AtomicBool,
}

impl Engine {
    pub fn new(driver: Arc<dyn Driver>, store: Store) -> Arc<Self> {
        Arc::new(Self {
            driver,
            store,
            agents: Mutex::default(),
            locks: Mutex::default(),
            snapshots: Mutex::default(),
            activity: Mutex::default(),
            default_egress: AtomicBool::new(true),
            pools: WarmPools::new(PoolSettings::default()),
            ticks: AtomicU64::new(0),
            metering: AtomicBool::new(true),
        })
    }

    /// Turns the recording of snapshot transfers on or off (benchmarks).
    pub fn set_metering(&self, on: bool) {
        self.metering.store(on, Ordering::Relaxed);
    }

    /// `transfer` as the increments a state change commits: none while
    /// metering is off.
    fn metered(&self, transfer: Increment) -> Vec<Increment> {
        if self.metering.load(Ordering::Relaxed) {
            vec![transfer]
        } else {
            Vec::new()
        }
    }

    /// Sets the egress of microVMs that name no egress connector.
    pub fn set_default_egress(&self, egress: bool) {
        self.default_egress.store(egress, Ordering::Relaxed);
    }

    /// The driver, for the layers that keep a handle (capacity admission).
    pub fn shared_driver(&self) -> Arc<dyn Driver> {
        self.driver.clone()
    }

    pub fn driver(&self) -> &dyn Driver {
        self.driver.as_ref()
    }

    pub(super) fn lock_for(&self, id: &str) -> Arc<AsyncMutex<()>> {
        lock(&self.locks)
            .entry(id.to_string())
            .or_insert_with(|| Arc::new(AsyncMutex::new(())))
            .clone()
    }

    fn forget(&self, id: &str) {
        lock(&self.agents).remove(id);
        lock(&self.locks).remove(id);
    }

    fn snapshot(&self, dir: &Path) -> Result<Snapshot, EngineError> {
        if let Some(snapshot) = lock(&self.snapshots).get(dir) {
            return Ok(snapshot.clone());
        }
        let snapshot = Snapshot::open(dir, Verify::Sizes).map_err(VmError::from)?;
        lock(&self.snapshots).insert(dir.to_path_buf(), snapshot.clone());
        Ok(snapshot)
    }

    /// Drops a cached snapshot whose files are being removed, and its warm pool.
    pub fn forget_snapshot(&self, dir: &Path) {
        lock(&self.snapshots).remove(dir);
        self.drain_pool(dir);
    }

    /// Ends the warm pool of a snapshot (its version is deleted or INACTIVE).
    /// The slots' processes end in the background.
    pub fn drain_pool(&self, snapshot_dir: &Path) {
        let slots = self.pools.drain_snapshot(snapshot_dir);
        if slots.is_empty() {
            return;
        }
        info!(snapshot = %snapshot_dir.display(), slots = slots.len(), "draining warm pool");
        let driver = self.driver.clone();
        tokio::spawn(async move {
            for slot in slots {
                driver.discard_prewarmed(slot).await;
            }
        });
    }

    /// The warm pool a launch of `row` may take from.
    fn pool_key(row: &MicrovmRow, snapshot_dir: &Path) -> PoolKey {
        PoolKey {
            account_id: row.account_id.clone(),
            image_name: row.image_name.clone(),
            version: row.image_version,
            snapshot_dir: snapshot_dir.to_path_buf(),
        }
    }

    /// Starts VM `row.vm_name`: from a prewarmed slot of its version when one
    /// is ready (a dead slot is discarded and the next tried), else cold.
    async fn start_vm(
        &self,
        row: &MicrovmRow,
        snapshot_dir: &Path,
    ) -> Result<(hearth_vm::VmRecord, AgentClient, u64), EngineError> {
        let snapshot = self.snapshot(snapshot_dir)?;
        // What a launch reads: the memory the snapshot stores (a sparse
        // file's holes are never read) and the device state.
        let read = meter::stored_bytes(&snapshot.memory())
            + std::fs::metadata(snapshot.state()).map_or(0, |m| m.len());
        let egress = row.spec.egress(self.default_egress.load(Ordering::Relaxed));
        // Slots are prepared with egress, the default; a VM without it starts
        // cold so it never runs a moment with a network it must not have.
        let key = Self::pool_key(row, snapshot_dir);
        while let Some(slot) = egress
            .then(|| self.pools.take(&key, u64::from(row.memory_mib)))
            .flatten()
        {
            match self.driver.launch_prewarmed(slot, &row.vm_name).await {
                Ok((vm, agent)) => {
                    debug!(microvm = %row.microvm_id, "launched from the warm pool");
                    self.pools.count_launch(true);
                    return Ok((vm, agent, read));
                }
                // The name is taken: a cold launch would fail the same way.
                Err(err @ VmError::Exists(_)) => return Err(err.into()),
                Err(err) => {
                    warn!(microvm = %row.microvm_id, error = %error_chain(&err), "warm pool slot unusable; discarded");
                }
            }
        }
        self.pools.count_launch(false);
        let (vm, agent) = self
            .driver
            .launch_with_egress(&snapshot, &row.vm_name, egress)
            .await?;
        Ok((vm, agent, read))
    }

    /// Empties every pool and stops refilling them (the server is going away,
    /// or a test ends): no slot's QEMU is left behind.
    pub async fn shutdown_pools(&self) {
        self.pools.set_settings(PoolSettings {
            max_total: 0,
            ..self.pools.settings()
        });
        let deadline = std::time::Instant::now() + POOL_SHUTDOWN_GRACE;
        // A slot being prepared is finished and then discarded by its refiller
        // (its pool may already be gone, so `filling` is not enough).
        while self.pools.refills_in_hand() > 0 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for slot in self.pools.drain_all() {
            self.driver.discard_prewarmed(slot).await;
        }
        // Slots never outlive the server (a restart starts its pools afresh),
        // so any slot QEMU the bookkeeping no longer holds ends here too. A
        // slot launched as a microVM runs from the same directory, named by
        // the microVM's link: those stay.
        let launched: std::collections::HashSet<String> = self
            .driver
            .vm_names()
            .into_iter()
            .filter(|name| !hearth_vm::is_pool_slot_name(name))
            .filter_map(|name| self.driver.load(&name).ok())
            .filter_map(|vm| Some(vm.dir.file_name()?.to_string_lossy().into_owned()))
            .collect();
        let mut ended = Vec::new();
        for process in self.driver.processes() {
            if hearth_vm::is_pool_slot_name(&process.vm) && !launched.contains(&process.vm) {
                warn!(vm = %process.vm, pid = process.pid, "ending a warm pool slot no pool holds");
                self.driver.kill_process(&process);
                ended.push(process.pid);
            }
        }
        // SIGKILL is not instant (a QEMU unmaps its memory first): wait a
        // little so that whoever called this finds them gone.
        for _ in 0..50 {
            let alive = self.driver.processes();
            if !alive.iter().any(|p| ended.contains(&p.pid)) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Runs forever: keeps the warm pools at their targets (one slot at a
    /// time: preparing one costs a QEMU start and a restore), drops pools
    /// whose demand ended, dead slots, and slots when host memory runs short.
    pub async fn run_pools(self: Arc<Self>) {
        loop {
            let now = std::time::Instant::now();
            let mut gone = self.pools.expire(now);
            gone.extend(self.pools.take_dead(|vm| self.driver.is_alive(vm)));
            for slot in gone {
                self.driver.discard_prewarmed(slot).await;
            }
            let quiet_in = self.pools.quiet_in(now);
            if !quiet_in.is_zero() {
                tokio::time::sleep(quiet_in).await;
                continue;
            }
            let settings = self.pools.settings();
            if available_mib().is_some_and(|mib| mib < settings.min_available_mib) {
                if let Some(slot) = self.pools.shrink_one() {
                    info!("host memory is short: discarding a warm pool slot");
                    self.driver.discard_prewarmed(slot).await;
                    continue;
                }
                self.pool_idle().await;
                continue;
            }
            let Some(ticket) = self.pools.next_fill(now) else {
                self.pool_idle().await;
                continue;
            };
            let slot = self.prepare_slot(&ticket.key).await;
            let failed = slot.is_none();
            if let Some(unwanted) = self.pools.finish_fill(&ticket, slot) {
                self.driver.discard_prewarmed(unwanted).await;
            }
            self.pools.refill_ended();
            if failed {
                // Not in a tight loop: the snapshot may be gone or the host short.
                self.pool_idle().await;
            }
        }
    }

    async fn pool_idle(&self) {
        tokio::select! {
            _ = tokio::time::sleep(POOL_TICK) => {}
            _ = self.pools.wake.notified() => {}
        }
    }

    /// Prepares one slot of `key`'s version if it may still run microVMs.
    async fn prepare_slot(&self, key: &PoolKey) -> Option<hearth_vm::Prewarmed> {
        let (store, account, image, version) = (
            self.store.clone(),
            key.account_id.clone(),
            key.image_name.clone(),
            key.version,
        );
        let row = store
            .blocking(move |store| store.version(&account, &image, version))
            .await
            .ok()??;
        let runnable = row.status == VersionStatus::Active
            && row.state == VersionState::Successful
            && row.snapshot_dir.as_deref() == Some(key.snapshot_dir.as_path());
        if !runnable {
            return None;
        }
        let snapshot = self.snapshot(&key.snapshot_dir).ok()?;
        match self.driver.prewarm(&snapshot).await {
            Ok(slot) => Some(slot),
            Err(VmError::Unsupported(_)) => None,
            Err(err) => {
                warn!(image = %key.image_name, version = key.version, error = %error_chain(&err), "cannot prepare a warm pool slot");
                None
            }
        }
    }

    /// After a restart: versions launched within the demand window get their
    /// pools back (slots themselves do not survive a restart).
    pub fn seed_pool_demand(&self) -> Result<(), EngineError> {
        let window = self.pools.settings().demand_window;
        let since = unix_now_ms() - i64::try_from(window.as_millis()).unwrap_or(i64::MAX);
        for (account, image, version, memory_mib) in self.store.recent_launches(since)? {
            let Some(row) = self.store.version(&account, &image, version)? else {
                continue;
            };
            let Some(snapshot_dir) = row.snapshot_dir else {
                continue;
            };
            if row.status != VersionStatus::Active {
                continue;
            }
            self.pools.note_demand(
                &PoolKey {
                    account_id: account,
                    image_name: image,
                    version,
                    snapshot_dir,
                },
                u64::from(memory_mib),
            );
        }
        Ok(())
    }

    /// The agent of a RUNNING microVM, connecting when there is none yet.
    pub async fn agent(&self, row: &MicrovmRow) -> Result<Arc<AgentClient>, EngineError> {
        if let Some(agent) = lock(&self.agents).get(&row.microvm_id) {
            return Ok(agent.clone());
        }
        let guard = self.lock_for(&row.microvm_id);
        let _held = guard.lock().await;
        if let Some(agent) = lock(&self.agents).get(&row.microvm_id) {
            return Ok(agent.clone());
        }
        let id = row.microvm_id.clone();
        let current = self
            .store
            .blocking(move |store| store.microvm_by_id(&id))
            .await?;
        if current.map(|r| r.state) != Some(MicrovmState::Running) {
            return Err(EngineError::NotRunning(row.microvm_id.clone()));
        }
        let vm = self.driver.load(&row.vm_name)?;
        let agent = Arc::new(self.driver.agent(&vm).await?);
        lock(&self.agents).insert(row.microvm_id.clone(), agent.clone());
        Ok(agent)
    }

    /// The agent of a VM whose process runs, for a caller holding its lock.
    async fn agent_unlocked(&self, row: &MicrovmRow) -> Result<Arc<AgentClient>, EngineError> {
        if let Some(agent) = lock(&self.agents).get(&row.microvm_id) {
            return Ok(agent.clone());
        }
        let vm = self.driver.load(&row.vm_name)?;
        let agent = Arc::new(self.driver.agent(&vm).await?);
        lock(&self.agents).insert(row.microvm_id.clone(), agent.clone());
        Ok(agent)
    }

    /// Records bytes through a microVM's endpoint (idle policy). Cheap: the
    /// watcher writes the times to the database once per tick.
    pub fn note_traffic(&self, microvm_id: &str) {
        let now = unix_now_ms();
        lock(&self.activity).insert(microvm_id.to_string(), now);
    }

    /// Opens a byte stream to `port` inside a microVM for the endpoint proxy.
    /// A SUSPENDED VM with `autoResumeEnabled` is resumed first (one resume
    /// however many requests wait for it); waits at most `wait` for RUNNING.
    pub async fn connect_port(
        self: &Arc<Self>,
        microvm_id: &str,
        port: u16,
        wait: Duration,
    ) -> Result<tokio::io::DuplexStream, ConnectError> {
        let agent = self.running_agent(microvm_id, wait).await?;
        match agent.connect_tcp(port).await {
            Ok(stream) => Ok(stream.into_io()),
            Err(err) if err.remote_kind() == Some(hearth_proto::ErrorKind::ConnectionRefused) => {
                Err(ConnectError::Refused)
            }
            Err(_) => Err(ConnectError::Unavailable),
        }
    }

    /// The agent of a RUNNING microVM for endpoint traffic, resuming a
    /// SUSPENDED one first when its idle policy has `autoResumeEnabled` (one
    /// resume however many requests wait); waits at most `wait` for RUNNING.
    pub async fn running_agent(
        self: &Arc<Self>,
        microvm_id: &str,
        wait: Duration,
    ) -> Result<Arc<AgentClient>, ConnectError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // SQLite blocks (disk, the connection's lock): off the async workers.
            let id = microvm_id.to_string();
            let row = self
                .store
                .blocking(move |store| store.microvm_by_id(&id))
                .await
                .map_err(|_| ConnectError::Unavailable)?
                .ok_or(ConnectError::Unavailable)?;
            let auto_resume = row.spec.auto_resume();
            match row.state {
                MicrovmState::Running => {
                    return self
                        .agent(&row)
                        .await
                        .map_err(|_| ConnectError::Unavailable);
                }
                MicrovmState::Suspended if auto_resume => {
                    let moved = self
                        .store
                        .transition_microvm(
                            microvm_id,
                            &[MicrovmState::Suspended],
                            MicrovmState::Pending,
                            None,
                        )
                        .map_err(|_| ConnectError::Unavailable)?;
                    if moved.is_some() {
                        info!(microvm = microvm_id, "auto-resuming for a request");
                        self.spawn_resume(row);
                    }
                }
                MicrovmState::Pending | MicrovmState::Suspending => {}
                MicrovmState::Suspended => return Err(ConnectError::Suspended),
                MicrovmState::Terminating | MicrovmState::Terminated => {
                    return Err(ConnectError::Unavailable)
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ConnectError::Timeout);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Launches a PENDING microVM from a snapshot (in the background).
    pub fn spawn_launch(self: &Arc<Self>, row: MicrovmRow, snapshot_dir: PathBuf) {
        let engine = self.clone();
        tokio::spawn(async move { engine.launch(row, snapshot_dir).await });
    }

    pub(super) async fn launch(&self, row: MicrovmRow, snapshot_dir: PathBuf) {
        // Pools wait for launches (and their `/run` hooks) to finish.
        let _launching = self.pools.launching();
        let guard = self.lock_for(&row.microvm_id);
        let _held = guard.lock().await;
        let launched = self.start_vm(&row, &snapshot_dir).await;
        match launched {
            Ok((_vm, agent, read)) => self.finish_launch(&row, agent, read).await,
            Err(err) => {
                warn!(microvm = %row.microvm_id, error = %error_chain(&err), "launch failed");
                self.fail(&row, LAUNCH_FAILED).await;
            }
        }
    }

    /// The rest of a launch whose VM answers: the `/run` hook, then RUNNING.
    /// The caller holds the VM's lock (a launch, or reconcile finishing one).
    /// `read`: the snapshot bytes the launch read (metered with RUNNING).
    pub(super) async fn finish_launch(&self, row: &MicrovmRow, agent: AgentClient, read: u64) {
        // `/run` comes before the VM counts as RUNNING (and before the
        // endpoint forwards traffic to it).
        if let Some(hook) = row.spec.hook(RuntimeHook::Run) {
            let body = json!({
                "microvmId": row.microvm_id,
                "runHookPayload": row.spec.run_hook_payload.as_deref().unwrap_or_default(),
            })
            .to_string();
            if let Err(reason) = call_hook(&agent, &hook, Some(body.as_bytes())).await {
                drop(agent);
                self.fail(row, &reason).await;
                return;
            }
        }
        lock(&self.agents).insert(row.microvm_id.clone(), Arc::new(agent));
        match self.record_running(row, read).await {
            Ok(Some(_)) => info!(microvm = %row.microvm_id, "running"),
            // Terminated meanwhile: its terminate task removes the VM.
            Ok(None) => {}
            Err(err) => {
                warn!(microvm = %row.microvm_id, error = %err, "cannot record RUNNING")
            }
        }
    }

    /// PENDING -> RUNNING with the snapshot read, in one commit, off the
    /// async workers.
    async fn record_running(
        &self,
        row: &MicrovmRow,
        read: u64,
    ) -> Result<Option<MicrovmState>, crate::db::store::StoreError> {
        let id = row.microvm_id.clone();
        let transfer = self.metered(meter::snapshot_transfer(row, UsageType::SnapshotRead, read));
        self.store
            .blocking(move |store| {
                store.transition_microvm_metered(
                    &id,
                    &[MicrovmState::Pending],
                    MicrovmState::Running,
                    None,
                    &transfer,
                )
            })
            .await
    }

    /// Suspends a SUSPENDING microVM (in the background).
    pub fn spawn_suspend(self: &Arc<Self>, row: MicrovmRow) {
        let engine = self.clone();
        tokio::spawn(async move { engine.suspend(row).await });
    }

    pub(super) async fn suspend(&self, row: MicrovmRow) {
        let guard = self.lock_for(&row.microvm_id);
        let _held = guard.lock().await;
        if let Some(hook) = row.spec.hook(RuntimeHook::Suspend) {
            let called = match self.agent_unlocked(&row).await {
                Ok(agent) => call_hook(&agent, &hook, None).await,
                Err(_) => Err("The MicroVM's agent did not answer before suspend.".to_string()),
            };
            // As the reference: a failed `/suspend` ends the VM.
            if let Err(reason) = called {
                self.fail(&row, &reason).await;
                return;
            }
        }
        // The agent connection does not survive the QEMU process.
        lock(&self.agents).remove(&row.microvm_id);
        let suspended = async {
            let mut vm = self.driver.load(&row.vm_name)?;
            self.driver.suspend(&mut vm).await?;
            // A lean suspend writes the state and keeps RAM in a file beside it.
            Ok::<_, EngineError>(
                meter::stored_bytes(&vm.suspend_state())
                    + vm.suspended_memory
                        .as_deref()
                        .map_or(0, meter::stored_bytes),
            )
        }
        .await;
        match suspended {
            Ok(written) => {
                let _ = self.store.transition_microvm_metered(
                    &row.microvm_id,
                    &[MicrovmState::Suspending],
                    MicrovmState::Suspended,
                    None,
                    &self.metered(meter::snapshot_transfer(
                        &row,
                        UsageType::SnapshotWrite,
                        written,
                    )),
                );
                info!(microvm = %row.microvm_id, "suspended");
            }
            Err(err) => {
                warn!(microvm = %row.microvm_id, error = %error_chain(&err), "suspend failed");
                let alive = self
                    .driver
                    .load(&row.vm_name)
                    .is_ok_and(|vm| vm.state == VmState::Running && self.driver.is_alive(&vm));
                if alive {
                    let _ = self.store.transition_microvm(
                        &row.microvm_id,
                        &[MicrovmState::Suspending],
                        MicrovmState::Running,
                        Some("Suspend failed; the MicroVM kept running."),
                    );
                } else {
                    self.fail(&row, "Suspend failed: the MicroVM could not be saved.")
                        .await;
                }
            }
        }
    }

    /// Resumes a microVM that moved SUSPENDED → PENDING (in the background).
    pub fn spawn_resume(self: &Arc<Self>, row: MicrovmRow) {
        let engine = self.clone();
        tokio::spawn(async move { engine.resume(row).await });
    }

    pub(super) async fn resume(&self, row: MicrovmRow) {
        let _launching = self.pools.launching();
        let guard = self.lock_for(&row.microvm_id);
        let _held = guard.lock().await;
        let resumed = async {
            let mut vm = self.driver.load(&row.vm_name)?;
            // The state file, and the RAM file a lean suspend kept beside it.
            let read = meter::stored_bytes(&vm.suspend_state())
                + vm.suspended_memory
                    .as_deref()
                    .map_or(0, meter::stored_bytes);
            self.driver.resume(&mut vm).await?;
            let agent = self.driver.agent(&vm).await?;
            Ok::<_, EngineError>((agent, read))
        }
        .await;
        match resumed {
            Ok((agent, read)) => self.finish_resume(&row, agent, read).await,
            Err(err) => {
                warn!(microvm = %row.microvm_id, error = %error_chain(&err), "resume failed");
                self.fail(&row, "Resume failed: the MicroVM could not be restored.")
                    .await;
            }
        }
    }

    /// The rest of a resume whose VM answers: the `/resume` hook, then RUNNING.
    /// The caller holds the VM's lock (a resume, or reconcile finishing one).
    pub(super) async fn finish_resume(&self, row: &MicrovmRow, agent: AgentClient, read: u64) {
        if let Some(hook) = row.spec.hook(RuntimeHook::Resume) {
            if let Err(reason) = call_hook(&agent, &hook, None).await {
                drop(agent);
                self.fail(row, &reason).await;
                return;
            }
        }
        lock(&self.agents).insert(row.microvm_id.clone(), Arc::new(agent));
        let _ = self.record_running(row, read).await;
        info!(microvm = %row.microvm_id, "resumed");
    }

    /// Terminates a TERMINATING microVM (in the background).
    pub fn spawn_terminate(self: &Arc<Self>, row: MicrovmRow, reason: String) {
        let engine = self.clone();
        tokio::spawn(async move { engine.terminate(&row, &reason).await });
    }

    pub(super) async fn terminate(&self, row: &MicrovmRow, reason: &str) {
        let guard = self.lock_for(&row.microvm_id);
        let held = guard.lock().await;
        if let Some(hook) = row.spec.hook(RuntimeHook::Terminate) {
            // Best effort: the VM ends whatever the app answers.
            if let Ok(agent) = self.agent_unlocked(row).await {
                if let Err(reason) = call_hook(&agent, &hook, None).await {
                    info!(microvm = %row.microvm_id, reason, "terminate hook");
                }
            }
        }
        self.remove_vm(row).await;
        drop(held);
        match self.store.transition_microvm(
            &row.microvm_id,
            &[MicrovmState::Terminating],
            MicrovmState::Terminated,
            Some(reason),
        ) {
            Ok(_) => info!(microvm = %row.microvm_id, reason, "terminated"),
            Err(err) => warn!(microvm = %row.microvm_id, error = %err, "cannot record TERMINATED"),
        }
        self.forget(&row.microvm_id);
    }

    /// Ends the VM's process and removes its files (a VM never made is fine).
    async fn remove_vm(&self, row: &MicrovmRow) {
        lock(&self.agents).remove(&row.microvm_id);
        match self.driver.load(&row.vm_name) {
            Ok(vm) => {
                if let Err(err) = self.driver.remove(&vm).await {
                    warn!(microvm = %row.microvm_id, error = %error_chain(&err), "cannot remove VM files");
                }
            }
            Err(VmError::NotFound(_)) => {}
            Err(err) => {
                warn!(microvm = %row.microvm_id, error = %error_chain(&err), "unreadable VM record; removing its directory");
                let _ = self.driver.discard(&row.vm_name);
            }
        }
    }

    /// A failed step: the VM goes TERMINATING → TERMINATED with `reason`.
    /// The caller holds the VM's lock.
    pub(super) async fn fail(&self, row: &MicrovmRow, reason: &str) {
        self.remove_vm(row).await;
        let moved = self.store.transition_microvm(
            &row.microvm_id,
            &[
                MicrovmState::Pending,
                MicrovmState::Running,
                MicrovmState::Suspending,
                MicrovmState::Suspended,
            ],
            MicrovmState::Terminating,
            Some(reason),
        );
        if let Err(err) = moved {
            warn!(microvm = %row.microvm_id, error = %err, "cannot record TERMINATING");
        }
        // Whether this call or a concurrent Terminate moved it, finish the job.
        let _ = self.store.transition_microvm(
            &row.microvm_id,
            &[MicrovmState::Terminating],
            MicrovmState::Terminated,
            None,
        );
        lock(&self.agents).remove(&row.microvm_id);
    }

    /// Runs forever: ends microVMs past `maximumDurationInSeconds` and notices
    /// VM processes that died.
    pub async fn watch(self: Arc<Self>) {
        let mut ticker = tokio::time::interval(WATCH_INTERVAL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            if let Err(err) = self.watch_once().await {
                warn!(error = %err, "lifetime check failed");
            }
        }
    }

    async fn watch_once(self: &Arc<Self>) -> Result<(), EngineError> {
        let pending: Vec<(String, i64)> = lock(&self.activity).drain().collect();
        for (id, at) in pending {
            self.store.note_activity(&id, at)?;
        }
        let now = unix_now_ms();
        // Every IO_CHECK_TICKS ticks: a QMP round trip per running VM.
        let io_check = self
            .ticks
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(IO_CHECK_TICKS);
        for row in self.store.live_microvms()? {
            if row.state == MicrovmState::Terminating {
                continue;
            }
            if let Some(policy) = row.spec.idle_policy {
                let idle_since = row.last_activity_at.unwrap_or(row.started_at);
                if row.state == MicrovmState::Running
                    && now - idle_since >= policy.max_idle_ms()
                    && self
                        .store
                        .transition_microvm(
                            &row.microvm_id,
                            &[MicrovmState::Running],
                            MicrovmState::Suspending,
                            None,
                        )?
                        .is_some()
                {
                    info!(microvm = %row.microvm_id, "idle: suspending");
                    self.spawn_suspend(row);
                    continue;
                }
                let suspended_since = row.suspended_at.unwrap_or(now);
                if row.state == MicrovmState::Suspended
                    && now - suspended_since >= policy.suspended_ms()
                    && self
                        .store
                        .transition_microvm(
                            &row.microvm_id,
                            &[MicrovmState::Suspended],
                            MicrovmState::Terminating,
                            None,
                        )?
                        .is_some()
                {
                    self.spawn_terminate(
                        row,
                        "The MicroVM stayed suspended longer than its idle policy allows.".into(),
                    );
                    continue;
                }
            }
            if now >= row.deadline_at {
                let moved = self.store.transition_microvm(
                    &row.microvm_id,
                    &[row.state],
                    MicrovmState::Terminating,
                    None,
                )?;
                if moved.is_some() {
                    self.spawn_terminate(
                        row,
                        "The MicroVM reached its maximum duration.".to_string(),
                    );
                }
                continue;
            }
            if row.state == MicrovmState::Running {
                // Only judge a VM whose lock is free: a task working on it
                // may be between processes.
                let guard = self.lock_for(&row.microvm_id);
                let Ok(held) = guard.try_lock() else { continue };
                let vm = self.driver.load(&row.vm_name).ok();
                let alive = vm.as_ref().is_some_and(|vm| self.driver.is_alive(vm));
                if let (true, true, Some(vm)) = (alive, io_check, &vm) {
                    // A full disk paused it (QEMU stops a guest on ENOSPC rather
                    // than fail its writes): let it run once space may be back.
                    match self.driver.continue_after_io_error(vm).await {
                        Ok(true) => {
                            warn!(microvm = %row.microvm_id, "disk write error paused the VM; continued")
                        }
                        Ok(false) => {}
                        Err(err) => {
                            warn!(microvm = %row.microvm_id, error = %error_chain(&err), "cannot check the VM for disk errors")
                        }
                    }
                }
                let still_running = self
                    .store
                    .microvm_by_id(&row.microvm_id)?
                    .is_some_and(|r| r.state == MicrovmState::Running);
                drop(held);
                if !alive && still_running {
                    warn!(microvm = %row.microvm_id, "VM process is gone");
                    let guard = self.lock_for(&row.microvm_id);
                    let _held = guard.lock().await;
                    self.fail(&row, "The MicroVM stopped unexpectedly.").await;
                    self.forget(&row.microvm_id);
                }
            }
        }
        Ok(())
    }
}

/// Why the endpoint could not reach a port in a microVM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ConnectError {
    #[error("nothing listens on that port in the MicroVM")]
    Refused,
    #[error("the MicroVM is suspended")]
    Suspended,
    #[error("the MicroVM cannot be reached")]
    Unavailable,
    #[error("the MicroVM did not become RUNNING in time")]
    Timeout,
}

/// Calls a hook; the error is the microVM's `stateReason`.
async fn call_hook(
    agent: &AgentClient,
    hook: &HookCall,
    body: Option<&[u8]>,
) -> Result<(), String> {
    let title = {
        let mut name = hook.name.to_string();
        if let Some(first) = name.get_mut(..1) {
            first.make_ascii_uppercase();
        }
        name
    };
    match hooks::call(agent, hook.port, hook.name, body, hook.timeout).await {
        Ok(200) => Ok(()),
        Ok(status) => Err(format!(
            "{title} lifecycle hook returned HTTP status {status}."
        )),
        Err(HookError::Timeout(_)) => Err(format!(
            "{title} lifecycle hook invocation timed out after PT{}S.",
            hook.timeout.as_secs()
        )),
        Err(err) => Err(format!("{title} lifecycle hook failed: {err}.")),
    }
}

pub(super) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

//! A fake [`Driver`] for other crates' unit tests (cargo feature `testing`):
//! VM records held in memory, every call recorded, and failures and dead
//! processes on request.
//!
//! What talks to a guest still gets a real agent: a VM that runs has the
//! static `hearth-agent` running on the host (`--unix-listen` at the VM's
//! agent socket), started when someone first needs it (an agent connection,
//! a launch), so hooks and probes run unchanged without a VM. That process
//! is the VM's "process": [`FakeDriver::kill`] ends it. A driver made with
//! [`FakeDriver::without_agent`] has none (for tests on tokio's paused
//! clock, where real I/O and timeouts do not mix): asking for an agent fails.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::accel::Accel;
use crate::agent::{AgentClient, AgentError};
use crate::assets::Assets;
use crate::cgroup::VmUsage;
use crate::driver::{BootRequest, ColdBoot, Driver, VmError, VmProcess};
use crate::record::{MachineShape, Memory, Origin, VmRecord, VmState};
use crate::snapshot::{self, FileEntry, Manifest, Snapshot};

/// A driver call, as recorded and as [`FakeDriver::fail_next`] names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Boot,
    Agent,
    Recover,
    Snapshot,
    Checkpoint,
    Launch,
    Suspend,
    Resume,
    Shutdown,
    Remove,
    Kill,
}

/// One recorded call: what was asked, of which VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub op: Op,
    pub vm: String,
}

/// Called at the start of every VM action, before the fake acts: a test
/// reads what the caller had persisted by then (intent before action).
pub type Observer = Arc<dyn Fn(&Call) + Send + Sync>;

/// The fake VMM. Clones share one state.
#[derive(Clone)]
pub struct FakeDriver {
    inner: Arc<Inner>,
}

struct Inner {
    root: PathBuf,
    agent_binary: Option<PathBuf>,
    state: Mutex<State>,
    observer: Mutex<Option<Observer>>,
}

#[derive(Debug, Default)]
struct State {
    vms: BTreeMap<String, FakeVm>,
    calls: Vec<Call>,
    failing: HashMap<Op, u32>,
    /// Processes no VM of this driver accounts for (see `add_stray`).
    strays: Vec<VmProcess>,
    next_pid: u32,
    /// What `usage` reports for running VMs, by name (see `set_usage`).
    usage: HashMap<String, VmUsage>,
}

#[derive(Debug)]
struct FakeVm {
    record: VmRecord,
    alive: bool,
    agent: Option<std::process::Child>,
}

impl Drop for FakeVm {
    fn drop(&mut self) {
        stop_agent(&mut self.agent);
    }
}

impl std::fmt::Debug for FakeDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeDriver")
            .field("root", &self.inner.root)
            .field("state", &self.inner.state)
            .finish_non_exhaustive()
    }
}

impl FakeDriver {
    /// A fake whose VMs live under `root` (directories, sockets, snapshots)
    /// and whose running VMs get the real agent as a host process.
    pub fn new(root: &Path) -> Result<Self, VmError> {
        let agent = Assets::from_env().agent_binary()?;
        Ok(Self::build(root, Some(agent)))
    }

    /// A fake without agents: [`Driver::agent`] and launches fail.
    pub fn without_agent(root: &Path) -> Self {
        Self::build(root, None)
    }

    fn build(root: &Path, agent_binary: Option<PathBuf>) -> Self {
        let _ = std::fs::create_dir_all(root.join("vms"));
        // Snapshots name a kernel and an initrd that must exist.
        let _ = std::fs::write(root.join("vmlinuz"), b"fake kernel");
        let _ = std::fs::write(root.join("initrd"), b"fake initrd");
        Self {
            inner: Arc::new(Inner {
                root: root.to_path_buf(),
                agent_binary,
                state: Mutex::default(),
                observer: Mutex::default(),
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Every call so far, in order.
    pub fn calls(&self) -> Vec<Call> {
        self.state().calls.clone()
    }

    /// The ops called on one VM, in order.
    pub fn ops(&self, vm: &str) -> Vec<Op> {
        self.state()
            .calls
            .iter()
            .filter(|call| call.vm == vm)
            .map(|call| call.op)
            .collect()
    }

    /// The next call of `op` fails (after it is recorded and observed).
    pub fn fail_next(&self, op: Op) {
        *self.state().failing.entry(op).or_default() += 1;
    }

    /// Calls `observer` at the start of every VM action.
    pub fn observe(&self, observer: Observer) {
        *self
            .inner
            .observer
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(observer);
    }

    /// The VM's process dies (as a QEMU killed under it): it reports dead
    /// and its agent ends.
    pub fn kill(&self, name: &str) {
        if let Some(vm) = self.state().vms.get_mut(name) {
            vm.alive = false;
            stop_agent(&mut vm.agent);
        }
    }

    /// What [`Driver::usage`] reports for the VM while it runs (zero until
    /// set): a test's stand-in for the process's or cgroup's counters.
    pub fn set_usage(&self, name: &str, usage: VmUsage) {
        self.state().usage.insert(name.to_string(), usage);
    }

    /// A VM that runs, made without a call (as one left by an earlier server).
    pub fn insert_running(&self, name: &str) -> VmRecord {
        let record = self.new_record(
            name,
            Origin::Boot {
                image: "fake".into(),
            },
        );
        let mut state = self.state();
        let record = VmRecord {
            pid: Some(next_pid(&mut state)),
            ..record
        };
        state.vms.insert(
            name.to_string(),
            FakeVm {
                record: record.clone(),
                alive: true,
                agent: None,
            },
        );
        record
    }

    /// [`Self::insert_running`] with shape `shape`.
    pub fn insert_running_shaped(&self, name: &str, shape: MachineShape) -> VmRecord {
        let mut record = self.insert_running(name);
        record.shape = shape;
        if let Some(vm) = self.state().vms.get_mut(name) {
            vm.record = record.clone();
        }
        record
    }

    /// A VM suspended with its state saved, made without a call.
    pub fn insert_suspended(&self, name: &str) -> VmRecord {
        let mut record = self.insert_running(name);
        record.state = VmState::Suspended;
        record.pid = None;
        let _ = std::fs::write(record.suspend_state(), b"fake suspend state");
        if let Some(vm) = self.state().vms.get_mut(name) {
            vm.record = record.clone();
            vm.alive = false;
        }
        record
    }

    /// Writes a snapshot directory the fake launches from (small files that
    /// [`Snapshot::open`] accepts).
    pub fn make_snapshot(&self, out: &Path) -> Result<Snapshot, VmError> {
        let record = self.new_record(
            "snapshot-origin",
            Origin::Boot {
                image: "fake".into(),
            },
        );
        let _ = std::fs::remove_dir_all(&record.dir);
        write_snapshot(&record, out)
    }

    /// A VMM process on the host that runs `vm` but that no record names.
    pub fn add_stray(&self, vm: &str) -> VmProcess {
        let mut state = self.state();
        let process = VmProcess {
            pid: next_pid(&mut state),
            vm: vm.to_string(),
            ram: None,
        };
        state.strays.push(process.clone());
        process
    }

    /// A VM directory with no readable record (a crash mid-create).
    pub fn add_orphan_dir(&self, name: &str) -> PathBuf {
        let dir = self.vms_dir().join(name);
        let _ = std::fs::create_dir_all(&dir);
        dir
    }

    fn vms_dir(&self) -> PathBuf {
        self.inner.root.join("vms")
    }

    fn new_record(&self, name: &str, origin: Origin) -> VmRecord {
        let dir = self.vms_dir().join(name);
        let _ = std::fs::create_dir_all(&dir);
        VmRecord {
            name: name.to_string(),
            instance: name.to_string(),
            dir: dir.clone(),
            state: VmState::Running,
            pid: None,
            shape: MachineShape::default(),
            accel: Accel::Tcg,
            kernel: self.inner.root.join("vmlinuz"),
            initrd: self.inner.root.join("initrd"),
            cmdline: String::new(),
            disk: dir.join("disk.qcow2"),
            memory: Memory::Anonymous,
            origin,
            created_unix: 0,
            nic: false,
            egress: false,
            jail_uid: None,
            balloon: false,
            suspended_memory: None,
        }
    }

    /// Records the call, lets the observer look, and fails it if asked to.
    fn enter(&self, op: Op, vm: &str) -> Result<(), VmError> {
        let call = Call {
            op,
            vm: vm.to_string(),
        };
        self.state().calls.push(call.clone());
        let observer = self
            .inner
            .observer
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        if let Some(observer) = observer {
            observer(&call);
        }
        let mut state = self.state();
        match state.failing.get_mut(&op) {
            Some(count) if *count > 0 => {
                *count -= 1;
                Err(VmError::QemuDied {
                    log: format!("fake failure of {op:?}"),
                })
            }
            _ => Ok(()),
        }
    }

    /// A running VM named `name` from `origin`, with its agent if this fake has one.
    fn start(&self, name: &str, origin: Origin) -> Result<VmRecord, VmError> {
        if self.state().vms.contains_key(name) {
            return Err(VmError::Exists(name.into()));
        }
        let record = self.new_record(name, origin);
        let mut vm = FakeVm {
            record,
            alive: true,
            agent: None,
        };
        self.start_agent(&mut vm)?;
        let mut state = self.state();
        vm.record.pid = Some(match &vm.agent {
            Some(child) => child.id(),
            None => next_pid(&mut state),
        });
        let record = vm.record.clone();
        state.vms.insert(name.to_string(), vm);
        Ok(record)
    }

    /// Starts the host agent on the VM's socket and waits for it to listen.
    fn start_agent(&self, vm: &mut FakeVm) -> Result<(), VmError> {
        let Some(binary) = &self.inner.agent_binary else {
            return Ok(());
        };
        if vm.agent.is_some() {
            return Ok(());
        }
        let socket = vm.record.agent_socket();
        let _ = std::fs::remove_file(&socket);
        let child = std::process::Command::new(binary)
            .arg("--unix-listen")
            .arg(&socket)
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(VmError::Spawn)?;
        vm.agent = Some(child);
        // Real time, not tokio's: the agent is a real process.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            if Instant::now() > deadline {
                return Err(VmError::Agent(AgentError::Timeout(Duration::from_secs(10))));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    /// Connects to the running VM's agent (starting it on first use).
    async fn connect_agent(&self, name: &str) -> Result<AgentClient, VmError> {
        let socket = {
            let mut state = self.state();
            let vm = state
                .vms
                .get_mut(name)
                .ok_or_else(|| VmError::NotFound(name.into()))?;
            if !vm.alive || vm.record.state != VmState::Running {
                return Err(VmError::Agent(AgentError::Closed));
            }
            if self.inner.agent_binary.is_none() {
                return Err(VmError::Agent(AgentError::Closed));
            }
            self.start_agent(vm)?;
            vm.record.agent_socket()
        };
        Ok(AgentClient::connect(&socket, Duration::from_secs(10)).await?)
    }

    fn running(&self, name: &str, action: &'static str) -> Result<VmRecord, VmError> {
        let state = self.state();
        let vm = state
            .vms
            .get(name)
            .ok_or_else(|| VmError::NotFound(name.into()))?;
        if vm.record.state != VmState::Running || !vm.alive {
            return Err(VmError::BadState {
                name: name.into(),
                state: vm.record.state,
                action,
            });
        }
        Ok(vm.record.clone())
    }
}

fn next_pid(state: &mut State) -> u32 {
    state.next_pid += 1;
    // Far above any pid the host hands out, so nothing real is ever named.
    4_000_000 + state.next_pid
}

fn stop_agent(agent: &mut Option<std::process::Child>) {
    if let Some(mut child) = agent.take() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Writes a snapshot directory [`Snapshot::open`] accepts (small files).
fn write_snapshot(vm: &VmRecord, out: &Path) -> Result<Snapshot, VmError> {
    std::fs::create_dir_all(out).map_err(|e| VmError::Io(out.to_path_buf(), e))?;
    let mut files = Vec::new();
    for name in [
        snapshot::MEMORY_FILE,
        snapshot::STATE_FILE,
        snapshot::DISK_FILE,
    ] {
        let path = out.join(name);
        std::fs::write(&path, name.as_bytes()).map_err(|e| VmError::Io(path, e))?;
        files.push(FileEntry {
            name: name.to_string(),
            size: name.len() as u64,
            blake3: blake3::hash(name.as_bytes()).to_hex().to_string(),
        });
    }
    let manifest = Manifest {
        format_version: snapshot::FORMAT_VERSION,
        created_unix: 0,
        shape: vm.shape,
        accel: vm.accel,
        kernel: vm.kernel.clone(),
        kernel_version: "fake".into(),
        initrd: vm.initrd.clone(),
        cmdline: vm.cmdline.clone(),
        qemu_version: "fake".into(),
        nic: false,
        files,
        balloon: vm.balloon,
    };
    let path = out.join(snapshot::MANIFEST_FILE);
    let bytes =
        serde_json::to_vec_pretty(&manifest).map_err(|e| VmError::BadRecord(path.clone(), e))?;
    std::fs::write(&path, bytes).map_err(|e| VmError::Io(path, e))?;
    Ok(Snapshot::open(out, snapshot::Verify::Sizes)?)
}

#[async_trait::async_trait]
impl Driver for FakeDriver {
    fn accel(&self) -> Accel {
        Accel::Tcg
    }

    fn load(&self, name: &str) -> Result<VmRecord, VmError> {
        self.state()
            .vms
            .get(name)
            .map(|vm| vm.record.clone())
            .ok_or_else(|| VmError::NotFound(name.into()))
    }

    fn list(&self) -> Result<Vec<VmRecord>, VmError> {
        Ok(self
            .state()
            .vms
            .values()
            .map(|vm| vm.record.clone())
            .collect())
    }

    fn vm_names(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.vms_dir())
            .into_iter()
            .flatten()
            .flatten()
            .map(|entry| entry.file_name().to_string_lossy().into_owned())
            .collect();
        names.extend(self.state().vms.keys().cloned());
        names.sort();
        names.dedup();
        names
    }

    fn is_alive(&self, vm: &VmRecord) -> bool {
        self.state()
            .vms
            .get(&vm.name)
            .is_some_and(|fake| fake.alive && fake.record.pid == vm.pid)
    }

    fn processes(&self) -> Vec<VmProcess> {
        let state = self.state();
        let mut found: Vec<VmProcess> = state
            .vms
            .values()
            .filter(|vm| vm.alive)
            .filter_map(|vm| {
                Some(VmProcess {
                    pid: vm.record.pid?,
                    vm: vm.record.name.clone(),
                    ram: None,
                })
            })
            .collect();
        found.extend(state.strays.iter().cloned());
        found
    }

    /// What was set with [`FakeDriver::set_usage`] while the VM runs; a
    /// running VM with none set reports zero usage.
    fn usage(&self, vm: &VmRecord) -> Option<VmUsage> {
        if !self.is_alive(vm) {
            return None;
        }
        Some(
            self.state()
                .usage
                .get(&vm.name)
                .copied()
                .unwrap_or_default(),
        )
    }

    fn kill_process(&self, process: &VmProcess) {
        self.state().calls.push(Call {
            op: Op::Kill,
            vm: process.vm.clone(),
        });
        let mut state = self.state();
        state.strays.retain(|stray| stray != process);
        if let Some(vm) = state.vms.get_mut(&process.vm) {
            if vm.record.pid == Some(process.pid) {
                vm.alive = false;
                stop_agent(&mut vm.agent);
            }
        }
    }

    fn discard(&self, name: &str) -> Result<(), VmError> {
        self.state().vms.remove(name);
        let dir = self.vms_dir().join(name);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(VmError::Io(dir, e)),
        }
    }

    async fn boot(&self, request: &BootRequest) -> Result<VmRecord, VmError> {
        self.enter(Op::Boot, &request.name)?;
        self.start(
            &request.name,
            Origin::Boot {
                image: request.image.clone(),
            },
        )
    }

    async fn boot_with(
        &self,
        request: &BootRequest,
        _boot: &ColdBoot,
    ) -> Result<VmRecord, VmError> {
        self.boot(request).await
    }

    async fn agent(&self, vm: &VmRecord) -> Result<AgentClient, VmError> {
        self.enter(Op::Agent, &vm.name)?;
        self.connect_agent(&vm.name).await
    }

    async fn recover(&self, vm: &VmRecord) -> Result<(), VmError> {
        self.enter(Op::Recover, &vm.name)?;
        self.running(&vm.name, "recover").map(drop)
    }

    async fn snapshot(&self, vm: &VmRecord, out: &Path) -> Result<Snapshot, VmError> {
        self.enter(Op::Snapshot, &vm.name)?;
        let record = self.running(&vm.name, "snapshot")?;
        write_snapshot(&record, out)
    }

    async fn checkpoint_disk(
        &self,
        vm: &mut VmRecord,
        new_overlay: &Path,
    ) -> Result<PathBuf, VmError> {
        self.enter(Op::Checkpoint, &vm.name)?;
        self.running(&vm.name, "checkpoint its disk")?;
        let frozen = std::mem::replace(&mut vm.disk, new_overlay.to_path_buf());
        if let Some(fake) = self.state().vms.get_mut(&vm.name) {
            fake.record.disk = vm.disk.clone();
        }
        Ok(frozen)
    }

    async fn launch_with_agent(
        &self,
        snapshot: &Snapshot,
        name: &str,
    ) -> Result<(VmRecord, AgentClient), VmError> {
        self.enter(Op::Launch, name)?;
        if self.inner.agent_binary.is_none() {
            return Err(VmError::Agent(AgentError::Closed));
        }
        let vm = self.start(
            name,
            Origin::Snapshot {
                dir: snapshot.dir.clone(),
            },
        )?;
        match self.connect_agent(name).await {
            Ok(agent) => Ok((vm, agent)),
            Err(err) => {
                let _ = self.discard(name);
                Err(err)
            }
        }
    }

    async fn suspend(&self, vm: &mut VmRecord) -> Result<(), VmError> {
        self.enter(Op::Suspend, &vm.name)?;
        let mut record = self.running(&vm.name, "suspend")?;
        std::fs::write(record.suspend_state(), b"fake suspend state")
            .map_err(|e| VmError::Io(record.suspend_state(), e))?;
        record.state = VmState::Suspended;
        record.pid = None;
        if let Some(fake) = self.state().vms.get_mut(&vm.name) {
            fake.record = record.clone();
            fake.alive = false;
            stop_agent(&mut fake.agent);
        }
        *vm = record;
        Ok(())
    }

    async fn resume(&self, vm: &mut VmRecord) -> Result<(), VmError> {
        self.enter(Op::Resume, &vm.name)?;
        let mut state = self.state();
        let pid = next_pid(&mut state);
        let fake = state
            .vms
            .get_mut(&vm.name)
            .ok_or_else(|| VmError::NotFound(vm.name.clone()))?;
        if fake.record.state != VmState::Suspended || !fake.record.suspend_state().is_file() {
            return Err(VmError::BadState {
                name: vm.name.clone(),
                state: fake.record.state,
                action: "resume",
            });
        }
        let _ = std::fs::remove_file(fake.record.suspend_state());
        fake.record.state = VmState::Running;
        fake.record.pid = Some(pid);
        fake.alive = true;
        *vm = fake.record.clone();
        Ok(())
    }

    async fn shutdown(&self, vm: &mut VmRecord) -> Result<(), VmError> {
        self.enter(Op::Shutdown, &vm.name)?;
        let mut record = self.running(&vm.name, "shut down")?;
        record.state = VmState::Stopped;
        record.pid = None;
        if let Some(fake) = self.state().vms.get_mut(&vm.name) {
            fake.record = record.clone();
            fake.alive = false;
            stop_agent(&mut fake.agent);
        }
        *vm = record;
        Ok(())
    }

    async fn remove(&self, vm: &VmRecord) -> Result<(), VmError> {
        self.enter(Op::Remove, &vm.name)?;
        self.discard(&vm.name)
    }
}

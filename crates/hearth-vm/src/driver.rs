//! The interface a VMM implements ([`Driver`]), what it is asked to boot, and
//! how it fails ([`VmError`]).

use std::path::{Path, PathBuf};

use crate::accel::{Accel, AccelError};
use crate::agent::{AgentClient, AgentError};
use crate::assets::AssetError;
use crate::disk::{self, DiskError};
use crate::pins::UntestedHost;
use crate::qmp::QmpError;
use crate::record::{MachineShape, VmRecord, VmState};
use crate::slot::Prewarmed;
use crate::snapshot::{Snapshot, SnapshotError};
use crate::usage::VmUsage;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("VM name {0:?} is invalid: use 1-40 of A-Z a-z 0-9 _ -")]
    BadName(String),
    #[error("a VM named {0:?} already exists")]
    Exists(String),
    #[error("no VM named {0:?}")]
    NotFound(String),
    #[error("VM {name} is {state:?}; cannot {action}")]
    BadState {
        name: String,
        state: VmState,
        action: &'static str,
    },
    #[error("VM {0} was restored from a snapshot and has not been suspended since; snapshot it after a suspend/resume, or snapshot its origin")]
    NotSnapshottable(String),
    #[error("QEMU could not be started")]
    Spawn(#[source] std::io::Error),
    #[error("QEMU exited: {log}")]
    QemuDied { log: String },
    #[error(
        "the guest did not come up: {reason}; console ends: {console}; QEMU log ends: {qemu_log}"
    )]
    BootFailed {
        reason: String,
        console: String,
        qemu_log: String,
    },
    #[error("QEMU control failed")]
    Qmp(#[from] QmpError),
    #[error("guest agent failed")]
    Agent(#[from] AgentError),
    #[error(transparent)]
    Asset(#[from] AssetError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error("VM network failed")]
    Net(#[from] crate::net::NetError),
    #[error(transparent)]
    Accel(#[from] AccelError),
    #[error(transparent)]
    UntestedHost(#[from] UntestedHost),
    #[error(transparent)]
    Jail(#[from] crate::jail::JailError),
    #[error("snapshot was made with {made_with:?}, this host runs {runs:?}; rebuild the image, or set HEARTH_ALLOW_UNTESTED_HOST=1 to try anyway")]
    SnapshotQemu { made_with: String, runs: String },
    #[error("snapshot was made for {0:?}, this host runs {1:?}")]
    AccelMismatch(Accel, Accel),
    #[error("VM record {0} is unreadable")]
    BadRecord(PathBuf, #[source] serde_json::Error),
    #[error("cannot confine the VM's process")]
    Cgroup(#[from] crate::cgroup::CgroupError),
    #[error("this VMM has no {0}")]
    Unsupported(&'static str),
    #[error("I/O on {0}")]
    Io(PathBuf, #[source] std::io::Error),
}

/// Options for a cold boot.
#[derive(Debug, Clone)]
pub struct BootRequest {
    pub name: String,
    /// A base image name (e.g. `debian-12`).
    pub image: String,
    pub shape: MachineShape,
}

/// A cold boot from an explicit root disk.
#[derive(Debug, Clone)]
pub struct ColdBoot {
    /// The disk the VM's overlay reads unwritten blocks from.
    pub base: PathBuf,
    pub base_format: disk::BackingFormat,
    /// Where to create the VM's overlay; `None`: inside the VM's directory
    /// (removed with the VM). A caller that keeps the overlay (the image
    /// builder's layer cache) names a path outside it.
    pub overlay: Option<PathBuf>,
    /// Give the guest internet egress (see [`crate::net`]); otherwise its
    /// network card reaches nothing.
    pub egress: bool,
    /// Virtual size of the overlay in bytes when larger than the base's
    /// (room to grow the filesystem in the guest); `None`: the base's size.
    pub disk_size: Option<u64>,
    /// Give the guest a virtio-balloon with free page reporting (when its
    /// kernel has the module), so memory it frees goes back to the host.
    /// Only for VMs whose memory is never cloned: a clone maps the snapshot's
    /// memory read-only and QEMU refuses its discards (one error per report).
    pub free_page_reporting: bool,
}

/// A VMM process found on the host (see [`Driver::processes`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmProcess {
    pub pid: u32,
    /// The name of the VM directory it runs from.
    pub vm: String,
    /// Its shared RAM file, when it has one in the driver's RAM directory.
    pub ram: Option<PathBuf>,
}

/// A VMM that can run hearth guests: everything the server's engine, the app
/// snapshot, imports and the image builder ask of VMs. Implementations persist
/// each VM's [`VmRecord`] before acting, so another process can pick the VM up.
///
/// Object-safe (`Arc<dyn Driver>`): the server holds one driver for its whole
/// life and tests swap in `testing::FakeDriver`.
#[async_trait::async_trait]
pub trait Driver: Send + Sync + std::fmt::Debug {
    /// The accelerator its guests run under.
    fn accel(&self) -> Accel;
    /// Loads a VM's record by name.
    fn load(&self, name: &str) -> Result<VmRecord, VmError>;
    /// All VMs with a readable record, sorted by name.
    fn list(&self) -> Result<Vec<VmRecord>, VmError>;
    /// The name of every VM directory, readable record or not.
    fn vm_names(&self) -> Vec<String>;
    /// True when the VM's process is alive.
    fn is_alive(&self, vm: &VmRecord) -> bool;
    /// Every live VMM process that runs a VM of this driver's, found on the
    /// host: processes outlive the process that started them, so after a
    /// crash this is how strays are found.
    fn processes(&self) -> Vec<VmProcess>;
    /// Kills a process found by [`Self::processes`] and frees its memory.
    fn kill_process(&self, process: &VmProcess);
    /// What a running VM has used so far (CPU time of its current process,
    /// memory held now), from its cgroup or, without one, its process;
    /// `None` when it has no live process.
    fn usage(&self, vm: &VmRecord) -> Option<VmUsage>;
    /// Removes the per-VM resource groups (cgroups) no live VM process uses,
    /// left by a crash; called by reconcile after strays are killed.
    fn remove_stale_cgroups(&self) {}
    /// Removes the per-VM network namespaces no live VM process uses, left by
    /// a crash between making one and starting its QEMU; called by reconcile
    /// after strays are killed, before anything new starts.
    fn remove_stale_networks(&self) {}
    /// Removes what is left of a VM whose record cannot be read.
    fn discard(&self, name: &str) -> Result<(), VmError>;

    /// Boots a VM from a base image and waits until its agent answers.
    async fn boot(&self, request: &BootRequest) -> Result<VmRecord, VmError>;
    /// Boots a VM as `boot` says (root disk, overlay, network) and waits until
    /// its agent answers.
    async fn boot_with(&self, request: &BootRequest, boot: &ColdBoot) -> Result<VmRecord, VmError>;
    /// Connects to a running VM's agent.
    async fn agent(&self, vm: &VmRecord) -> Result<AgentClient, VmError>;
    /// Brings back a running VM whose controller died in the middle of an
    /// operation (a paused guest, a half-written suspend state); the caller
    /// then checks the agent.
    async fn recover(&self, vm: &VmRecord) -> Result<(), VmError>;
    /// Lets a VM run again that its VMM paused on a disk write error (QEMU's
    /// `werror=enospc`, virtio-blk's default: a full disk pauses the guest
    /// instead of failing its writes). Ok(true) if it was paused so; a disk
    /// still full pauses it again at the next write, so callers retry later.
    async fn continue_after_io_error(&self, _vm: &VmRecord) -> Result<bool, VmError> {
        Ok(false)
    }
    /// Pauses the VM, writes a snapshot into `out`, and lets the VM run on.
    async fn snapshot(&self, vm: &VmRecord, out: &Path) -> Result<Snapshot, VmError>;
    /// Freezes the VM's disk overlay: later writes go to `new_overlay`, so the
    /// old overlay keeps the disk as it is now (the guest synced first).
    /// Returns the frozen file.
    async fn checkpoint_disk(
        &self,
        vm: &mut VmRecord,
        new_overlay: &Path,
    ) -> Result<PathBuf, VmError>;
    /// Starts a new VM from a snapshot and returns it with its agent connected.
    async fn launch_with_agent(
        &self,
        snapshot: &Snapshot,
        name: &str,
    ) -> Result<(VmRecord, AgentClient), VmError>;
    /// Starts a new VM from a snapshot with internet egress or without (its
    /// connectors) and returns it with its agent connected. The default
    /// launches and then sets egress; a driver with networks decides before
    /// the guest runs, so a VM without egress never has it.
    async fn launch_with_egress(
        &self,
        snapshot: &Snapshot,
        name: &str,
        egress: bool,
    ) -> Result<(VmRecord, AgentClient), VmError> {
        let (mut vm, agent) = self.launch_with_agent(snapshot, name).await?;
        if let Err(err) = self.set_egress(&mut vm, egress).await {
            let _ = self.remove(&vm).await;
            return Err(err);
        }
        Ok((vm, agent))
    }
    /// Starts a new VM from a snapshot and waits until its agent answers.
    async fn launch(&self, snapshot: &Snapshot, name: &str) -> Result<VmRecord, VmError> {
        self.launch_with_agent(snapshot, name)
            .await
            .map(|(vm, _agent)| vm)
    }
    /// Prepares a warm-pool slot from `snapshot`: a VM restored under a
    /// slot name (`.pool-ID`), its agent greeted, one command run (so the
    /// guest's exec path is translated), then paused. Drivers without a pool
    /// answer [`VmError::Unsupported`] and every launch is cold.
    async fn prewarm(&self, _snapshot: &Snapshot) -> Result<Prewarmed, VmError> {
        Err(VmError::Unsupported("warm pool"))
    }
    /// Turns a prewarmed slot into VM `name`: names it, lets the guest run and
    /// sends `restored` (clock and RNG reseed, so no two VMs of one pool share
    /// random state). A slot whose process died is removed and refused.
    async fn launch_prewarmed(
        &self,
        slot: Prewarmed,
        _name: &str,
    ) -> Result<(VmRecord, AgentClient), VmError> {
        let _ = self.remove(&slot.vm).await;
        Err(VmError::Unsupported("warm pool"))
    }
    /// Removes a prewarmed slot that will not be launched (its process and files).
    async fn discard_prewarmed(&self, slot: Prewarmed) {
        let _ = self.remove(&slot.vm).await;
    }
    /// Writes the VM's memory and state to its directory and ends its process.
    async fn suspend(&self, vm: &mut VmRecord) -> Result<(), VmError>;
    /// Restores a suspended VM and waits until its agent answers.
    async fn resume(&self, vm: &mut VmRecord) -> Result<(), VmError>;
    /// Asks the guest to sync and power off, and waits for the VM to end.
    async fn shutdown(&self, vm: &mut VmRecord) -> Result<(), VmError>;
    /// Stops the VM and removes everything it left on disk.
    async fn remove(&self, vm: &VmRecord) -> Result<(), VmError>;
    /// Gives a running VM internet egress or takes it away (its connectors,
    /// chosen at launch); kept in the record, so a resume restores it.
    async fn set_egress(&self, vm: &mut VmRecord, egress: bool) -> Result<(), VmError> {
        vm.egress = egress;
        Ok(())
    }
    /// Bytes the VM has sent to the internet since its process started
    /// (`None`: it has no host network).
    async fn egress_bytes(&self, _vm: &VmRecord) -> Option<u64> {
        None
    }
}

//! hearth's VM layer: boots, snapshots, launches, suspends and resumes Linux
//! microVMs, and talks to the agent inside them.
//!
//! - [`Driver`] is the interface a VMM implements; [`qemu::QemuDriver`] is the one
//!   implementation today (QEMU's `microvm` machine driven over QMP).
//! - [`VmRecord`] is a VM's persisted description (`vm.json` in its directory), so
//!   any process (the CLI, the server after a restart) can find and drive it.
//! - [`snapshot`] reads and writes snapshot directories; [`pool`] keeps QEMU
//!   processes started ahead of time so a launch pays only the restore.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub mod accel;
pub mod agent;
pub mod assets;
pub mod disk;
pub mod initramfs;
pub mod pins;
pub mod pool;
pub mod qemu;
pub mod qmp;
pub mod snapshot;

pub use accel::Accel;
pub use agent::{AgentClient, AgentError, ExecOutput};
pub use assets::{AssetError, Assets};
pub use qemu::{QemuDriver, VmError};
pub use snapshot::{Snapshot, SnapshotError, Verify};

/// An error and its sources on one line (`a: b: c`), for logs and reasons.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Size of a VM: snapshots restore only into the same shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MachineShape {
    pub memory_mib: u32,
    pub vcpus: u8,
}

impl Default for MachineShape {
    fn default() -> Self {
        Self {
            memory_mib: 256,
            vcpus: 1,
        }
    }
}

/// Lifecycle of a VM. Transitions are checked by [`VmState::can_become`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// QEMU runs the guest.
    Running,
    /// Memory, CPU and device state are on disk; no QEMU process.
    Suspended,
    /// The guest powered off cleanly; only its disk remains.
    Stopped,
}

impl VmState {
    pub fn can_become(self, next: VmState) -> bool {
        matches!(
            (self, next),
            (VmState::Running, VmState::Suspended)
                | (VmState::Suspended, VmState::Running)
                | (VmState::Running, VmState::Stopped)
        )
    }
}

/// Where a running VM's RAM lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Memory {
    /// A file mapped shared: the VM's own RAM file, which a snapshot copies
    /// without putting RAM through the migration stream.
    SharedFile { path: PathBuf },
    /// A snapshot's memory file mapped private (copy-on-write): pages a clone has
    /// not written stay shared with every other clone in the page cache.
    PrivateFile { path: PathBuf },
    /// Ordinary private RAM, filled from a full migration stream: the naive
    /// restore the benchmark compares against.
    Anonymous,
}

impl Memory {
    pub fn path(&self) -> Option<&Path> {
        match self {
            Memory::SharedFile { path } | Memory::PrivateFile { path } => Some(path),
            Memory::Anonymous => None,
        }
    }
}

/// How the VM came to be.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Origin {
    Boot { image: String },
    Snapshot { dir: PathBuf },
}

/// Everything needed to find, drive and re-create a VM's QEMU process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    pub name: String,
    /// Names the current QEMU process (`-name hearth-ID`), so a recycled pid is
    /// never mistaken for it.
    pub instance: String,
    pub dir: PathBuf,
    pub state: VmState,
    /// QEMU's process id while running.
    pub pid: Option<u32>,
    pub shape: MachineShape,
    pub accel: Accel,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub cmdline: String,
    /// The VM's copy-on-write disk overlay (qcow2).
    pub disk: PathBuf,
    pub memory: Memory,
    pub origin: Origin,
    pub created_unix: u64,
    /// A virtio-net device on QEMU's user-mode network (outbound only, NAT).
    /// Only cold-booted VMs have one; snapshots of them are not made.
    #[serde(default)]
    pub user_network: bool,
}

impl VmRecord {
    pub fn qmp_socket(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }
    pub fn agent_socket(&self) -> PathBuf {
        self.dir.join("agent.sock")
    }
    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }
    pub fn qemu_log(&self) -> PathBuf {
        self.dir.join("qemu.log")
    }
    pub fn suspend_state(&self) -> PathBuf {
        self.dir.join("suspend.state")
    }
}

/// Checks a VM name: 1-40 characters of `[A-Za-z0-9_-]`, not starting with `-`.
/// Names become directory names and socket paths, so nothing else is allowed.
pub fn validate_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 40
        && !name.starts_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
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
    /// Give the guest outbound network through QEMU's user-mode NAT.
    pub user_network: bool,
    /// Virtual size of the overlay in bytes when larger than the base's
    /// (room to grow the filesystem in the guest); `None`: the base's size.
    pub disk_size: Option<u64>,
}

/// A VMM that can run hearth guests. Implementations persist each VM's
/// [`VmRecord`] before acting, so another process can pick the VM up.
#[allow(async_fn_in_trait)]
pub trait Driver {
    /// Boots a VM from a base image and waits until its agent answers.
    async fn boot(&self, request: &BootRequest) -> Result<VmRecord, VmError>;
    /// Pauses the VM, writes a snapshot into `out`, and lets the VM run on.
    async fn snapshot(&self, vm: &VmRecord, out: &Path) -> Result<Snapshot, VmError>;
    /// Starts a new VM from a snapshot and waits until its agent answers.
    async fn launch(&self, snapshot: &Snapshot, name: &str) -> Result<VmRecord, VmError>;
    /// Writes the VM's memory and state to its directory and ends its process.
    async fn suspend(&self, vm: &mut VmRecord) -> Result<(), VmError>;
    /// Restores a suspended VM and waits until its agent answers.
    async fn resume(&self, vm: &mut VmRecord) -> Result<(), VmError>;
    /// Asks the guest to sync and power off, and waits for the VM to end.
    async fn shutdown(&self, vm: &mut VmRecord) -> Result<(), VmError>;
    /// Stops the VM and removes everything it left on disk.
    async fn remove(&self, vm: &VmRecord) -> Result<(), VmError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(validate_name("a"));
        assert!(validate_name("web-1_x"));
        assert!(!validate_name(""));
        assert!(!validate_name("-x"));
        assert!(!validate_name("../x"));
        assert!(!validate_name("a/b"));
        assert!(!validate_name(&"a".repeat(41)));
    }

    #[test]
    fn state_transitions() {
        assert!(VmState::Running.can_become(VmState::Suspended));
        assert!(VmState::Suspended.can_become(VmState::Running));
        assert!(!VmState::Running.can_become(VmState::Running));
        assert!(!VmState::Suspended.can_become(VmState::Suspended));
        assert!(VmState::Running.can_become(VmState::Stopped));
        assert!(!VmState::Stopped.can_become(VmState::Running));
        assert!(!VmState::Suspended.can_become(VmState::Stopped));
    }
}

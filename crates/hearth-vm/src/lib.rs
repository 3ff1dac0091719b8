//! hearth's VM layer: boots, snapshots, launches, suspends and resumes Linux
//! microVMs, and talks to the agent inside them.
//!
//! - [`Driver`] is the interface a VMM implements; [`qemu::QemuDriver`] is the one
//!   implementation today (QEMU's `microvm` machine driven over QMP).
//! - [`VmRecord`] is a VM's persisted description (`vm.json` in its directory), so
//!   any process (the CLI, the server after a restart) can find and drive it.
//! - [`snapshot`] reads and writes snapshot directories; [`pool`] keeps QEMU
//!   processes started ahead of time so a launch pays only the restore.

pub mod accel;
pub mod agent;
pub mod assets;
pub mod cgroup;
pub mod console;
pub mod disk;
pub mod driver;
pub mod errors;
pub mod initramfs;
pub mod jail;
pub mod net;
pub mod pins;
pub mod pool;
pub mod qemu;
pub mod qmp;
pub mod record;
pub mod slot;
pub mod snapshot;
#[cfg(feature = "testing")]
pub mod testing;
pub mod usage;

pub use accel::Accel;
pub use agent::{AgentClient, AgentError, ExecOutput};
pub use assets::{AssetError, Assets};
pub use cgroup::{CgroupConfig, CgroupError, CgroupLimits, VmCgroup, VmUsage};
pub use driver::{BootRequest, ColdBoot, Driver, VmError, VmProcess};
pub use errors::error_chain;
pub use jail::{JailConfig, JailError, JailMode};
pub use qemu::QemuDriver;
pub use record::{
    is_pool_slot_name, validate_name, MachineShape, Memory, Origin, VmRecord, VmState,
};
pub use slot::Prewarmed;
pub use snapshot::{Snapshot, SnapshotError, Verify};

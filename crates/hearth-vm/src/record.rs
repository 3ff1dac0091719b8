//! A VM's persisted description ([`VmRecord`], `vm.json` in its directory) and
//! the values in it: shape, state, memory and origin.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::accel::Accel;

/// Size of a VM: snapshots restore only into the same shape.
///
/// `memory_mib` and `vcpus` are the peak the guest sees (QEMU's `-m` and
/// `-smp`); `baseline_mib` is what the size guarantees and bills whenever the
/// VM runs (the reference's `minimumMemoryInMiB`): the per-VM cgroup weights
/// CPU by the baseline and caps at the peak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MachineShape {
    pub memory_mib: u32,
    pub vcpus: u8,
    /// 0 in records written before baselines: the baseline is the peak.
    #[serde(default)]
    pub baseline_mib: u32,
}

impl Default for MachineShape {
    fn default() -> Self {
        Self {
            memory_mib: 256,
            vcpus: 1,
            baseline_mib: 0,
        }
    }
}

impl MachineShape {
    /// A shape whose baseline is its peak (no burst).
    pub fn fixed(memory_mib: u32, vcpus: u8) -> Self {
        Self {
            memory_mib,
            vcpus,
            baseline_mib: memory_mib,
        }
    }

    /// The reference's rule for a baseline: the VM bursts to 4x memory and
    /// vCPU, with one vCPU per 2 GiB of peak memory (at least one).
    pub fn burst_of(baseline_mib: u32) -> Self {
        let memory_mib = baseline_mib.saturating_mul(4);
        let vcpus = u8::try_from((memory_mib / 2048).max(1)).unwrap_or(u8::MAX);
        Self {
            memory_mib,
            vcpus,
            baseline_mib,
        }
    }

    /// The guaranteed memory, in MiB.
    pub fn baseline_memory_mib(&self) -> u32 {
        if self.baseline_mib == 0 {
            self.memory_mib
        } else {
            self.baseline_mib.min(self.memory_mib)
        }
    }

    /// The guaranteed vCPUs: the peak's share in the same ratio as memory
    /// (a quarter of a vCPU for the 512 MiB size).
    pub fn baseline_vcpus(&self) -> f64 {
        if self.memory_mib == 0 {
            return f64::from(self.vcpus);
        }
        f64::from(self.vcpus) * f64::from(self.baseline_memory_mib()) / f64::from(self.memory_mib)
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
    /// The VM has a virtio-net card (every cold boot since networking; a
    /// clone when its snapshot's VM had one). Without a host network the card
    /// has no backend (see [`crate::net`]).
    #[serde(default)]
    pub nic: bool,
    /// The card's namespace has an uplink to the internet (`INTERNET_EGRESS`);
    /// otherwise it reaches nothing. Kept across suspend and resume.
    #[serde(default)]
    pub egress: bool,
    /// The uid (and gid) its QEMU runs as in the jail: claimed when the VM is
    /// made and kept until it is removed, so no other VM gets it meanwhile.
    /// `None`: a VM from before the jail, or an unjailed driver.
    #[serde(default)]
    pub jail_uid: Option<u32>,
    /// A virtio-balloon device with free page reporting: pages the guest
    /// frees go back to the host (a hole in the RAM file). Part of the
    /// machine: a snapshot restores only into a VM that has it too.
    #[serde(default)]
    pub balloon: bool,
    /// While suspended: the file that holds the VM's RAM when the saved state
    /// does not (the lean format: the state file has CPU and devices only, and
    /// resume maps this file instead of reading RAM back). None: the state
    /// stream carries the RAM, as every suspend before this format did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suspended_memory: Option<PathBuf>,
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
    /// Where a suspended VM's RAM is kept in the lean format (on disk, in the
    /// VM's directory; a resumed VM maps it shared, so a later suspend writes
    /// only the pages the guest dirtied).
    pub fn memory_file(&self) -> PathBuf {
        self.dir.join("memory.ram")
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

/// The directory-name prefix of warm-pool slots (`vms/.pool-ID`): user names
/// cannot start with a dot, so a slot never collides with a VM.
pub const POOL_SLOT_PREFIX: &str = ".pool-";

/// True for the directory name of a warm-pool slot (`.pool-` + a valid name).
pub fn is_pool_slot_name(name: &str) -> bool {
    name.strip_prefix(POOL_SLOT_PREFIX)
        .is_some_and(validate_name)
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
    fn reference_sizes_burst_four_times() {
        let table = [
            (512, 2048, 1, 0.25),
            (1024, 4096, 2, 0.5),
            (2048, 8192, 4, 1.0),
            (4096, 16384, 8, 2.0),
            (8192, 32768, 16, 4.0),
        ];
        for (baseline, peak, vcpus, baseline_vcpus) in table {
            let shape = MachineShape::burst_of(baseline);
            assert_eq!((shape.memory_mib, shape.vcpus), (peak, vcpus), "{baseline}");
            assert_eq!(shape.baseline_memory_mib(), baseline);
            assert!((shape.baseline_vcpus() - baseline_vcpus).abs() < 1e-9);
        }
        // Records from before baselines: the baseline is the peak.
        let old: MachineShape =
            serde_json::from_str(r#"{"memory_mib":256,"vcpus":1}"#).expect("old record");
        assert_eq!(old.baseline_memory_mib(), 256);
        assert_eq!(old.baseline_vcpus(), 1.0);
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

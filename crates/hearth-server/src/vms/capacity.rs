//! Host capacity admission: before a launch, a resume or a build starts a VM,
//! check that the host can hold it at its full size without taking anything
//! from the VMs already running.
//!
//! A running VM grows: its guest touches more of its RAM (pages charged to
//! host memory, and to the tmpfs holding its RAM file when it has one: a full
//! tmpfs would SIGBUS the guest), QEMU's translation cache fills. So admission
//! counts, for every VM already admitted, what it may still grow into (its
//! cgroup limit minus what it uses now; its RAM file's full size minus what is
//! allocated), plus what was admitted moments ago and is still starting, and
//! keeps the operator's reserve free on top. The arithmetic is [`admit`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hearth_vm::{CgroupLimits, Driver, Memory, VmState};

const MIB: u64 = 1 << 20;
/// How long an admission is counted on its own before its VM must show up
/// running (a cold boot under TCG takes up to a minute on a busy host); past
/// it the VM failed to start or already counts as running.
const STARTING_GRACE: Duration = Duration::from_secs(180);

/// What the operator keeps free for the host itself (`hearth serve
/// --reserve-memory-mib`, `--reserve-disk-mib`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reserve {
    pub memory_mib: u64,
    pub disk_mib: u64,
    /// Count running microVMs at their baseline, not their peak (`hearth
    /// serve --overcommit-memory`): many more fit, and bursts share what is
    /// left, so enough of them at once can run the host short (QEMUs are the
    /// OOM killer's first choice, `oom_score_adj` 1000, never the server).
    pub overcommit: bool,
}

impl Default for Reserve {
    /// 1 GiB of memory for the server, the kernel and the page cache of the
    /// snapshots; 2 GiB of disk for the store, logs and image builds.
    fn default() -> Self {
        Self {
            memory_mib: 1024,
            disk_mib: 2048,
            overcommit: false,
        }
    }
}

/// The host's free resources right now, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostFree {
    /// `MemAvailable` of `/proc/meminfo`.
    pub memory: u64,
    /// Free space of the file system holding RAM files (tmpfs by default).
    pub ram_fs: u64,
    /// Free space of the file system holding the data directory.
    pub disk: u64,
    /// True when the RAM files' file system is memory (tmpfs): its pages are
    /// already part of `memory`'s accounting.
    pub ram_fs_is_memory: bool,
}

/// What a VM needs, or what admitted VMs may still grow into, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Demand {
    /// Host memory (guest RAM and QEMU's overhead).
    pub memory: u64,
    /// Room on the RAM files' file system.
    pub ram_fs: u64,
    /// Room in the data directory (suspend state, snapshot, disk growth).
    pub disk: u64,
}

impl Demand {
    fn add(self, other: Demand) -> Demand {
        Demand {
            memory: self.memory.saturating_add(other.memory),
            ram_fs: self.ram_fs.saturating_add(other.ram_fs),
            disk: self.disk.saturating_add(other.disk),
        }
    }
}

/// Which resource is short, with the figures in MiB (for the error message).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Shortfall {
    #[error("host memory: {needed_mib} MiB needed, {free_mib} MiB free after what running microVMs may still use and the operator's reserve")]
    Memory { needed_mib: u64, free_mib: u64 },
    #[error("RAM file space: {needed_mib} MiB needed, {free_mib} MiB free after what running microVMs may still use")]
    RamFs { needed_mib: u64, free_mib: u64 },
    #[error(
        "disk space: {needed_mib} MiB needed, {free_mib} MiB free after the operator's reserve"
    )]
    Disk { needed_mib: u64, free_mib: u64 },
}

/// Admits `need` when the host's free resources, less what admitted VMs may
/// still grow into (`committed`) and the operator's reserve, hold it.
pub fn admit(
    free: HostFree,
    reserve: Reserve,
    committed: Demand,
    need: Demand,
) -> Result<(), Shortfall> {
    let memory_left = free
        .memory
        .saturating_sub(committed.memory)
        .saturating_sub(reserve.memory_mib.saturating_mul(MIB));
    if need.memory > memory_left {
        return Err(Shortfall::Memory {
            needed_mib: need.memory.div_ceil(MIB),
            free_mib: memory_left / MIB,
        });
    }
    // A RAM file on tmpfs draws on host memory (already checked above) and on
    // the tmpfs's own size limit; the reserve is host memory, kept once.
    let ram_fs_left = free.ram_fs.saturating_sub(committed.ram_fs);
    let ram_fs_left = if free.ram_fs_is_memory {
        ram_fs_left
    } else {
        ram_fs_left.saturating_sub(reserve.memory_mib.saturating_mul(MIB))
    };
    if need.ram_fs > ram_fs_left {
        return Err(Shortfall::RamFs {
            needed_mib: need.ram_fs.div_ceil(MIB),
            free_mib: ram_fs_left / MIB,
        });
    }
    let disk_left = free
        .disk
        .saturating_sub(committed.disk)
        .saturating_sub(reserve.disk_mib.saturating_mul(MIB));
    if need.disk > disk_left {
        return Err(Shortfall::Disk {
            needed_mib: need.disk.div_ceil(MIB),
            free_mib: disk_left / MIB,
        });
    }
    Ok(())
}

/// What a VM about to start needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// A launch from an image's snapshot: guest RAM is a private copy-on-write
    /// mapping of the snapshot's memory file (host memory, no RAM file).
    Launch,
    /// A resume or a build VM: guest RAM lives in a shared RAM file.
    WithRamFile,
}

/// The demand of a VM of size `baseline_mib` (its `minimumMemoryInMiB`)
/// started as `start`: everything at the baseline, as the reference's quota
/// counts it (the cgroup caps a burst at the peak; counting peaks refused
/// most builds on a 23 GiB host). QEMU's allowance is its whole cgroup
/// allowance, translation cache included, unless the host overcommits
/// (`overcommit`): then the cache, like a burst, shares what is left.
pub fn demand_of(
    baseline_mib: u32,
    accel: hearth_vm::Accel,
    start: Start,
    overcommit: bool,
) -> Demand {
    let guest = u64::from(baseline_mib) * MIB;
    let qemu_mib = if overcommit {
        hearth_vm::cgroup::qemu_base_overhead_mib()
    } else {
        hearth_vm::cgroup::qemu_overhead_mib(accel)
    };
    Demand {
        memory: guest + (qemu_mib << 20),
        ram_fs: match start {
            Start::Launch => 0,
            Start::WithRamFile => guest,
        },
        // Its suspend state (up to its whole RAM) or its build's snapshot.
        disk: guest,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CapacityError {
    #[error("not enough {0}")]
    Short(#[from] Shortfall),
    #[error("cannot read the host's free resources")]
    Probe(#[source] std::io::Error),
}

/// Admissions of one server: the operator's reserve and the VMs admitted
/// but not yet running.
#[derive(Debug)]
pub struct Capacity {
    driver: Arc<dyn Driver>,
    reserve: Reserve,
    ram_dir: PathBuf,
    data_dir: PathBuf,
    /// Admitted moments ago, by key (a VM name, or a build's id), with when.
    starting: Mutex<HashMap<String, (Demand, Instant)>>,
    /// One admission decision at a time (two racing requests must not both
    /// take the last free gigabyte).
    decide: Mutex<()>,
}

impl Capacity {
    pub fn new(driver: Arc<dyn Driver>, reserve: Reserve, ram_dir: &Path, data_dir: &Path) -> Self {
        Self {
            driver,
            reserve,
            ram_dir: ram_dir.to_path_buf(),
            data_dir: data_dir.to_path_buf(),
            starting: Mutex::default(),
            decide: Mutex::default(),
        }
    }

    /// What a VM of `baseline_mib` started as `start` counts on this host
    /// ([`demand_of`] under the operator's overcommit choice).
    pub fn demand(&self, baseline_mib: u32, start: Start) -> Demand {
        demand_of(
            baseline_mib,
            self.driver.accel(),
            start,
            self.reserve.overcommit,
        )
    }

    /// Admits a VM that `key` names (the VM's name; a build's id for a build
    /// VM) needing `need`, or says what is short.
    pub fn admit(&self, key: &str, need: Demand) -> Result<(), CapacityError> {
        let _one = self.decide.lock().unwrap_or_else(|p| p.into_inner());
        let free = probe(&self.ram_dir, &self.data_dir).map_err(CapacityError::Probe)?;
        let committed = self.committed();
        admit(free, self.reserve, committed, need)?;
        self.starting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.to_string(), (need, Instant::now()));
        Ok(())
    }

    /// Drops an admission whose VM will not start after all.
    pub fn release(&self, key: &str) {
        self.starting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }

    /// What running VMs may still grow into, plus the admissions still starting.
    fn committed(&self) -> Demand {
        let mut total = Demand::default();
        let mut running: Vec<String> = Vec::new();
        for vm in self.driver.list().unwrap_or_default() {
            if vm.state != VmState::Running || !self.driver.is_alive(&vm) {
                continue;
            }
            // What it may grow into: its peak (the cgroup's limit), or with
            // overcommit what its admission counted.
            let limit = if self.reserve.overcommit {
                demand_of(
                    vm.shape.baseline_memory_mib(),
                    vm.accel,
                    Start::Launch,
                    true,
                )
                .memory
            } else {
                CgroupLimits::for_shape_on(&vm.shape, vm.accel).memory_bytes
            };
            let guest = u64::from(vm.shape.memory_mib) * MIB;
            let ram_allocated = match &vm.memory {
                Memory::SharedFile { path } => allocated_bytes(path),
                _ => 0,
            };
            // Without a cgroup to ask, the RAM file is the best sign of use.
            let used = self
                .driver
                .usage(&vm)
                .map_or(ram_allocated, |u| u.memory_bytes);
            total = total.add(Demand {
                memory: limit.saturating_sub(used),
                ram_fs: match &vm.memory {
                    Memory::SharedFile { .. } => guest.saturating_sub(ram_allocated),
                    _ => 0,
                },
                // Disk growth of running VMs is not reserved: it is bounded by
                // their disk sizes, far above what they write in practice;
                // each admission's own need and the reserve cover the rest.
                disk: 0,
            });
            running.push(vm.name);
        }
        let mut starting = self.starting.lock().unwrap_or_else(|p| p.into_inner());
        starting.retain(|key, (_, at)| at.elapsed() < STARTING_GRACE && !running.contains(key));
        for (need, _) in starting.values() {
            total = total.add(*need);
        }
        total
    }
}

/// Bytes a file occupies (its allocated blocks, not its length: RAM files
/// are sparse until the guest touches its memory).
fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).map_or(0, |m| m.blocks().saturating_mul(512))
}

/// The host's free resources.
fn probe(ram_dir: &Path, data_dir: &Path) -> std::io::Result<HostFree> {
    let meminfo = std::fs::read_to_string("/proc/meminfo")?;
    let memory = meminfo_kib(&meminfo, "MemAvailable:")
        .ok_or_else(|| std::io::Error::other("no MemAvailable in /proc/meminfo"))?
        .saturating_mul(1024);
    let space = |path: &Path| -> std::io::Result<(u64, bool)> {
        let stat = rustix::fs::statfs(path)?;
        let vfs = rustix::fs::statvfs(path)?;
        // TMPFS_MAGIC of statfs(2).
        let tmpfs = stat.f_type as u64 == 0x0102_1994;
        Ok((vfs.f_bavail.saturating_mul(vfs.f_frsize), tmpfs))
    };
    let (ram_fs, ram_fs_is_memory) = space(ram_dir)?;
    let (disk, _) = space(data_dir)?;
    Ok(HostFree {
        memory,
        ram_fs,
        disk,
        ram_fs_is_memory,
    })
}

fn meminfo_kib(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn free(memory_gib: u64, ram_fs_gib: u64, disk_gib: u64) -> HostFree {
        HostFree {
            memory: memory_gib * GIB,
            ram_fs: ram_fs_gib * GIB,
            disk: disk_gib * GIB,
            ram_fs_is_memory: true,
        }
    }

    fn demand(memory_gib: u64, ram_fs_gib: u64, disk_gib: u64) -> Demand {
        Demand {
            memory: memory_gib * GIB,
            ram_fs: ram_fs_gib * GIB,
            disk: disk_gib * GIB,
        }
    }

    #[test]
    fn admission_table() {
        let reserve = Reserve {
            memory_mib: 1024,
            disk_mib: 2048,
            overcommit: false,
        };
        let none = Demand::default();
        // (case, host free, committed, need, expected)
        type Case = (
            &'static str,
            HostFree,
            Demand,
            Demand,
            Result<(), &'static str>,
        );
        let cases: Vec<Case> = vec![
            ("fits", free(8, 8, 20), none, demand(2, 2, 2), Ok(())),
            (
                "exactly fits",
                free(3, 8, 20),
                none,
                demand(2, 2, 2),
                Ok(()),
            ),
            (
                "reserve takes the last GiB",
                free(3, 8, 20),
                none,
                demand(3, 0, 0),
                Err("memory"),
            ),
            (
                "running VMs may still grow",
                free(8, 8, 20),
                demand(6, 0, 0),
                demand(2, 0, 0),
                Err("memory"),
            ),
            (
                "tmpfs full though memory is free",
                free(8, 1, 20),
                none,
                demand(2, 2, 0),
                Err("ram"),
            ),
            (
                "tmpfs committed to running VMs",
                free(8, 4, 20),
                demand(0, 3, 0),
                demand(1, 2, 0),
                Err("ram"),
            ),
            (
                "a launch needs no tmpfs",
                free(8, 0, 20),
                none,
                demand(2, 0, 2),
                Ok(()),
            ),
            (
                "disk reserve",
                free(8, 8, 3),
                none,
                demand(1, 0, 2),
                Err("disk"),
            ),
            (
                "disk committed",
                free(8, 8, 10),
                demand(0, 0, 7),
                demand(1, 0, 2),
                Err("disk"),
            ),
            ("nothing free", free(0, 0, 0), none, demand(0, 0, 0), Ok(())),
            (
                "nothing free, something needed",
                free(0, 0, 0),
                none,
                Demand { memory: 1, ..none },
                Err("memory"),
            ),
        ];
        for (case, host, committed, need, expected) in cases {
            let got = admit(host, reserve, committed, need).map_err(|s| match s {
                Shortfall::Memory { .. } => "memory",
                Shortfall::RamFs { .. } => "ram",
                Shortfall::Disk { .. } => "disk",
            });
            assert_eq!(got, expected, "{case}");
        }
    }

    #[test]
    fn a_ram_dir_on_disk_keeps_the_memory_reserve_too() {
        let host = HostFree {
            ram_fs_is_memory: false,
            ..free(8, 2, 20)
        };
        let need = demand(1, 2, 0);
        assert!(matches!(
            admit(host, Reserve::default(), Demand::default(), need),
            Err(Shortfall::RamFs {
                needed_mib: 2048,
                free_mib: 1024
            })
        ));
    }

    #[test]
    fn the_message_gives_the_figures() {
        let err = admit(
            free(2, 8, 20),
            Reserve::default(),
            Demand::default(),
            demand(4, 0, 0),
        )
        .expect_err("short");
        assert_eq!(
            err.to_string(),
            "host memory: 4096 MiB needed, 1024 MiB free after what running microVMs may still use and the operator's reserve"
        );
    }

    #[test]
    fn demand_follows_the_start() {
        // The 512 MiB size: everything at the baseline (plus QEMU).
        let launch = demand_of(512, hearth_vm::Accel::Tcg, Start::Launch, false);
        assert_eq!(launch.ram_fs, 0);
        assert_eq!(launch.disk, 512 * MIB);
        assert_eq!(
            launch.memory,
            (512 + hearth_vm::cgroup::qemu_overhead_mib(hearth_vm::Accel::Tcg)) * MIB
        );
        let resume = demand_of(512, hearth_vm::Accel::Tcg, Start::WithRamFile, false);
        assert_eq!(resume.ram_fs, 512 * MIB);
    }

    /// An overcommitting host leaves the translation cache out of QEMU's
    /// allowance (it fills as the guest runs new code, like a burst), so
    /// fifty 256 MiB microVMs fit where they did not; the cgroup limit still
    /// holds the whole cache.
    #[test]
    fn overcommit_leaves_the_translation_cache_out() {
        let tcg = hearth_vm::Accel::Tcg;
        let full = demand_of(256, tcg, Start::Launch, false);
        let lean = demand_of(256, tcg, Start::Launch, true);
        assert_eq!(lean.memory, (256 + 96) * MIB);
        assert_eq!(full.memory, (256 + 96 + 256) * MIB);
        assert_eq!((lean.ram_fs, lean.disk), (full.ram_fs, full.disk));
        // Under KVM there is no cache: the two agree.
        let kvm = hearth_vm::Accel::Kvm;
        assert_eq!(
            demand_of(256, kvm, Start::Launch, true),
            demand_of(256, kvm, Start::Launch, false)
        );
        // 50 of them and the default reserve on a host with 20 GiB available.
        let reserve = Reserve {
            overcommit: true,
            ..Reserve::default()
        };
        let fifty = |one: Demand| Demand {
            memory: one.memory * 49,
            ..Demand::default()
        };
        let host = free(20, 20, 100);
        assert!(admit(host, reserve, fifty(lean), lean).is_ok());
        assert!(admit(host, reserve, fifty(full), full).is_err());
    }

    /// Running VMs count at what they may still grow into (cgroup limit
    /// minus usage), admissions until their VM runs; suspended VMs count for
    /// nothing.
    #[test]
    fn commitments_of_running_suspended_and_starting_vms() {
        use hearth_vm::testing::FakeDriver;
        let dir = tempfile::tempdir().expect("dir");
        let fake = FakeDriver::without_agent(&dir.path().join("vmm"));
        let running = fake.insert_running("running");
        fake.set_usage(
            "running",
            hearth_vm::VmUsage {
                cpu_ns: 0,
                memory_bytes: 100 * MIB,
            },
        );
        fake.insert_suspended("suspended");
        let limit = CgroupLimits::for_shape_on(&running.shape, running.accel).memory_bytes;
        let capacity = Capacity::new(
            Arc::new(fake.clone()),
            Reserve {
                memory_mib: 0,
                disk_mib: 0,
                overcommit: false,
            },
            dir.path(),
            dir.path(),
        );
        assert_eq!(capacity.committed().memory, limit - 100 * MIB);
        // Admitted and starting: counted in full until its VM runs.
        let need = demand_of(256, hearth_vm::Accel::Tcg, Start::Launch, false);
        capacity
            .admit("next", need)
            .expect("a tiny VM fits this host");
        assert_eq!(capacity.committed().memory, limit - 100 * MIB + need.memory);
        let next = fake.insert_running("next");
        let next_limit = CgroupLimits::for_shape_on(&next.shape, next.accel).memory_bytes;
        assert_eq!(capacity.committed().memory, limit - 100 * MIB + next_limit);
        // A refused or failed start gives its admission back.
        capacity.admit("failed", need).expect("fits");
        capacity.release("failed");
        assert_eq!(capacity.committed().memory, limit - 100 * MIB + next_limit);

        // With overcommit a running VM counts at its baseline's demand.
        let shaped = FakeDriver::without_agent(&dir.path().join("vmm2"));
        let bursting =
            shaped.insert_running_shaped("bursting", hearth_vm::MachineShape::burst_of(256));
        shaped.set_usage(
            "bursting",
            hearth_vm::VmUsage {
                cpu_ns: 0,
                memory_bytes: 100 * MIB,
            },
        );
        let overcommitted = Capacity::new(
            Arc::new(shaped),
            Reserve {
                memory_mib: 0,
                disk_mib: 0,
                overcommit: true,
            },
            dir.path(),
            dir.path(),
        );
        let baseline = demand_of(
            bursting.shape.baseline_memory_mib(),
            bursting.accel,
            Start::Launch,
            true,
        );
        let peak = CgroupLimits::for_shape_on(&bursting.shape, bursting.accel).memory_bytes;
        assert!(baseline.memory < peak);
        assert_eq!(
            overcommitted.committed().memory,
            baseline.memory - 100 * MIB
        );
    }

    #[test]
    fn meminfo_is_read_in_kib() {
        let text = "MemTotal:       24684048 kB\nMemAvailable:   23345000 kB\n";
        assert_eq!(meminfo_kib(text, "MemAvailable:"), Some(23_345_000));
        assert_eq!(meminfo_kib(text, "Nope:"), None);
    }
}

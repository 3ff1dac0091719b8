//! One cgroup per VM: its QEMU's memory limit, CPU quota and weight, and pids
//! limit, and its CPU and memory counters for metering.
//!
//! cgroup v1 (separate `memory`, `cpu`, `cpuacct` and `pids` hierarchies, as on
//! this project's CI hosts, where the unified hierarchy has no controllers) and
//! cgroup v2 are both handled; [`CgroupConfig::detect`] picks one at start.
//!
//! Hand-written rather than `cgroups-rs` (0.5): that crate pulls in a whole
//! D-Bus stack (`zbus`, unconditionally, for its systemd manager, which hearth
//! does not use) and places a v1 cgroup at one path in every hierarchy, while
//! hearth nests each VM under the server's own cgroup in each controller (the
//! server may be confined by its operator, and its VMs must stay inside that).
//! What is needed is a dozen file writes and reads, done here.
//!
//! Layout: `<server's cgroup>/<parent>/<instance>` in every controller used, where
//! `parent` is `hearth/<data directory key>` (see `QemuDriver`), so servers of
//! different data directories never touch each other's cgroups.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::record::MachineShape;
use crate::Accel;

/// The CFS period hearth sets: 100 ms, the kernel's default.
const CPU_PERIOD_US: u64 = 100_000;
/// v1 `cpu.shares` of one weight unit (v2 `cpu.weight` 100 = v1 1024 shares).
const SHARES_PER_WEIGHT: u64 = 1024 / 100 + 1;

/// What QEMU itself needs beyond the guest's RAM and its translation cache.
/// Measured on this project's CI host (QEMU 10.0, TCG, `-M microvm`, Debian's
/// cloud kernel, 256 MiB guests) from `/proc/PID/smaps` of booted, idle QEMUs
/// and of one whose guest had just run out of memory: 86-96 MiB anonymous in
/// all, of which 50-57 MiB was the translation cache (the 256 MiB anonymous
/// mapping) and 36-39 MiB the rest (heap, thread stacks, the 14 MiB kernel image
/// a cold-booted QEMU keeps); QEMU's own text (27 MiB, shared page cache) is
/// charged to the cgroup that first reads it. The memory cgroup of an idle
/// booted guest read 207-209 MiB: 123 MiB guest RAM touched (tmpfs), 82-83 MiB
/// anonymous (`crates/hearth-vm/tests/limits.rs` prints these figures).
/// 96 MiB covers 39 + 27 with room for the heap growing with device activity.
const QEMU_BASE_OVERHEAD_MIB: u64 = 96;
/// Under TCG the translation cache is sized by `tb-size=` (see
/// [`Accel::qemu_arg`]): it is filled lazily, but a guest running enough
/// distinct code fills all of it, so the limit must hold it.
const TCG_TRANSLATION_CACHE_MIB: u64 = 256;
/// QEMU's threads besides the vCPUs: the main loop, the RCU thread, the I/O
/// thread pool of the block layer (up to 64 workers), the migration thread
/// and signal handling. 64 + a margin of 32 for transient helpers.
const QEMU_OTHER_THREADS: u64 = 96;

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("per-VM cgroups are unavailable: {0}")]
    Unavailable(&'static str),
    #[error("cannot read {0}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("cannot write {value:?} to {path}")]
    Write {
        path: PathBuf,
        value: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create cgroup {0}")]
    Create(PathBuf, #[source] std::io::Error),
    #[error("cannot remove cgroup {0}")]
    Remove(PathBuf, #[source] std::io::Error),
    #[error("{0} holds an unexpected value")]
    Parse(PathBuf),
    #[error("processes of cgroup {0} did not exit")]
    Busy(PathBuf),
}

/// Which cgroup interface the host offers, with the parent directory of the
/// VMs' cgroups in each controller used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupConfig {
    /// Separate v1 hierarchies (`cpu` and `cpuacct` may be one directory).
    V1 {
        memory: PathBuf,
        cpu: PathBuf,
        cpuacct: PathBuf,
        pids: PathBuf,
    },
    /// The unified hierarchy with the memory, cpu and pids controllers.
    V2 { parent: PathBuf },
}

/// A VM's limits; see [`CgroupLimits::for_shape`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CgroupLimits {
    /// Guest RAM plus QEMU's overhead.
    pub memory_bytes: u64,
    /// At most this many CPUs' time (its vCPUs).
    pub cpu_quota: u32,
    /// Share under contention, in cgroup v2's `cpu.weight` units (100 = one
    /// default process); v1 `cpu.shares` is derived from it.
    pub cpu_weight: u64,
    /// Threads and processes QEMU may have.
    pub pids: u64,
}

/// A VM's consumption so far, from its cgroup's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VmUsage {
    /// CPU time of every thread of the VM's QEMU, in nanoseconds.
    pub cpu_ns: u64,
    /// Memory charged now: guest RAM it touched (tmpfs pages included: they
    /// are charged to the writer), QEMU's own memory and its page cache.
    pub memory_bytes: u64,
}

impl CgroupLimits {
    /// Limits for a VM of `shape` under TCG (the larger overhead: a KVM host
    /// passes [`Accel::Kvm`] to [`Self::for_shape_on`]).
    pub fn for_shape(shape: &MachineShape) -> Self {
        Self::for_shape_on(shape, Accel::Tcg)
    }

    pub fn for_shape_on(shape: &MachineShape, accel: Accel) -> Self {
        let vcpus = u32::from(shape.vcpus.max(1));
        Self {
            memory_bytes: (u64::from(shape.memory_mib) + qemu_overhead_mib(accel)) << 20,
            // The peak is the hard cap; the baseline's share is what the VM
            // is guaranteed under contention (100 per baseline vCPU).
            cpu_quota: vcpus,
            cpu_weight: ((100.0 * shape.baseline_vcpus()).round() as u64).max(1),
            pids: u64::from(vcpus) + QEMU_OTHER_THREADS,
        }
    }
}

/// What QEMU itself needs beyond the guest's RAM, its translation cache left
/// out: what an overcommitting host counts per VM (the cache fills only as
/// the guest runs new code; an idle clone's holds about 16 MiB).
pub fn qemu_base_overhead_mib() -> u64 {
    QEMU_BASE_OVERHEAD_MIB
}

/// Memory QEMU needs beyond the guest's RAM under `accel` (see the constants).
pub fn qemu_overhead_mib(accel: Accel) -> u64 {
    match accel {
        Accel::Tcg => QEMU_BASE_OVERHEAD_MIB + TCG_TRANSLATION_CACHE_MIB,
        Accel::Kvm => QEMU_BASE_OVERHEAD_MIB,
    }
}

/// One line of `/proc/self/mountinfo` that mounts a cgroup file system.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CgroupMount {
    point: PathBuf,
    v2: bool,
    /// v1: the controllers in the super options (`rw,memory`).
    controllers: Vec<String>,
}

fn parse_mountinfo(text: &str) -> Vec<CgroupMount> {
    let mut mounts = Vec::new();
    for line in text.lines() {
        // `ID PARENT MAJ:MIN ROOT POINT OPTS [TAGS...] - FSTYPE SOURCE SUPER`
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let Some(point) = left.split(' ').nth(4) else {
            continue;
        };
        let mut right = right.split(' ');
        let (Some(fstype), _, Some(options)) = (right.next(), right.next(), right.next()) else {
            continue;
        };
        let v2 = match fstype {
            "cgroup2" => true,
            "cgroup" => false,
            _ => continue,
        };
        mounts.push(CgroupMount {
            point: PathBuf::from(point.replace("\\040", " ")),
            v2,
            controllers: options.split(',').map(str::to_string).collect(),
        });
    }
    mounts
}

/// `/proc/self/cgroup`: (v1 controllers, path) per line; v2 has no controllers.
fn parse_proc_cgroup(text: &str) -> Vec<(Vec<String>, String)> {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ':');
            let _id = parts.next()?;
            let controllers = parts.next()?;
            let path = parts.next()?;
            let controllers = controllers
                .split(',')
                .filter(|c| !c.is_empty())
                .map(str::to_string)
                .collect();
            Some((controllers, path.to_string()))
        })
        .collect()
}

fn join_cgroup(mount: &Path, own: &str, parent: &str) -> PathBuf {
    mount
        .join(own.trim_start_matches('/'))
        .join(parent.trim_matches('/'))
}

impl CgroupConfig {
    /// Finds the controllers and creates `parent` under the server's own
    /// cgroup in each. `Unavailable` when the server is not root (it cannot
    /// create cgroups) or the host lacks a controller.
    pub fn detect(parent: &str) -> Result<CgroupConfig, CgroupError> {
        if !rustix::process::geteuid().is_root() {
            return Err(CgroupError::Unavailable("the server does not run as root"));
        }
        let read = |p: &str| {
            std::fs::read_to_string(p).map_err(|e| CgroupError::Read(PathBuf::from(p), e))
        };
        let mounts = parse_mountinfo(&read("/proc/self/mountinfo")?);
        let own = parse_proc_cgroup(&read("/proc/self/cgroup")?);
        let config = Self::choose(&mounts, &own, parent)?;
        config.create_parents()?;
        Ok(config)
    }

    /// The pure part of [`Self::detect`]: v2 when its mount has every
    /// controller, else v1 when each has a hierarchy.
    fn choose(
        mounts: &[CgroupMount],
        own: &[(Vec<String>, String)],
        parent: &str,
    ) -> Result<CgroupConfig, CgroupError> {
        if let Some(unified) = mounts.iter().find(|m| m.v2) {
            let available = std::fs::read_to_string(unified.point.join("cgroup.controllers"))
                .unwrap_or_default();
            let has = |c: &str| available.split_whitespace().any(|a| a == c);
            if has("memory") && has("cpu") && has("pids") {
                let own_path = own
                    .iter()
                    .find(|(c, _)| c.is_empty())
                    .map_or("/", |(_, p)| p.as_str());
                return Ok(CgroupConfig::V2 {
                    parent: join_cgroup(&unified.point, own_path, parent),
                });
            }
        }
        let v1 = |controller: &str| -> Result<PathBuf, CgroupError> {
            let mount = mounts
                .iter()
                .find(|m| !m.v2 && m.controllers.iter().any(|c| c == controller))
                .ok_or(CgroupError::Unavailable(
                    "the host has no cgroup hierarchy for memory, cpu, cpuacct or pids",
                ))?;
            let own_path = own
                .iter()
                .find(|(c, _)| c.iter().any(|c| c == controller))
                .map_or("/", |(_, p)| p.as_str());
            Ok(join_cgroup(&mount.point, own_path, parent))
        };
        Ok(CgroupConfig::V1 {
            memory: v1("memory")?,
            cpu: v1("cpu")?,
            cpuacct: v1("cpuacct")?,
            pids: v1("pids")?,
        })
    }

    /// The directories the VM cgroups go under (one per distinct hierarchy).
    fn parents(&self) -> Vec<&Path> {
        let mut dirs: Vec<&Path> = match self {
            CgroupConfig::V1 {
                memory,
                cpu,
                cpuacct,
                pids,
            } => vec![memory, cpu, cpuacct, pids],
            CgroupConfig::V2 { parent } => vec![parent],
        }
        .into_iter()
        .map(PathBuf::as_path)
        .collect();
        dirs.dedup();
        dirs
    }

    fn create_parents(&self) -> Result<(), CgroupError> {
        match self {
            CgroupConfig::V1 { .. } => {
                for dir in self.parents() {
                    std::fs::create_dir_all(dir)
                        .map_err(|e| CgroupError::Create(dir.to_path_buf(), e))?;
                }
            }
            CgroupConfig::V2 { parent } => {
                // v2 lets a cgroup hand controllers to its children only when
                // it holds no processes itself: every level from the root to
                // `parent` delegates memory, cpu and pids, and `parent`'s own
                // ancestors below the server's cgroup hold none.
                std::fs::create_dir_all(parent)
                    .map_err(|e| CgroupError::Create(parent.clone(), e))?;
                let mut chain: Vec<&Path> = parent.ancestors().collect();
                chain.reverse();
                for dir in chain {
                    let control = dir.join("cgroup.subtree_control");
                    if !control.exists() || dir == parent.as_path() {
                        continue;
                    }
                    write_file(&control, "+memory +cpu +pids")?;
                }
                write_file(&parent.join("cgroup.subtree_control"), "+memory +cpu +pids")?;
            }
        }
        self.weigh_parents()
    }

    /// Gives the VMs, together, the CPU weight of one busy process per host
    /// CPU. A new cgroup weighs as much as one process: left so, every VM of
    /// the host together would get one process's share under contention (on a
    /// busy host, a fraction of one CPU for all of them), while as plain
    /// processes each QEMU thread weighed one. More than this would let busy
    /// guests starve the server itself.
    fn weigh_parents(&self) -> Result<(), CgroupError> {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
        let (cpu_dir, file, value) = match self {
            CgroupConfig::V1 { cpu, .. } => (cpu, "cpu.shares", (1024 * cpus).to_string()),
            CgroupConfig::V2 { parent } => (
                parent,
                "cpu.weight",
                (100 * cpus).clamp(1, 10_000).to_string(),
            ),
        };
        // `parent` is `<server's cgroup>/hearth/<key>`: both levels are hearth's.
        for dir in [Some(cpu_dir.as_path()), cpu_dir.parent()]
            .into_iter()
            .flatten()
        {
            write_file(&dir.join(file), &value)?;
        }
        Ok(())
    }

    /// Removes this configuration's parent directories (`hearth/<key>`) when
    /// no VM cgroup is left in them (a test's temporary state directory).
    pub fn remove_empty_parents(&self) {
        for dir in self.parents() {
            let _ = std::fs::remove_dir(dir);
        }
    }

    /// Removes the cgroups under `parent` that hold no process: those of VMs
    /// whose QEMU ended without its cgroup being removed (a crash, a killed
    /// stray). Returns how many were removed.
    pub fn remove_stale(&self) -> usize {
        let mut instances: Vec<String> = Vec::new();
        for dir in self.parents() {
            for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    if !instances.contains(&name) {
                        instances.push(name);
                    }
                }
            }
        }
        let mut removed = 0;
        for instance in instances {
            let cgroup = VmCgroup::open(self, &instance);
            if cgroup.pids().is_empty() && cgroup.remove().is_ok() {
                removed += 1;
            }
        }
        removed
    }
}

/// A VM's cgroup (a directory per hierarchy).
#[derive(Debug, Clone)]
pub struct VmCgroup {
    version2: bool,
    /// (memory, cpu, cpuacct, pids) directories; the same one four times on v2.
    memory: PathBuf,
    cpu: PathBuf,
    cpuacct: PathBuf,
    pids: PathBuf,
}

impl VmCgroup {
    /// The cgroup of `instance`, created or not.
    pub fn open(config: &CgroupConfig, instance: &str) -> VmCgroup {
        match config {
            CgroupConfig::V1 {
                memory,
                cpu,
                cpuacct,
                pids,
            } => VmCgroup {
                version2: false,
                memory: memory.join(instance),
                cpu: cpu.join(instance),
                cpuacct: cpuacct.join(instance),
                pids: pids.join(instance),
            },
            CgroupConfig::V2 { parent } => {
                let dir = parent.join(instance);
                VmCgroup {
                    version2: true,
                    memory: dir.clone(),
                    cpu: dir.clone(),
                    cpuacct: dir.clone(),
                    pids: dir,
                }
            }
        }
    }

    /// Creates the cgroup of `instance` with `limits`. An existing one (a
    /// retried start) is reused and its limits set again.
    pub fn create(
        config: &CgroupConfig,
        instance: &str,
        limits: &CgroupLimits,
    ) -> Result<VmCgroup, CgroupError> {
        let cgroup = Self::open(config, instance);
        for dir in cgroup.dirs() {
            match std::fs::create_dir(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(CgroupError::Create(dir.to_path_buf(), e)),
            }
        }
        let set = || -> Result<(), CgroupError> {
            let quota = u64::from(limits.cpu_quota.max(1)) * CPU_PERIOD_US;
            if cgroup.version2 {
                let dir = &cgroup.memory;
                write_file(&dir.join("memory.max"), &limits.memory_bytes.to_string())?;
                // Guest RAM must never be swapped out from under a snapshot.
                let swap = dir.join("memory.swap.max");
                if swap.exists() {
                    write_file(&swap, "0")?;
                }
                write_file(&dir.join("cpu.max"), &format!("{quota} {CPU_PERIOD_US}"))?;
                write_file(
                    &dir.join("cpu.weight"),
                    &limits.cpu_weight.clamp(1, 10_000).to_string(),
                )?;
                write_file(&dir.join("pids.max"), &limits.pids.to_string())?;
            } else {
                write_file(
                    &cgroup.memory.join("memory.limit_in_bytes"),
                    &limits.memory_bytes.to_string(),
                )?;
                write_file(
                    &cgroup.cpu.join("cpu.cfs_period_us"),
                    &CPU_PERIOD_US.to_string(),
                )?;
                write_file(&cgroup.cpu.join("cpu.cfs_quota_us"), &quota.to_string())?;
                write_file(
                    &cgroup.cpu.join("cpu.shares"),
                    &(limits.cpu_weight * SHARES_PER_WEIGHT).max(2).to_string(),
                )?;
                write_file(&cgroup.pids.join("pids.max"), &limits.pids.to_string())?;
            }
            Ok(())
        };
        if let Err(err) = set() {
            let _ = cgroup.clone().remove();
            return Err(err);
        }
        Ok(cgroup)
    }

    /// Each hierarchy's directory once.
    fn dirs(&self) -> Vec<&Path> {
        let mut dirs = vec![
            self.memory.as_path(),
            self.cpu.as_path(),
            self.cpuacct.as_path(),
            self.pids.as_path(),
        ];
        dirs.dedup();
        dirs
    }

    /// The `cgroup.procs` files a process writes its pid (or "0") to, to
    /// enter this cgroup in every hierarchy.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs()
            .into_iter()
            .map(|d| d.join("cgroup.procs"))
            .collect()
    }

    /// Moves process `pid` (all its threads) into the cgroup.
    pub fn attach(&self, pid: u32) -> Result<(), CgroupError> {
        for file in self.procs_files() {
            write_file(&file, &pid.to_string())?;
        }
        Ok(())
    }

    /// The processes in the cgroup (in any of its hierarchies).
    pub fn pids(&self) -> Vec<u32> {
        let mut pids: Vec<u32> = Vec::new();
        for file in self.procs_files() {
            let text = std::fs::read_to_string(file).unwrap_or_default();
            for pid in text.lines().filter_map(|l| l.trim().parse().ok()) {
                if !pids.contains(&pid) {
                    pids.push(pid);
                }
            }
        }
        pids
    }

    /// The memory directory (for tests and diagnostics).
    pub fn memory_dir(&self) -> &Path {
        &self.memory
    }

    /// CPU time and memory charged so far.
    pub fn usage(&self) -> Result<VmUsage, CgroupError> {
        if self.version2 {
            let stat_path = self.cpu.join("cpu.stat");
            let stat = read_file(&stat_path)?;
            let usec = stat
                .lines()
                .find_map(|l| l.strip_prefix("usage_usec "))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or(CgroupError::Parse(stat_path))?;
            Ok(VmUsage {
                cpu_ns: usec.saturating_mul(1000),
                memory_bytes: read_number(&self.memory.join("memory.current"))?,
            })
        } else {
            Ok(VmUsage {
                cpu_ns: read_number(&self.cpuacct.join("cpuacct.usage"))?,
                memory_bytes: read_number(&self.memory.join("memory.usage_in_bytes"))?,
            })
        }
    }

    /// Kills what is left in the cgroup, waits for it to exit and removes
    /// the cgroup. Removing one that does not exist succeeds.
    pub fn remove(self) -> Result<(), CgroupError> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let pids = self.pids();
            if pids.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                return Err(CgroupError::Busy(self.memory.clone()));
            }
            for pid in pids {
                if let Some(pid) = i32::try_from(pid)
                    .ok()
                    .and_then(rustix::process::Pid::from_raw)
                {
                    let _ = rustix::process::kill_process(pid, rustix::process::Signal::Kill);
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        for dir in self.dirs() {
            // A process just gone may still be accounted for a moment (EBUSY).
            let mut tries = 0;
            loop {
                match std::fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(_) if tries < 100 => {
                        tries += 1;
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(e) => return Err(CgroupError::Remove(dir.to_path_buf(), e)),
                }
            }
        }
        Ok(())
    }
}

/// The VM cgroup `pid` is in under `config`, if any: its instance name.
pub fn instance_of(config: &CgroupConfig, pid: u32) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let mounts = parse_mountinfo(&std::fs::read_to_string("/proc/self/mountinfo").ok()?);
    let memory_parent = match config {
        CgroupConfig::V1 { memory, .. } => memory,
        CgroupConfig::V2 { parent } => parent,
    };
    for (controllers, path) in parse_proc_cgroup(&text) {
        let wanted = match config {
            CgroupConfig::V1 { .. } => controllers.iter().any(|c| c == "memory"),
            CgroupConfig::V2 { .. } => controllers.is_empty(),
        };
        if !wanted {
            continue;
        }
        for mount in mounts
            .iter()
            .filter(|m| m.v2 == matches!(config, CgroupConfig::V2 { .. }))
        {
            let full = mount.point.join(path.trim_start_matches('/'));
            if full.parent() == Some(memory_parent.as_path()) {
                return full.file_name().map(|n| n.to_string_lossy().into_owned());
            }
        }
    }
    None
}

fn write_file(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(|source| CgroupError::Write {
        path: path.to_path_buf(),
        value: value.to_string(),
        source,
    })
}

fn read_file(path: &Path) -> Result<String, CgroupError> {
    std::fs::read_to_string(path).map_err(|e| CgroupError::Read(path.to_path_buf(), e))
}

fn read_number(path: &Path) -> Result<u64, CgroupError> {
    read_file(path)?
        .trim()
        .parse()
        .map_err(|_| CgroupError::Parse(path.to_path_buf()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO_V1: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime shared:9 - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const PROC_CGROUP_V1: &str = "\
8:pids:/
4:memory:/process_api/abc
2:cpuacct:/
1:cpu:/
0::/
";

    #[test]
    fn v1_nests_under_the_servers_own_cgroup_per_controller() {
        let mounts = parse_mountinfo(MOUNTINFO_V1);
        assert_eq!(mounts.len(), 5);
        let own = parse_proc_cgroup(PROC_CGROUP_V1);
        // The unified mount here has no cgroup.controllers file with the
        // controllers (it is not this host's /sys/fs/cgroup/unified when the
        // test runs elsewhere; a missing file reads as none).
        let mounts: Vec<CgroupMount> = mounts.into_iter().filter(|m| !m.v2).collect();
        let config = CgroupConfig::choose(&mounts, &own, "hearth/k1").expect("v1");
        assert_eq!(
            config,
            CgroupConfig::V1 {
                memory: "/sys/fs/cgroup/memory/process_api/abc/hearth/k1".into(),
                cpu: "/sys/fs/cgroup/cpu/hearth/k1".into(),
                cpuacct: "/sys/fs/cgroup/cpuacct/hearth/k1".into(),
                pids: "/sys/fs/cgroup/pids/hearth/k1".into(),
            }
        );
        let vm = VmCgroup::open(&config, "0123abcd");
        assert_eq!(vm.procs_files().len(), 4);
        assert_eq!(
            vm.procs_files()[0],
            PathBuf::from("/sys/fs/cgroup/memory/process_api/abc/hearth/k1/0123abcd/cgroup.procs")
        );
    }

    #[test]
    fn co_mounted_cpu_and_cpuacct_share_one_directory() {
        let mounts = parse_mountinfo(
            "1 0 0:1 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n\
             2 0 0:2 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n\
             3 0 0:3 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids\n",
        );
        let own = parse_proc_cgroup("3:cpu,cpuacct:/a\n2:memory:/a\n1:pids:/a\n");
        let config = CgroupConfig::choose(&mounts, &own, "hearth").expect("v1");
        assert_eq!(config.parents().len(), 3);
        assert_eq!(VmCgroup::open(&config, "x").procs_files().len(), 3);
    }

    #[test]
    fn v2_is_chosen_when_its_root_has_the_controllers() {
        let root = tempfile::tempdir().expect("dir");
        std::fs::write(
            root.path().join("cgroup.controllers"),
            "cpuset cpu io memory pids\n",
        )
        .expect("controllers");
        let mounts = parse_mountinfo(&format!(
            "1 0 0:1 / {} rw - cgroup2 cgroup2 rw\n",
            root.path().display()
        ));
        let own = parse_proc_cgroup("0::/system.slice/hearth.service\n");
        let config = CgroupConfig::choose(&mounts, &own, "hearth/k").expect("v2");
        let parent = root.path().join("system.slice/hearth.service/hearth/k");
        assert_eq!(
            config,
            CgroupConfig::V2 {
                parent: parent.clone()
            }
        );
        let vm = VmCgroup::open(&config, "abc");
        assert_eq!(vm.procs_files(), vec![parent.join("abc/cgroup.procs")]);
        // Without the controllers delegated there, v1 is looked for (and
        // here there is none).
        std::fs::write(root.path().join("cgroup.controllers"), "cpu io\n").expect("controllers");
        assert!(matches!(
            CgroupConfig::choose(&mounts, &own, "hearth/k"),
            Err(CgroupError::Unavailable(_))
        ));
    }

    #[test]
    fn a_host_without_a_controller_has_no_cgroups() {
        let mounts = parse_mountinfo(
            "2 0 0:2 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n\
             3 0 0:3 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids\n",
        );
        assert!(matches!(
            CgroupConfig::choose(&mounts, &[], "hearth"),
            Err(CgroupError::Unavailable(_))
        ));
    }

    #[test]
    fn limits_follow_the_shape() {
        let limits = CgroupLimits::for_shape(&MachineShape::fixed(512, 2));
        assert_eq!(limits.memory_bytes, (512 + 96 + 256) << 20);
        assert_eq!(limits.cpu_quota, 2);
        assert_eq!(limits.cpu_weight, 200);
        // The 512 MiB size: a 2 GiB, 1 vCPU peak, a quarter of it guaranteed.
        let burst = CgroupLimits::for_shape(&MachineShape::burst_of(512));
        assert_eq!(burst.memory_bytes, (2048 + 96 + 256) << 20);
        assert_eq!(burst.cpu_quota, 1);
        assert_eq!(burst.cpu_weight, 25);
        assert_eq!(limits.pids, 2 + 96);
        let kvm = CgroupLimits::for_shape_on(&MachineShape::fixed(512, 1), Accel::Kvm);
        assert_eq!(kvm.memory_bytes, (512 + 96) << 20);
    }
}

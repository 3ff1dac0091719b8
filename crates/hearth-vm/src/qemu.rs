//! The QEMU driver: `-M microvm` guests controlled over QMP.
//!
//! Every VM lives in its own directory (`vm.json`, sockets, logs, disk overlay,
//! RAM file). The record is written before QEMU is started and after every state
//! change, so another process can find the VM and a crash leaves a record that
//! says what was intended.

use std::collections::HashSet;
use std::ffi::OsString;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::process::Command;
use tracing::{debug, info, warn};

use crate::accel::{self, Accel};
use crate::agent::{AgentClient, AgentError};
use crate::assets::Assets;
use crate::cgroup::{CgroupConfig, CgroupLimits, VmCgroup, VmUsage};
use crate::disk::{self, BackingFormat};
use crate::driver::{BootRequest, ColdBoot, Driver, VmError, VmProcess};
use crate::errors::error_chain;
use crate::jail::{
    self, JailConfig, JailError, JailMode, JailSpec, Limits, Network as JailNetwork, Plan,
    UidClaims,
};
use crate::net::Network;
use crate::pins::HostPins;
use crate::qmp::{Qmp, QmpError};
use crate::record::{
    is_pool_slot_name, validate_name, MachineShape, Memory, Origin, VmRecord, VmState,
};
use crate::slot::Prewarmed;
use crate::snapshot::{self, Manifest, Snapshot, SnapshotError};

#[cfg(feature = "bench")]
pub mod bench;

/// How long a cold boot may take to reach the agent (TCG boots take seconds).
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
/// A cold boot whose console stays empty this long has hung before the kernel
/// printed anything (it prints within seconds even on a loaded TCG host).
const SILENT_BOOT_LIMIT: Duration = Duration::from_secs(60);
/// How long a restored guest's agent may take to answer.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long QEMU may take to open its QMP socket.
const QMP_START_TIMEOUT: Duration = Duration::from_secs(20);
/// Migration to or from a file of a few hundred MiB.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a guest may take to power off after the agent's shutdown.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
const RECORD_FILE: &str = "vm.json";

/// How a QEMU process gets its initial state.
#[derive(Debug, Clone, Copy)]
enum Incoming<'a> {
    /// Boot the kernel.
    None,
    /// Wait for `migrate-incoming` over QMP.
    Defer,
    /// Load from this migration URI at start (the naive restore in `bench`).
    #[cfg_attr(not(feature = "bench"), allow(dead_code))]
    Uri(&'a str),
}

/// The guest kernel's command line for a cold boot.
fn boot_cmdline(accel: Accel, nic: bool) -> String {
    // Every microVM of an image has the hostname `localhost`, as the reference.
    let mut cmdline =
        String::from("console=ttyS0 quiet panic=-1 hearth.root=/dev/vda hearth.hostname=localhost");
    // `edd=off`: a second guard (the first is `boot_kernel`, which keeps the
    // initrd off the firmware's memory) against a QEMU `microvm` + SeaBIOS fault
    // that hangs the boot at some memory sizes, 2048 MiB among them
    // (docs/qemu-microvm-edd.md).
    // QEMU loads the initrd just below `top of RAM - 160 KiB` (its ACPI
    // reservation), but SeaBIOS keeps 256 KiB there, including the virtqueue of
    // its virtio-blk driver, so the initrd overwrites that queue. The kernel's
    // real-mode setup then probes disks for EDD through the BIOS (INT 13h), the
    // BIOS submits a read on the clobbered queue ("virtio-blk missing headers"),
    // and waits forever: the guest never prints a line. Without the probe the
    // BIOS never touches the queue again and the kernel resets the device. The
    // guest loses only EDD's BIOS disk data, which no virtio guest uses.
    cmdline.push_str(" edd=off");
    if nic {
        // The agent configures eth0 as 10.0.2.15/24, gateway 10.0.2.2, DNS
        // 10.0.2.3: the same in every VM (see `net`), as QEMU's user network was.
        cmdline.push_str(" hearth.net=user");
    }
    cmdline.push_str(IDLE_CMDLINE);
    if accel == Accel::Tcg {
        // See `accel::host_tsc_khz`: without it a TCG boot on a busy host can hang.
        if let Some(khz) = accel::host_tsc_khz() {
            cmdline.push_str(&format!(" tsc_early_khz={khz}"));
        }
        cmdline.push_str(TCG_IDLE_CMDLINE);
    }
    cmdline
}

/// Kernel options that let an idle guest sleep: every wake-up of the guest
/// CPU costs the host real work (under TCG, about half a millisecond of a host
/// core). Baked into snapshots, so their clones idle the same way.
/// - `nowatchdog`: no soft/hard-lockup timer every 4 s (and no false lockup
///   reports when a loaded host starves a guest).
/// - `sysctl.vm.compaction_proactiveness=0`: kcompactd otherwise wakes twice
///   a second to look at fragmentation.
const IDLE_CMDLINE: &str = " nowatchdog sysctl.vm.compaction_proactiveness=0";

/// `tsc=reliable` under TCG: the clocksource watchdog, comparing the TSC with
/// jiffies while a busy host starves the guest, declares the TSC unstable in
/// some boots; the guest then falls back to `refined-jiffies` and a periodic
/// 250 Hz tick, and every clone of that boot's snapshot pays it (an idle VM
/// at ~20 % of a host core instead of ~1 %, measured with `hearth bench
/// density` on two snapshots of the same app). Under TCG the guest's TSC is
/// QEMU's host-clock-derived counter, which is monotonic and shared by every
/// vCPU, so the watchdog has nothing real to catch. It was off for a while
/// (Dec 2026) as a suspect in clones that never answered their agent; the
/// cause was the agent's port registration (see `hearth-agent` `channel.rs`).
/// KVM guests use kvm-clock and keep the kernel's checks.
const TCG_IDLE_CMDLINE: &str = " tsc=reliable";

/// The QEMU implementation of [`Driver`].
#[derive(Debug, Clone)]
pub struct QemuDriver {
    assets: Assets,
    accel: Accel,
    qemu: PathBuf,
    /// The first line of `qemu --version` (empty when QEMU is missing), read
    /// once: snapshots record it and launches compare it.
    qemu_version: String,
    /// How its QEMU processes are confined (see [`crate::jail`]).
    jail: JailConfig,
    uid_claims: UidClaims,
    /// The host's VM networks; `None` (no root, or turned off): every network
    /// card has no backend and the guests have no network.
    network: Option<Arc<Network>>,
    /// Where each VM's cgroup goes; `None` when the host or the server's
    /// privileges do not allow cgroups (said once, at start).
    cgroups: Option<CgroupConfig>,
}

impl QemuDriver {
    /// A driver with the accelerator chosen by [`accel::select_cached`].
    pub fn new(assets: Assets) -> Result<Self, VmError> {
        Self::with_jail(assets, JailConfig::for_current_user())
    }

    /// A driver whose QEMU processes run in `jail`; refuses a jail this
    /// process must not or cannot use (an unjailed root server).
    pub fn with_jail(assets: Assets, jail: JailConfig) -> Result<Self, VmError> {
        jail.check()?;
        std::fs::create_dir_all(&assets.cache_dir)
            .map_err(|e| VmError::Io(assets.cache_dir.clone(), e))?;
        let (accel, reason) = accel::select_cached(&assets.cache_dir.join("accel.json"))?;
        info!(accel = ?accel, "{reason}");
        let mut driver = Self::with_accel(assets, accel);
        driver.jail = jail;
        // A host without QEMU fails at the first start with its own message; a
        // QEMU other than the tested one is refused here, before any guest runs.
        if !driver.qemu_version.is_empty() {
            HostPins::tested().check_qemu(&driver.qemu_version)?;
        }
        Ok(driver)
    }

    /// A driver with a given accelerator, for callers that have chosen already.
    pub fn with_accel(assets: Assets, accel: Accel) -> Self {
        let qemu = PathBuf::from("qemu-system-x86_64");
        let qemu_version = read_qemu_version(&qemu);
        let jail = JailConfig::for_current_user();
        if jail.enabled() {
            jail::become_subreaper();
        }
        crate::console::watch(&assets.vms_dir());
        let cgroups = detect_cgroups(&assets);
        Self {
            uid_claims: UidClaims::new(assets.state_dir.join("jail").join("uids")),
            assets,
            accel,
            qemu,
            qemu_version,
            jail,
            network: None,
            cgroups,
        }
    }

    /// The same driver with QEMU left unjailed, for the benchmark's
    /// with/without comparison only (never a server path).
    #[cfg(feature = "bench")]
    pub fn unjailed_for_benchmark(&self) -> Self {
        Self {
            jail: JailConfig {
                mode: JailMode::Disabled,
            },
            ..self.clone()
        }
    }

    pub fn jail(&self) -> &JailConfig {
        &self.jail
    }

    /// A uid for the VM in `dir` (root jail), kept in its record.
    fn claim_uid(&self, dir: &Path) -> Result<Option<u32>, VmError> {
        match self.jail.mode {
            JailMode::Root { .. } => Ok(Some(self.uid_claims.claim(&self.jail, dir)?)),
            JailMode::Unprivileged | JailMode::Disabled => Ok(None),
        }
    }

    fn release_uid(&self, vm: &VmRecord) {
        if let Some(uid) = vm.jail_uid {
            self.uid_claims.release(uid, &vm.dir);
        }
    }

    /// Gives this driver's VMs their networks from `network`.
    pub fn with_network(mut self, network: Arc<Network>) -> Self {
        self.network = Some(network);
        self
    }

    pub fn network(&self) -> Option<&Arc<Network>> {
        self.network.as_ref()
    }

    /// Deletes the network namespace of QEMU instance `instance`, if any.
    fn release_network(&self, instance: &str) {
        if let Some(network) = &self.network {
            network.remove(instance);
        }
    }

    /// Every live QEMU process that runs a VM of this driver's state
    /// directory, with what its command line claims (instance, VM, RAM file).
    fn claims(&self) -> Vec<(u32, QemuClaim)> {
        // Only what hearth itself started counts: a process of this user (any
        // local user can name a process like QEMU; another user's is ignored)
        // whose command line names `-name hearth-<instance>` and runs from a
        // directory directly under `vms`. Its RAM file is reported only when it
        // is `<instance>.ram` in the RAM directory, resolved: reconcile kills
        // what this returns and deletes that file, nothing else. The record is
        // not required to name the instance: a crash between QEMU's start and
        // the record's update (a resume) must not leave a QEMU no one ends.
        let vms = canonical_or_self(&self.assets.vms_dir());
        let ram_dir = canonical_or_self(&self.assets.ram_dir);
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        let mut found = Vec::new();
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            // Jailed: a uid of the jail's range (root), or this user's.
            if !process_uids(&entry.path())
                .is_some_and(|uids| uids.iter().all(|u| self.jail.owns_uid(*u)))
            {
                continue;
            }
            let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            let args: Vec<String> = cmdline
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            let Some(claim) = QemuClaim::parse(&args, &vms, &ram_dir) else {
                continue;
            };
            found.push((pid, claim));
        }
        found
    }

    /// The cgroup configuration VMs are confined with, if any.
    pub fn cgroups(&self) -> Option<&CgroupConfig> {
        self.cgroups.as_ref()
    }

    /// Creates the cgroup `vm`'s QEMU will run in (before it starts).
    fn create_cgroup(&self, vm: &VmRecord) -> Result<Option<VmCgroup>, VmError> {
        let Some(config) = &self.cgroups else {
            return Ok(None);
        };
        let limits = CgroupLimits::for_shape_on(&vm.shape, vm.accel);
        Ok(Some(VmCgroup::create(config, &vm.instance, &limits)?))
    }

    /// Moves a just-started QEMU into its cgroup and makes it the kernel's
    /// first choice for an OOM kill (before the server, see `hearth serve`).
    /// Until the jail writes the cgroup's `procs_files` before exec.
    fn confine(&self, cgroup: &Option<VmCgroup>, pid: u32) -> Result<(), VmError> {
        let _ = std::fs::write(format!("/proc/{pid}/oom_score_adj"), "1000");
        match cgroup {
            Some(cgroup) => Ok(cgroup.attach(pid)?),
            None => Ok(()),
        }
    }

    /// Removes the cgroup of a QEMU instance that has ended (killing anything
    /// left in it).
    fn release_cgroup(&self, instance: &str) {
        if let Some(config) = &self.cgroups {
            if let Err(err) = VmCgroup::open(config, instance).remove() {
                warn!(instance, error = %error_chain(&err), "cannot remove a VM's cgroup");
            }
        }
    }

    pub fn assets(&self) -> &Assets {
        &self.assets
    }

    fn vm_dir(&self, name: &str) -> PathBuf {
        self.assets.vms_dir().join(name)
    }

    /// Persists a record atomically.
    pub fn save(&self, vm: &VmRecord) -> Result<(), VmError> {
        let bytes =
            serde_json::to_vec_pretty(vm).map_err(|e| VmError::BadRecord(vm.dir.clone(), e))?;
        disk::write_atomic(&vm.dir.join(RECORD_FILE), &bytes)?;
        Ok(())
    }

    /// Creates a fresh VM directory, refusing an existing name.
    fn create_dir(&self, name: &str) -> Result<PathBuf, VmError> {
        if !validate_name(name) {
            return Err(VmError::BadName(name.into()));
        }
        self.create_dir_unchecked(name)
    }

    /// Creates a directory under `vms/` for a name hearth made itself (pool slots
    /// use `.pool-*`, which user names cannot collide with).
    pub(crate) fn create_dir_unchecked(&self, name: &str) -> Result<PathBuf, VmError> {
        let vms = self.assets.vms_dir();
        disk::create_private_dir_all(&vms)?;
        let dir = vms.join(name);
        match disk::create_private_dir(&dir) {
            Ok(()) => Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                Err(VmError::Exists(name.into()))
            }
            Err(e) => Err(VmError::Io(dir, e)),
        }
    }

    /// QEMU's command line for `vm`; `incoming` starts it waiting for a state load.
    /// `tap`: the card's backend, the VM namespace's tap opened for QEMU
    /// (see `net::open_tap`).
    fn command_line(
        &self,
        vm: &VmRecord,
        incoming: Incoming<'_>,
        kernel: &Path,
        tap: Option<std::os::fd::RawFd>,
    ) -> Vec<OsString> {
        let MachineShape {
            memory_mib, vcpus, ..
        } = vm.shape;
        let memory = match &vm.memory {
            Memory::SharedFile { path } => format!(
                "memory-backend-file,id=mem,size={memory_mib}M,mem-path={},share=on",
                path.display()
            ),
            // Private mapping of a snapshot's RAM: the file is never written.
            // reserve=off (MAP_NORESERVE): a copy-on-write mapping is otherwise
            // charged in full against the host's overcommit limit, and a
            // 32 GiB peak is refused on a host with less RAM ("Cannot
            // allocate memory") although only the pages the guest writes
            // ever take memory.
            Memory::PrivateFile { path } => format!(
                "memory-backend-file,id=mem,size={memory_mib}M,mem-path={},share=off,readonly=on,rom=off,reserve=off",
                path.display()
            ),
            Memory::Anonymous => format!("memory-backend-ram,id=mem,size={memory_mib}M"),
        };
        let mut args: Vec<OsString> = Vec::new();
        let mut push = |a: &str| args.push(a.into());
        push("-name");
        push(&format!("hearth-{}", vm.instance));
        for a in [
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-M",
            "microvm,rtc=off,isa-serial=on,acpi=on,memory-backend=mem",
            "-accel",
            vm.accel.qemu_arg(),
            "-cpu",
            "max",
        ] {
            push(a);
        }
        push("-smp");
        push(&vcpus.to_string());
        push("-m");
        push(&format!("{memory_mib}M"));
        push("-object");
        push(&memory);
        push("-kernel");
        push(&kernel.display().to_string());
        if matches!(incoming, Incoming::None) {
            push("-initrd");
            push(&vm.initrd.display().to_string());
        }
        push("-append");
        push(&vm.cmdline);
        // Appending, so the console cap (`crate::console`) can truncate it.
        push("-chardev");
        push(&format!(
            "file,id=console,path={},append=on",
            vm.console_log().display()
        ));
        push("-serial");
        push("chardev:console");
        if self.jail.enabled() {
            // QEMU's own seccomp filter: no exec, no privilege changes, no
            // obsolete system calls, no scheduler or affinity changes.
            push("-sandbox");
            push("on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny");
        }
        push("-drive");
        push(&format!(
            "id=root,file={},format=qcow2,if=none,cache=writeback,discard=unmap",
            vm.disk.display()
        ));
        push("-device");
        push("virtio-blk-device,drive=root");
        if let (true, Some(tap)) = (vm.nic, tap) {
            push("-netdev");
            push(&format!("tap,id=net0,fd={tap}"));
            push("-device");
            push("virtio-net-device,netdev=net0");
        } else if vm.nic {
            // No host network: the card stays (the snapshot's device layout
            // needs it) with no backend, so the guest sends into nothing.
            push("-device");
            push("virtio-net-device");
        }
        if vm.balloon {
            // Free page reporting: the guest reports freed 2 MiB blocks and
            // QEMU punches them out of the RAM file, so a burst's memory goes
            // back to the host when the guest frees it.
            push("-device");
            push("virtio-balloon-device,free-page-reporting=on");
        }
        push("-device");
        push("virtio-serial-device,max_ports=2");
        push("-chardev");
        push(&format!(
            "socket,id=agent,path={},server=on,wait=off",
            vm.agent_socket().display()
        ));
        push("-device");
        push(&format!(
            "virtserialport,chardev=agent,name={}",
            hearth_proto::PORT_NAME
        ));
        push("-qmp");
        push(&format!(
            "unix:{},server=on,wait=off",
            vm.qmp_socket().display()
        ));
        match incoming {
            Incoming::None => {}
            Incoming::Defer => {
                push("-incoming");
                push("defer");
            }
            Incoming::Uri(uri) => {
                push("-incoming");
                push(uri);
            }
        }
        args
    }

    /// Starts QEMU for `vm` in its jail and returns its pid and a QMP session
    /// once QEMU accepts commands. QEMU runs in its own process group,
    /// outliving the caller.
    async fn spawn(&self, vm: &VmRecord, incoming: Incoming<'_>) -> Result<(u32, Qmp), VmError> {
        let netns = self.open_network(vm).await?;
        self.spawn_in(vm, incoming, netns).await
    }

    /// The VM's network namespace, created, when it has a card and this
    /// driver has networks.
    async fn open_network(&self, vm: &VmRecord) -> Result<Option<std::fs::File>, VmError> {
        match (&self.network, vm.nic) {
            (Some(network), true) => Ok(Some(self.create_network(network, vm).await?)),
            _ => Ok(None),
        }
    }

    /// [`Self::spawn`] with the namespace made already (`open_network`); the
    /// namespace is deleted if QEMU does not start.
    async fn spawn_in(
        &self,
        vm: &VmRecord,
        incoming: Incoming<'_>,
        netns: Option<std::fs::File>,
    ) -> Result<(u32, Qmp), VmError> {
        let started = self.start_qemu(vm, incoming, netns).await;
        if started.is_err() {
            self.release_network(&vm.instance);
        }
        started
    }

    async fn start_qemu(
        &self,
        vm: &VmRecord,
        incoming: Incoming<'_>,
        netns: Option<std::fs::File>,
    ) -> Result<(u32, Qmp), VmError> {
        let log_path = vm.qemu_log();
        // Never through a link a jailed QEMU could have left in its directory.
        let log = disk::create_fresh(&log_path)?;
        let log_err = log
            .try_clone()
            .map_err(|e| VmError::Io(log_path.clone(), e))?;
        let kernel = match incoming {
            Incoming::None => vm.kernel.clone(),
            Incoming::Defer | Incoming::Uri(_) => self.kernel_stub(&vm.kernel)?,
        };
        let cgroup = self.create_cgroup(vm)?;
        let mut command = Command::new(&self.qemu);
        let tap = match &netns {
            Some(netns) => Some(
                crate::net::open_tap(netns)
                    .map_err(|e| VmError::Io(PathBuf::from("/dev/net/tun"), e))?,
            ),
            None => None,
        };
        let tap_fd = tap.as_ref().map(std::os::fd::AsRawFd::as_raw_fd);
        command.args(self.command_line(vm, incoming, &kernel, tap_fd));
        let plan = if self.jail.enabled() {
            let netns_path = match (&netns, &self.network) {
                (Some(_), Some(network)) => Some(network.netns_path(&vm.instance)),
                _ => None,
            };
            let mut spec = self.jail_spec(vm, &kernel, incoming, netns_path)?;
            spec.keep_fds.extend(tap_fd);
            spec.cgroup_procs = cgroup
                .as_ref()
                .map(VmCgroup::procs_files)
                .unwrap_or_default();
            let root = self.assets.state_dir.join("jail").join("root");
            disk::create_private_dir_all(&root)?;
            Some(Plan::new(&self.jail, &spec, &root)?)
        } else {
            if let Some(netns) = netns {
                enter_netns(&mut command, netns, tap_fd);
            }
            None
        };
        let (plan, pid_pipe) = match plan {
            Some((plan, pipe)) => (Some(plan), Some(pipe)),
            None => (None, None),
        };
        // SAFETY: the closure runs in the forked child before exec. It makes
        // only system calls (prctl; the jail's, see `Plan::enter`) on data
        // prepared before the fork, and touches no shared state.
        unsafe {
            command.pre_exec(move || {
                // Transparent huge pages would round QEMU's translation cache up to
                // 2 MiB pages in every clone; guest RAM is file-backed and unaffected.
                libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
                match &plan {
                    Some(plan) => plan.enter(),
                    None => Ok(()),
                }
            });
        }
        let mut child = command
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .process_group(0)
            .kill_on_drop(false)
            .spawn()
            .map_err(VmError::Spawn)?;
        // Drop the command (and the plan in its closure) now: its pid pipe
        // end must close before the read below.
        drop(command);
        // QEMU holds its own copy of the tap now.
        drop(tap);
        let pid = match pid_pipe {
            // The jail's intermediate process reported QEMU's pid and exited.
            Some(pipe) => {
                let pid = pipe.read_pid();
                let _ = child.wait().await;
                let pid = pid?;
                jail::reap(pid);
                pid
            }
            None => {
                let pid = child.id().ok_or_else(|| VmError::QemuDied {
                    log: read_tail(&log_path),
                })?;
                // Unjailed: into its cgroup now (a jail joins it before exec).
                if let Err(err) = self.confine(&cgroup, pid) {
                    let _ = child.start_kill();
                    self.release_cgroup(&vm.instance);
                    return Err(err);
                }
                pid
            }
        };
        let deadline = Instant::now() + QMP_START_TIMEOUT;
        let qmp = loop {
            if !process_alive(pid, &vm.instance) {
                self.release_cgroup(&vm.instance);
                return Err(VmError::QemuDied {
                    log: read_tail(&log_path),
                });
            }
            match Qmp::connect(&vm.qmp_socket()).await {
                Ok(qmp) => break qmp,
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                Err(err) => {
                    kill_pid(pid);
                    self.release_cgroup(&vm.instance);
                    return Err(err.into());
                }
            }
        };
        if self.jail.enabled() {
            return Ok((pid, qmp));
        }
        // Reap QEMU when it exits while this process lives; if this process exits
        // first, init adopts and reaps it.
        tokio::spawn(async move {
            let _ = child.wait().await;
        });
        Ok((pid, qmp))
    }

    /// What `vm`'s jail holds, with its files handed to its uid (root jail).
    fn jail_spec(
        &self,
        vm: &VmRecord,
        kernel: &Path,
        incoming: Incoming<'_>,
        netns: Option<PathBuf>,
    ) -> Result<JailSpec, VmError> {
        let (uid, gid) = match (self.jail.mode, vm.jail_uid) {
            (JailMode::Root { .. }, Some(uid)) => (uid, uid),
            (JailMode::Root { .. }, None) => return Err(JailError::NoFreeUid.into()),
            _ => {
                let uid = rustix::process::getuid().as_raw();
                (uid, rustix::process::getgid().as_raw())
            }
        };
        let mut read_only = vec![kernel.to_path_buf()];
        if matches!(incoming, Incoming::None) {
            read_only.push(vm.initrd.clone());
        }
        // Every file under the overlay: QEMU opens the whole chain.
        read_only.extend(disk::backing_chain(&vm.disk)?);
        if let Incoming::Uri(uri) = incoming {
            if let Some(path) = uri.strip_prefix("file:") {
                read_only.push(PathBuf::from(path));
            }
        }
        if let Origin::Snapshot { dir } = &vm.origin {
            for name in [snapshot::MEMORY_FILE, snapshot::STATE_FILE] {
                let path = dir.join(name);
                if path.exists() {
                    read_only.push(path);
                }
            }
        }
        let mut read_write = vec![vm.dir.clone()];
        if !vm.disk.starts_with(&vm.dir) {
            read_write.push(vm.disk.clone());
        }
        match &vm.memory {
            Memory::SharedFile { path } => read_write.push(path.clone()),
            Memory::PrivateFile { path } => read_only.push(path.clone()),
            Memory::Anonymous => {}
        }
        read_only.sort();
        read_only.dedup();
        if let Some(shared) = self.jail.shared_gid() {
            for path in &read_only {
                jail::share_read_only(path, shared)?;
            }
            // The VM directory stays root's (its record is the server's to
            // write): QEMU's group may add files, the sticky bit keeps it
            // from removing or replacing what it does not own.
            std::os::unix::fs::chown(&vm.dir, Some(0), Some(gid))
                .map_err(|e| VmError::Io(vm.dir.clone(), e))?;
            std::fs::set_permissions(
                &vm.dir,
                std::os::unix::fs::PermissionsExt::from_mode(0o1770),
            )
            .map_err(|e| VmError::Io(vm.dir.clone(), e))?;
            let console = vm.console_log();
            if !console.exists() {
                disk::create_private_file(&console)?;
            }
            jail::give(&console, uid, gid)?;
            jail::give(&vm.disk, uid, gid)?;
            if let Memory::SharedFile { path } = &vm.memory {
                jail::give(path, uid, gid)?;
            }
        }
        let mut devices: Vec<PathBuf> = jail::BASE_DEVICES.iter().map(PathBuf::from).collect();
        if vm.accel == Accel::Kvm {
            devices.push(PathBuf::from("/dev/kvm"));
        }
        let memory = u64::from(vm.shape.memory_mib) << 20;
        let disk_size = disk::virtual_size(&vm.disk).unwrap_or(64 << 30);
        Ok(JailSpec {
            uid,
            gid,
            read_only,
            read_write,
            devices,
            cgroup_procs: Vec::new(),
            network: match netns {
                Some(path) => JailNetwork::Join(path),
                None => JailNetwork::Isolated,
            },
            keep_fds: Vec::new(),
            limits: Limits {
                nofile: 4096,
                // vCPU threads, QEMU's I/O worker pool (64) and its own threads.
                nproc: 128 + u64::from(vm.shape.vcpus),
                // The overlay may grow to the disk's size; a suspend writes
                // all of RAM; the console is capped far below either.
                fsize: disk_size + 2 * memory + (256 << 20),
            },
        })
    }

    /// Creates the network namespace QEMU instance `vm.instance` runs in, with
    /// an uplink when the VM has egress, and opens it for [`enter_netns`].
    async fn create_network(
        &self,
        network: &Network,
        vm: &VmRecord,
    ) -> Result<std::fs::File, VmError> {
        let limits = vm.egress.then(|| network.config().limits_for(vm.shape));
        network
            .create(
                &vm.instance,
                // The tap belongs to the uid the jailed QEMU runs as.
                vm.jail_uid
                    .unwrap_or_else(|| rustix::process::geteuid().as_raw()),
                limits,
            )
            .await?;
        let path = network.netns_path(&vm.instance);
        std::fs::File::open(&path).map_err(|e| {
            network.remove(&vm.instance);
            VmError::Io(path, e)
        })
    }

    /// Prepares a VM to receive `snapshot`'s state: its directory, disk overlay,
    /// record and a QEMU process waiting in `-incoming defer`. Used directly by
    /// launches and ahead of time by the warm pool.
    pub(crate) async fn prepare_clone(
        &self,
        snapshot: &Snapshot,
        name: &str,
        pool_slot: bool,
        egress: bool,
    ) -> Result<(VmRecord, Qmp), VmError> {
        let manifest = &snapshot.manifest;
        if manifest.accel != self.accel {
            return Err(VmError::AccelMismatch(manifest.accel, self.accel));
        }
        // QEMU restores only device state its own version wrote reliably.
        if manifest.qemu_version != self.qemu_version && !crate::pins::untested_allowed() {
            return Err(VmError::SnapshotQemu {
                made_with: manifest.qemu_version.clone(),
                runs: self.qemu_version.clone(),
            });
        }
        let dir = if pool_slot {
            self.create_dir_unchecked(name)?
        } else {
            self.create_dir(name)?
        };
        let mut guard = BootGuard {
            network: self.network.clone(),
            process: None,
            paths: vec![dir.clone()],
        };
        let result = async {
            let vm = VmRecord {
                egress: manifest.nic && egress,
                ..restored_record(
                    manifest,
                    name,
                    &dir,
                    Memory::PrivateFile {
                        path: snapshot.memory(),
                    },
                    &snapshot.dir,
                    self.claim_uid(&dir)?,
                )
            };
            // The disk overlay and the network namespace are made side by side.
            let base = snapshot.disk();
            let (overlay, netns) = tokio::join!(
                disk::create_overlay(&vm.disk, &base, BackingFormat::Qcow2),
                self.open_network(&vm)
            );
            let ready = overlay
                .map_err(VmError::from)
                .and(netns)
                .and_then(|netns| self.save(&vm).map(|()| netns));
            let netns = match ready {
                Ok(netns) => netns,
                Err(err) => {
                    self.release_network(&vm.instance);
                    return Err(err);
                }
            };
            let (pid, qmp) = self.spawn_in(&vm, Incoming::Defer, netns).await?;
            guard.process = Some((pid, vm.instance.clone()));
            let vm = VmRecord {
                pid: Some(pid),
                ..vm
            };
            self.save(&vm)?;
            Ok((vm, qmp))
        }
        .await;
        if result.is_ok() {
            guard.disarm();
        }
        result
    }

    /// Loads `snapshot`'s state into a prepared VM, runs it and greets its agent.
    pub(crate) async fn restore_clone(
        &self,
        vm: &VmRecord,
        qmp: &mut Qmp,
        snapshot: &Snapshot,
    ) -> Result<AgentClient, VmError> {
        let uri = format!("file:{}", snapshot.state().display());
        let start = Instant::now();
        let loaded = async {
            qmp.set_ignore_shared(true).await?;
            qmp.migrate_incoming_and_wait(&uri, MIGRATION_TIMEOUT)
                .await?;
            qmp.cont().await
        }
        .await;
        if let Err(err) = loaded {
            return Err(self.qemu_failure(vm, err));
        }
        let restored_at = start.elapsed();
        let agent = AgentClient::connect(&vm.agent_socket(), RESTORE_TIMEOUT).await?;
        let hello_at = start.elapsed();
        agent.restored().await?;
        debug!(
            vm = %vm.name,
            restore_ms = restored_at.as_secs_f64() * 1e3,
            hello_ms = hello_at.as_secs_f64() * 1e3,
            restored_ms = start.elapsed().as_secs_f64() * 1e3,
            "clone running"
        );
        Ok(agent)
    }

    /// Where a VM's shared RAM file lives: in the RAM directory (tmpfs by default,
    /// see [`Assets::ram_dir`]), named by the QEMU instance.
    ///
    /// The file is created here, empty and 0600, for QEMU to size and map: left
    /// to QEMU it would be 0644 (guest memory readable by every local user).
    fn ram_file(&self, instance: &str) -> Result<PathBuf, VmError> {
        let dir = &self.assets.ram_dir;
        disk::ensure_private_dir(dir)?;
        let path = dir.join(format!("{instance}.ram"));
        disk::create_private_file(&path)?;
        Ok(path)
    }

    /// A stand-in kernel image for VMs that restore instead of booting: the real
    /// image's setup header and one page of its body.
    ///
    /// After a restore the guest never reads its kernel image again (it came
    /// through fw_cfg at boot), but the `microvm` machine must still be given a
    /// `-kernel` to lay out the same devices as at boot (without one the restored
    /// guest hangs). QEMU keeps that image in private memory for the life of the
    /// process, 14 MiB for Debian's kernel: in every clone. The stub costs 24 KiB.
    /// The kernel image a cold boot of `memory_mib` uses: `kernel` itself, or a
    /// copy whose boot-protocol `initrd_addr_max` (offset 0x22c of the setup
    /// header) keeps the initrd at least 2 MiB below the top of RAM.
    ///
    /// Why: QEMU loads the initrd as high as that field allows, up to
    /// `top of RAM - 160 KiB`, but `microvm`'s firmware (SeaBIOS) keeps 256 KiB
    /// there: its virtio-blk queue and, depending on the sizes, the ACPI tables.
    /// An initrd over them hangs the boot in the BIOS or leaves the kernel
    /// without ACPI tables, hence without devices (docs/qemu-microvm-edd.md).
    /// Above 2 GiB the kernel's own limit (2 GiB) already keeps it low. The
    /// guest's memory is unchanged; only where the initrd is loaded moves.
    fn boot_kernel(&self, kernel: &Path, memory_mib: u32) -> Result<PathBuf, VmError> {
        use std::io::Read;
        const INITRD_ADDR_MAX: usize = 0x22c;
        const FIRMWARE_MARGIN: u64 = 2 * 1024 * 1024;
        let io = |e| VmError::Io(kernel.to_path_buf(), e);
        let mut head = Vec::with_capacity(4096);
        std::fs::File::open(kernel)
            .map_err(io)?
            .take(4096)
            .read_to_end(&mut head)
            .map_err(io)?;
        let protocol = head
            .get(0x206..0x208)
            .map_or(0, |b| u16::from_le_bytes([b[0], b[1]]));
        let current = head
            .get(INITRD_ADDR_MAX..INITRD_ADDR_MAX + 4)
            .map(|b| u64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]])));
        let (Some(current), true) = (current, head.get(0x202..0x206) == Some(b"HdrS")) else {
            return Ok(kernel.to_path_buf());
        };
        let limit = (u64::from(memory_mib) * 1024 * 1024)
            .saturating_sub(FIRMWARE_MARGIN)
            .saturating_sub(1);
        if protocol < 0x203 || current <= limit {
            return Ok(kernel.to_path_buf());
        }
        let Ok(limit) = u32::try_from(limit) else {
            return Ok(kernel.to_path_buf());
        };
        let mut image = std::fs::read(kernel).map_err(io)?;
        image[INITRD_ADDR_MAX..INITRD_ADDR_MAX + 4].copy_from_slice(&limit.to_le_bytes());
        let dir = self.assets.cache_dir.join("kernel-boot");
        let path = dir.join(format!(
            "{}-initrd-below-{limit:08x}.bzImage",
            &blake3::hash(&image).to_hex()[..16]
        ));
        if !path.exists() {
            std::fs::create_dir_all(&dir).map_err(|e| VmError::Io(dir.clone(), e))?;
            disk::write_atomic(&path, &image)?;
        }
        Ok(path)
    }

    fn kernel_stub(&self, kernel: &Path) -> Result<PathBuf, VmError> {
        use std::io::Read;
        let io = |e| VmError::Io(kernel.to_path_buf(), e);
        let mut head = Vec::with_capacity(64 * 1024);
        std::fs::File::open(kernel)
            .map_err(io)?
            .take(64 * 1024)
            .read_to_end(&mut head)
            .map_err(io)?;
        // Linux boot protocol: "HdrS" at 0x202, setup sectors at 0x1f1 (0 means 4).
        if head.get(0x202..0x206) != Some(b"HdrS") {
            return Err(VmError::Io(
                kernel.to_path_buf(),
                std::io::Error::new(std::io::ErrorKind::InvalidData, "not a bzImage"),
            ));
        }
        let setup_sectors = match head.get(0x1f1).copied().unwrap_or(0) {
            0 => 4,
            n => n as usize,
        };
        let len = ((setup_sectors + 1) * 512 + 4096).min(head.len());
        let stub = &head[..len];
        let dir = self.assets.cache_dir.join("kernel-stubs");
        let path = dir.join(format!("{}.bzImage", &blake3::hash(stub).to_hex()[..16]));
        if !path.exists() {
            std::fs::create_dir_all(&dir).map_err(|e| VmError::Io(dir.clone(), e))?;
            disk::write_atomic(&path, stub)?;
        }
        Ok(path)
    }

    /// Turns a QMP failure into `QemuDied` with QEMU's log when the process is gone.
    fn qemu_failure(&self, vm: &VmRecord, err: QmpError) -> VmError {
        std::thread::sleep(Duration::from_millis(20));
        if !vm_alive(vm) {
            VmError::QemuDied {
                log: read_tail(&vm.qemu_log()),
            }
        } else {
            err.into()
        }
    }

    /// Boots a VM whose root disk is the ext4 file `base` (kept immutable: the
    /// VM writes to its own overlay).
    pub async fn boot_from_disk(
        &self,
        request: &BootRequest,
        base: &Path,
    ) -> Result<VmRecord, VmError> {
        let boot = ColdBoot {
            base: base.to_path_buf(),
            base_format: BackingFormat::Raw,
            overlay: None,
            egress: false,
            disk_size: None,
            // Booted VMs are snapshotted and cloned by the engine's users.
            free_page_reporting: false,
        };
        self.boot_with(request, &boot).await
    }

    /// Writes the paused VM's state file, and keeps its RAM: beside it when it
    /// is a shared file (lean: the state has CPU and devices only), in the
    /// stream otherwise; `mapped_ram` puts a stream's pages at fixed offsets
    /// (zero pages left out), for [`Self::relean`] to load.
    async fn write_suspend(
        &self,
        qmp: &mut Qmp,
        vm: &VmRecord,
        shared_ram: Option<&Path>,
        mapped_ram: bool,
    ) -> Result<(), VmError> {
        let state_file = vm.suspend_state();
        let memory_file = vm.memory_file();
        // QEMU migrates no VM that an earlier migration paused (a conversion
        // that failed, or a suspend a crash interrupted): the guest runs a
        // moment first, as if suspended a little later.
        if qmp.query_status().await?.status == "postmigrate" {
            qmp.cont().await?;
            qmp.stop().await?;
        }
        // QEMU creates it (in its own directory, as its own uid).
        let _ = std::fs::remove_file(&state_file);
        qmp.set_ignore_shared(shared_ram.is_some()).await?;
        qmp.set_mapped_ram(mapped_ram).await?;
        let uri = format!("file:{}", state_file.display());
        qmp.migrate_and_wait(&uri, MIGRATION_TIMEOUT).await?;
        if let Some(ram) = shared_ram {
            if ram == memory_file {
                std::fs::File::open(ram)
                    .and_then(|f| f.sync_all())
                    .map_err(|e| VmError::Io(ram.to_path_buf(), e))?;
            } else {
                // tmp + rename: a crash never leaves a half-copied RAM file
                // under the name a resume maps.
                let tmp = vm.dir.join("memory.ram.tmp");
                disk::sparse_copy(ram, &tmp)?;
                std::fs::rename(&tmp, &memory_file)
                    .map_err(|e| VmError::Io(memory_file.clone(), e))?;
            }
        }
        // QEMU wrote it in its own directory: no symlink, no FIFO.
        sync_own_file(&state_file)?;
        Ok(disk::sync_dir(&vm.dir)?)
    }

    /// Turns a clone's streamed suspend (written with `mapped-ram`) into the
    /// lean format: a second QEMU, whose guest never runs, loads the stream
    /// into the VM's memory file (shared; only the pages the stream holds are
    /// written, so the file stays sparse) and saves CPU and devices alone;
    /// that state replaces the stream once both files are on disk. The
    /// suspending QEMU is paused and alive, and the record still says
    /// running: a crash anywhere here leaves that QEMU to be continued, and
    /// on failure its sockets get their names back.
    async fn relean(&self, vm: &VmRecord) -> Result<(), VmError> {
        let stream = vm.suspend_state();
        let lean_state = vm.dir.join(LEAN_STATE_FILE);
        let memory = vm.memory_file();
        let _ = std::fs::remove_file(&lean_state);
        // Created here (the jail binds it, and hands it to the VM's uid);
        // QEMU sizes it, sparse.
        disk::create_fresh(&memory)?;
        // The loader's sockets take the usual names (its start must not reach
        // the suspending QEMU's QMP socket); the suspending QEMU keeps its
        // own under other names until it quits.
        let sockets = [vm.qmp_socket(), vm.agent_socket()];
        for socket in &sockets {
            let _ = std::fs::rename(socket, set_aside(socket));
        }
        let converted = self.load_and_save_lean(vm, &stream, &lean_state).await;
        let kept = converted.and_then(|()| {
            sync_own_file(&memory)?;
            sync_own_file(&lean_state)?;
            std::fs::rename(&lean_state, &stream).map_err(|e| VmError::Io(stream.clone(), e))?;
            Ok(disk::sync_dir(&vm.dir)?)
        });
        match &kept {
            Ok(()) => {
                for socket in &sockets {
                    let _ = std::fs::remove_file(set_aside(socket));
                }
            }
            Err(_) => {
                let _ = std::fs::remove_file(&lean_state);
                let _ = std::fs::remove_file(&memory);
                for socket in &sockets {
                    let _ = std::fs::rename(set_aside(socket), socket);
                }
            }
        }
        kept
    }

    /// [`Self::relean`]'s second QEMU: loads `stream` into the VM's memory
    /// file and writes `lean_state`, then ends.
    async fn load_and_save_lean(
        &self,
        vm: &VmRecord,
        stream: &Path,
        lean_state: &Path,
    ) -> Result<(), VmError> {
        let mut loader = vm.clone();
        loader.instance = new_instance_id();
        loader.memory = Memory::SharedFile {
            path: vm.memory_file(),
        };
        // A card's state loads only into a card with a backend of the same
        // kind (a tap's offloads are part of it), so the loader gets a tap in
        // a namespace of its own; without an uplink, as its guest never runs.
        loader.egress = false;
        let (pid, mut qmp) = self.spawn(&loader, Incoming::Defer).await?;
        loader.pid = Some(pid);
        let converted = async {
            qmp.set_mapped_ram(true).await?;
            let from = format!("file:{}", stream.display());
            qmp.migrate_incoming_and_wait(&from, MIGRATION_TIMEOUT)
                .await?;
            // Loaded paused (the stream was saved paused): save it lean.
            qmp.set_mapped_ram(false).await?;
            qmp.set_ignore_shared(true).await?;
            let to = format!("file:{}", lean_state.display());
            qmp.migrate_and_wait(&to, MIGRATION_TIMEOUT).await
        }
        .await
        .map_err(|err| self.qemu_failure(&loader, err));
        let _ = qmp.quit().await;
        if !wait_gone(pid, &loader.instance, Duration::from_secs(5)).await {
            self.stop_process(&loader).await;
        }
        self.release_network(&loader.instance);
        self.release_cgroup(&loader.instance);
        converted
    }

    /// Ends the VM's QEMU process: `quit` over QMP, SIGKILL if that fails.
    pub(crate) async fn stop_process(&self, vm: &VmRecord) {
        if let Some(pid) = vm.pid.filter(|pid| process_alive(*pid, &vm.instance)) {
            let quit = async {
                let mut qmp = Qmp::connect(&vm.qmp_socket()).await?;
                qmp.quit().await
            };
            let _ = tokio::time::timeout(Duration::from_secs(3), quit).await;
            if !wait_gone(pid, &vm.instance, Duration::from_secs(3)).await {
                if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
                    let _ = rustix::process::kill_process(pid, rustix::process::Signal::Kill);
                }
                wait_gone(pid, &vm.instance, Duration::from_secs(5)).await;
            }
        }
        self.release_network(&vm.instance);
        self.release_cgroup(&vm.instance);
    }

    fn qemu_version(&self) -> String {
        self.qemu_version.clone()
    }
}

#[async_trait::async_trait]
impl Driver for QemuDriver {
    fn accel(&self) -> Accel {
        self.accel
    }

    /// Loads a VM's record by name.
    fn load(&self, name: &str) -> Result<VmRecord, VmError> {
        if !validate_name(name) {
            return Err(VmError::BadName(name.into()));
        }
        let path = self.vm_dir(name).join(RECORD_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(VmError::NotFound(name.into()))
            }
            Err(e) => return Err(VmError::Io(path, e)),
        };
        serde_json::from_slice(&bytes).map_err(|e| VmError::BadRecord(path, e))
    }

    /// All VMs with a record, sorted by name.
    fn list(&self) -> Result<Vec<VmRecord>, VmError> {
        let dir = self.assets.vms_dir();
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(VmError::Io(dir, e)),
        };
        let mut vms = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            if validate_name(&name) {
                if let Ok(vm) = self.load(&name) {
                    vms.push(vm);
                }
            }
        }
        vms.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(vms)
    }

    fn vm_names(&self) -> Vec<String> {
        let entries = std::fs::read_dir(self.assets.vms_dir())
            .into_iter()
            .flatten();
        let mut names: Vec<String> = entries
            .flatten()
            .map(|entry| entry.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    fn discard(&self, name: &str) -> Result<(), VmError> {
        if !validate_name(name) && !is_pool_slot_name(name) {
            return Err(VmError::BadName(name.into()));
        }
        let dir = self.vm_dir(name);
        if let Ok(vm) = self.load(name) {
            self.release_uid(&vm);
        }
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(VmError::Io(dir, e)),
        }
    }

    fn is_alive(&self, vm: &VmRecord) -> bool {
        vm_alive(vm)
    }

    /// Every live QEMU process that runs a VM of this driver's state directory,
    /// as (pid, VM directory name), found by its command line: QEMU processes
    /// outlive the process that started them, so after a crash this is how
    /// strays are found.
    fn processes(&self) -> Vec<VmProcess> {
        self.claims()
            .into_iter()
            .map(|(pid, claim)| VmProcess {
                pid,
                vm: claim.vm,
                ram: claim.ram,
            })
            .collect()
    }

    /// Kills a process found by [`Self::processes`] and removes its RAM file.
    fn kill_process(&self, process: &VmProcess) {
        let instance = process_instance(process.pid);
        let cgroup = self
            .cgroups
            .as_ref()
            .and_then(|config| crate::cgroup::instance_of(config, process.pid));
        if let Ok(pid) = i32::try_from(process.pid) {
            // SAFETY: kill(2) has no memory effects; a stale pid at worst
            // fails with ESRCH.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
        if let Some(instance) = instance {
            self.release_network(&instance);
        }
        // `processes` only reports a RAM file named for the instance directly in
        // the RAM directory; a symlink there is never followed.
        if let Some(ram) = &process.ram {
            if ram
                .symlink_metadata()
                .is_ok_and(|m| m.file_type().is_file())
            {
                let _ = std::fs::remove_file(ram);
            }
        }
        if let Some(instance) = cgroup {
            self.release_cgroup(&instance);
        }
    }

    fn usage(&self, vm: &VmRecord) -> Option<VmUsage> {
        // A pid that is no longer this VM's QEMU reports nothing rather than
        // a stranger's usage.
        if vm.state != VmState::Running || !vm_alive(vm) {
            return None;
        }
        match &self.cgroups {
            Some(config) => VmCgroup::open(config, &vm.instance).usage().ok(),
            // Without cgroups (a server without root): the process's own.
            None => crate::usage::process_usage(vm.pid?),
        }
    }

    fn remove_stale_networks(&self) {
        let Some(network) = &self.network else {
            return;
        };
        let live: HashSet<String> = self
            .claims()
            .into_iter()
            .map(|(_, claim)| claim.instance)
            .collect();
        let mut removed = 0;
        for instance in network.instances() {
            if !live.contains(&instance) {
                network.remove(&instance);
                removed += 1;
            }
        }
        if removed > 0 {
            info!(
                removed,
                "removed the network namespaces of VMs that no longer run"
            );
        }
    }

    fn remove_stale_cgroups(&self) {
        if let Some(config) = &self.cgroups {
            let removed = config.remove_stale();
            if removed > 0 {
                info!(removed, "removed the cgroups of VMs that no longer run");
            }
        }
    }

    async fn boot(&self, request: &BootRequest) -> Result<VmRecord, VmError> {
        let base = self.assets.base_image(&request.image)?;
        self.boot_from_disk(request, &base).await
    }

    /// Boots a VM as `boot` says and waits until its agent answers.
    async fn boot_with(&self, request: &BootRequest, boot: &ColdBoot) -> Result<VmRecord, VmError> {
        let kernel = self.assets.guest_kernel()?;
        let dir = self.create_dir(&request.name)?;
        let instance = new_instance_id();
        let mut guard = BootGuard {
            network: self.network.clone(),
            process: None,
            paths: vec![
                dir.clone(),
                self.assets.ram_dir.join(format!("{instance}.ram")),
            ],
        };
        if let Some(overlay) = &boot.overlay {
            guard.paths.push(overlay.clone());
        }
        let result = async {
            let vm = VmRecord {
                name: request.name.clone(),
                instance: instance.clone(),
                dir: dir.clone(),
                state: VmState::Running,
                pid: None,
                shape: request.shape,
                accel: self.accel,
                kernel: self.boot_kernel(&kernel.vmlinuz, request.shape.memory_mib)?,
                initrd: kernel.initrd.clone(),
                cmdline: boot_cmdline(self.accel, true),
                disk: boot
                    .overlay
                    .clone()
                    .unwrap_or_else(|| dir.join("disk.qcow2")),
                memory: Memory::SharedFile {
                    path: self.ram_file(&instance)?,
                },
                origin: Origin::Boot {
                    image: request.image.clone(),
                },
                created_unix: unix_now(),
                jail_uid: self.claim_uid(&dir)?,
                nic: true,
                egress: boot.egress,
                balloon: boot.free_page_reporting && kernel.free_page_reporting,
                suspended_memory: None,
            };
            disk::create_overlay_sized(&vm.disk, &boot.base, boot.base_format, boot.disk_size)
                .await?;
            self.save(&vm)?;
            let (pid, _qmp) = self.spawn(&vm, Incoming::None).await?;
            guard.process = Some((pid, instance.clone()));
            let vm = VmRecord {
                pid: Some(pid),
                ..vm
            };
            self.save(&vm)?;
            info!(vm = %vm.name, pid, "booting");
            match await_agent(&vm, BOOT_TIMEOUT, SILENT_BOOT_LIMIT).await {
                Ok(agent) => {
                    debug!(agent = agent.agent_software(), "agent up");
                    Ok(vm)
                }
                Err(err) => {
                    self.stop_process(&vm).await;
                    Err(err)
                }
            }
        }
        .await;
        if result.is_ok() {
            guard.disarm();
        }
        // On an error the guard ends QEMU and removes the VM's files here; if this
        // future is dropped instead (a cancelled build, an interrupted CLI), it
        // does so when dropped.
        drop(guard);
        result
    }

    /// Connects to a running VM's agent.
    async fn agent(&self, vm: &VmRecord) -> Result<AgentClient, VmError> {
        if vm.state != VmState::Running {
            return Err(VmError::BadState {
                name: vm.name.clone(),
                state: vm.state,
                action: "reach its agent",
            });
        }
        Ok(AgentClient::connect(&vm.agent_socket(), Duration::from_secs(10)).await?)
    }

    /// Brings back a running VM whose controller died in the middle of an
    /// operation (e.g. a suspend: the guest paused, its state half written):
    /// cancels a migration in flight, lets the guest run again and drops the
    /// partial suspend state. The caller then checks the agent.
    async fn recover(&self, vm: &VmRecord) -> Result<(), VmError> {
        // A suspend cut short while it converted a clone's state
        // (`relean`) left this QEMU's sockets under other names, and its
        // loader's (ended by reconcile as a second process) under these.
        for socket in [vm.qmp_socket(), vm.agent_socket()] {
            let aside = set_aside(&socket);
            if aside.exists() {
                let _ = std::fs::rename(&aside, &socket);
            }
        }
        let _ = std::fs::remove_file(vm.dir.join(LEAN_STATE_FILE));
        let mut qmp = Qmp::connect_with_retry(&vm.qmp_socket(), Duration::from_secs(5)).await?;
        let _ = qmp
            .execute::<serde_json::Value>("migrate_cancel", None)
            .await;
        // A cancelled migration takes a moment to leave the `cancelling` state.
        for _ in 0..50 {
            let status = qmp
                .execute::<serde_json::Value>("query-migrate", None)
                .await?;
            let state = status["status"].as_str().unwrap_or("none");
            if !matches!(
                state,
                "active" | "cancelling" | "setup" | "device" | "pre-switchover"
            ) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if !qmp.query_status().await?.running {
            qmp.cont().await?;
        }
        let _ = std::fs::remove_file(vm.suspend_state());
        Ok(())
    }

    async fn continue_after_io_error(&self, vm: &VmRecord) -> Result<bool, VmError> {
        let mut qmp = Qmp::connect(&vm.qmp_socket()).await?;
        // `io-error`: paused by a BLOCK_IO_ERROR whose policy is to stop.
        if qmp.query_status().await?.status != "io-error" {
            return Ok(false);
        }
        qmp.cont().await?;
        Ok(true)
    }

    /// Freezes the VM's current disk overlay: QEMU creates `new_overlay` on top
    /// of it and sends all later writes there (QMP `blockdev-snapshot-sync`),
    /// so the old overlay keeps the disk exactly as it is now. The guest
    /// should have synced first ([`AgentClient::sync`]). Returns the frozen file.
    async fn checkpoint_disk(
        &self,
        vm: &mut VmRecord,
        new_overlay: &Path,
    ) -> Result<PathBuf, VmError> {
        let mut qmp = Qmp::connect(&vm.qmp_socket()).await?;
        let arguments = match (self.jail.enabled(), vm.jail_uid) {
            (false, _) => serde_json::json!({
                "device": "root",
                "snapshot-file": new_overlay.display().to_string(),
                "format": "qcow2",
                "mode": "absolute-paths",
            }),
            (true, uid) => {
                // A jailed QEMU cannot see `new_overlay`'s directory: the
                // server makes the overlay (backed by the current one, by its
                // real path), hands it to the VM's uid, and links it into the
                // VM directory, where QEMU opens it as an existing image.
                disk::create_overlay(new_overlay, &vm.disk, BackingFormat::Qcow2).await?;
                if let Some(uid) = uid {
                    jail::give(new_overlay, uid, uid)?;
                }
                let link = vm.dir.join(format!("layer-{}.qcow2", new_instance_id()));
                std::fs::hard_link(new_overlay, &link).map_err(|e| VmError::Io(link.clone(), e))?;
                serde_json::json!({
                    "device": "root",
                    "snapshot-file": link.display().to_string(),
                    "format": "qcow2",
                    "mode": "existing",
                })
            }
        };
        qmp.execute::<serde_json::Value>("blockdev-snapshot-sync", Some(arguments))
            .await
            .map_err(|err| self.qemu_failure(vm, err))?;
        let frozen = std::mem::replace(&mut vm.disk, new_overlay.to_path_buf());
        self.save(vm)?;
        if let Some(shared) = self.jail.shared_gid() {
            // Frozen: a read-only layer from now on, for any later VM's chain.
            jail::share_read_only(&frozen, shared)?;
        }
        Ok(frozen)
    }

    /// Launches from a snapshot and returns the record with a connected agent.
    async fn launch_with_agent(
        &self,
        snapshot: &Snapshot,
        name: &str,
    ) -> Result<(VmRecord, AgentClient), VmError> {
        self.launch_with_egress(snapshot, name, true).await
    }

    async fn launch_with_egress(
        &self,
        snapshot: &Snapshot,
        name: &str,
        egress: bool,
    ) -> Result<(VmRecord, AgentClient), VmError> {
        let (vm, mut qmp) = self.prepare_clone(snapshot, name, false, egress).await?;
        // Ends the clone if this future is dropped mid-restore.
        let mut guard = BootGuard {
            network: self.network.clone(),
            process: vm.pid.map(|pid| (pid, vm.instance.clone())),
            paths: vec![vm.dir.clone()],
        };
        match self.restore_clone(&vm, &mut qmp, snapshot).await {
            Ok(agent) => {
                guard.disarm();
                Ok((vm, agent))
            }
            Err(err) => {
                guard.disarm();
                let _ = self.remove(&vm).await;
                Err(err)
            }
        }
    }

    async fn prewarm(&self, snapshot: &Snapshot) -> Result<Prewarmed, VmError> {
        self.prewarm_slot(snapshot).await
    }

    async fn launch_prewarmed(
        &self,
        slot: Prewarmed,
        name: &str,
    ) -> Result<(VmRecord, AgentClient), VmError> {
        self.launch_prewarmed_slot(slot, name).await
    }

    async fn snapshot(&self, vm: &VmRecord, out: &Path) -> Result<Snapshot, VmError> {
        if vm.state != VmState::Running || !vm_alive(vm) {
            return Err(VmError::BadState {
                name: vm.name.clone(),
                state: vm.state,
                action: "snapshot",
            });
        }
        let Memory::SharedFile { path: ram } = &vm.memory else {
            return Err(VmError::NotSnapshottable(vm.name.clone()));
        };
        if out.exists() {
            return Err(VmError::Io(
                out.to_path_buf(),
                std::io::Error::from(std::io::ErrorKind::AlreadyExists),
            ));
        }
        let parent = out
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        disk::create_dir_all_synced(&parent)?;
        let file_name = out
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        let tmp = parent.join(format!(".{file_name}.tmp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        disk::create_private_dir(&tmp).map_err(|e| VmError::Io(tmp.clone(), e))?;
        let staged_state = vm.dir.join(".snapshot.state");
        let _ = std::fs::remove_file(&staged_state);

        let mut qmp = Qmp::connect(&vm.qmp_socket()).await?;
        qmp.stop().await?;
        let captured = async {
            qmp.set_ignore_shared(true).await?;
            // A jailed QEMU sees only its own directory: it writes the state
            // there, and it is moved into the snapshot.
            let uri = format!("file:{}", staged_state.display());
            qmp.migrate_and_wait(&uri, MIGRATION_TIMEOUT).await?;
            move_file(&staged_state, &tmp.join(snapshot::STATE_FILE))?;
            disk::sparse_copy(ram, &tmp.join(snapshot::MEMORY_FILE))?;
            disk::sparse_copy(&vm.disk, &tmp.join(snapshot::DISK_FILE))?;
            Ok::<(), VmError>(())
        }
        .await;
        // The source VM runs on whatever happened to the snapshot.
        let resumed = async {
            qmp.set_ignore_shared(false).await?;
            qmp.cont().await
        }
        .await;
        if let Err(err) = captured {
            let _ = std::fs::remove_file(&staged_state);
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(err);
        }
        resumed?;

        let finish = || -> Result<(), VmError> {
            let state = tmp.join(snapshot::STATE_FILE);
            std::fs::File::open(&state)
                .and_then(|f| f.sync_all())
                .map_err(|e| VmError::Io(state.clone(), e))?;
            let files = [
                snapshot::MEMORY_FILE,
                snapshot::STATE_FILE,
                snapshot::DISK_FILE,
            ]
            .iter()
            .map(|name| snapshot::file_entry(&tmp, name))
            .collect::<Result<Vec<_>, _>>()?;
            let kernel_version = self
                .assets
                .guest_kernel()
                .map(|k| k.version)
                .unwrap_or_default();
            let manifest = Manifest {
                format_version: snapshot::FORMAT_VERSION,
                created_unix: unix_now(),
                shape: vm.shape,
                accel: vm.accel,
                kernel: vm.kernel.clone(),
                kernel_version,
                initrd: vm.initrd.clone(),
                cmdline: vm.cmdline.clone(),
                qemu_version: self.qemu_version(),
                nic: vm.nic,
                files,
                balloon: vm.balloon,
            };
            let bytes = serde_json::to_vec_pretty(&manifest)
                .map_err(|e| VmError::BadRecord(tmp.clone(), e))?;
            disk::write_atomic(&tmp.join(snapshot::MANIFEST_FILE), &bytes)?;
            // Clones map these files: keep them from being changed, and readable
            // by their owner only (guest memory and disk are the tenant's secrets).
            for name in [
                snapshot::MEMORY_FILE,
                snapshot::DISK_FILE,
                snapshot::STATE_FILE,
            ] {
                let path = tmp.join(name);
                std::fs::set_permissions(
                    &path,
                    std::os::unix::fs::PermissionsExt::from_mode(0o400),
                )
                .map_err(|e| VmError::Io(path.clone(), e))?;
            }
            disk::sync_dir(&tmp)?;
            std::fs::rename(&tmp, out).map_err(|e| VmError::Io(out.to_path_buf(), e))?;
            disk::sync_dir(&parent)?;
            Ok(())
        };
        if let Err(err) = finish() {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(err);
        }
        Ok(Snapshot::open(out, snapshot::Verify::Sizes)?)
    }

    /// Two formats, chosen by where the RAM is:
    /// - a shared RAM file (a booted VM, or one resumed before): lean. The
    ///   state file gets CPU and devices only (`x-ignore-shared`), and the RAM
    ///   stays a file in the VM's directory: copied sparse from the RAM
    ///   directory (tmpfs), or, when it is that file already (resumed in the
    ///   lean format), only fsynced, so only the pages the guest dirtied are
    ///   written. Resume maps it instead of reading it back.
    /// - a private mapping (a clone launched from a snapshot): its written
    ///   pages exist only in QEMU, so they are streamed out and the stream is
    ///   turned into the lean format ([`Self::relean`]). Should that fail, the
    ///   state stream carries the RAM (the format of every suspend before the
    ///   lean one, which resume still reads).
    async fn suspend(&self, vm: &mut VmRecord) -> Result<(), VmError> {
        if !vm.state.can_become(VmState::Suspended) || !vm_alive(vm) {
            return Err(VmError::BadState {
                name: vm.name.clone(),
                state: vm.state,
                action: "suspend",
            });
        }
        let state_file = vm.suspend_state();
        let shared_ram = match &vm.memory {
            Memory::SharedFile { path } => Some(path.clone()),
            Memory::PrivateFile { .. } | Memory::Anonymous => None,
        };
        let memory_file = vm.memory_file();
        let mut qmp = Qmp::connect(&vm.qmp_socket()).await?;
        qmp.stop().await?;
        let start = Instant::now();
        // A clone's RAM is a private mapping of its snapshot: its written
        // pages exist only in this QEMU, so they are streamed out, then the
        // stream is turned into the lean format, so even the first resume
        // reads nothing back.
        let relean = shared_ram.is_none();
        let mut saved = self
            .write_suspend(&mut qmp, vm, shared_ram.as_deref(), relean)
            .await;
        let saved_at = start.elapsed();
        let mut lean = shared_ram.is_some();
        if saved.is_ok() && relean {
            match self.relean(vm).await {
                Ok(()) => lean = true,
                Err(err) => {
                    warn!(
                        vm = %vm.name,
                        error = %error_chain(&err),
                        "a clone's suspend stays a stream; its resume reads the RAM back"
                    );
                    // That stream has its pages at fixed offsets (`mapped-ram`),
                    // for the conversion: write the one resume reads instead.
                    saved = self.write_suspend(&mut qmp, vm, None, false).await;
                }
            }
        }
        if let Err(err) = saved {
            let _ = qmp.set_ignore_shared(false).await;
            let _ = qmp.cont().await;
            let _ = std::fs::remove_file(&state_file);
            let _ = std::fs::remove_file(vm.dir.join("memory.ram.tmp"));
            return Err(err);
        }
        debug!(
            vm = %vm.name,
            lean,
            save_ms = saved_at.as_secs_f64() * 1e3,
            total_ms = start.elapsed().as_secs_f64() * 1e3,
            "suspended"
        );
        vm.state = VmState::Suspended;
        vm.suspended_memory = lean.then(|| memory_file.clone());
        let pid = vm.pid.take();
        self.save(vm)?;
        // The VM directory's own entry too: after a power cut the saved state
        // is the only copy of the guest.
        if let Some(vms) = vm.dir.parent() {
            disk::sync_dir(vms)?;
        }
        let _ = qmp.quit().await;
        if let Some(pid) = pid {
            if !wait_gone(pid, &vm.instance, Duration::from_secs(5)).await {
                let running = VmRecord {
                    pid: Some(pid),
                    ..vm.clone()
                };
                self.stop_process(&running).await;
            }
        }
        // A fresh namespace at resume: no connection tracked before survives.
        self.release_network(&vm.instance);
        self.release_cgroup(&vm.instance);
        // The RAM directory's file (tmpfs: host memory) goes; the VM's own
        // memory file stays for the resume.
        if let Some(ram) = &shared_ram {
            if *ram != memory_file {
                let _ = std::fs::remove_file(ram);
            }
        }
        Ok(())
    }

    /// A lean suspend (see [`Self::suspend`]) resumes into a QEMU that maps the
    /// VM's memory file shared: nothing is read back, pages come in from the
    /// page cache as the guest touches them. Any other (a clone's, or one
    /// saved before the lean format) loads the RAM from the state stream into
    /// a new shared RAM file in the RAM directory.
    async fn resume(&self, vm: &mut VmRecord) -> Result<(), VmError> {
        if !vm.state.can_become(VmState::Running) {
            return Err(VmError::BadState {
                name: vm.name.clone(),
                state: vm.state,
                action: "resume",
            });
        }
        let state_file = vm.suspend_state();
        if !state_file.is_file() {
            return Err(SnapshotError::MissingFile(state_file).into());
        }
        let lean = vm.suspended_memory.clone();
        if let Some(memory) = &lean {
            if !memory.is_file() {
                return Err(SnapshotError::MissingFile(memory.clone()).into());
            }
        }
        // The resumed VM's RAM is a shared file either way, so it can be
        // snapshotted and suspended lean.
        let mut running = vm.clone();
        running.instance = new_instance_id();
        if running.jail_uid.is_none() {
            running.jail_uid = self.claim_uid(&running.dir)?;
        }
        running.suspended_memory = None;
        let fresh_ram = match &lean {
            Some(memory) => {
                running.memory = Memory::SharedFile {
                    path: memory.clone(),
                };
                None
            }
            None => {
                let ram = self.ram_file(&running.instance)?;
                running.memory = Memory::SharedFile { path: ram.clone() };
                Some(ram)
            }
        };
        let start = Instant::now();
        let (pid, mut qmp) = match self.spawn(&running, Incoming::Defer).await {
            Ok(spawned) => spawned,
            Err(err) => {
                if let Some(ram) = &fresh_ram {
                    let _ = std::fs::remove_file(ram);
                }
                return Err(err);
            }
        };
        let spawned_at = start.elapsed();
        running.pid = Some(pid);
        running.state = VmState::Running;
        let uri = format!("file:{}", state_file.display());
        let loaded = async {
            qmp.set_ignore_shared(lean.is_some()).await?;
            qmp.migrate_incoming_and_wait(&uri, MIGRATION_TIMEOUT).await
        }
        .await
        .map_err(|err| self.qemu_failure(&running, err));
        // Recorded running while the loaded guest is still paused: from
        // `cont` on it writes into its RAM file, which after a lean suspend
        // is the saved state's own, so the saved state is whole no more. A
        // crash from here on is recovered by continuing this process
        // (reconcile), never by resuming again from the consumed state.
        let continued = match loaded.and_then(|()| self.save(&running)) {
            Ok(()) => qmp
                .cont()
                .await
                .map_err(|err| self.qemu_failure(&running, err)),
            Err(err) => Err(err),
        };
        if let Err(err) = continued {
            self.stop_process(&running).await;
            // The guest never ran: the saved state is still whole.
            let _ = self.save(vm);
            if let Some(ram) = &fresh_ram {
                let _ = std::fs::remove_file(ram);
            }
            return Err(err);
        }
        *vm = running;
        let _ = std::fs::remove_file(&state_file);
        let loaded_at = start.elapsed();
        let agent = AgentClient::connect(&vm.agent_socket(), RESTORE_TIMEOUT).await?;
        let hello_at = start.elapsed();
        agent.restored().await?;
        debug!(
            vm = %vm.name,
            lean = lean.is_some(),
            spawn_ms = spawned_at.as_secs_f64() * 1e3,
            load_ms = loaded_at.as_secs_f64() * 1e3,
            hello_ms = hello_at.as_secs_f64() * 1e3,
            restored_ms = start.elapsed().as_secs_f64() * 1e3,
            "resumed"
        );
        Ok(())
    }

    async fn shutdown(&self, vm: &mut VmRecord) -> Result<(), VmError> {
        if !vm.state.can_become(VmState::Stopped) || !vm_alive(vm) {
            return Err(VmError::BadState {
                name: vm.name.clone(),
                state: vm.state,
                action: "shut down",
            });
        }
        let agent = self.agent(vm).await?;
        agent.shutdown().await?;
        drop(agent);
        if let Some(pid) = vm.pid {
            if !wait_gone(pid, &vm.instance, SHUTDOWN_TIMEOUT).await {
                // The guest did not power off in time: end it the hard way.
                self.stop_process(vm).await;
            }
        }
        self.release_network(&vm.instance);
        self.release_cgroup(&vm.instance);
        vm.state = VmState::Stopped;
        vm.pid = None;
        if let Memory::SharedFile { path } = &vm.memory {
            let _ = std::fs::remove_file(path);
        }
        self.save(vm)
    }

    async fn set_egress(&self, vm: &mut VmRecord, egress: bool) -> Result<(), VmError> {
        if vm.egress == egress {
            return Ok(());
        }
        if let (Some(network), true, VmState::Running) = (&self.network, vm.nic, vm.state) {
            if egress {
                network
                    .connect(&vm.instance, network.config().limits_for(vm.shape))
                    .await?;
            } else {
                network.disconnect(&vm.instance).await?;
            }
        }
        vm.egress = egress;
        self.save(vm)
    }

    async fn egress_bytes(&self, vm: &VmRecord) -> Option<u64> {
        let network = self.network.as_ref()?;
        if !(vm.nic && vm.egress && vm.state == VmState::Running) {
            return None;
        }
        network.egress_bytes(&vm.instance).await.ok()
    }

    async fn remove(&self, vm: &VmRecord) -> Result<(), VmError> {
        self.stop_process(vm).await;
        if let Memory::SharedFile { path } = &vm.memory {
            let _ = std::fs::remove_file(path);
        }
        // A VM launched from the warm pool is named by a symlink to its directory.
        let link = self.vm_dir(&vm.name);
        if link
            .symlink_metadata()
            .is_ok_and(|m| m.file_type().is_symlink())
        {
            std::fs::remove_file(&link).map_err(|e| VmError::Io(link.clone(), e))?;
        }
        let removed = match std::fs::remove_dir_all(&vm.dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(VmError::Io(vm.dir.clone(), e)),
        };
        self.release_uid(vm);
        removed
    }
}

/// Per-VM cgroups for this driver's VMs under `hearth/<key>`, the key naming
/// the state directory (so servers and tests with different data directories
/// never see each other's cgroups); `None`, said once, when unavailable.
fn detect_cgroups(assets: &Assets) -> Option<CgroupConfig> {
    let state = canonical_or_self(&assets.state_dir);
    let key = &blake3::hash(state.as_os_str().as_encoded_bytes()).to_hex()[..12];
    match CgroupConfig::detect(&format!("hearth/{key}")) {
        Ok(config) => Some(config),
        Err(err) => {
            static SAID: std::sync::Once = std::sync::Once::new();
            SAID.call_once(|| {
                warn!(error = %error_chain(&err), "VMs run without per-VM cgroup limits");
            });
            None
        }
    }
}

/// The record of a VM about to be restored from the snapshot described by
/// `manifest`: same shape, kernel and command line, its own directory and disk.
fn restored_record(
    manifest: &Manifest,
    name: &str,
    dir: &Path,
    memory: Memory,
    origin: &Path,
    jail_uid: Option<u32>,
) -> VmRecord {
    VmRecord {
        name: name.to_string(),
        instance: new_instance_id(),
        dir: dir.to_path_buf(),
        state: VmState::Running,
        pid: None,
        shape: manifest.shape,
        accel: manifest.accel,
        kernel: manifest.kernel.clone(),
        initrd: manifest.initrd.clone(),
        cmdline: manifest.cmdline.clone(),
        disk: dir.join("disk.qcow2"),
        memory,
        origin: Origin::Snapshot {
            dir: origin.to_path_buf(),
        },
        created_unix: unix_now(),
        jail_uid,
        nic: manifest.nic,
        // The default, internet egress; launches without it say so
        // (`Driver::launch_with_egress`), warm pool slots keep it ready so the
        // default launch pays nothing for it.
        egress: manifest.nic,
        balloon: manifest.balloon,
        suspended_memory: None,
    }
}

/// Moves a file QEMU wrote (in its VM directory) to `to`: a rename on the same
/// filesystem, else a copy; fsynced and owned by this user either way. Never
/// through a symlink (the directory is writable by the jailed QEMU).
fn move_file(from: &Path, to: &Path) -> Result<(), VmError> {
    let meta = std::fs::symlink_metadata(from).map_err(|e| VmError::Io(from.to_path_buf(), e))?;
    if !meta.is_file() {
        return Err(VmError::Io(
            from.to_path_buf(),
            std::io::Error::new(std::io::ErrorKind::InvalidData, "not a regular file"),
        ));
    }
    match std::fs::rename(from, to) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            disk::sparse_copy(from, to)?;
            let _ = std::fs::remove_file(from);
        }
        Err(e) => return Err(VmError::Io(to.to_path_buf(), e)),
    }
    let me = rustix::process::geteuid().as_raw();
    let gid = rustix::process::getegid().as_raw();
    std::os::unix::fs::lchown(to, Some(me), Some(gid))
        .map_err(|e| VmError::Io(to.to_path_buf(), e))?;
    std::fs::File::open(to)
        .and_then(|f| f.sync_all())
        .map_err(|e| VmError::Io(to.to_path_buf(), e))
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The lean state a clone's suspend writes while it converts (`relean`),
/// in the VM's directory, before it replaces the stream.
const LEAN_STATE_FILE: &str = "suspend.lean";

/// Where a suspending QEMU's socket `socket` is kept while its state is
/// converted (`relean`).
fn set_aside(socket: &Path) -> PathBuf {
    socket.with_extension("sock.suspending")
}

/// fsyncs a file a jailed QEMU wrote in its own directory, opened without
/// following a symlink and without blocking on a FIFO.
fn sync_own_file(path: &Path) -> Result<(), VmError> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| VmError::Io(path.to_path_buf(), e))
}

/// A random id that names one QEMU process (`-name hearth-ID`).
pub(crate) fn new_instance_id() -> String {
    hex::encode(rand::random::<[u8; 8]>())
}

/// Makes an unjailed QEMU (the benchmark's comparison, a non-root server with
/// `--no-jail`) enter network namespace `netns` and inherit its tap; a jailed
/// one gets both from its `JailSpec`.
fn enter_netns(command: &mut Command, netns: std::fs::File, tap: Option<std::os::fd::RawFd>) {
    use std::os::fd::AsRawFd;
    // SAFETY: the closure runs in the forked child before exec and only calls
    // setns(2), which is async-signal-safe; the descriptor stays open because
    // the closure owns the file (dropped in the parent after the spawn).
    unsafe {
        command.pre_exec(move || {
            if libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // QEMU inherits its tap (`-netdev tap,fd=N`).
            if let Some(tap) = tap {
                if libc::fcntl(tap, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// The instance id in a QEMU process's `-name hearth-ID`.
fn process_instance(pid: u32) -> Option<String> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let mut args = cmdline.split(|b| *b == 0);
    while let Some(arg) = args.next() {
        if arg == b"-name" {
            let name = std::str::from_utf8(args.next()?).ok()?;
            return name.strip_prefix("hearth-").map(str::to_string);
        }
    }
    None
}

/// True when the VM's QEMU process is alive.
fn vm_alive(vm: &VmRecord) -> bool {
    vm.pid.is_some_and(|pid| process_alive(pid, &vm.instance))
}

/// True when `pid` is a live (not zombie) QEMU process started for `instance`.
/// Checking the command line guards against a recycled pid.
fn process_alive(pid: u32, instance: &str) -> bool {
    let proc = PathBuf::from(format!("/proc/{pid}"));
    let Ok(cmdline) = std::fs::read(proc.join("cmdline")) else {
        return false;
    };
    if cmdline.is_empty() {
        return false; // zombie
    }
    let stat = std::fs::read_to_string(proc.join("stat")).unwrap_or_default();
    if stat
        .rsplit_once(") ")
        .is_some_and(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X'))
    {
        return false;
    }
    String::from_utf8_lossy(&cmdline).contains(&format!("hearth-{instance}"))
}

/// SIGKILL to `pid`.
fn kill_pid(pid: u32) {
    if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::Kill);
    }
}

async fn wait_gone(pid: u32, instance: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while process_alive(pid, instance) {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    true
}

/// Waits for a cold-booted guest's agent, failing as soon as the boot is
/// known to have gone wrong: QEMU exited, or the guest printed nothing on its
/// console for `silent_limit` (the kernel prints within a second or two
/// even under TCG, so a silent console means the firmware or the kernel's
/// setup hung). The error carries the tails of the console and QEMU's log.
async fn await_agent(
    vm: &VmRecord,
    timeout: Duration,
    silent_limit: Duration,
) -> Result<AgentClient, VmError> {
    let started = Instant::now();
    let watch = async {
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if !vm_alive(vm) {
                return "QEMU exited".to_string();
            }
            let silent = std::fs::metadata(vm.console_log()).map_or(true, |m| m.len() == 0);
            if silent && started.elapsed() >= silent_limit {
                return format!(
                    "the guest printed nothing on its console in {}s",
                    silent_limit.as_secs()
                );
            }
        }
    };
    let socket = vm.agent_socket();
    let reason = tokio::select! {
        agent = AgentClient::connect_booting(&socket, timeout) => match agent {
            Ok(agent) => return Ok(agent),
            Err(AgentError::Timeout(t)) => format!("the agent did not answer within {}s", t.as_secs()),
            Err(err) if vm_alive(vm) => error_chain(&err),
            Err(_) => "QEMU exited".to_string(),
        },
        reason = watch => reason,
    };
    // Give QEMU a moment to flush its log if it is on its way out.
    tokio::time::sleep(Duration::from_millis(20)).await;
    Err(VmError::BootFailed {
        reason,
        console: console_tail(&vm.console_log()),
        qemu_log: match read_tail(&vm.qemu_log()) {
            log if log.is_empty() => "(empty)".to_string(),
            log => log,
        },
    })
}

/// What a process's command line says about it, if it is shaped like a QEMU
/// that hearth started: its instance (`-name hearth-<instance>`), the VM
/// directory it runs from (directly under `vms`), and its RAM file when that is
/// `<instance>.ram` directly in `ram_dir` (paths compared after resolving `..`
/// and symlinks of their directories).
#[derive(Debug, Clone, PartialEq, Eq)]
struct QemuClaim {
    instance: String,
    vm: String,
    ram: Option<PathBuf>,
}

impl QemuClaim {
    fn parse(args: &[String], vms: &Path, ram_dir: &Path) -> Option<Self> {
        let program = Path::new(args.first()?).file_name()?.to_str()?;
        if !program.starts_with("qemu-system-") {
            return None;
        }
        let name_at = args.iter().position(|a| a == "-name")?;
        let instance = args.get(name_at + 1)?.strip_prefix("hearth-")?.to_string();
        if instance.is_empty() || !instance.chars().all(|c| c.is_ascii_alphanumeric()) {
            return None;
        }
        // The VM directory: the directory of the serial log
        // (`-chardev file,...,path=<dir>/console.log`, or `file:<dir>/console.log`).
        let console = args.iter().find_map(|a| {
            let path = match a.strip_prefix("file:") {
                Some(path) => path,
                None => a
                    .strip_prefix("file,")?
                    .split(',')
                    .find_map(|o| o.strip_prefix("path="))?,
            };
            Some(path).filter(|p| p.ends_with("/console.log"))
        })?;
        let vm_dir = canonical_or_self(Path::new(console).parent()?);
        if vm_dir.parent() != Some(vms) {
            return None;
        }
        let vm = vm_dir.file_name()?.to_str()?.to_string();
        if !(validate_name(&vm) || is_pool_slot_name(&vm)) {
            return None;
        }
        let ram = args.iter().find_map(|a| {
            let start = a.find("mem-path=")? + "mem-path=".len();
            let path = Path::new(a[start..].split(',').next()?);
            let dir = canonical_or_self(path.parent()?);
            let expected = format!("{instance}.ram");
            (dir == ram_dir && path.file_name()?.to_str()? == expected).then(|| dir.join(expected))
        });
        Some(Self { instance, vm, ram })
    }
}

/// The real, effective, saved and filesystem uids of the process at `proc`
/// (`/proc/PID`), from its `status`.
fn process_uids(proc: &Path) -> Option<Vec<u32>> {
    let status = std::fs::read_to_string(proc.join("status")).ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("Uid:"))?;
    let uids: Vec<u32> = line
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    (uids.len() == 4).then_some(uids)
}

/// `path` with `..` and symlinks resolved, or as given when it does not exist.
fn canonical_or_self(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

/// Ends a booting VM's QEMU and removes its files unless disarmed: on an error,
/// and when the boot future is dropped before it finishes (a cancelled build,
/// an interrupted `hearth vm boot`), so a failed boot leaves no process behind.
pub(crate) struct BootGuard {
    /// Where the VM's network namespace is to be deleted from.
    pub(crate) network: Option<Arc<Network>>,
    /// QEMU's pid and the instance id that identifies it in `/proc`.
    pub(crate) process: Option<(u32, String)>,
    /// The VM's directory, RAM file and disk overlay.
    pub(crate) paths: Vec<PathBuf>,
}

impl BootGuard {
    pub(crate) fn disarm(&mut self) {
        self.process = None;
        self.paths.clear();
    }
}

impl Drop for BootGuard {
    fn drop(&mut self) {
        if let Some((pid, instance)) = self.process.take() {
            if process_alive(pid, &instance) {
                if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
                    let _ = rustix::process::kill_process(pid, rustix::process::Signal::Kill);
                }
            }
            if let Some(network) = &self.network {
                network.remove(&instance);
            }
        }
        for path in self.paths.drain(..) {
            if path.is_dir() {
                let _ = std::fs::remove_dir_all(&path);
            } else {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
}

/// The last lines of a guest console for an error message, or a note that it
/// is empty (which says where a boot stopped: before the kernel printed).
fn console_tail(path: &Path) -> String {
    let text = crate::console::read(path.parent().unwrap_or(Path::new("/")));
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.is_empty() {
        return "(empty)".to_string();
    }
    let tail = lines[lines.len().saturating_sub(12)..].join("\n");
    let start = tail.len().saturating_sub(1500);
    let start = (start..tail.len())
        .find(|&i| tail.is_char_boundary(i))
        .unwrap_or(0);
    tail[start..].to_string()
}

/// The first line of `qemu --version`, or empty when it cannot be run.
fn read_qemu_version(qemu: &Path) -> String {
    std::process::Command::new(qemu)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_string))
        .unwrap_or_default()
}

/// The last lines of a log file, for error messages.
pub(crate) fn read_tail(path: &Path) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let start = text.len().saturating_sub(2000);
    String::from_utf8_lossy(&text[start..]).trim().to_string()
}

#[cfg(test)]
mod boot_failure_tests {
    use super::*;

    /// A stand-in for a booting QEMU: a process whose command line carries the
    /// instance id, as `process_alive` looks for, returned once it does (a
    /// process caught mid-exec shows no command line yet, and the guard
    /// leaves alone what it cannot identify).
    fn fake_qemu(instance: &str, seconds: &str) -> std::process::Child {
        let child = std::process::Command::new("bash")
            .args(["-c", &format!("exec -a hearth-{instance} sleep {seconds}")])
            .spawn()
            .expect("spawn bash");
        let deadline = Instant::now() + Duration::from_secs(5);
        while !process_alive(child.id(), instance) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        child
    }

    fn record(dir: &Path, instance: &str, pid: u32) -> VmRecord {
        VmRecord {
            name: "t".into(),
            instance: instance.into(),
            dir: dir.to_path_buf(),
            state: VmState::Running,
            pid: Some(pid),
            shape: MachineShape::default(),
            accel: Accel::Tcg,
            kernel: dir.join("vmlinuz"),
            initrd: dir.join("initrd"),
            cmdline: String::new(),
            disk: dir.join("disk.qcow2"),
            memory: Memory::Anonymous,
            origin: Origin::Boot {
                image: "debian-12".into(),
            },
            created_unix: 0,
            jail_uid: None,
            nic: false,
            egress: false,
            balloon: false,
            suspended_memory: None,
        }
    }

    #[tokio::test]
    async fn a_silent_console_fails_the_boot_early_and_says_so() {
        let dir = tempfile::tempdir().expect("tempdir");
        let instance = new_instance_id();
        let mut child = fake_qemu(&instance, "30");
        let vm = record(dir.path(), &instance, child.id());
        std::fs::write(vm.console_log(), b"").expect("console");
        std::fs::write(
            vm.qemu_log(),
            b"qemu-system-x86_64: virtio-blk missing headers\n",
        )
        .expect("qemu log");
        let started = Instant::now();
        let err = await_agent(&vm, BOOT_TIMEOUT, Duration::from_secs(1))
            .await
            .expect_err("a silent guest never answers");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
        let text = err.to_string();
        assert!(text.contains("printed nothing on its console"), "{text}");
        assert!(text.contains("console ends: (empty)"), "{text}");
        assert!(text.contains("virtio-blk missing headers"), "{text}");
        let _ = child.kill();
        let _ = child.wait();
    }

    #[tokio::test]
    async fn an_exited_qemu_fails_the_boot_with_the_console_tail() {
        let dir = tempfile::tempdir().expect("tempdir");
        let instance = new_instance_id();
        let mut child = fake_qemu(&instance, "0.3");
        let vm = record(dir.path(), &instance, child.id());
        std::fs::write(
            vm.console_log(),
            b"[    0.000000] Linux version 6.1\nKernel panic - not syncing: VFS\n",
        )
        .expect("console");
        let err = await_agent(&vm, BOOT_TIMEOUT, Duration::from_secs(60))
            .await
            .expect_err("QEMU is gone");
        let text = err.to_string();
        assert!(text.contains("QEMU exited"), "{text}");
        assert!(text.contains("Kernel panic - not syncing: VFS"), "{text}");
        let _ = child.wait();
    }

    #[test]
    fn a_dropped_boot_guard_ends_the_process_and_removes_the_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let vm_dir = dir.path().join("vm");
        std::fs::create_dir(&vm_dir).expect("vm dir");
        std::fs::write(vm_dir.join("console.log"), b"x").expect("file");
        let ram = dir.path().join("x.ram");
        std::fs::write(&ram, b"ram").expect("ram");
        let instance = new_instance_id();
        let mut child = fake_qemu(&instance, "30");
        let guard = BootGuard {
            network: None,
            process: Some((child.id(), instance.clone())),
            paths: vec![vm_dir.clone(), ram.clone()],
        };
        drop(guard);
        let status = child.wait().expect("wait");
        assert!(!status.success(), "killed, not exited: {status:?}");
        assert!(!vm_dir.exists() && !ram.exists());

        // Disarmed (a successful boot), it leaves everything alone.
        let mut child = fake_qemu(&instance, "30");
        std::fs::write(&ram, b"ram").expect("ram");
        let mut guard = BootGuard {
            network: None,
            process: Some((child.id(), instance)),
            paths: vec![ram.clone()],
        };
        guard.disarm();
        drop(guard);
        assert!(ram.exists());
        assert!(
            child.try_wait().expect("try_wait").is_none(),
            "still running"
        );
        let _ = child.kill();
        let _ = child.wait();
    }

    #[test]
    fn idle_guests_drop_background_timers_and_tcg_guests_trust_their_tsc() {
        let options = |cmdline: &str| -> Vec<String> {
            cmdline.split_whitespace().map(str::to_string).collect()
        };
        let tcg = options(&boot_cmdline(Accel::Tcg, false));
        for wanted in [
            "nowatchdog",
            "sysctl.vm.compaction_proactiveness=0",
            "tsc=reliable",
        ] {
            assert!(tcg.iter().any(|o| o == wanted), "{wanted} in {tcg:?}");
        }
        // KVM guests use kvm-clock; the TSC is left to the kernel's checks.
        let kvm = options(&boot_cmdline(Accel::Kvm, true));
        assert!(kvm.iter().all(|o| o != "tsc=reliable"), "{kvm:?}");
        assert!(kvm.iter().any(|o| o == "nowatchdog"), "{kvm:?}");
        assert!(kvm.iter().any(|o| o == "hearth.net=user"), "{kvm:?}");
    }

    #[test]
    fn the_console_tail_keeps_the_last_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("console.log");
        assert_eq!(console_tail(&path), "(empty)");
        let text: String = (0..40).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&path, text).expect("write");
        let tail = console_tail(&path);
        assert!(
            tail.starts_with("line 28") && tail.ends_with("line 39"),
            "{tail}"
        );
    }
}

#[cfg(test)]
mod recognition_tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|a| a.to_string()).collect()
    }

    #[test]
    fn only_hearths_own_command_lines_are_claimed() {
        let root = tempfile::tempdir().expect("tempdir");
        let vms = root.path().join("vms");
        let ram_dir = root.path().join("ram");
        std::fs::create_dir_all(vms.join("web")).expect("vm dir");
        std::fs::create_dir_all(&ram_dir).expect("ram dir");
        let console = format!("file:{}/web/console.log", vms.display());
        let good_ram = format!(
            "memory-backend-file,id=mem,size=256M,mem-path={}/abc123.ram,share=on",
            ram_dir.display()
        );
        let good = args(&[
            "qemu-system-x86_64",
            "-name",
            "hearth-abc123",
            "-object",
            &good_ram,
            "-serial",
            &console,
        ]);
        assert_eq!(
            QemuClaim::parse(&good, &vms, &ram_dir),
            Some(QemuClaim {
                instance: "abc123".into(),
                vm: "web".into(),
                ram: Some(ram_dir.join("abc123.ram")),
            })
        );
        // A RAM path that escapes the RAM directory, or names another file, is
        // not this VM's RAM file: never reported, so never deleted.
        for hostile in [
            format!("mem-path={}/../../etc/shadow,share=on", ram_dir.display()),
            "mem-path=/etc/shadow,share=on".to_string(),
            format!("mem-path={}/other.ram,share=on", ram_dir.display()),
        ] {
            let crafted = args(&[
                "qemu-system-x86_64",
                "-name",
                "hearth-abc123",
                "-object",
                &hostile,
                "-serial",
                &console,
            ]);
            let claim = QemuClaim::parse(&crafted, &vms, &ram_dir).expect("claimed");
            assert_eq!(claim.ram, None, "{hostile}");
        }
        // Not QEMU, no hearth name, or a directory outside `vms`: not claimed.
        let elsewhere = format!("file:{}/console.log", root.path().display());
        let traversal = format!("file:{}/web/../../x/console.log", vms.display());
        for bad in [
            args(&["python3", "-name", "hearth-abc123", "-serial", &console]),
            args(&[
                "qemu-system-x86_64",
                "-name",
                "vm-abc123",
                "-serial",
                &console,
            ]),
            args(&[
                "qemu-system-x86_64",
                "-name",
                "hearth-../x",
                "-serial",
                &console,
            ]),
            args(&[
                "qemu-system-x86_64",
                "-name",
                "hearth-abc123",
                "-serial",
                &elsewhere,
            ]),
            args(&[
                "qemu-system-x86_64",
                "-name",
                "hearth-abc123",
                "-serial",
                &traversal,
            ]),
        ] {
            assert_eq!(QemuClaim::parse(&bad, &vms, &ram_dir), None, "{bad:?}");
        }
    }

    #[test]
    fn a_process_dressed_as_qemu_is_ignored_and_its_target_survives() {
        let root = tempfile::tempdir().expect("tempdir");
        let assets = Assets {
            cache_dir: root.path().join("cache"),
            state_dir: root.path().join("state"),
            ram_dir: root.path().join("ram"),
        };
        let vms = assets.vms_dir();
        std::fs::create_dir_all(vms.join("victim")).expect("vm dir");
        std::fs::create_dir_all(&assets.ram_dir).expect("ram dir");
        let target = root.path().join("precious.txt");
        std::fs::write(&target, b"keep me").expect("target");
        let driver = QemuDriver::with_accel(assets.clone(), Accel::Tcg);
        let console = format!("file:{}/victim/console.log", vms.display());
        let mem = format!(
            "memory-backend-file,mem-path={}/../precious.txt,share=on",
            assets.ram_dir.display()
        );
        let fake = |uid: Option<u32>| {
            use std::os::unix::process::CommandExt;
            let mut command = std::process::Command::new("bash");
            // argv[0] "qemu-system-x86_64", then arguments that name a VM directory.
            command
                .args([
                    "-c",
                    r#"exec -a qemu-system-x86_64 sh -c 'sleep 30; true' "$@""#,
                    "x",
                ])
                .args([
                    "-name",
                    "hearth-feedbeef",
                    "-object",
                    &mem,
                    "-serial",
                    &console,
                ]);
            if let Some(uid) = uid {
                command.uid(uid).gid(uid);
            }
            command.spawn().expect("spawn")
        };
        // Another user's process dressed as one of ours (root's own too, when
        // the jail has a uid range): not ours at all.
        if rustix::process::geteuid().as_raw() == 0 {
            let mut other = fake(Some(65534));
            let mut root_owned = fake(None);
            std::thread::sleep(Duration::from_millis(300));
            assert!(driver.processes().iter().all(|p| p.pid != root_owned.id()));
            let _ = root_owned.kill();
            let _ = root_owned.wait();
            std::thread::sleep(Duration::from_millis(300));
            assert!(driver.processes().iter().all(|p| p.pid != other.id()));
            let _ = other.kill();
            let _ = other.wait();
        }
        // One of the jail's (a uid of its range when root, else this
        // user's): claimed (it runs from our VM directory), but the RAM file
        // it names is not its own, so killing it deletes nothing.
        let jailed_uid = match driver.jail().mode {
            JailMode::Root { uid_base, .. } => Some(uid_base + 7),
            _ => None,
        };
        let mut mine = fake(jailed_uid);
        std::thread::sleep(Duration::from_millis(300));
        let found: Vec<_> = driver
            .processes()
            .into_iter()
            .filter(|p| p.pid == mine.id())
            .collect();
        assert_eq!(found.len(), 1, "claimed");
        for process in &found {
            assert_eq!(process.ram, None);
            driver.kill_process(process);
        }
        assert_eq!(std::fs::read(&target).expect("target kept"), b"keep me");
        let _ = mine.kill();
        let _ = mine.wait();
    }
}

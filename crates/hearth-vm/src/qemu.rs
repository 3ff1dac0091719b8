//! The QEMU driver: `-M microvm` guests controlled over QMP.
//!
//! Every VM lives in its own directory (`vm.json`, sockets, logs, disk overlay,
//! RAM file). The record is written before QEMU is started and after every state
//! change, so another process can find the VM and a crash leaves a record that
//! says what was intended.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::process::Command;
use tracing::{debug, info};

use crate::accel::{self, Accel};
use crate::agent::{AgentClient, AgentError};
use crate::assets::Assets;
use crate::disk::{self, BackingFormat};
use crate::driver::{BootRequest, ColdBoot, Driver, VmError, VmProcess};
use crate::errors::error_chain;
use crate::pins::HostPins;
use crate::qmp::{Qmp, QmpError};
use crate::record::{validate_name, MachineShape, Memory, Origin, VmRecord, VmState};
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
fn boot_cmdline(accel: Accel, user_network: bool) -> String {
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
    if user_network {
        // The agent configures eth0 for QEMU's user-mode network (10.0.2.0/24).
        cmdline.push_str(" hearth.net=user");
    }
    // See `accel::host_tsc_khz`: without it a TCG boot on a busy host can hang.
    if accel == Accel::Tcg {
        if let Some(khz) = accel::host_tsc_khz() {
            cmdline.push_str(&format!(" tsc_early_khz={khz}"));
        }
    }
    cmdline
}

/// The QEMU implementation of [`Driver`].
#[derive(Debug, Clone)]
pub struct QemuDriver {
    assets: Assets,
    accel: Accel,
    qemu: PathBuf,
    /// The first line of `qemu --version` (empty when QEMU is missing), read
    /// once: snapshots record it and launches compare it.
    qemu_version: String,
}

impl QemuDriver {
    /// A driver with the accelerator chosen by [`accel::select_cached`].
    pub fn new(assets: Assets) -> Result<Self, VmError> {
        std::fs::create_dir_all(&assets.cache_dir)
            .map_err(|e| VmError::Io(assets.cache_dir.clone(), e))?;
        let (accel, reason) = accel::select_cached(&assets.cache_dir.join("accel.json"))?;
        info!(accel = ?accel, "{reason}");
        let driver = Self::with_accel(assets, accel);
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
        Self {
            assets,
            accel,
            qemu,
            qemu_version,
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
    fn command_line(&self, vm: &VmRecord, incoming: Incoming<'_>, kernel: &Path) -> Vec<OsString> {
        let MachineShape { memory_mib, vcpus } = vm.shape;
        let memory = match &vm.memory {
            Memory::SharedFile { path } => format!(
                "memory-backend-file,id=mem,size={memory_mib}M,mem-path={},share=on",
                path.display()
            ),
            // Private mapping of a snapshot's RAM: the file is never written.
            Memory::PrivateFile { path } => format!(
                "memory-backend-file,id=mem,size={memory_mib}M,mem-path={},share=off,readonly=on,rom=off",
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
        push("-serial");
        push(&format!("file:{}", vm.console_log().display()));
        push("-drive");
        push(&format!(
            "id=root,file={},format=qcow2,if=none,cache=writeback,discard=unmap",
            vm.disk.display()
        ));
        push("-device");
        push("virtio-blk-device,drive=root");
        if vm.user_network {
            push("-netdev");
            push("user,id=net0");
            push("-device");
            push("virtio-net-device,netdev=net0");
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

    /// Starts QEMU for `vm` and returns its pid and a QMP session once QEMU
    /// accepts commands. QEMU runs in its own process group, outliving the caller.
    async fn spawn(&self, vm: &VmRecord, incoming: Incoming<'_>) -> Result<(u32, Qmp), VmError> {
        let log_path = vm.qemu_log();
        let log = std::fs::File::create(&log_path).map_err(|e| VmError::Io(log_path.clone(), e))?;
        let log_err = log
            .try_clone()
            .map_err(|e| VmError::Io(log_path.clone(), e))?;
        let kernel = match incoming {
            Incoming::None => vm.kernel.clone(),
            Incoming::Defer | Incoming::Uri(_) => self.kernel_stub(&vm.kernel)?,
        };
        let mut command = Command::new(&self.qemu);
        command.args(self.command_line(vm, incoming, &kernel));
        // SAFETY: the closure runs in the forked child before exec and only calls
        // prctl(2), which is async-signal-safe and touches no shared state.
        unsafe {
            command.pre_exec(|| {
                // Transparent huge pages would round QEMU's translation cache up to
                // 2 MiB pages in every clone; guest RAM is file-backed and unaffected.
                libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
                Ok(())
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
        let pid = child.id().ok_or_else(|| VmError::QemuDied {
            log: read_tail(&log_path),
        })?;
        let deadline = Instant::now() + QMP_START_TIMEOUT;
        let qmp = loop {
            if let Ok(Some(_)) = child.try_wait() {
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
                    let _ = child.start_kill();
                    return Err(err.into());
                }
            }
        };
        // Reap QEMU when it exits while this process lives; if this process exits
        // first, init adopts and reaps it.
        tokio::spawn(async move {
            let _ = child.wait().await;
        });
        Ok((pid, qmp))
    }

    /// Prepares a VM to receive `snapshot`'s state: its directory, disk overlay,
    /// record and a QEMU process waiting in `-incoming defer`. Used directly by
    /// launches and ahead of time by the warm pool.
    pub(crate) async fn prepare_clone(
        &self,
        snapshot: &Snapshot,
        name: &str,
        pool_slot: bool,
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
            process: None,
            paths: vec![dir.clone()],
        };
        let result = async {
            let vm = restored_record(
                manifest,
                name,
                &dir,
                Memory::PrivateFile {
                    path: snapshot.memory(),
                },
                &snapshot.dir,
            );
            disk::create_overlay(&vm.disk, &snapshot.disk(), BackingFormat::Qcow2).await?;
            self.save(&vm)?;
            let (pid, qmp) = self.spawn(&vm, Incoming::Defer).await?;
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
            user_network: false,
            disk_size: None,
        };
        self.boot_with(request, &boot).await
    }

    /// Ends the VM's QEMU process: `quit` over QMP, SIGKILL if that fails.
    pub(crate) async fn stop_process(&self, vm: &VmRecord) {
        let Some(pid) = vm.pid else { return };
        if !process_alive(pid, &vm.instance) {
            return;
        }
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
        if !validate_name(name) {
            return Err(VmError::BadName(name.into()));
        }
        let dir = self.vm_dir(name);
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
        let own_uid = rustix::process::getuid().as_raw();
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
            use std::os::unix::fs::MetadataExt;
            if !entry.metadata().is_ok_and(|m| m.uid() == own_uid) {
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
            found.push(VmProcess {
                pid,
                vm: claim.vm,
                ram: claim.ram,
            });
        }
        found
    }

    /// Kills a process found by [`Self::processes`] and removes its RAM file.
    fn kill_process(&self, process: &VmProcess) {
        if let Ok(pid) = i32::try_from(process.pid) {
            // SAFETY: kill(2) has no memory effects; a stale pid at worst
            // fails with ESRCH.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
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
                cmdline: boot_cmdline(self.accel, boot.user_network),
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
                user_network: boot.user_network,
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
        qmp.execute::<serde_json::Value>(
            "blockdev-snapshot-sync",
            Some(serde_json::json!({
                "device": "root",
                "snapshot-file": new_overlay.display().to_string(),
                "format": "qcow2",
                "mode": "absolute-paths",
            })),
        )
        .await
        .map_err(|err| self.qemu_failure(vm, err))?;
        let frozen = std::mem::replace(&mut vm.disk, new_overlay.to_path_buf());
        self.save(vm)?;
        Ok(frozen)
    }

    /// Launches from a snapshot and returns the record with a connected agent.
    async fn launch_with_agent(
        &self,
        snapshot: &Snapshot,
        name: &str,
    ) -> Result<(VmRecord, AgentClient), VmError> {
        let (vm, mut qmp) = self.prepare_clone(snapshot, name, false).await?;
        // Ends the clone if this future is dropped mid-restore.
        let mut guard = BootGuard {
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

        let mut qmp = Qmp::connect(&vm.qmp_socket()).await?;
        qmp.stop().await?;
        let captured = async {
            qmp.set_ignore_shared(true).await?;
            let uri = format!("file:{}", tmp.join(snapshot::STATE_FILE).display());
            qmp.migrate_and_wait(&uri, MIGRATION_TIMEOUT).await?;
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
                files,
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

    async fn suspend(&self, vm: &mut VmRecord) -> Result<(), VmError> {
        if !vm.state.can_become(VmState::Suspended) || !vm_alive(vm) {
            return Err(VmError::BadState {
                name: vm.name.clone(),
                state: vm.state,
                action: "suspend",
            });
        }
        let state_file = vm.suspend_state();
        let mut qmp = Qmp::connect(&vm.qmp_socket()).await?;
        qmp.stop().await?;
        let saved = async {
            // All RAM goes into the stream: the VM's memory is freed afterwards.
            qmp.set_ignore_shared(false).await?;
            let uri = format!("file:{}", state_file.display());
            qmp.migrate_and_wait(&uri, MIGRATION_TIMEOUT).await?;
            std::fs::File::open(&state_file)
                .and_then(|f| f.sync_all())
                .map_err(|e| VmError::Io(state_file.clone(), e))?;
            Ok::<(), VmError>(())
        }
        .await;
        if let Err(err) = saved {
            let _ = qmp.cont().await;
            let _ = std::fs::remove_file(&state_file);
            return Err(err);
        }
        vm.state = VmState::Suspended;
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
        if let Memory::SharedFile { path } = &vm.memory {
            let _ = std::fs::remove_file(path);
        }
        Ok(())
    }

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
        // The resumed VM gets its own shared RAM file, so it can be snapshotted.
        let mut running = vm.clone();
        running.instance = new_instance_id();
        let ram = self.ram_file(&running.instance)?;
        running.memory = Memory::SharedFile { path: ram.clone() };
        let start = Instant::now();
        let (pid, mut qmp) = match self.spawn(&running, Incoming::Defer).await {
            Ok(spawned) => spawned,
            Err(err) => {
                let _ = std::fs::remove_file(&ram);
                return Err(err);
            }
        };
        let spawned_at = start.elapsed();
        running.pid = Some(pid);
        running.state = VmState::Running;
        let uri = format!("file:{}", state_file.display());
        let loaded = async {
            qmp.set_ignore_shared(false).await?;
            qmp.migrate_incoming_and_wait(&uri, MIGRATION_TIMEOUT)
                .await?;
            qmp.cont().await
        }
        .await;
        if let Err(err) = loaded {
            let err = self.qemu_failure(&running, err);
            self.stop_process(&running).await;
            let _ = std::fs::remove_file(&ram);
            return Err(err);
        }
        self.save(&running)?;
        *vm = running;
        let _ = std::fs::remove_file(&state_file);
        let loaded_at = start.elapsed();
        let agent = AgentClient::connect(&vm.agent_socket(), RESTORE_TIMEOUT).await?;
        let hello_at = start.elapsed();
        agent.restored().await?;
        debug!(
            vm = %vm.name,
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
        vm.state = VmState::Stopped;
        vm.pid = None;
        if let Memory::SharedFile { path } = &vm.memory {
            let _ = std::fs::remove_file(path);
        }
        self.save(vm)
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
        match std::fs::remove_dir_all(&vm.dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(VmError::Io(vm.dir.clone(), e)),
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
        user_network: false,
    }
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A random id that names one QEMU process (`-name hearth-ID`).
pub(crate) fn new_instance_id() -> String {
    hex::encode(rand::random::<[u8; 8]>())
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
        agent = AgentClient::connect(&socket, timeout) => match agent {
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
        // The VM directory: the directory of the serial log (`file:<dir>/console.log`).
        let console = args.iter().find_map(|a| {
            a.strip_prefix("file:")
                .filter(|p| p.ends_with("/console.log"))
        })?;
        let vm_dir = canonical_or_self(Path::new(console).parent()?);
        if vm_dir.parent() != Some(vms) {
            return None;
        }
        let vm = vm_dir.file_name()?.to_str()?.to_string();
        if !(validate_name(&vm) || vm.starts_with(".pool-")) {
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

/// `path` with `..` and symlinks resolved, or as given when it does not exist.
fn canonical_or_self(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

/// Ends a booting VM's QEMU and removes its files unless disarmed: on an error,
/// and when the boot future is dropped before it finishes (a cancelled build,
/// an interrupted `hearth vm boot`), so a failed boot leaves no process behind.
struct BootGuard {
    /// QEMU's pid and the instance id that identifies it in `/proc`.
    process: Option<(u32, String)>,
    /// The VM's directory, RAM file and disk overlay.
    paths: Vec<PathBuf>,
}

impl BootGuard {
    fn disarm(&mut self) {
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
    let text = std::fs::read(path).unwrap_or_default();
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
fn read_tail(path: &Path) -> String {
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
            user_network: false,
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
        // Another user's process dressed as one of ours: not ours at all.
        if rustix::process::geteuid().as_raw() == 0 {
            let mut other = fake(Some(65534));
            std::thread::sleep(Duration::from_millis(300));
            assert!(driver.processes().iter().all(|p| p.pid != other.id()));
            let _ = other.kill();
            let _ = other.wait();
        }
        // This user's: claimed (it runs from our VM directory), but the RAM
        // file it names is not its own, so killing it deletes nothing.
        let mut mine = fake(None);
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

//! The jail, audited from outside and tried from inside: every kind of QEMU
//! the VM layer runs (cold boot, clone launched from a snapshot, warm-pool
//! slot, resumed after a suspend) is checked in `/proc` (uid, no_new_privs,
//! seccomp, namespaces, descriptors, mounts, rlimits, oom_score_adj), and an
//! escape drill runs commands as a QEMU's uid inside its namespaces to show
//! the host's secrets, other VMs and other QEMUs are out of reach.
//! Needs a root host (the jail's uid range), `scripts/setup-host` and the agent.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::sh;
use hearth_vm::pool::{PoolMode, WarmPool};
use hearth_vm::{
    Assets, BootRequest, Driver, JailMode, MachineShape, Memory, QemuDriver, VmRecord,
};

fn driver(state: &Path) -> QemuDriver {
    let assets = Assets {
        state_dir: state.to_path_buf(),
        ..Assets::from_env()
    };
    QemuDriver::new(assets).expect("driver")
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn status_field(pid: u32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in status"))
        .trim()
        .to_string()
}

fn ns(pid: &str, kind: &str) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).expect("ns link")
}

/// The paths a VM's QEMU may have: its directory, disk chain, RAM and
/// snapshot files, kernel and initramfs, and a few device nodes.
fn allowed_paths(vm: &VmRecord) -> Vec<PathBuf> {
    let mut allowed = vec![
        vm.dir.clone(),
        vm.disk.clone(),
        vm.kernel.clone(),
        vm.initrd.clone(),
        PathBuf::from("/usr"),
        PathBuf::from("/dev/null"),
        PathBuf::from("/dev/zero"),
        PathBuf::from("/dev/urandom"),
        PathBuf::from("/dev/random"),
    ];
    allowed.extend(hearth_vm::disk::backing_chain(&vm.disk).expect("chain"));
    // Boot-kernel copies and the stub a restored VM is given (see `QemuDriver`).
    let cache = Assets::from_env().cache_dir;
    allowed.push(cache.join("kernel-stubs"));
    allowed.push(cache.join("kernel-boot"));
    if let Some(path) = vm.memory.path() {
        allowed.push(path.to_path_buf());
    }
    if let hearth_vm::Origin::Snapshot { dir } = &vm.origin {
        allowed.push(dir.clone());
    }
    allowed
}

/// Checks one QEMU in `/proc`; returns its uid.
fn audit(vm: &VmRecord, state: &Path, others: &[&VmRecord]) -> u32 {
    let pid = vm.pid.expect("running");
    let what = format!("{} (pid {pid})", vm.name);
    let uids: Vec<u32> = status_field(pid, "Uid")
        .split_whitespace()
        .map(|u| u.parse().expect("uid"))
        .collect();
    let gids: Vec<u32> = status_field(pid, "Gid")
        .split_whitespace()
        .map(|g| g.parse().expect("gid"))
        .collect();
    let uid = vm.jail_uid.expect("a jailed VM records its uid");
    assert!(uids.iter().all(|u| *u == uid), "{what}: uids {uids:?}");
    assert!(gids.iter().all(|g| *g == uid), "{what}: gids {gids:?}");
    assert_ne!(uid, 0, "{what}");
    assert!(uid > hearth_vm::jail::DEFAULT_UID_BASE, "{what}: {uid}");
    assert_eq!(
        status_field(pid, "Groups"),
        hearth_vm::jail::DEFAULT_UID_BASE.to_string(),
        "{what}: only the shared read-only group"
    );
    assert_eq!(status_field(pid, "NoNewPrivs"), "1", "{what}");
    assert_eq!(status_field(pid, "Seccomp"), "2", "{what}");
    assert_eq!(status_field(pid, "CapEff"), "0000000000000000", "{what}");
    for kind in ["mnt", "pid", "net", "ipc", "uts"] {
        assert_ne!(
            ns(&pid.to_string(), kind),
            ns("self", kind),
            "{what}: {kind} namespace is the host's"
        );
    }
    for other in others {
        let other_pid = other.pid.expect("running").to_string();
        for kind in ["mnt", "pid", "net"] {
            assert_ne!(
                ns(&pid.to_string(), kind),
                ns(&other_pid, kind),
                "{what} shares {kind} with {}",
                other.name
            );
        }
    }
    assert_eq!(
        std::fs::read_to_string(format!("/proc/{pid}/oom_score_adj"))
            .expect("oom")
            .trim(),
        "1000",
        "{what}"
    );
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let limit = |name: &str| -> String {
        limits
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{name}"))[26..]
            .split_whitespace()
            .next()
            .expect("soft")
            .to_string()
    };
    assert_eq!(limit("Max core file size"), "0", "{what}");
    assert_eq!(limit("Max open files"), "4096", "{what}");
    assert_eq!(
        limit("Max processes"),
        (128 + u32::from(vm.shape.vcpus)).to_string(),
        "{what}"
    );
    let fsize: u64 = limit("Max file size").parse().expect("fsize");
    assert!(
        fsize < 200 << 30 && fsize > u64::from(vm.shape.memory_mib) << 20,
        "{what}: {fsize}"
    );

    // Descriptors: nothing but the VM's own files, sockets, pipes and the like.
    let allowed = allowed_paths(vm);
    let mut fds = 0;
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).expect("fds") {
        let entry = entry.expect("fd");
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        fds += 1;
        let text = target.to_string_lossy();
        if !text.starts_with('/') || text.starts_with("/memfd:") {
            assert!(
                ["socket:", "pipe:", "anon_inode:", "/memfd:"]
                    .iter()
                    .any(|p| text.starts_with(p)),
                "{what}: fd {:?} -> {text}",
                entry.file_name()
            );
            continue;
        }
        let fd: u32 = entry.file_name().to_string_lossy().parse().expect("fd");
        let expected = allowed.iter().any(|a| target.starts_with(a));
        assert!(expected, "{what}: fd {fd} -> {text}");
    }
    assert!(fds < 200, "{what}: {fds} descriptors");

    // Mounts: only the allowed paths; never the data directory or another VM.
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).expect("mountinfo");
    let mut points = BTreeSet::new();
    for line in mountinfo.lines() {
        let point = PathBuf::from(line.split(' ').nth(4).expect("mount point"));
        points.insert(point.clone());
        if point == Path::new("/") {
            continue;
        }
        assert!(
            allowed.iter().any(|a| point.starts_with(a))
                || point.starts_with("/usr")
                || point.starts_with("/dev"),
            "{what}: mount {point:?}"
        );
        assert_ne!(point, state, "{what}: the data directory is mounted");
        for other in others {
            assert!(
                !point.starts_with(&other.dir),
                "{what}: {}'s directory",
                other.name
            );
        }
    }
    assert!(points.contains(&vm.dir), "{what}: its own directory");
    assert!(!points.contains(Path::new("/proc")), "{what}: a /proc");
    uid
}

/// Runs `script` with `sh` as `uid` inside the namespaces of `pid` (mount,
/// pid, net, ipc, uts) with QEMU's groups, as an escaped QEMU would; returns
/// its output.
fn as_escaped_qemu(pid: u32, uid: u32, script: &str) -> String {
    let out = Command::new("nsenter")
        .args(["-t", &pid.to_string(), "-m", "-p", "-n", "-i", "-u", "--"])
        .args([
            "setpriv",
            &format!("--reuid={uid}"),
            &format!("--regid={uid}"),
            // QEMU's own groups: the shared read-only group only.
            &format!("--groups={}", hearth_vm::jail::DEFAULT_UID_BASE),
            "--",
            "sh",
            "-c",
            script,
        ])
        .output()
        .expect("nsenter");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "drill failed to run: {text}");
    text
}

/// `setpriv` as `uid` in the host's namespaces: signals and ptrace only.
fn as_uid_on_host(uid: u32, script: &str) -> String {
    let out = Command::new("setpriv")
        .args([
            &format!("--reuid={uid}"),
            &format!("--regid={uid}"),
            "--clear-groups",
            "--",
            "sh",
            "-c",
            script,
        ])
        .output()
        .expect("setpriv");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A script that tries to read each path and prints `READ <path>` for each it could.
fn try_read(paths: &[PathBuf]) -> String {
    let mut script = String::new();
    for path in paths {
        let path = path.display();
        script.push_str(&format!(
            "if cat '{path}' >/dev/null 2>&1 || ls '{path}' >/dev/null 2>&1; then echo 'READ {path}'; fi\n"
        ));
    }
    script
}

/// Kills the test's QEMUs and removes their RAM files if the test fails
/// midway (the state directory goes with its `TempDir`).
struct KillOnDrop(QemuDriver);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for process in self.0.processes() {
            self.0.kill_process(&process);
        }
    }
}

const PTRACE: &str = "import ctypes,sys\nlibc=ctypes.CDLL(None,use_errno=True)\nr=libc.ptrace(16,int(sys.argv[1]),0,0)\nprint(\"PTRACE\", r, ctypes.get_errno())\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_qemu_is_jailed_and_an_escape_reaches_nothing() {
    if !is_root() {
        eprintln!("skipped: the uid-range jail needs root");
        return;
    }
    let state = tempfile::Builder::new()
        .prefix("hj")
        .tempdir_in("/tmp")
        .expect("state dir");
    let driver = driver(state.path());
    let _kill = KillOnDrop(driver.clone());
    assert!(matches!(driver.jail().mode, JailMode::Root { .. }));
    // The server's secrets, where `hearth serve` keeps them under its data directory.
    let secrets: Vec<PathBuf> = ["master.key", "hearth.db", "token-keys", "s3/bucket/object"]
        .iter()
        .map(|name| state.path().join(name))
        .collect();
    for path in &secrets {
        std::fs::create_dir_all(path.parent().expect("parent")).expect("dir");
        std::fs::write(path, b"secret").expect("secret");
    }

    let source = driver
        .boot(&BootRequest {
            name: "src".into(),
            image: "debian-12".into(),
            shape: MachineShape::default(),
        })
        .await
        .expect("boot");
    let agent = driver.agent(&source).await.expect("agent");
    sh(&agent, "echo jailed > /root/mark").await;
    drop(agent);
    let snapshot = driver
        .snapshot(&source, &state.path().join("snap"))
        .await
        .expect("snapshot");
    // The snapshot's files: root's, readable by the shared group only.
    for name in ["mem", "state", "disk.qcow2"] {
        let path = snapshot.dir.join(name);
        if path.exists() {
            use std::os::unix::fs::MetadataExt;
            let meta = std::fs::metadata(&path).expect("meta");
            assert_eq!(meta.mode() & 0o007, 0, "{path:?} is world-accessible");
        }
    }
    let clone = driver.launch(&snapshot, "clone").await.expect("launch");
    let pool = WarmPool::new(driver.clone(), snapshot.clone(), PoolMode::Prewarmed, 1);
    assert!(pool.wait_full(Duration::from_secs(120)).await, "pool");
    let (pooled, pooled_agent, _) = pool.launch("pooled").await.expect("pool launch");
    assert_eq!(sh(&pooled_agent, "cat /root/mark").await, "jailed");
    drop(pooled_agent);
    let mut resumed = driver.launch(&snapshot, "resumed").await.expect("launch");
    driver.suspend(&mut resumed).await.expect("suspend");
    driver.resume(&mut resumed).await.expect("resume");
    let agent = driver.agent(&resumed).await.expect("agent");
    assert_eq!(sh(&agent, "cat /root/mark").await, "jailed");
    drop(agent);
    assert!(matches!(resumed.memory, Memory::SharedFile { .. }));

    let vms = [&source, &clone, &pooled, &resumed];
    let mut uids = BTreeSet::new();
    for vm in vms {
        let others: Vec<&VmRecord> = vms.iter().copied().filter(|o| o.name != vm.name).collect();
        uids.insert(audit(vm, state.path(), &others));
    }
    assert_eq!(uids.len(), vms.len(), "a uid per VM: {uids:?}");

    // A guest writing to its serial port without end fills no disk: the
    // console log is cut past its cap, its tail kept in console.log.1.
    let agent = driver.agent(&clone).await.expect("agent");
    let flood = hearth_vm::console::CAP + 2 * hearth_vm::console::KEEP;
    sh(
        &agent,
        &format!("head -c {flood} /dev/zero | tr '\\000' x > /dev/ttyS0"),
    )
    .await;
    drop(agent);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let log = std::fs::metadata(clone.console_log())
        .expect("console")
        .len();
    let kept = std::fs::metadata(clone.dir.join("console.log.1"))
        .expect("the cut tail")
        .len();
    assert!(log <= hearth_vm::console::CAP, "console.log is {log} bytes");
    assert_eq!(kept, hearth_vm::console::KEEP);

    // The escape drill, from inside `clone`'s QEMU.
    let pid = clone.pid.expect("pid");
    let uid = clone.jail_uid.expect("uid");
    let mut forbidden = secrets.clone();
    forbidden.push(state.path().join("s3"));
    forbidden.push(source.dir.clone());
    forbidden.push(source.dir.join("vm.json"));
    forbidden.push(resumed.dir.join("disk.qcow2"));
    forbidden.extend(source.memory.path().map(Path::to_path_buf));
    forbidden.push(PathBuf::from("/etc/shadow"));
    forbidden.push(PathBuf::from("/etc"));
    forbidden.push(PathBuf::from("/proc/1/environ"));
    let out = as_escaped_qemu(pid, uid, &try_read(&forbidden));
    assert!(!out.contains("READ"), "reachable from the jail: {out}");
    // The directories above its binds are empty skeletons: the data
    // directory shows only the way to its own VM directory and snapshot.
    let listing = |dir: &Path| as_escaped_qemu(pid, uid, &format!("ls -A '{}'", dir.display()));
    assert_eq!(listing(&driver.assets().vms_dir()).trim(), "clone");
    let top: BTreeSet<String> = listing(state.path())
        .split_whitespace()
        .map(str::to_string)
        .collect();
    assert!(top.iter().all(|e| e == "vms" || e == "snap"), "{top:?}");
    assert_eq!(listing(Path::new("/root")).trim(), ".cache");
    assert_eq!(
        listing(Path::new("/"))
            .split_whitespace()
            .filter(|e| *e == "etc" || *e == "home" || *e == "var")
            .count(),
        0
    );
    // Its /proc is no procfs: one copied host setting (the overcommit mode
    // QEMU reads), nothing of any process.
    assert_eq!(listing(Path::new("/proc")).trim(), "sys");
    assert_eq!(
        listing(Path::new("/proc/sys/vm")).trim(),
        "overcommit_memory"
    );
    // Its own files are there (the drill does run in the jail) ...
    let own = as_escaped_qemu(
        pid,
        uid,
        &try_read(&[clone.dir.clone(), snapshot.dir.join("mem")]),
    );
    assert_eq!(own.matches("READ").count(), 2, "{own}");
    // ... but its record, the server's, is not writable, and no other process is visible.
    let out = as_escaped_qemu(
        pid,
        uid,
        &format!(
            "echo x >> '{}' 2>/dev/null && echo WROTE; ls /proc 2>&1 | head -3; echo done",
            clone.dir.join("vm.json").display()
        ),
    );
    assert!(!out.contains("WROTE") && out.contains("done"), "{out}");
    // Other QEMUs: not there to signal or trace from inside its pid namespace ...
    for other in [&source, &pooled, &resumed] {
        let other_pid = other.pid.expect("pid");
        let out = as_escaped_qemu(
            pid,
            uid,
            &format!("kill -0 {other_pid} 2>/dev/null && echo SIGNALLED; python3 -c '{PTRACE}' {other_pid}"),
        );
        assert!(!out.contains("SIGNALLED"), "{out}");
        assert!(out.contains("PTRACE -1"), "{out}");
        // ... nor, as its uid, from the host's.
        let out = as_uid_on_host(
            uid,
            &format!("kill -0 {other_pid} 2>/dev/null && echo SIGNALLED; python3 -c '{PTRACE}' {other_pid}"),
        );
        assert!(!out.contains("SIGNALLED"), "{out}");
        assert!(out.contains("PTRACE -1 1"), "EPERM expected: {out}");
    }

    pool.shutdown().await;
    for vm in [&source, &clone, &pooled, &resumed] {
        driver.remove(vm).await.expect("remove");
    }
}

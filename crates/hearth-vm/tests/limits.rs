//! Per-VM cgroups hold real guests: every QEMU runs in its own cgroup with the
//! limits of its shape (checked from `/proc/PID/cgroup`), a guest allocating
//! past its memory is held (the guest's own OOM killer acts inside; QEMU and
//! the other VM live on), a guest spinning every vCPU stays within its CPU
//! quota while another VM's agent keeps answering (latency printed), and the
//! pids limit stops a process in a VM cgroup from forking past it. Also
//! measures QEMU's memory overhead beyond guest RAM (the allowance in
//! `cgroup.rs`). Needs root (cgroups) and `scripts/setup-host`.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::sh;
use hearth_proto::ExecRequest;
use hearth_vm::cgroup::qemu_overhead_mib;
use hearth_vm::{
    Accel, AgentClient, Assets, BootRequest, CgroupLimits, Driver, MachineShape, QemuDriver,
    VmCgroup, VmRecord,
};

/// The directory of `pid`'s cgroup for `controller` (v1), or its v2 cgroup.
fn cgroup_dir(pid: u32, controller: &str) -> PathBuf {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("/proc/PID/cgroup");
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next(), parts.next(), parts.next());
        let (Some(controllers), Some(path)) = (controllers, path) else {
            continue;
        };
        let path = path.trim_start_matches('/');
        if controllers.split(',').any(|c| c == controller) {
            return PathBuf::from("/sys/fs/cgroup").join(controller).join(path);
        }
        if controllers.is_empty()
            && std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers")
                .is_ok_and(|c| c.split_whitespace().any(|c| c == controller))
        {
            return PathBuf::from("/sys/fs/cgroup").join(path);
        }
    }
    panic!("pid {pid} is in no {controller} cgroup: {text}");
}

fn read(path: PathBuf) -> String {
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .to_string()
}

fn number(path: PathBuf) -> u64 {
    let text = read(path.clone());
    text.parse()
        .unwrap_or_else(|_| panic!("{}: {text:?}", path.display()))
}

fn v2() -> bool {
    std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
}

/// A key of v1 `memory.stat` (bytes).
fn memory_stat(pid: u32, key: &str) -> u64 {
    let stat = read(cgroup_dir(pid, "memory").join("memory.stat"));
    stat.lines()
        .find_map(|l| l.strip_prefix(&format!("{key} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {key} in memory.stat"))
}

/// The QEMU's limits as its cgroups say, in [`CgroupLimits`] terms.
fn limits_of(pid: u32) -> CgroupLimits {
    if v2() {
        let dir = cgroup_dir(pid, "memory");
        let cpu_max = read(dir.join("cpu.max"));
        let (quota, period) = cpu_max.split_once(' ').expect("cpu.max");
        let quota: u64 = quota.parse().expect("quota");
        let period: u64 = period.parse().expect("period");
        CgroupLimits {
            memory_bytes: number(dir.join("memory.max")),
            cpu_quota: u32::try_from(quota / period).expect("quota"),
            cpu_weight: number(dir.join("cpu.weight")),
            pids: number(dir.join("pids.max")),
        }
    } else {
        let cpu = cgroup_dir(pid, "cpu");
        let quota = number(cpu.join("cpu.cfs_quota_us"));
        let period = number(cpu.join("cpu.cfs_period_us"));
        CgroupLimits {
            memory_bytes: number(cgroup_dir(pid, "memory").join("memory.limit_in_bytes")),
            cpu_quota: u32::try_from(quota / period).expect("quota"),
            // v1 shares are weight * 11 (cgroup.rs); compare in weight units.
            cpu_weight: number(cpu.join("cpu.shares")) / 11,
            pids: number(cgroup_dir(pid, "pids").join("pids.max")),
        }
    }
}

fn cpu_ns(pid: u32) -> u64 {
    if v2() {
        let stat = read(cgroup_dir(pid, "cpu").join("cpu.stat"));
        stat.lines()
            .find_map(|l| l.strip_prefix("usage_usec "))
            .and_then(|v| v.parse::<u64>().ok())
            .expect("usage_usec")
            * 1000
    } else {
        number(cgroup_dir(pid, "cpuacct").join("cpuacct.usage"))
    }
}

fn pid_of(vm: &VmRecord) -> u32 {
    vm.pid.expect("a running VM has a pid")
}

async fn boot(driver: &QemuDriver, name: &str, shape: MachineShape) -> VmRecord {
    driver
        .boot(&BootRequest {
            name: name.into(),
            image: "debian-12".into(),
            shape,
        })
        .await
        .unwrap_or_else(|err| panic!("boot {name}: {}", hearth_vm::error_chain(&err)))
}

/// Ping latencies of `agent` for `for_how_long`, sorted, in ms.
async fn ping_latencies(agent: &AgentClient, for_how_long: Duration) -> Vec<f64> {
    let until = Instant::now() + for_how_long;
    let mut samples = Vec::new();
    while Instant::now() < until {
        let start = Instant::now();
        agent.ping().await.expect("the other VM's agent answers");
        samples.push(start.elapsed().as_secs_f64() * 1e3);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    samples.sort_by(f64::total_cmp);
    samples
}

/// Ends the test's QEMUs and removes their cgroups even when an assertion
/// fails midway (the VMs outlive the test process otherwise).
struct Cleanup {
    pids: Vec<u32>,
    cgroups: Vec<VmCgroup>,
    config: hearth_vm::CgroupConfig,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for pid in &self.pids {
            if let Some(pid) = i32::try_from(*pid)
                .ok()
                .and_then(rustix::process::Pid::from_raw)
            {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::Kill);
            }
        }
        std::thread::sleep(Duration::from_millis(200));
        for cgroup in self.cgroups.drain(..) {
            let _ = cgroup.remove();
        }
        self.config.remove_stale();
        self.config.remove_empty_parents();
    }
}

fn nr_throttled(pid: u32) -> u64 {
    let stat = read(cgroup_dir(pid, "cpu").join("cpu.stat"));
    stat.lines()
        .find_map(|l| l.strip_prefix("nr_throttled "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let at = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(at).copied().unwrap_or(f64::NAN)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn guests_stay_inside_their_cgroups() {
    let state = tempfile::Builder::new()
        .prefix("hcg")
        .tempdir_in("/tmp")
        .expect("state dir");
    let driver = QemuDriver::new(Assets {
        state_dir: state.path().to_path_buf(),
        ..Assets::from_env()
    })
    .expect("driver");
    let config = driver
        .cgroups()
        .expect("per-VM cgroups (run as root on a host with memory, cpu and pids controllers)")
        .clone();
    let shape = MachineShape::fixed(256, 1);
    let mut cleanup = Cleanup {
        pids: Vec::new(),
        cgroups: Vec::new(),
        config: config.clone(),
    };
    let hog = boot(&driver, "hog", shape).await;
    cleanup.pids.push(pid_of(&hog));
    cleanup.cgroups.push(VmCgroup::open(&config, &hog.instance));
    let bystander = boot(&driver, "bystander", shape).await;
    cleanup.pids.push(pid_of(&bystander));
    cleanup
        .cgroups
        .push(VmCgroup::open(&config, &bystander.instance));

    // Every QEMU runs in its own cgroup, with its shape's limits.
    let expected = CgroupLimits::for_shape_on(&shape, driver.accel());
    for vm in [&hog, &bystander] {
        let pid = pid_of(vm);
        assert_eq!(limits_of(pid), expected, "limits of {}", vm.name);
        assert!(
            cgroup_dir(pid, "memory").ends_with(&vm.instance),
            "{} runs in its own cgroup",
            vm.name
        );
        let oom = read(PathBuf::from(format!("/proc/{pid}/oom_score_adj")));
        assert_eq!(oom, "1000", "QEMU is the OOM killer's first choice");
    }
    assert_ne!(
        cgroup_dir(pid_of(&hog), "memory"),
        cgroup_dir(pid_of(&bystander), "memory")
    );

    // One connection per VM (QEMU's chardev serves one at a time), shared.
    let hog_agent = std::sync::Arc::new(driver.agent(&hog).await.expect("hog agent"));
    let bystander_agent = driver.agent(&bystander).await.expect("bystander agent");

    // QEMU's overhead beyond guest RAM, idle after boot (the allowance).
    let pid = pid_of(&hog);
    if !v2() {
        let usage = number(cgroup_dir(pid, "memory").join("memory.usage_in_bytes"));
        let (rss, cache, shmem) = (
            memory_stat(pid, "rss"),
            memory_stat(pid, "cache"),
            memory_stat(pid, "shmem"),
        );
        println!(
            "idle 256 MiB guest: cgroup usage {} MiB = guest RAM touched (shmem) {} MiB + QEMU anonymous {} MiB + page cache {} MiB",
            usage >> 20,
            shmem >> 20,
            rss >> 20,
            cache.saturating_sub(shmem) >> 20
        );
        let overhead = usage.saturating_sub(shmem);
        assert!(
            overhead < qemu_overhead_mib(driver.accel()) << 20,
            "idle overhead {} MiB exceeds QEMU's allowance",
            overhead >> 20
        );
    }

    // Memory: the guest allocates past its RAM. The guest's own OOM killer
    // ends the allocating process; QEMU stays inside its limit and lives.
    let out = hog_agent
        .exec_output(ExecRequest {
            argv: vec![
                "sh".into(),
                "-c".into(),
                "x=$(head -c 400M /dev/zero | tr '\\0' a); echo ${#x}".into(),
            ],
            ..Default::default()
        })
        .await
        .expect("exec");
    assert_ne!(
        out.status.code,
        Some(0),
        "400 MiB cannot fit in a 256 MiB guest"
    );
    let dmesg = sh(&hog_agent, "dmesg | grep -ci 'out of memory' || true").await;
    assert_ne!(dmesg, "0", "the guest's OOM killer acted");
    assert!(driver.is_alive(&hog), "QEMU survived its guest's OOM");
    let peak = if v2() {
        number(cgroup_dir(pid, "memory").join("memory.peak"))
    } else {
        number(cgroup_dir(pid, "memory").join("memory.max_usage_in_bytes"))
    };
    println!(
        "after the guest's OOM: peak {} MiB of a {} MiB limit; QEMU anonymous {} MiB",
        peak >> 20,
        expected.memory_bytes >> 20,
        if v2() {
            0
        } else {
            memory_stat(pid, "rss") >> 20
        }
    );
    assert!(peak <= expected.memory_bytes);
    assert_eq!(sh(&hog_agent, "echo alive").await, "alive");
    assert_eq!(sh(&bystander_agent, "echo alive").await, "alive");

    // CPU: the hog spins every vCPU for 20 s; its QEMU uses at most its
    // quota, and the other VM's agent keeps answering meanwhile. On a host
    // busier than the quota (a shared CI host) the spin gets less than its
    // quota and is never throttled: the figures printed say which it was.
    let (idle_before, idle_wall) = (cpu_ns(pid), Instant::now());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle_ratio = (cpu_ns(pid) - idle_before) as f64 / idle_wall.elapsed().as_nanos() as f64;
    let spin = {
        let agent = hog_agent.clone();
        tokio::spawn(async move {
            sh(
                &agent,
                "for i in $(seq $(nproc)); do timeout 20 sh -c 'while :; do :; done' & done; wait; echo done",
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (cpu_before, wall, throttled_before) = (cpu_ns(pid), Instant::now(), nr_throttled(pid));
    let latencies = ping_latencies(&bystander_agent, Duration::from_secs(10)).await;
    let used = cpu_ns(pid) - cpu_before;
    let ratio = used as f64 / wall.elapsed().as_nanos() as f64;
    let throttled = nr_throttled(pid) - throttled_before;
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "spinning {} vCPU(s): QEMU used {ratio:.2} CPUs (idle {idle_ratio:.2}, quota {}, {throttled} periods throttled, host load {}); bystander agent ping p50 {:.1} ms, p95 {:.1} ms, max {:.1} ms over {} pings",
        shape.vcpus,
        expected.cpu_quota,
        load.split_whitespace().next().unwrap_or("?"),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.95),
        percentile(&latencies, 1.0),
        latencies.len()
    );
    assert!(
        ratio <= f64::from(expected.cpu_quota) * 1.05,
        "QEMU used {ratio:.2} CPUs, over its quota of {}",
        expected.cpu_quota
    );
    assert!(
        percentile(&latencies, 0.5) < 1000.0,
        "the bystander kept answering"
    );
    assert_eq!(spin.await.expect("spin task"), "done");

    // pids: a guest fork bomb makes guest processes, not QEMU threads; QEMU
    // stays under its pids limit throughout.
    // The guest may end the bomb itself (its own OOM killer or pid limit can
    // kill the shell): how it ends is the guest's business. What is checked
    // is the host side: QEMU's task count and both VMs alive.
    let bomb = hog_agent
        .exec_output(ExecRequest {
            argv: vec![
                "sh".into(),
                "-c".into(),
                "n=0; for i in $(seq 1000); do sleep 20 & n=$((n+1)); done 2>/dev/null; echo $n; kill $(jobs -p) 2>/dev/null; true".into(),
            ],
            ..Default::default()
        })
        .await
        .map(|out| match out.status.code {
            Some(0) => String::from_utf8_lossy(&out.stdout).trim().to_string(),
            other => format!("some ({other:?}: the guest ended the shell)"),
        })
        .expect("exec");
    let pids_now = number(cgroup_dir(pid, "pids").join("pids.current"));
    println!(
        "guest forked {bomb} processes; QEMU has {pids_now} tasks of {} allowed",
        expected.pids
    );
    assert!(pids_now <= expected.pids);
    assert!(driver.is_alive(&hog) && driver.is_alive(&bystander));

    // Removing a VM removes its cgroup.
    let hog_cgroup = cgroup_dir(pid, "memory");
    driver.remove(&hog).await.expect("remove hog");
    assert!(!hog_cgroup.exists(), "the hog's cgroup is gone");
    let bystander_cgroup = cgroup_dir(pid_of(&bystander), "memory");
    driver.remove(&bystander).await.expect("remove bystander");
    assert!(!bystander_cgroup.exists());
    assert_eq!(config.remove_stale(), 0, "nothing stale is left");
    cleanup.pids.clear();
    cleanup.cgroups.clear();
}

/// The pids limit bites: a shell in a VM cgroup limited to 8 tasks cannot
/// fork past it (what bounds QEMU's threads bounds any process there).
#[test]
fn a_vm_cgroup_stops_forks_past_its_pids_limit() {
    let state = tempfile::tempdir().expect("dir");
    let driver = QemuDriver::with_accel(
        Assets {
            state_dir: state.path().to_path_buf(),
            ..Assets::from_env()
        },
        Accel::Tcg,
    );
    let config = driver.cgroups().expect("per-VM cgroups (root)").clone();
    let limits = CgroupLimits {
        pids: 8,
        ..CgroupLimits::for_shape(&MachineShape::default())
    };
    let cgroup = VmCgroup::create(&config, "pidstest", &limits).expect("create");
    // Removes the cgroup (and the sleepers in it) however the test ends.
    let _cleanup = Cleanup {
        pids: Vec::new(),
        cgroups: vec![cgroup.clone()],
        config: config.clone(),
    };
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg("read go; for i in $(seq 20); do sleep 5 & done; wait")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("sh");
    cgroup.attach(child.id()).expect("attach");
    use std::io::Write;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"go\n")
        .expect("go");
    std::thread::sleep(Duration::from_millis(1500));
    let tasks = cgroup.pids().len();
    // The pids hierarchy's directory: the last of the cgroup's (one on v2).
    let pids_dir = cgroup
        .procs_files()
        .last()
        .and_then(|f| f.parent())
        .expect("pids directory")
        .to_path_buf();
    let refused = read(pids_dir.join("pids.events"))
        .lines()
        .find_map(|l| {
            l.strip_prefix("max ")
                .and_then(|n| n.trim().parse::<u64>().ok())
        })
        .expect("pids.events max");
    println!("a shell forking 20 sleepers in a cgroup of 8 tasks: {tasks} processes in it, {refused} forks refused");
    assert!(tasks <= 8, "{tasks} processes in a cgroup of 8 tasks");
    assert!(refused > 0, "forks past the limit were refused");
    let usage = cgroup.usage().expect("usage");
    assert!(usage.cpu_ns > 0 && usage.memory_bytes > 0, "{usage:?}");
    cgroup
        .remove()
        .expect("remove kills the sleepers and removes the cgroup");
    let _ = child.wait();
    assert!(!pids_dir.exists());
}

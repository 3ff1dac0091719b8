//! Every size of the reference (`minimumMemoryInMiB` 512, 1024, 2048 — the
//! API's default —, 4096 and 8192) boots its PEAK shape (4x the memory, one
//! vCPU per 2 GiB: 2 GiB/1 up to 32 GiB/16), snapshots and launches, and the
//! guest sees that memory and that many CPUs. 2048 MiB once never booted at all (the QEMU
//! `microvm` + SeaBIOS fault in docs/qemu-microvm-edd.md), so each size is
//! exercised here, not only the small one most tests use.
//! Needs `scripts/setup-host` (as `scripts/test` runs).

mod common;

use common::sh;
use hearth_vm::{AgentClient, Assets, BootRequest, Driver, MachineShape, QemuDriver};

/// The VM's agent; a guest of many vCPUs under TCG on a busy host may take
/// longer than one connection's timeout to greet.
async fn agent_of(driver: &QemuDriver, vm: &hearth_vm::VmRecord) -> AgentClient {
    let mut last = None;
    for _ in 0..6 {
        match driver.agent(vm).await {
            Ok(agent) => return agent,
            Err(err) => last = Some(err),
        }
    }
    panic!("agent of {}: {last:?}", vm.name)
}

/// MemTotal in KiB.
async fn mem_total_kib(agent: &AgentClient) -> u64 {
    let line = sh(agent, "grep MemTotal /proc/meminfo").await;
    line.split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("MemTotal line {line:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_reference_size_boots_snapshots_and_launches() {
    let state = tempfile::Builder::new()
        .prefix("hsz")
        .tempdir_in("/tmp")
        .expect("state dir");
    let driver = QemuDriver::new(Assets {
        state_dir: state.path().to_path_buf(),
        ..Assets::from_env()
    })
    .expect("driver");
    for baseline_mib in [512u32, 1024, 2048, 4096, 8192] {
        let shape = MachineShape::burst_of(baseline_mib);
        let memory_mib = shape.memory_mib;
        let started = std::time::Instant::now();
        let source = driver
            .boot(&BootRequest {
                name: format!("boot-{memory_mib}"),
                image: "debian-12".into(),
                shape,
            })
            .await
            .unwrap_or_else(|err| {
                panic!("{memory_mib} MiB boot: {}", hearth_vm::error_chain(&err))
            });
        let agent = agent_of(&driver, &source).await;
        // The kernel keeps a little for itself (its image, page tables, the
        // e820 holes); everything else of the size is the guest's.
        let total = mem_total_kib(&agent).await;
        let size_kib = u64::from(memory_mib) * 1024;
        assert!(
            total <= size_kib && total >= size_kib * 90 / 100,
            "{memory_mib} MiB guest sees MemTotal {total} KiB"
        );
        assert_eq!(
            sh(&agent, "grep -c ^processor /proc/cpuinfo").await,
            shape.vcpus.to_string(),
            "{baseline_mib} MiB size: the guest's CPUs"
        );
        eprintln!(
            "size {baseline_mib}: peak {memory_mib} MiB, {} vCPUs booted in {:.1} s",
            shape.vcpus,
            started.elapsed().as_secs_f64()
        );
        sh(
            &agent,
            &format!("echo size-{memory_mib} > /root/mark && sync"),
        )
        .await;
        drop(agent);

        let snapshot = driver
            .snapshot(&source, &state.path().join(format!("snap-{memory_mib}")))
            .await
            .unwrap_or_else(|err| {
                panic!(
                    "{memory_mib} MiB snapshot: {}",
                    hearth_vm::error_chain(&err)
                )
            });
        driver.remove(&source).await.expect("remove source");

        let clone = driver
            .launch(&snapshot, &format!("clone-{memory_mib}"))
            .await
            .unwrap_or_else(|err| {
                panic!("{memory_mib} MiB launch: {}", hearth_vm::error_chain(&err))
            });
        let agent = agent_of(&driver, &clone).await;
        assert_eq!(
            sh(&agent, "cat /root/mark").await,
            format!("size-{memory_mib}")
        );
        assert_eq!(
            mem_total_kib(&agent).await,
            total,
            "the clone sees the same memory"
        );
        assert_eq!(
            sh(&agent, "grep -c ^processor /proc/cpuinfo").await,
            shape.vcpus.to_string(),
            "the clone sees the same CPUs"
        );
        drop(agent);
        let pid = clone.pid.expect("clone pid");
        driver.remove(&clone).await.expect("remove clone");
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists()
                || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .is_ok_and(|s| s.contains(") Z")),
            "the clone's QEMU is gone"
        );
    }
}

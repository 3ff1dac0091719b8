//! Usage metering on real guests, through the server's handlers: the 512 MiB
//! size's guest sees its peak (2 GiB, 1 vCPU); asleep it accrues its baseline
//! only; CPU-bound it is held to its one vCPU and the burst is recorded; the
//! metered vCPU-seconds agree within 5 % with the QEMU process's own counters
//! and the wall time measured here; a suspend and a resume add snapshot write
//! and read bytes equal to the saved state's size; a meter that starts over
//! (as after a `kill -9` of the server: only the database survives) counts
//! nothing twice; another account's report is empty.
//!
//! The meter is driven by hand (`sample_round`) so each interval is the
//! test's own; the server's sampler runs at a one-hour interval meanwhile.
//! A real `kill -9` of `hearth serve` mid-run, checked against the VM
//! cgroup's counters, is `tests/python/test_usage.py`.
//! Needs the host set-up (scripts/setup-host).

use std::collections::HashMap;
use std::time::Duration;

use hearth_server::api::ops::Caller;
use hearth_server::api::usage::{report, GroupBy};
use hearth_server::pricing::{UsageType, MICRO};
use hearth_server::vms::meter::{stored_bytes, Meter};
use hearth_server::ServerConfig;
use serde_json::json;

mod common;
use common::{call, sh, wait_state};

const BASELINE_VCPUS: f64 = 0.25;

/// CPU seconds of a process (utime + stime), read independently of hearth.
fn process_cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let rest = &stat[stat.rfind(')').expect("comm") + 1..];
    let fields: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .map(|f| f.parse().expect("tick"))
        .collect();
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (fields[0] + fields[1]) as f64 / hz
}

fn totals(state: &hearth_server::AppState, account: &str, id: &str) -> HashMap<UsageType, i64> {
    let mut out = HashMap::new();
    for sum in state
        .store
        .usage_sums(Some(account), 0, i64::MAX / 2)
        .expect("sums")
    {
        if sum.microvm_id == id {
            *out.entry(sum.usage_type).or_default() += sum.amount;
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_of_a_real_guest_is_metered_exactly() {
    let work = tempfile::tempdir().expect("tempdir");
    let data = work.path().join("data");
    let rootfs = work.path().join("rootfs");
    common::make_rootfs(&rootfs, "import time\nwhile True:\n    time.sleep(3600)\n");
    let mut config =
        ServerConfig::new(data.clone(), ([127, 0, 0, 1], 0).into(), "us-east-1".into());
    config.usage_interval = Duration::from_secs(3600);
    let state = hearth_server::start(config).await.expect("start");
    let owner = state.store.create_account("owner").expect("account");
    let other = state.store.create_account("other").expect("account");
    let caller = Caller {
        account_id: owner.account_id.clone(),
        region: "us-east-1".into(),
    };
    hearth_server::images::import::import_image(
        &data,
        &state.store,
        state.engine.driver(),
        &state.config.quotas,
        &hearth_server::images::import::ImportRequest {
            account_id: owner.account_id.clone(),
            image_name: "idle".into(),
            region: "us-east-1".into(),
            rootfs: rootfs.clone(),
            command: vec!["python3".into(), "/app/server.py".into()],
            workdir: "/".into(),
            hooks_port: None,
            ready_timeout: Duration::from_secs(60),
            microvm_hooks: Vec::new(),
            hook_timeout_secs: 1,
            memory_mib: 512,
            environment: Vec::new(),
            description: None,
        },
        &|step: &str| eprintln!("import: {step}"),
    )
    .await
    .expect("import");

    let run = call(
        &state,
        &caller,
        "RunMicrovm",
        json!({"imageIdentifier": "idle"}),
    )
    .await;
    let id = run["microvmId"].as_str().expect("id").to_string();
    wait_state(&state, &caller, &id, "RUNNING").await;
    // The size's peak: 2 GiB and one vCPU.
    assert_eq!(sh(&state, &caller, &id, "nproc").await, "1");
    let mem_kib: u64 = sh(
        &state,
        &caller,
        &id,
        "awk '/MemTotal/ {print $2}' /proc/meminfo",
    )
    .await
    .parse()
    .expect("MemTotal");
    assert!(
        (2048 * 1024 * 90 / 100..=2048 * 1024).contains(&mem_kib),
        "MemTotal {mem_kib} KiB"
    );
    let row = state
        .store
        .microvm(&owner.account_id, &id)
        .expect("store")
        .expect("row");
    let pid = state
        .engine
        .driver()
        .load(&row.vm_name)
        .expect("record")
        .pid
        .expect("pid");
    let meter = state.meter.clone();

    // Interval 1, asleep: the baseline only (a quarter vCPU, 512 MiB).
    meter.sample_round().expect("sample");
    let start = state.store.vm_mark(&id).expect("mark").expect("metered");
    let cpu_start = process_cpu_seconds(pid);
    let before = totals(&state, &owner.account_id, &id);
    tokio::time::sleep(Duration::from_secs(8)).await;
    meter.sample_round().expect("sample");
    let slept = state.store.vm_mark(&id).expect("mark").expect("metered");
    let cpu_slept = process_cpu_seconds(pid);
    let after = totals(&state, &owner.account_id, &id);
    let wall = (slept.metered_to - start.metered_to) as f64 / 1000.0;
    let idle_cpu = cpu_slept - cpu_start;
    eprintln!("asleep: {wall:.2} s wall, QEMU used {idle_cpu:.2} CPU s");
    let vcpu =
        (after[&UsageType::VcpuSeconds] - before[&UsageType::VcpuSeconds]) as f64 / MICRO as f64;
    let memory = (after[&UsageType::MemoryGbSeconds] - before[&UsageType::MemoryGbSeconds]) as f64
        / MICRO as f64;
    if idle_cpu < BASELINE_VCPUS * wall * 0.95 {
        assert!(
            (vcpu - BASELINE_VCPUS * wall).abs() < 0.001,
            "asleep: {vcpu} vCPU-s for {wall} s"
        );
    } else {
        eprintln!("the idle guest used more than its baseline under TCG: burst expected");
    }
    let rss = std::fs::read_to_string(format!("/proc/{pid}/statm")).expect("statm");
    eprintln!("asleep: memory {memory:.3} GB-s, QEMU statm {rss}");
    assert!(
        memory >= 0.5 * wall * 0.999,
        "at least the baseline: {memory}"
    );

    // Interval 2, CPU-bound: held to one vCPU; the burst is recorded and
    // the metered vCPU-seconds match the process's CPU time within 5 %.
    sh(
        &state,
        &caller,
        &id,
        "(timeout 12 sh -c 'while :; do :; done' >/dev/null 2>&1 &) ; echo started",
    )
    .await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    meter.sample_round().expect("sample");
    let burned = state.store.vm_mark(&id).expect("mark").expect("metered");
    let cpu_burned = process_cpu_seconds(pid);
    let after_burn = totals(&state, &owner.account_id, &id);
    let wall = (burned.metered_to - slept.metered_to) as f64 / 1000.0;
    let used = cpu_burned - cpu_slept;
    let vcpu = (after_burn[&UsageType::VcpuSeconds] - after[&UsageType::VcpuSeconds]) as f64
        / MICRO as f64;
    eprintln!("CPU-bound: {wall:.2} s wall, QEMU used {used:.2} CPU s, metered {vcpu:.3} vCPU-s");
    let expected = used.max(BASELINE_VCPUS * wall);
    assert!(
        (vcpu - expected).abs() <= expected * 0.05,
        "metered {vcpu} vCPU-s, measured {expected}"
    );
    // One vCPU: the guest cannot use more than one core's worth (QEMU's
    // other threads add little).
    assert!(
        used <= wall * 1.15,
        "{used} CPU s in {wall} s: more than one vCPU"
    );
    let figures = meter.figures();
    if used > BASELINE_VCPUS * wall * 1.2 {
        // It used more than its baseline: the excess is the burst.
        assert!(figures[&id].burst_seconds > 0.0, "{:?}", figures[&id]);
        assert!(vcpu > BASELINE_VCPUS * wall * 1.1, "a burst is recorded");
    } else {
        // On a host this busy the guest's one vCPU got less than its
        // baseline: only the baseline is billed (checked above).
        eprintln!("CPU-bound guest got {used:.2} CPU s of {wall:.2} s: the host is saturated");
    }

    // The server dies (kill -9 leaves only the database) and a new meter
    // carries on from the marks: the next interval is counted once.
    let restarted = Meter::new(
        std::sync::Arc::new(
            hearth_vm::QemuDriver::new(hearth_server::engine_assets(&data)).expect("driver"),
        ),
        state.store.clone(),
        Duration::from_secs(3600),
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    restarted.sample_round().expect("sample");
    // The old meter (the dead server's) samples on from the same marks.
    meter.sample_round().expect("sample");
    let after_restart = totals(&state, &owner.account_id, &id);
    let resumed_mark = state.store.vm_mark(&id).expect("mark").expect("metered");
    let wall = (resumed_mark.metered_to - burned.metered_to) as f64 / 1000.0;
    let vcpu = (after_restart[&UsageType::VcpuSeconds] - after_burn[&UsageType::VcpuSeconds])
        as f64
        / MICRO as f64;
    assert!(
        vcpu <= (process_cpu_seconds(pid) - cpu_burned).max(BASELINE_VCPUS * wall) * 1.05 + 0.01,
        "after a restart: {vcpu} vCPU-s over {wall} s"
    );

    // Suspend and resume: the state written, then read, once each.
    call(
        &state,
        &caller,
        "SuspendMicrovm",
        json!({"microvmIdentifier": id}),
    )
    .await;
    wait_state(&state, &caller, &id, "SUSPENDED").await;
    // A clone's suspend is lean: CPU and devices in the state file, the RAM
    // in a file beside it. Both are written, and read back by the resume.
    let record = state.engine.driver().load(&row.vm_name).expect("record");
    let memory = record.suspended_memory.as_deref().expect("a lean suspend");
    let saved = stored_bytes(&record.suspend_state()) + stored_bytes(memory);
    assert!(saved > stored_bytes(&record.suspend_state()));
    let suspended = totals(&state, &owner.account_id, &id);
    assert_eq!(suspended[&UsageType::SnapshotWrite], saved as i64);
    meter.sample_round().expect("sample");
    call(
        &state,
        &caller,
        "ResumeMicrovm",
        json!({"microvmIdentifier": id}),
    )
    .await;
    wait_state(&state, &caller, &id, "RUNNING").await;
    let resumed = totals(&state, &owner.account_id, &id);
    let launch_read = after[&UsageType::SnapshotRead];
    assert_eq!(
        resumed[&UsageType::SnapshotRead],
        launch_read + saved as i64
    );
    assert_eq!(resumed[&UsageType::SnapshotWrite], saved as i64);

    // The reports: the owner's shows its microVM; the other account's nothing.
    let mine = report(
        &state.store,
        &state.config.prices,
        "us-east-1",
        Some(&owner.account_id),
        0,
        i64::MAX / 2,
        GroupBy::Microvm,
    )
    .expect("report");
    assert!(mine
        .items
        .iter()
        .any(|i| i.microvm_id.as_deref() == Some(id.as_str())));
    assert!(mine.total_cost_usd > 0.0);
    let theirs = report(
        &state.store,
        &state.config.prices,
        "us-east-1",
        Some(&other.account_id),
        0,
        i64::MAX / 2,
        GroupBy::Microvm,
    )
    .expect("report");
    assert!(theirs.items.is_empty(), "{theirs:?}");

    call(
        &state,
        &caller,
        "TerminateMicrovm",
        json!({"microvmIdentifier": id}),
    )
    .await;
    wait_state(&state, &caller, &id, "TERMINATED").await;
}

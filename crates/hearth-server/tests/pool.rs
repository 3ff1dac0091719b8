//! The server's warm pool on real guests, through the API handlers:
//! - a slot serves only its own account and image version;
//! - launches from the pool get the clock and RNG reseed (two VMs read
//!   different /dev/urandom bytes and the host's time);
//! - a slot whose QEMU was killed is discarded, never launched;
//! - deleting an image whose pool is full leaves no process behind;
//! - after a crash of the server (its runtime dropped, QEMUs left running) a
//!   VM launched from the pool is adopted, the old slots end and the pool
//!   refills from the recorded demand.
//!
//! Needs the host set-up (scripts/setup-host).

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hearth_server::api::ops::Caller;
use hearth_server::vms::pool::PoolKey;
use hearth_server::{AppState, ServerConfig};
use serde_json::json;

mod common;
use common::{call, sh, wait_state};

const APP: &str = r#"
import http.server
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header('Content-Length', '2')
        self.end_headers()
        self.wfile.write(b'ok')
    do_POST = do_GET
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(('0.0.0.0', 8080), H).serve_forever()
"#;

/// How long a slot sits paused before the reseed test launches it.
const SLOT_PAUSE: Duration = Duration::from_secs(16);

fn config(data: &Path) -> ServerConfig {
    let mut config = ServerConfig::new(
        data.to_path_buf(),
        ([127, 0, 0, 1], 0).into(),
        "us-east-1".into(),
    );
    config.warm_pool.max_total = 4;
    config.warm_pool.per_version = 1;
    config
}

fn caller(account: &str) -> Caller {
    Caller {
        account_id: account.to_string(),
        region: "us-east-1".into(),
    }
}

async fn import(state: &AppState, data: &Path, rootfs: &Path, account: &str, image: &str) -> u32 {
    let request = hearth_server::images::import::ImportRequest {
        account_id: account.to_string(),
        image_name: image.into(),
        region: "us-east-1".into(),
        rootfs: rootfs.to_path_buf(),
        command: vec!["python3".into(), "/app/server.py".into()],
        workdir: "/".into(),
        hooks_port: Some(8080),
        ready_timeout: Duration::from_secs(120),
        microvm_hooks: Vec::new(),
        hook_timeout_secs: 5,
        memory_mib: 256,
        environment: Vec::new(),
        description: None,
    };
    hearth_server::images::import::import_image(
        data,
        &state.store,
        state.engine.driver(),
        &state.config.quotas,
        &request,
        &|step: &str| eprintln!("import {account}/{image}: {step}"),
    )
    .await
    .expect("import")
    .version
}

fn pool_key(state: &AppState, account: &str, image: &str, version: u32) -> PoolKey {
    let row = state
        .store
        .version(account, image, version)
        .expect("store")
        .expect("version");
    PoolKey {
        account_id: account.to_string(),
        image_name: image.to_string(),
        version,
        snapshot_dir: row.snapshot_dir.expect("snapshot"),
    }
}

async fn wait_pool(state: &AppState, key: &PoolKey) {
    let deadline = Instant::now() + Duration::from_secs(180);
    while state.engine.pools.ready_for(key) == 0 {
        assert!(
            Instant::now() < deadline,
            "the pool of {key:?} did not fill"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn run(state: &AppState, caller: &Caller, image: &str, version: u32) -> String {
    let out = call(
        state,
        caller,
        "RunMicrovm",
        json!({"imageIdentifier": image, "imageVersion": format!("{version}.0")}),
    )
    .await;
    let id = out["microvmId"].as_str().expect("id").to_string();
    wait_state(state, caller, &id, "RUNNING").await;
    id
}

async fn terminate(state: &AppState, caller: &Caller, id: &str) {
    call(
        state,
        caller,
        "TerminateMicrovm",
        json!({"microvmIdentifier": id}),
    )
    .await;
    wait_state(state, caller, id, "TERMINATED").await;
}

/// The directory a microVM's VM runs from (a pool launch: the slot's).
fn vm_dir(vms: &Path, state: &AppState, caller: &Caller, id: &str) -> String {
    let row = state
        .store
        .microvm(&caller.account_id, id)
        .expect("store")
        .expect("row");
    let path = vms.join(&row.vm_name);
    match std::fs::read_link(&path) {
        Ok(target) => target.to_string_lossy().into_owned(),
        Err(_) => row.vm_name,
    }
}

/// `key`'s one ready slot: (QEMU pid, directory name).
fn slot_of(state: &AppState, key: &PoolKey) -> (u32, String) {
    let vms = state.engine.pools.slot_vms(key);
    assert_eq!(vms.len(), 1, "one slot in {key:?}: {vms:?}");
    let dir = vms[0]
        .dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .expect("slot directory");
    (vms[0].pid.expect("slot pid"), dir)
}

/// QEMUs in `.pool-*` directories that no microVM's name links to.
fn slot_processes(vms: &Path, state: &AppState) -> Vec<(u32, String)> {
    let linked: Vec<String> = std::fs::read_dir(vms)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|t| t.to_string_lossy().into_owned())
        .collect();
    state
        .engine
        .driver()
        .processes()
        .into_iter()
        .filter(|p| hearth_vm::is_pool_slot_name(&p.vm) && !linked.contains(&p.vm))
        .map(|p| (p.pid, p.vm))
        .collect()
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !stat
            .rsplit_once(") ")
            .is_some_and(|(_, r)| r.starts_with('Z'))
    })
}

async fn wait_gone(pid: u32, dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while alive(pid) || dir.exists() {
        assert!(
            Instant::now() < deadline,
            "slot {pid} ({}) was left behind",
            dir.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn host_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Everything left running at the end: microVMs to keep across the restart.
struct Survivor {
    caller: Caller,
    id: String,
    pid: u32,
    slot: (u32, String),
    key: PoolKey,
    /// Every slot process at the crash.
    others: Vec<(u32, String)>,
}

/// Kills every process whose command line names the test's data directory
/// when dropped: a failed assertion must not leave QEMUs behind.
struct KillOnDrop(String);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return;
        };
        for entry in entries.flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            if pid != std::process::id() && String::from_utf8_lossy(&cmdline).contains(&self.0) {
                let _ = std::process::Command::new("kill")
                    .args(["-9", &pid.to_string()])
                    .status();
            }
        }
    }
}

#[test]
fn warm_pool_isolation_reseed_dead_slots_delete_and_restart() {
    let work = tempfile::tempdir().expect("tempdir");
    let data = work.path().join("data");
    let _cleanup = KillOnDrop(data.join("engine").display().to_string());
    let rootfs = work.path().join("rootfs");
    common::make_rootfs(&rootfs, APP);
    let vms = hearth_server::engine_assets(&data).vms_dir();

    // The first server lives in its own runtime: dropping that runtime is
    // the crash (tasks gone, QEMU processes left running).
    let first = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let survivor = first.block_on(async {
        let state = hearth_server::start(config(&data)).await.expect("start");
        let a = caller(&state.store.create_account("a").expect("account").account_id);
        let b = caller(&state.store.create_account("b").expect("account").account_id);
        assert_eq!(
            import(&state, &data, &rootfs, &a.account_id, "web").await,
            1
        );
        assert_eq!(
            import(&state, &data, &rootfs, &b.account_id, "web").await,
            1
        );
        assert_eq!(
            import(&state, &data, &rootfs, &a.account_id, "web").await,
            2
        );
        let a1 = pool_key(&state, &a.account_id, "web", 1);
        let b1 = pool_key(&state, &b.account_id, "web", 1);

        // A first run of A's version 1 is cold; its pool fills after it.
        let first_run = run(&state, &a, "web", 1).await;
        terminate(&state, &a, &first_run).await;
        wait_pool(&state, &a1).await;
        let a_slot = slot_of(&state, &a1);

        // Account B, same image name: never A's slot.
        let (warm0, cold0) = state.engine.pools.launch_counts();
        let b_vm = run(&state, &b, "web", 1).await;
        assert_ne!(vm_dir(&vms, &state, &b, &b_vm), a_slot.1);
        assert_eq!(state.engine.pools.launch_counts(), (warm0, cold0 + 1));
        assert_eq!(slot_of(&state, &a1), a_slot);
        assert!(alive(a_slot.0));
        assert_eq!(sh(&state, &b, &b_vm, "echo up").await, "up");

        // Version 2 of A's image: never version 1's slot.
        let a_v2 = run(&state, &a, "web", 2).await;
        assert_ne!(vm_dir(&vms, &state, &a, &a_v2), a_slot.1);
        assert_eq!(state.engine.pools.launch_counts(), (warm0, cold0 + 2));
        assert_eq!(slot_of(&state, &a1), a_slot);
        assert!(alive(a_slot.0));
        terminate(&state, &a, &a_v2).await;

        // Two launches from the pool: each reseeded (different random bytes)
        // and given the host's time, though its slot sat paused meanwhile.
        let mut seen = Vec::new();
        let mut kept = Vec::new();
        for _ in 0..2 {
            wait_pool(&state, &a1).await;
            let slot = slot_of(&state, &a1);
            // Paused, a guest's clock stands still: let it fall well behind.
            tokio::time::sleep(SLOT_PAUSE).await;
            let (warm, _) = state.engine.pools.launch_counts();
            let id = run(&state, &a, "web", 1).await;
            assert_eq!(
                state.engine.pools.launch_counts().0,
                warm + 1,
                "a warm launch"
            );
            assert_eq!(
                vm_dir(&vms, &state, &a, &id),
                slot.1,
                "launched from the slot"
            );
            let random = sh(
                &state,
                &a,
                &id,
                "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'",
            )
            .await;
            assert_eq!(random.len(), 64, "{random}");
            // Host time before and after: under load an exec can take seconds,
            // and the guest's clock (clocksource refined-jiffies: it advances
            // by timer ticks, which a starved vCPU loses) runs slow meanwhile.
            // Without the reseed it would lag by the whole pause; with it, by
            // at most what a loaded host costs it in the seconds since.
            let before = host_now();
            let guest_now: i64 = sh(&state, &a, &id, "date +%s").await.parse().expect("date");
            let after = host_now();
            let pause = SLOT_PAUSE.as_secs() as i64;
            assert!(
                before - pause / 2 <= guest_now && guest_now <= after + 1,
                "guest clock {guest_now}, host {before}..{after}"
            );
            seen.push(random);
            kept.push(id);
        }
        assert_ne!(
            seen[0], seen[1],
            "two pool launches read the same random bytes"
        );

        // A slot whose QEMU died is discarded, never launched.
        wait_pool(&state, &a1).await;
        let dead = slot_of(&state, &a1);
        let status = std::process::Command::new("kill")
            .args(["-9", &dead.0.to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
        let after_kill = run(&state, &a, "web", 1).await;
        assert_ne!(vm_dir(&vms, &state, &a, &after_kill), dead.1);
        assert_eq!(sh(&state, &a, &after_kill, "echo up").await, "up");
        wait_gone(dead.0, &vms.join(&dead.1)).await;
        terminate(&state, &a, &after_kill).await;

        // B's image deleted while its pool is full: no process left behind.
        terminate(&state, &b, &b_vm).await;
        wait_pool(&state, &b1).await;
        let b_slot = slot_of(&state, &b1);
        call(
            &state,
            &b,
            "DeleteMicrovmImage",
            json!({"imageIdentifier": "web"}),
        )
        .await;
        wait_gone(b_slot.0, &vms.join(&b_slot.1)).await;
        assert!(state.engine.pools.slot_vms(&b1).is_empty());

        // Keep one pool-launched VM and a full pool of A's version 1 across
        // the crash.
        terminate(&state, &a, &kept[1]).await;
        wait_pool(&state, &a1).await;
        let slot = slot_of(&state, &a1);
        // Only A's slot is left (B's pool is gone, A's version 2 drained after
        // its demand ends only later, so it may hold one too).
        assert!(slot_processes(&vms, &state).contains(&slot));
        let row = state
            .store
            .microvm(&a.account_id, &kept[0])
            .expect("store")
            .expect("row");
        let pid = state
            .engine
            .driver()
            .load(&row.vm_name)
            .expect("vm")
            .pid
            .expect("pid");
        Survivor {
            caller: a,
            id: kept[0].clone(),
            pid,
            slot,
            key: a1,
            others: slot_processes(&vms, &state),
        }
    });
    first.shutdown_timeout(Duration::from_secs(5));

    let second = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    second.block_on(async {
        let state = hearth_server::start(config(&data)).await.expect("restart");
        let a = &survivor.caller;
        // The VM launched from a slot is adopted, same process.
        let vm = wait_state(&state, a, &survivor.id, "RUNNING").await;
        assert_eq!(vm["state"], "RUNNING");
        assert_eq!(sh(&state, a, &survivor.id, "echo still").await, "still");
        let row = state
            .store
            .microvm(&a.account_id, &survivor.id)
            .expect("store")
            .expect("row");
        let vm = state.engine.driver().load(&row.vm_name).expect("vm");
        assert_eq!(vm.pid, Some(survivor.pid));
        assert!(alive(survivor.pid));
        // The old slots ended; the pool comes back with a new one.
        for (pid, dir) in &survivor.others {
            wait_gone(*pid, &vms.join(dir)).await;
        }
        wait_pool(&state, &survivor.key).await;
        let fresh = slot_of(&state, &survivor.key);
        assert_ne!(fresh, survivor.slot);
        let (warm, _) = state.engine.pools.launch_counts();
        let id = run(&state, a, "web", 1).await;
        assert_eq!(state.engine.pools.launch_counts().0, warm + 1);
        assert_eq!(vm_dir(&vms, &state, a, &id), fresh.1);
        terminate(&state, a, &id).await;

        // Suspend formats on the survivor. Its RAM is a private mapping of the
        // snapshot (a clone), so the first suspend streams it out and turns
        // the stream into the lean format (`hearth-vm`'s engine test covers
        // the stream format that a failed conversion, or a suspend before
        // the lean format, leaves).
        sh(&state, a, &survivor.id, "echo kept > /root/mark && sync").await;
        let suspend = |n: u32| {
            let state = state.clone();
            let a = a.clone();
            let id = survivor.id.clone();
            async move {
                call(
                    &state,
                    &a,
                    "SuspendMicrovm",
                    json!({"microvmIdentifier": id}),
                )
                .await;
                wait_state(&state, &a, &id, "SUSPENDED").await;
                let row = state
                    .store
                    .microvm(&a.account_id, &id)
                    .expect("store")
                    .expect("row");
                let vm = state.engine.driver().load(&row.vm_name).expect("vm");
                let record = std::fs::read_to_string(vm.dir.join("vm.json")).expect("vm.json");
                let state_len = std::fs::metadata(vm.suspend_state()).expect("state").len();
                eprintln!("suspend {n}: state file {state_len} bytes, record {record}");
                (vm, record, state_len)
            }
        };
        let resume = |mark: &'static str| {
            let state = state.clone();
            let a = a.clone();
            let id = survivor.id.clone();
            async move {
                call(
                    &state,
                    &a,
                    "ResumeMicrovm",
                    json!({"microvmIdentifier": id}),
                )
                .await;
                wait_state(&state, &a, &id, "RUNNING").await;
                assert_eq!(sh(&state, &a, &id, "cat /root/mark").await, mark);
            }
        };
        // The state file holds CPU and devices only; the RAM is a file that
        // the resume maps.
        let (first, record, first_len) = suspend(1).await;
        let memory = first.suspended_memory.clone().expect("lean format");
        assert_eq!(memory, first.memory_file());
        assert!(record.contains("suspended_memory"), "{record}");
        assert!(first_len < 4 << 20, "state without RAM: {first_len} bytes");
        assert!(memory.is_file());
        resume("kept").await;
        // Resumed, the VM maps its memory file: the next suspend only syncs it.
        sh(&state, a, &survivor.id, "echo again > /root/mark && sync").await;
        let (lean, _, lean_len) = suspend(2).await;
        assert_eq!(lean.suspended_memory, Some(memory));
        assert!(lean_len < 4 << 20, "state without RAM: {lean_len} bytes");
        resume("again").await;

        terminate(&state, a, &survivor.id).await;
        state.engine.shutdown_pools().await;
        let left = state.engine.driver().processes();
        assert!(left.is_empty(), "QEMU processes left: {left:?}");
    });
}

//! The engine against the fake VMM (`hearth_vm::testing::FakeDriver`) and a
//! temporary SQLite store: state changes and the order they are persisted in
//! (the row before the VM action, and after it), hooks over the real agent
//! running on the host, reconciliation after a restart, and the lifetime and
//! idle timers on tokio's paused clock. No VM boots.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hearth_vm::testing::{FakeDriver, Op};
use hearth_vm::{Driver, VmState};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::Quotas;
use crate::db::records::{MicrovmRow, NewVersion, SnapshotSizes};
use crate::db::resources::MicrovmState::{self, *};
use crate::db::spec::{HookState, Hooks, IdlePolicy, ImageSpec, MicrovmHooks, MicrovmSpec};
use crate::db::store::{test_clock, unix_now_ms, Store};
use crate::vms::engine::{ConnectError, Engine};

/// Each VM action and the row's state when it started.
type ActionLog = Arc<Mutex<Vec<(Op, Option<MicrovmState>)>>>;

struct Fixture {
    dir: tempfile::TempDir,
    store: Store,
    fake: FakeDriver,
    engine: Arc<Engine>,
    account: String,
}

impl Fixture {
    /// With the real agent on the host for running VMs.
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let fake = FakeDriver::new(&dir.path().join("vmm")).unwrap();
        Self::with(dir, fake)
    }

    /// Without agents, on tokio's (paused) clock.
    fn paused() -> Self {
        test_clock::follow_tokio();
        let dir = tempfile::tempdir().unwrap();
        let fake = FakeDriver::without_agent(&dir.path().join("vmm"));
        Self::with(dir, fake)
    }

    fn with(dir: tempfile::TempDir, fake: FakeDriver) -> Self {
        let store = Store::open(dir.path()).unwrap();
        let account = store.create_account("a").unwrap().account_id;
        let engine = Engine::new(Arc::new(fake.clone()), store.clone());
        Self {
            dir,
            store,
            fake,
            engine,
            account,
        }
    }

    /// Records a microVM row `microvm-N` (VM `mv-N`) in `state`.
    fn row(&self, n: u32, state: MicrovmState, spec: MicrovmSpec) -> MicrovmRow {
        let now = unix_now_ms();
        let row = MicrovmRow {
            microvm_id: format!("microvm-{n}"),
            account_id: self.account.clone(),
            image_name: "web".into(),
            image_version: 1,
            state,
            state_reason: None,
            deadline_at: now + spec.maximum_duration_in_seconds as i64 * 1000,
            spec,
            memory_mib: 256,
            vm_name: format!("mv-{n}"),
            started_at: now,
            terminated_at: None,
            last_activity_at: None,
            suspended_at: None,
        };
        self.store
            .insert_microvm(&row, None, "", &Quotas::default())
            .unwrap()
            .unwrap();
        row
    }

    fn state(&self, n: u32) -> MicrovmState {
        self.read(n).state
    }

    fn read(&self, n: u32) -> MicrovmRow {
        self.store
            .microvm_by_id(&format!("microvm-{n}"))
            .unwrap()
            .unwrap()
    }

    /// The row's state as each VM action started (what was persisted first).
    fn watch_order(&self) -> ActionLog {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (store, log) = (self.store.clone(), seen.clone());
        self.fake.observe(Arc::new(move |call| {
            let id = call.vm.replacen("mv-", "microvm-", 1);
            let state = store.microvm_by_id(&id).unwrap().map(|row| row.state);
            log.lock().unwrap().push((call.op, state));
        }));
        seen
    }

    fn snapshot(&self) -> PathBuf {
        let dir = self.dir.path().join("snapshot");
        self.fake.make_snapshot(&dir).unwrap();
        dir
    }

    async fn move_to(&self, n: u32, from: MicrovmState, to: MicrovmState) -> MicrovmRow {
        let id = format!("microvm-{n}");
        assert!(self
            .store
            .transition_microvm(&id, &[from], to, None)
            .unwrap()
            .is_some());
        self.read(n)
    }
}

fn spec(max_seconds: u64) -> MicrovmSpec {
    MicrovmSpec {
        maximum_duration_in_seconds: max_seconds,
        ..MicrovmSpec::default()
    }
}

fn with_hooks(port: u16, hooks: MicrovmHooks) -> MicrovmSpec {
    MicrovmSpec {
        hooks: Some(Hooks {
            port: Some(port),
            microvm_hooks: Some(hooks),
            microvm_image_hooks: None,
        }),
        run_hook_payload: Some("payload".into()),
        ..spec(3600)
    }
}

fn idle(max_idle: u64, suspended: u64, auto_resume: bool) -> MicrovmSpec {
    MicrovmSpec {
        idle_policy: Some(IdlePolicy {
            max_idle_duration_seconds: max_idle,
            suspended_duration_seconds: suspended,
            auto_resume_enabled: auto_resume,
        }),
        ..spec(3600)
    }
}

/// An app's hooks port on the host's loopback (where the host agent
/// connects): answers every request with `status` and keeps the requests.
async fn hook_server(status: u16) -> (u16, Arc<Mutex<Vec<String>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let mut request = Vec::new();
            let mut buf = [0u8; 4096];
            // One small request: headers and the body in a few reads.
            while let Ok(n) =
                tokio::time::timeout(Duration::from_millis(300), socket.read(&mut buf))
                    .await
                    .unwrap_or(Ok(0))
            {
                if n == 0 {
                    break;
                }
                request.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&request);
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let length = head
                        .lines()
                        .find_map(|l| l.strip_prefix("Content-Length: "))
                        .and_then(|v| v.trim().parse::<usize>().ok())
                        .unwrap_or(0);
                    if body.len() >= length {
                        break;
                    }
                }
            }
            log.lock()
                .unwrap()
                .push(String::from_utf8_lossy(&request).into_owned());
            let answer = format!("HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n");
            let _ = socket.write_all(answer.as_bytes()).await;
        }
    });
    (port, seen)
}

// ---- launch ---------------------------------------------------------------

#[tokio::test]
async fn a_launch_starts_the_vm_of_a_pending_row_then_records_running() {
    let f = Fixture::new();
    let snapshot = f.snapshot();
    let order = f.watch_order();
    let row = f.row(1, Pending, spec(3600));
    f.engine.launch(row.clone(), snapshot).await;
    assert_eq!(f.state(1), Running);
    assert_eq!(*order.lock().unwrap(), vec![(Op::Launch, Some(Pending))]);
    assert_eq!(f.fake.load("mv-1").unwrap().state, VmState::Running);
    // The launch's agent connection is kept: no second connection.
    f.engine
        .agent(&f.read(1))
        .await
        .unwrap()
        .ping()
        .await
        .unwrap();
    assert_eq!(f.fake.ops("mv-1"), vec![Op::Launch]);
}

#[tokio::test]
async fn a_failed_launch_terminates_the_row_with_a_reason() {
    let f = Fixture::new();
    let snapshot = f.snapshot();
    f.fake.fail_next(Op::Launch);
    f.engine
        .launch(f.row(1, Pending, spec(3600)), snapshot)
        .await;
    let row = f.read(1);
    assert_eq!(row.state, Terminated);
    assert!(row.state_reason.unwrap().starts_with("Launch failed"));
    assert!(row.terminated_at.is_some());
    assert!(f.fake.load("mv-1").is_err());
}

#[tokio::test]
async fn the_run_hook_is_called_with_the_payload_before_running() {
    let f = Fixture::new();
    let snapshot = f.snapshot();
    let (port, requests) = hook_server(200).await;
    let hooks = MicrovmHooks {
        run: Some(HookState::Enabled),
        ..MicrovmHooks::default()
    };
    f.engine
        .launch(f.row(1, Pending, with_hooks(port, hooks)), snapshot)
        .await;
    assert_eq!(f.state(1), Running);
    let requests = requests.lock().unwrap();
    assert_eq!(requests.len(), 1);
    assert!(requests[0].starts_with("POST /aws/lambda-microvms/runtime/v1/run "));
    assert!(requests[0].contains(r#""microvmId":"microvm-1""#));
    assert!(requests[0].contains(r#""runHookPayload":"payload""#));
}

#[tokio::test]
async fn a_failing_run_hook_terminates_the_microvm() {
    let f = Fixture::new();
    let snapshot = f.snapshot();
    let (port, _) = hook_server(500).await;
    let hooks = MicrovmHooks {
        run: Some(HookState::Enabled),
        ..MicrovmHooks::default()
    };
    f.engine
        .launch(f.row(1, Pending, with_hooks(port, hooks)), snapshot)
        .await;
    let row = f.read(1);
    assert_eq!(row.state, Terminated);
    assert_eq!(
        row.state_reason.as_deref(),
        Some("Run lifecycle hook returned HTTP status 500.")
    );
    assert_eq!(f.fake.ops("mv-1"), vec![Op::Launch, Op::Remove]);
}

// ---- suspend and resume ---------------------------------------------------

#[tokio::test]
async fn a_suspend_records_suspending_before_the_vm_and_suspended_after() {
    let f = Fixture::paused();
    f.fake.insert_running("mv-1");
    f.row(1, Running, spec(3600));
    let order = f.watch_order();
    let row = f.move_to(1, Running, Suspending).await;
    f.engine.suspend(row).await;
    assert_eq!(
        *order.lock().unwrap(),
        vec![(Op::Suspend, Some(Suspending))]
    );
    let row = f.read(1);
    assert_eq!(row.state, Suspended);
    assert!(row.suspended_at.is_some());
    assert_eq!(f.fake.load("mv-1").unwrap().state, VmState::Suspended);
}

#[tokio::test]
async fn a_failed_suspend_of_a_live_vm_keeps_it_running() {
    let f = Fixture::paused();
    f.fake.insert_running("mv-1");
    f.row(1, Running, spec(3600));
    f.fake.fail_next(Op::Suspend);
    let row = f.move_to(1, Running, Suspending).await;
    f.engine.suspend(row).await;
    let row = f.read(1);
    assert_eq!(row.state, Running);
    assert_eq!(
        row.state_reason.as_deref(),
        Some("Suspend failed; the MicroVM kept running.")
    );
    assert!(f.fake.is_alive(&f.fake.load("mv-1").unwrap()));
}

#[tokio::test]
async fn a_failed_suspend_of_a_dead_vm_terminates_it() {
    let f = Fixture::paused();
    f.fake.insert_running("mv-1");
    f.row(1, Running, spec(3600));
    f.fake.kill("mv-1");
    let row = f.move_to(1, Running, Suspending).await;
    f.engine.suspend(row).await;
    let row = f.read(1);
    assert_eq!(row.state, Terminated);
    assert_eq!(
        row.state_reason.as_deref(),
        Some("Suspend failed: the MicroVM could not be saved.")
    );
    assert!(f.fake.load("mv-1").is_err(), "the VM's files are removed");
}

#[tokio::test]
async fn a_failing_suspend_hook_ends_the_microvm() {
    let f = Fixture::new();
    let snapshot = f.snapshot();
    let (port, _) = hook_server(503).await;
    let hooks = MicrovmHooks {
        suspend: Some(HookState::Enabled),
        ..MicrovmHooks::default()
    };
    f.engine
        .launch(f.row(1, Pending, with_hooks(port, hooks)), snapshot)
        .await;
    let row = f.move_to(1, Running, Suspending).await;
    f.engine.suspend(row).await;
    let row = f.read(1);
    assert_eq!(row.state, Terminated);
    assert_eq!(
        row.state_reason.as_deref(),
        Some("Suspend lifecycle hook returned HTTP status 503.")
    );
    assert!(!f.fake.ops("mv-1").contains(&Op::Suspend));
}

#[tokio::test]
async fn a_resume_records_pending_before_the_vm_and_running_after() {
    let f = Fixture::new();
    f.fake.insert_suspended("mv-1");
    f.row(1, Suspended, spec(3600));
    let order = f.watch_order();
    let row = f.move_to(1, Suspended, Pending).await;
    f.engine.resume(row).await;
    assert_eq!(f.state(1), Running);
    assert_eq!(
        *order.lock().unwrap(),
        vec![(Op::Resume, Some(Pending)), (Op::Agent, Some(Pending))]
    );
    f.engine
        .agent(&f.read(1))
        .await
        .unwrap()
        .ping()
        .await
        .unwrap();
}

#[tokio::test]
async fn a_failed_resume_terminates_the_microvm() {
    let f = Fixture::new();
    f.fake.insert_suspended("mv-1");
    f.row(1, Suspended, spec(3600));
    f.fake.fail_next(Op::Resume);
    let row = f.move_to(1, Suspended, Pending).await;
    f.engine.resume(row).await;
    let row = f.read(1);
    assert_eq!(row.state, Terminated);
    assert_eq!(
        row.state_reason.as_deref(),
        Some("Resume failed: the MicroVM could not be restored.")
    );
}

#[tokio::test]
async fn endpoint_traffic_resumes_a_suspended_microvm_with_auto_resume() {
    let f = Fixture::new();
    f.fake.insert_suspended("mv-1");
    f.row(1, Suspended, idle(60, 600, true));
    let agent = f
        .engine
        .running_agent("microvm-1", Duration::from_secs(20))
        .await
        .unwrap();
    agent.ping().await.unwrap();
    assert_eq!(f.state(1), Running);
    assert_eq!(f.fake.ops("mv-1").first(), Some(&Op::Resume));
}

#[tokio::test]
async fn endpoint_traffic_leaves_a_suspended_microvm_without_auto_resume() {
    let f = Fixture::paused();
    f.fake.insert_suspended("mv-1");
    f.row(1, Suspended, idle(60, 600, false));
    let err = f
        .engine
        .running_agent("microvm-1", Duration::from_secs(1))
        .await
        .unwrap_err();
    assert_eq!(err, ConnectError::Suspended);
    assert_eq!(f.state(1), Suspended);
    assert!(f.fake.calls().is_empty());
}

// ---- terminate ------------------------------------------------------------

#[tokio::test]
async fn a_terminate_removes_the_vm_of_a_terminating_row_then_records_terminated() {
    let f = Fixture::paused();
    f.fake.insert_running("mv-1");
    f.row(1, Running, spec(3600));
    let order = f.watch_order();
    let row = f.move_to(1, Running, Terminating).await;
    f.engine.terminate(&row, "Success.").await;
    assert_eq!(
        *order.lock().unwrap(),
        vec![(Op::Remove, Some(Terminating))]
    );
    let row = f.read(1);
    assert_eq!(row.state, Terminated);
    assert_eq!(row.state_reason.as_deref(), Some("Success."));
    assert!(f.fake.load("mv-1").is_err());
}

#[tokio::test]
async fn terminating_a_microvm_whose_vm_was_never_made_finishes() {
    let f = Fixture::paused();
    f.row(1, Pending, spec(3600));
    let row = f.move_to(1, Pending, Terminating).await;
    f.engine.terminate(&row, "Success.").await;
    assert_eq!(f.state(1), Terminated);
    assert!(f.fake.calls().is_empty(), "nothing to remove");
}

#[tokio::test]
async fn the_terminate_hook_is_called_and_its_failure_does_not_stop_the_end() {
    let f = Fixture::new();
    let snapshot = f.snapshot();
    let (port, requests) = hook_server(500).await;
    let hooks = MicrovmHooks {
        terminate: Some(HookState::Enabled),
        ..MicrovmHooks::default()
    };
    f.engine
        .launch(f.row(1, Pending, with_hooks(port, hooks)), snapshot)
        .await;
    let row = f.move_to(1, Running, Terminating).await;
    f.engine.terminate(&row, "Success.").await;
    assert_eq!(f.state(1), Terminated);
    assert_eq!(requests.lock().unwrap().len(), 1);
    assert!(
        requests.lock().unwrap()[0].starts_with("POST /aws/lambda-microvms/runtime/v1/terminate ")
    );
}

// ---- timers (tokio's paused clock) ----------------------------------------

#[tokio::test(start_paused = true)]
async fn a_microvm_past_its_maximum_duration_is_terminated() {
    let f = Fixture::paused();
    f.fake.insert_running("mv-1");
    f.row(1, Running, spec(120));
    tokio::spawn(f.engine.clone().watch());
    tokio::time::sleep(Duration::from_secs(118)).await;
    assert_eq!(f.state(1), Running);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let row = f.read(1);
    assert_eq!(row.state, Terminated);
    assert_eq!(
        row.state_reason.as_deref(),
        Some("The MicroVM reached its maximum duration.")
    );
    assert!(f.fake.load("mv-1").is_err());
}

#[tokio::test(start_paused = true)]
async fn an_idle_microvm_is_suspended_then_ended_after_its_suspended_time() {
    let f = Fixture::paused();
    f.fake.insert_running("mv-1");
    f.row(1, Running, idle(60, 30, false));
    tokio::spawn(f.engine.clone().watch());
    tokio::time::sleep(Duration::from_secs(58)).await;
    assert_eq!(f.state(1), Running);
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(f.state(1), Suspended);
    assert_eq!(f.fake.ops("mv-1"), vec![Op::Suspend]);
    tokio::time::sleep(Duration::from_secs(26)).await;
    assert_eq!(f.state(1), Suspended);
    tokio::time::sleep(Duration::from_secs(6)).await;
    let row = f.read(1);
    assert_eq!(row.state, Terminated);
    assert_eq!(
        row.state_reason.as_deref(),
        Some("The MicroVM stayed suspended longer than its idle policy allows.")
    );
}

#[tokio::test(start_paused = true)]
async fn endpoint_traffic_restarts_the_idle_timer() {
    let f = Fixture::paused();
    f.fake.insert_running("mv-1");
    f.row(1, Running, idle(60, 600, false));
    tokio::spawn(f.engine.clone().watch());
    tokio::time::sleep(Duration::from_secs(50)).await;
    f.engine.note_traffic("microvm-1");
    tokio::time::sleep(Duration::from_secs(50)).await;
    assert_eq!(f.state(1), Running, "50 s since the last traffic");
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert_eq!(f.state(1), Suspended);
}

#[tokio::test(start_paused = true)]
async fn suspended_time_counts_toward_the_maximum_duration() {
    let f = Fixture::paused();
    f.fake.insert_suspended("mv-1");
    f.row(1, Suspended, spec(100));
    tokio::spawn(f.engine.clone().watch());
    tokio::time::sleep(Duration::from_secs(102)).await;
    assert_eq!(f.state(1), Terminated);
}

#[tokio::test(start_paused = true)]
async fn a_vm_process_that_died_is_noticed_and_its_microvm_ended() {
    let f = Fixture::paused();
    f.fake.insert_running("mv-1");
    f.fake.insert_running("mv-2");
    f.row(1, Running, spec(3600));
    f.row(2, Running, spec(3600));
    tokio::spawn(f.engine.clone().watch());
    tokio::time::sleep(Duration::from_secs(3)).await;
    f.fake.kill("mv-1");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let row = f.read(1);
    assert_eq!(row.state, Terminated);
    assert_eq!(
        row.state_reason.as_deref(),
        Some("The MicroVM stopped unexpectedly.")
    );
    assert_eq!(f.state(2), Running, "the other VM is untouched");
}

// ---- reconcile ------------------------------------------------------------

#[tokio::test]
async fn reconcile_adopts_live_vms_and_finishes_interrupted_changes() {
    let f = Fixture::new();
    // 1: RUNNING, its process runs and its agent answers: adopted.
    f.fake.insert_running("mv-1");
    f.row(1, Running, spec(3600));
    // 2: SUSPENDING when the server died, the state saved: SUSPENDED.
    f.fake.insert_suspended("mv-2");
    f.row(2, Suspending, spec(3600));
    // 3: RUNNING but its process is gone: lost.
    f.fake.insert_running("mv-3");
    f.fake.kill("mv-3");
    f.row(3, Running, spec(3600));
    // 4: TERMINATING: finished.
    f.fake.insert_running("mv-4");
    f.row(4, Terminating, spec(3600));
    // 5: PENDING (a launch) with no VM and no image snapshot to launch from:
    // fails as the launch would have.
    f.row(5, Pending, spec(3600));
    // 6: SUSPENDING and its VM still runs: suspended now.
    f.fake.insert_running("mv-6");
    f.row(6, Suspending, spec(3600));
    // 7: PENDING after SUSPENDED (a resume), the state still saved: resumed.
    f.fake.insert_suspended("mv-7");
    f.row(7, Running, spec(3600));
    f.move_to(7, Running, Suspending).await;
    f.move_to(7, Suspending, Suspended).await;
    f.move_to(7, Suspended, Pending).await;
    f.engine.reconcile().await.unwrap();
    // The redone steps run in the background, as the API's do.
    for _ in 0..200 {
        if [5, 6, 7]
            .iter()
            .all(|&n| f.state(n) != Pending && f.state(n) != Suspending)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    assert_eq!(f.state(1), Running);
    assert!(f.fake.load("mv-1").is_ok());
    f.engine
        .agent(&f.read(1))
        .await
        .unwrap()
        .ping()
        .await
        .unwrap();
    assert_eq!(f.state(2), Suspended);
    // Recorded as a suspend: a later PENDING of it is a resume, not a launch.
    assert!(f.read(2).suspended_at.is_some());
    assert!(f.fake.load("mv-2").is_ok());
    let lost = f.read(3);
    assert_eq!(lost.state, Terminated);
    assert_eq!(
        lost.state_reason.as_deref(),
        Some("The MicroVM was lost while the hearth server was down.")
    );
    assert!(f.fake.load("mv-3").is_err());
    assert_eq!(f.read(4).state_reason.as_deref(), Some("Success."));
    assert!(f.fake.load("mv-4").is_err());
    let failed = f.read(5);
    assert_eq!(failed.state, Terminated);
    assert_eq!(
        failed.state_reason.as_deref(),
        Some("Launch failed: the MicroVM could not be started from its image snapshot.")
    );
    assert_eq!(f.state(6), Suspended);
    assert!(f.fake.ops("mv-6").contains(&Op::Suspend));
    assert_eq!(f.state(7), Running);
    assert!(f.fake.ops("mv-7").contains(&Op::Resume));
}

#[tokio::test]
async fn reconcile_launches_an_interrupted_launch_again_from_its_snapshot() {
    let f = Fixture::new();
    let snapshot = f.snapshot();
    // The version the microVM runs, with the snapshot a launch starts from.
    let started = f
        .store
        .start_version(
            &NewVersion {
                account_id: f.account.clone(),
                image_name: "web".into(),
                spec: ImageSpec::default(),
                memory_mib: 256,
                architecture: "X86_64".into(),
                chipset: "INTEL".into(),
                client_token: None,
                fingerprint: String::new(),
                create: true,
                restartable: false,
            },
            &Quotas::default(),
        )
        .unwrap()
        .unwrap();
    let sizes = SnapshotSizes {
        memory_snapshot_size_in_bytes: 1,
        disk_snapshot_size_in_bytes: 1,
        code_install_size_in_bytes: 0,
    };
    f.store
        .finish_build(&f.account, &started.build_id, Ok((snapshot, sizes)))
        .unwrap();
    f.row(1, Pending, spec(3600));
    // What the interrupted launch left: a VM directory whose process is gone.
    f.fake.insert_running("mv-1");
    f.fake.kill("mv-1");
    f.engine.reconcile().await.unwrap();
    for _ in 0..200 {
        if f.state(1) != Pending {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(f.state(1), Running);
    assert!(f.fake.ops("mv-1").contains(&Op::Launch));
}

#[tokio::test]
async fn reconcile_recovers_a_running_vm_whose_agent_does_not_answer_at_first() {
    let f = Fixture::new();
    f.fake.insert_running("mv-1");
    f.row(1, Running, spec(3600));
    // The first probe fails (as a guest paused by an interrupted suspend).
    f.fake.fail_next(Op::Agent);
    f.engine.reconcile().await.unwrap();
    assert_eq!(f.state(1), Running);
    assert_eq!(f.fake.ops("mv-1"), vec![Op::Agent, Op::Recover, Op::Agent]);
}

#[tokio::test]
async fn reconcile_kills_stray_processes_and_removes_unowned_vms() {
    let f = Fixture::paused();
    f.fake.insert_suspended("mv-1");
    f.row(1, Suspended, spec(3600));
    // A second process for an adopted VM, a VM no row names, a directory
    // with no record, and an import VM (not the engine's to judge).
    let stray = f.fake.add_stray("mv-1");
    f.fake.insert_running("mv-9");
    let orphan = f.fake.add_orphan_dir("mv-8");
    f.fake.insert_running("build-x");
    f.engine.reconcile().await.unwrap();

    assert_eq!(f.state(1), Suspended);
    assert!(f.fake.load("mv-1").is_ok());
    assert!(!f.fake.processes().contains(&stray));
    assert!(f.fake.load("mv-9").is_err());
    assert!(!orphan.exists());
    assert!(f.fake.load("build-x").is_ok());
    assert!(f.fake.ops("build-x").is_empty());
}

// ---- usage metering ------------------------------------------------------------

mod metering {
    use super::*;
    use crate::api::usage::{report, GroupBy};
    use crate::pricing::{PriceSheet, UsageType, MICRO};
    use crate::vms::meter::{stored_bytes, Meter};
    use hearth_vm::VmUsage;

    const MIB: u64 = 1 << 20;

    /// Sums of one microVM's buckets by type.
    fn totals(store: &Store, account: &str, microvm: &str) -> HashMap<UsageType, i64> {
        let mut out = HashMap::new();
        for sum in store.usage_sums(Some(account), 0, i64::MAX / 2).unwrap() {
            if sum.microvm_id == microvm {
                *out.entry(sum.usage_type).or_default() += sum.amount;
            }
        }
        out
    }

    use std::collections::HashMap;

    #[tokio::test(start_paused = true)]
    async fn baseline_and_burst_are_metered_exactly_across_a_restart() {
        let f = Fixture::paused();
        f.fake.insert_running("mv-1");
        f.row(1, Pending, spec(3600));
        f.move_to(1, Pending, Running).await;
        let driver: Arc<dyn Driver> = Arc::new(f.fake.clone());
        let meter = Meter::new(driver.clone(), f.store.clone(), Duration::from_secs(10));
        let sample = |meter: &Meter, cpu_s: u64, memory_mib: u64| {
            f.fake.set_usage(
                "mv-1",
                VmUsage {
                    cpu_ns: cpu_s * 1_000_000_000,
                    memory_bytes: memory_mib * MIB,
                },
            );
            meter.sample_round().unwrap();
        };
        // The fake's shape: 256 MiB, 1 vCPU, baseline = peak.
        sample(&meter, 0, 100);
        tokio::time::advance(Duration::from_secs(10)).await;
        // A sleeping guest (0.1 vCPU, under its memory): the baseline only.
        sample(&meter, 1, 100);
        let after_sleep = totals(&f.store, &f.account, "microvm-1");
        assert_eq!(after_sleep[&UsageType::VcpuSeconds], 10 * MICRO);
        assert_eq!(after_sleep[&UsageType::MemoryGbSeconds], 10 * MICRO / 4);
        tokio::time::advance(Duration::from_secs(10)).await;
        // 3 vCPUs for 10 s on a 1-vCPU baseline: 20 vCPU-s of burst; 512 MiB
        // held on a 256 MiB baseline: 0.25 GB x 10 s above it.
        sample(&meter, 31, 512);
        // The server dies (kill -9: nothing but the database survives) and a
        // new one meters on from the marks.
        drop(meter);
        let meter = Meter::new(driver, f.store.clone(), Duration::from_secs(10));
        tokio::time::advance(Duration::from_secs(10)).await;
        sample(&meter, 31, 100);
        let all = totals(&f.store, &f.account, "microvm-1");
        // 30 s of baseline + 20 s of burst; 30 s x 0.25 GB + 2.5 GB-s.
        assert_eq!(all[&UsageType::VcpuSeconds], 50 * MICRO);
        assert_eq!(all[&UsageType::MemoryGbSeconds], 10 * MICRO);
        // Sampling again at the same instant adds nothing (nothing twice).
        meter.sample_round().unwrap();
        assert_eq!(totals(&f.store, &f.account, "microvm-1"), all);
        let figures = meter.figures();
        assert_eq!(figures["microvm-1"].cpu_seconds, 31.0);
        // Stopped: billed up to the moment it stopped running, then closed.
        tokio::time::advance(Duration::from_secs(4)).await;
        f.move_to(1, Running, Terminating).await;
        tokio::time::advance(Duration::from_secs(6)).await;
        meter.sample_round().unwrap();
        let ended = totals(&f.store, &f.account, "microvm-1");
        assert_eq!(ended[&UsageType::VcpuSeconds], 54 * MICRO);
        assert!(f.store.vm_mark("microvm-1").unwrap().is_none());
        tokio::time::advance(Duration::from_secs(10)).await;
        meter.sample_round().unwrap();
        assert_eq!(totals(&f.store, &f.account, "microvm-1"), ended);
    }

    #[tokio::test]
    async fn suspend_and_resume_add_the_state_written_and_read() {
        let f = Fixture::new();
        f.fake.insert_running("mv-1");
        f.row(1, Running, spec(3600));
        let row = f.move_to(1, Running, Suspending).await;
        f.engine.suspend(row).await;
        assert_eq!(f.state(1), Suspended);
        let state_file = f.fake.load("mv-1").unwrap().suspend_state();
        let written = stored_bytes(&state_file);
        assert!(written >= std::fs::metadata(&state_file).unwrap().len());
        let after_suspend = totals(&f.store, &f.account, "microvm-1");
        assert_eq!(after_suspend[&UsageType::SnapshotWrite], written as i64);
        assert!(!after_suspend.contains_key(&UsageType::SnapshotRead));
        let row = f.move_to(1, Suspended, Pending).await;
        f.engine.resume(row).await;
        assert_eq!(f.state(1), Running);
        let after_resume = totals(&f.store, &f.account, "microvm-1");
        assert_eq!(after_resume[&UsageType::SnapshotRead], written as i64);
        assert_eq!(after_resume[&UsageType::SnapshotWrite], written as i64);
    }

    #[tokio::test]
    async fn a_launch_adds_the_snapshot_read() {
        let f = Fixture::new();
        let snapshot = f.snapshot();
        let row = f.row(1, Pending, spec(3600));
        f.engine.launch(row, snapshot.clone()).await;
        assert_eq!(f.state(1), Running);
        let opened = hearth_vm::Snapshot::open(&snapshot, hearth_vm::Verify::Sizes).unwrap();
        let expected =
            stored_bytes(&opened.memory()) + std::fs::metadata(opened.state()).unwrap().len();
        assert_eq!(
            totals(&f.store, &f.account, "microvm-1")[&UsageType::SnapshotRead],
            expected as i64
        );
    }

    #[tokio::test]
    async fn with_metering_off_a_launch_records_no_transfer_and_still_runs() {
        let f = Fixture::new();
        let snapshot = f.snapshot();
        f.engine.set_metering(false);
        f.engine
            .launch(f.row(1, Pending, spec(3600)), snapshot.clone())
            .await;
        assert_eq!(f.state(1), Running);
        assert!(!totals(&f.store, &f.account, "microvm-1").contains_key(&UsageType::SnapshotRead));
        // Back on, the next launch records its read again.
        f.engine.set_metering(true);
        f.engine
            .launch(f.row(2, Pending, spec(3600)), snapshot)
            .await;
        assert!(totals(&f.store, &f.account, "microvm-2")[&UsageType::SnapshotRead] > 0);
    }

    #[tokio::test]
    async fn one_accounts_report_never_shows_another() {
        let f = Fixture::paused();
        let other = f.store.create_account("b").unwrap().account_id;
        f.fake.insert_running("mv-1");
        f.row(1, Running, spec(3600));
        f.move_to(1, Running, Suspending).await;
        f.engine.suspend(f.read(1)).await;
        let sheet = PriceSheet::default();
        let mine = report(
            &f.store,
            &sheet,
            "us-east-1",
            Some(&f.account),
            0,
            i64::MAX / 2,
            GroupBy::Microvm,
        )
        .unwrap();
        assert!(!mine.items.is_empty());
        assert!(mine.total_cost_usd > 0.0);
        assert!(mine.items.iter().all(|i| i.account_id == f.account));
        let theirs = report(
            &f.store,
            &sheet,
            "us-east-1",
            Some(&other),
            0,
            i64::MAX / 2,
            GroupBy::Microvm,
        )
        .unwrap();
        assert!(theirs.items.is_empty(), "{theirs:?}");
        assert_eq!(theirs.total_cost_usd, 0.0);
    }
}

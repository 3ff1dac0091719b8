//! Reconciliation at start: every live microVM is driven to the intent its
//! record holds, whatever a crash (kill -9, power loss) interrupted.
//!
//! The API persists the intent (PENDING, SUSPENDING, TERMINATING, ...) before
//! it answers, and the engine writes the record before the VM changes, so
//! after a restart the record and what is left of the VM tell what was asked
//! and how far it got. [`recovery`] (pure, table-tested) maps that to the step
//! that carries the intent out: a launch is finished or started over from the
//! image snapshot, a resume finished or redone from the saved state, a suspend
//! redone, a terminate finished. Only a VM whose running state existed nowhere
//! but in the dead process is lost (terminated with a reason).

use std::collections::HashMap;
use std::sync::Arc;

use hearth_vm::agent::AgentClient;
use hearth_vm::{error_chain, VmState};
use tracing::{info, warn};

use crate::db::records::MicrovmRow;
use crate::db::resources::MicrovmState;
use crate::layout;
use crate::vms::engine::{lock, Engine, EngineError, ADOPT_TIMEOUT, LAUNCH_FAILED};

/// The reason of a microVM whose VM did not survive the restart.
pub(crate) const LOST: &str = "The MicroVM was lost while the hearth server was down.";

/// What a live record asks for: its state, with PENDING split into a first
/// launch and a resume (a resumed microVM was suspended before).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Intent {
    Launch,
    Resume,
    Run,
    Suspend,
    StaySuspended,
    Terminate,
    /// TERMINATED: reconcile never reads one; never revived.
    Done,
}

impl Intent {
    #[cfg(test)]
    pub(crate) const ALL: [Intent; 7] = [
        Intent::Launch,
        Intent::Resume,
        Intent::Run,
        Intent::Suspend,
        Intent::StaySuspended,
        Intent::Terminate,
        Intent::Done,
    ];

    /// `suspended_at` is set when a microVM first becomes SUSPENDED and never
    /// cleared: a PENDING record with it is a resume, without it a launch.
    pub(crate) fn of(state: MicrovmState, suspended_at: Option<i64>) -> Intent {
        match state {
            MicrovmState::Pending if suspended_at.is_some() => Intent::Resume,
            MicrovmState::Pending => Intent::Launch,
            MicrovmState::Running => Intent::Run,
            MicrovmState::Suspending => Intent::Suspend,
            MicrovmState::Suspended => Intent::StaySuspended,
            MicrovmState::Terminating => Intent::Terminate,
            MicrovmState::Terminated => Intent::Done,
        }
    }
}

/// The step that carries out a record's intent after a restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Recovery {
    /// The VM is as asked: record this state and adopt it.
    Adopt(MicrovmState),
    /// A launch whose VM answers: its `/run` hook, then RUNNING.
    FinishLaunch,
    /// A launch with no usable VM: remove what is left, launch again.
    Relaunch,
    /// A resume whose VM answers: its `/resume` hook, then RUNNING.
    FinishResume,
    /// A resume whose saved state is intact: resume again.
    Resume,
    /// A suspend asked for while the VM still runs: suspend it (again).
    Suspend,
    /// Terminate: an accepted terminate finished (`lost` false), or the VM
    /// is gone with the only copy of its state (`lost` true).
    Terminate { lost: bool },
}

/// The step for a record with `intent` whose VM process runs with an
/// answering agent (`running`) and/or has a whole suspend state saved
/// (`suspended`: written, fsynced and recorded in vm.json).
pub(crate) fn recovery(intent: Intent, running: bool, suspended: bool) -> Recovery {
    use Intent as I;
    use Recovery as R;
    match (intent, running, suspended) {
        (I::Launch, true, _) => R::FinishLaunch,
        // A half-made VM (or a stale file) is no use: start from the snapshot.
        (I::Launch, false, _) => R::Relaunch,
        (I::Resume, true, _) => R::FinishResume,
        (I::Resume, false, true) => R::Resume,
        (I::Run, true, _) => R::Adopt(MicrovmState::Running),
        (I::Suspend | I::StaySuspended, true, _) => R::Suspend,
        (I::Suspend | I::StaySuspended, false, true) => R::Adopt(MicrovmState::Suspended),
        (I::Resume | I::Run | I::Suspend | I::StaySuspended, false, false) => {
            R::Terminate { lost: true }
        }
        // A RUNNING record never suspended: a saved state is stale.
        (I::Run, false, true) => R::Terminate { lost: true },
        (I::Terminate | I::Done, _, _) => R::Terminate { lost: false },
    }
}

/// Work reconcile starts once stray processes and directories are gone.
enum Deferred {
    Relaunch(MicrovmRow),
    Resume(MicrovmRow),
    Suspend(MicrovmRow),
    FinishLaunch(MicrovmRow, AgentClient),
    FinishResume(MicrovmRow, AgentClient),
}

impl Engine {
    /// Brings records and VM processes into agreement after a start: every
    /// live record is driven to its intent (see [`recovery`]); QEMU processes
    /// and VM directories no record accounts for are removed (no orphans).
    pub async fn reconcile(self: &Arc<Self>) -> Result<(), EngineError> {
        let rows = self.store.live_microvms()?;
        // VM name -> the pid of its one legitimate QEMU process (None: its
        // directory stays but no process may run for it).
        let mut keep: HashMap<String, Option<u32>> = HashMap::new();
        let mut deferred = Vec::new();
        for row in rows {
            let intent = Intent::of(row.state, row.suspended_at);
            let vm = self.driver.load(&row.vm_name).ok();
            let alive = vm
                .as_ref()
                .is_some_and(|vm| vm.state == VmState::Running && self.driver.is_alive(vm));
            // A process may be alive but not a usable guest (e.g. killed while its
            // snapshot was loading): it counts as running only if its agent answers.
            let mut agent = None;
            if let (true, Some(vm)) = (alive, &vm) {
                agent = self.probe_agent(vm).await;
                // Perhaps paused by an interrupted suspend or snapshot: let it run
                // on. Not a launch's VM: one that never answered may be half loaded.
                if agent.is_none() && intent != Intent::Launch {
                    match self.driver.recover(vm).await {
                        Ok(()) => agent = self.probe_agent(vm).await,
                        Err(err) => {
                            warn!(microvm = %row.microvm_id, error = %error_chain(&err), "cannot recover VM")
                        }
                    }
                }
            }
            let running = agent.is_some();
            let suspended = vm
                .as_ref()
                .is_some_and(|vm| vm.state == VmState::Suspended && vm.suspend_state().is_file());
            let step = recovery(intent, running, suspended);
            info!(microvm = %row.microvm_id, state = %row.state, running, suspended, ?step, "reconcile");
            let pid = vm.as_ref().and_then(|vm| vm.pid);
            // A VM launched from the warm pool runs from its slot's directory
            // (`vms/NAME` is a symlink to `.pool-ID`): its QEMU names that
            // directory, which must not look ownerless.
            let slot_dir = vm
                .as_ref()
                .and_then(|vm| vm.dir.file_name())
                .and_then(|n| n.to_str())
                .filter(|dir| *dir != row.vm_name)
                .map(str::to_string);
            let vm_name = row.vm_name.clone();
            match step {
                Recovery::Adopt(state) => {
                    if state != row.state {
                        // A direct write: this finishes an interrupted step.
                        self.store.force_microvm_state(&row.microvm_id, state)?;
                    }
                    info!(microvm = %row.microvm_id, from = %row.state, to = %state, "adopted");
                    keep.insert(row.vm_name.clone(), pid.filter(|_| running));
                    if let Some(agent) = agent {
                        lock(&self.agents).insert(row.microvm_id.clone(), Arc::new(agent));
                    }
                }
                Recovery::FinishLaunch | Recovery::FinishResume => {
                    keep.insert(row.vm_name.clone(), pid);
                    if let Some(agent) = agent {
                        deferred.push(if step == Recovery::FinishLaunch {
                            Deferred::FinishLaunch(row, agent)
                        } else {
                            Deferred::FinishResume(row, agent)
                        });
                    }
                }
                Recovery::Relaunch => {
                    // Not kept: its process (if any) and directory go below.
                    deferred.push(Deferred::Relaunch(row));
                }
                Recovery::Resume => {
                    // The directory (with the saved state) stays; a process a
                    // resume had started goes.
                    keep.insert(row.vm_name.clone(), None);
                    deferred.push(Deferred::Resume(row));
                }
                Recovery::Suspend => {
                    if row.state != MicrovmState::Suspending {
                        self.store
                            .force_microvm_state(&row.microvm_id, MicrovmState::Suspending)?;
                    }
                    keep.insert(row.vm_name.clone(), pid);
                    if let Some(agent) = agent {
                        lock(&self.agents).insert(row.microvm_id.clone(), Arc::new(agent));
                    }
                    deferred.push(Deferred::Suspend(row));
                }
                Recovery::Terminate { lost } => {
                    let reason = if lost { LOST } else { "Success." };
                    self.store
                        .force_microvm_state(&row.microvm_id, MicrovmState::Terminating)?;
                    self.terminate(&row, reason).await;
                }
            }
            if let (Some(dir), Some(pid)) = (slot_dir, keep.get(&vm_name).copied()) {
                keep.insert(dir, pid);
            }
        }
        // QEMU processes no adopted VM accounts for: a second process for one VM
        // (e.g. a resume interrupted after its QEMU started), or a VM no record owns.
        for process in self.driver.processes() {
            if layout::is_import_vm(&process.vm) {
                continue;
            }
            if keep.get(&process.vm) != Some(&Some(process.pid)) {
                warn!(vm = %process.vm, pid = process.pid, "killing a QEMU process no microVM owns");
                self.driver.kill_process(&process);
            }
        }
        // VM directories no live record owns: left by a crash between creating
        // the VM and recording it, by a terminate that did not finish, or by a
        // launch that starts over, and warm pool slots (not kept across a
        // restart; their QEMUs ended above).
        for name in self.driver.vm_names() {
            if keep.contains_key(&name) || layout::is_import_vm(&name) {
                continue;
            }
            warn!(vm = %name, "removing a VM no microVM owns");
            match self.driver.load(&name) {
                Ok(vm) => {
                    let _ = self.driver.remove(&vm).await;
                }
                Err(_) => {
                    let _ = self.driver.discard(&name);
                }
            }
        }
        // The cgroups of VMs that ended while no server ran (a crash, a
        // host-side kill): no process holds them any more.
        self.driver.remove_stale_cgroups();
        // Likewise network namespaces made for a VM whose QEMU never started
        // (a crash in between) or whose VM went above.
        self.driver.remove_stale_networks();
        for work in deferred {
            self.start_deferred(work);
        }
        Ok(())
    }

    /// Starts an interrupted change again, in the background like the API's.
    fn start_deferred(self: &Arc<Self>, work: Deferred) {
        match work {
            Deferred::Relaunch(row) => {
                let snapshot_dir = self
                    .store
                    .version(&row.account_id, &row.image_name, row.image_version)
                    .ok()
                    .flatten()
                    .and_then(|version| version.snapshot_dir);
                match snapshot_dir {
                    Some(dir) => {
                        info!(microvm = %row.microvm_id, "launching again after the restart");
                        self.spawn_launch(row, dir);
                    }
                    None => {
                        let engine = self.clone();
                        tokio::spawn(async move {
                            let guard = engine.lock_for(&row.microvm_id);
                            let _held = guard.lock().await;
                            engine.fail(&row, LAUNCH_FAILED).await;
                        });
                    }
                }
            }
            Deferred::Resume(row) => {
                info!(microvm = %row.microvm_id, "resuming again after the restart");
                self.spawn_resume(row);
            }
            Deferred::Suspend(row) => {
                info!(microvm = %row.microvm_id, "suspending again after the restart");
                self.spawn_suspend(row);
            }
            Deferred::FinishLaunch(row, agent) | Deferred::FinishResume(row, agent) => {
                let engine = self.clone();
                let launch = row.suspended_at.is_none();
                tokio::spawn(async move {
                    let guard = engine.lock_for(&row.microvm_id);
                    let _held = guard.lock().await;
                    if launch {
                        // Its snapshot read is not known here: the crash lost it.
                        engine.finish_launch(&row, agent, 0).await;
                    } else {
                        engine.finish_resume(&row, agent, 0).await;
                    }
                });
            }
        }
    }

    /// Connects to a VM's agent and pings it, within a few seconds.
    async fn probe_agent(&self, vm: &hearth_vm::VmRecord) -> Option<AgentClient> {
        let probe = async {
            let agent = tokio::time::timeout(ADOPT_TIMEOUT, self.driver.agent(vm))
                .await
                .ok()?
                .ok()?;
            agent.ping().await.ok()?;
            Some(agent)
        };
        tokio::time::timeout(ADOPT_TIMEOUT * 2, probe)
            .await
            .ok()
            .flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Intent::{Done, Launch, Run, StaySuspended};
    use Recovery::{Adopt, FinishLaunch, FinishResume, Relaunch};

    const LOST_VM: Recovery = Recovery::Terminate { lost: true };
    const FINISH: Recovery = Recovery::Terminate { lost: false };

    /// Every (intent, agent answers, whole suspend state saved) case, each
    /// listed exactly once.
    #[test]
    fn reconcile_decisions() {
        let table = [
            // intent, running, suspended -> step
            (Launch, true, false, FinishLaunch),
            (Launch, true, true, FinishLaunch),
            (Launch, false, true, Relaunch),
            (Launch, false, false, Relaunch),
            (Intent::Resume, true, false, FinishResume),
            (Intent::Resume, true, true, FinishResume),
            (Intent::Resume, false, true, Recovery::Resume),
            // Resumed (state file consumed) and then the process died.
            (Intent::Resume, false, false, LOST_VM),
            (Run, true, false, Adopt(MicrovmState::Running)),
            (Run, true, true, Adopt(MicrovmState::Running)),
            // A RUNNING record never suspended: a saved state is stale.
            (Run, false, true, LOST_VM),
            (Run, false, false, LOST_VM),
            (Intent::Suspend, true, false, Recovery::Suspend),
            (Intent::Suspend, true, true, Recovery::Suspend),
            (Intent::Suspend, false, true, Adopt(MicrovmState::Suspended)),
            (Intent::Suspend, false, false, LOST_VM),
            // SUSPENDED but its VM runs (resumed by nobody): suspended again.
            (StaySuspended, true, false, Recovery::Suspend),
            (StaySuspended, true, true, Recovery::Suspend),
            (StaySuspended, false, true, Adopt(MicrovmState::Suspended)),
            (StaySuspended, false, false, LOST_VM),
            (Intent::Terminate, true, false, FINISH),
            (Intent::Terminate, true, true, FINISH),
            (Intent::Terminate, false, true, FINISH),
            (Intent::Terminate, false, false, FINISH),
            (Done, true, false, FINISH),
            (Done, true, true, FINISH),
            (Done, false, true, FINISH),
            (Done, false, false, FINISH),
        ];
        let mut cases: Vec<(Intent, bool, bool)> =
            table.iter().map(|&(i, r, s, _)| (i, r, s)).collect();
        cases.sort_by_key(|&(i, r, s)| (format!("{i:?}"), r, s));
        cases.dedup();
        assert_eq!(cases.len(), table.len(), "a case is listed twice");
        assert_eq!(
            cases.len(),
            Intent::ALL.len() * 4,
            "every intent with every (running, suspended)"
        );
        for (intent, running, suspended, step) in table {
            assert_eq!(
                recovery(intent, running, suspended),
                step,
                "{intent:?} running={running} suspended={suspended}"
            );
        }
    }

    #[test]
    fn a_pending_record_is_a_resume_only_once_it_was_suspended() {
        use MicrovmState as S;
        assert_eq!(Intent::of(S::Pending, None), Launch);
        assert_eq!(Intent::of(S::Pending, Some(1)), Intent::Resume);
        for state in MicrovmState::ALL {
            if *state != S::Pending {
                assert_eq!(Intent::of(*state, None), Intent::of(*state, Some(1)));
            }
        }
        let intents: std::collections::HashSet<Intent> = MicrovmState::ALL
            .iter()
            .flat_map(|s| [Intent::of(*s, None), Intent::of(*s, Some(1))])
            .collect();
        assert_eq!(
            intents.len(),
            Intent::ALL.len(),
            "every intent is reachable"
        );
    }
}

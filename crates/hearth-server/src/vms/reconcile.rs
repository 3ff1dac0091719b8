//! Reconciliation at start: records and VM processes brought into agreement.
//!
//! The record is written before the VM changes, so after a crash the two
//! tell what was in flight: a VM whose QEMU runs and whose agent answers is
//! adopted as RUNNING, one with a saved suspend state is SUSPENDED, a
//! TERMINATING one is finished, anything else is terminated with a reason.

use std::collections::HashMap;
use std::sync::Arc;

use hearth_vm::agent::AgentClient;
use hearth_vm::{error_chain, VmState};
use tracing::{info, warn};

use crate::db::resources::MicrovmState;
use crate::layout;
use crate::vms::engine::{lock, Engine, EngineError, ADOPT_TIMEOUT};

/// The state a live record should have after a restart, from what is left of
/// its VM (its process runs with an answering agent; its suspend state is
/// saved); None: the microVM is terminated.
pub(crate) fn target_state(
    recorded: MicrovmState,
    running: bool,
    suspended: bool,
) -> Option<MicrovmState> {
    use MicrovmState::*;
    match (recorded, running, suspended) {
        (Terminating, _, _) => None,
        (Pending | Running | Suspending, true, _) => Some(Running),
        (Pending | Suspending | Suspended, false, true) => Some(Suspended),
        _ => None,
    }
}

impl Engine {
    /// Brings records and VM processes into agreement after a start: VMs whose
    /// process still runs are adopted, half-done changes are finished or undone,
    /// and VM directories that no live record names are removed (no orphaned QEMU).
    pub async fn reconcile(self: &Arc<Self>) -> Result<(), EngineError> {
        let rows = self.store.live_microvms()?;
        // VM name -> the pid of its one legitimate QEMU process.
        let mut keep: HashMap<String, Option<u32>> = HashMap::new();
        for row in rows {
            let vm = self.driver.load(&row.vm_name).ok();
            let mut running = vm
                .as_ref()
                .is_some_and(|vm| vm.state == VmState::Running && self.driver.is_alive(vm));
            // A process may be alive but not a usable guest (e.g. killed while its
            // snapshot was loading): adopt it only if its agent answers.
            let mut agent = None;
            if let (true, Some(vm)) = (running, &vm) {
                agent = self.probe_agent(vm).await;
                if agent.is_none() {
                    // Perhaps paused by an interrupted suspend: let it run on.
                    match self.driver.recover(vm).await {
                        Ok(()) => agent = self.probe_agent(vm).await,
                        Err(err) => {
                            warn!(microvm = %row.microvm_id, error = %error_chain(&err), "cannot recover VM")
                        }
                    }
                }
                running = agent.is_some();
            }
            let suspended = vm
                .as_ref()
                .is_some_and(|vm| vm.state == VmState::Suspended && vm.suspend_state().is_file());
            use MicrovmState::*;
            let target = target_state(row.state, running, suspended);
            match target {
                Some(state) => {
                    if state != row.state {
                        // A direct write: this finishes or undoes an interrupted step.
                        self.store.force_microvm_state(&row.microvm_id, state)?;
                    }
                    info!(microvm = %row.microvm_id, from = %row.state, to = %state, "adopted");
                    let pid = vm
                        .as_ref()
                        .and_then(|vm| vm.pid)
                        .filter(|_| state == Running);
                    keep.insert(row.vm_name.clone(), pid);
                    // A VM launched from the warm pool runs from its slot's
                    // directory (`vms/NAME` is a symlink to `.pool-ID`): its
                    // QEMU names that directory, which must not look ownerless.
                    if let Some(dir) = vm
                        .as_ref()
                        .and_then(|vm| vm.dir.file_name())
                        .and_then(|n| n.to_str())
                        .filter(|dir| *dir != row.vm_name)
                    {
                        keep.insert(dir.to_string(), pid);
                    }
                    if let Some(agent) = agent {
                        lock(&self.agents).insert(row.microvm_id.clone(), Arc::new(agent));
                    }
                }
                None => {
                    let reason = if row.state == Terminating {
                        "Success."
                    } else {
                        "The MicroVM was lost while the hearth server was down."
                    };
                    self.store
                        .force_microvm_state(&row.microvm_id, Terminating)?;
                    self.terminate(&row, reason).await;
                }
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
        // the VM and recording it, or by a terminate that did not finish, and
        // warm pool slots (not kept across a restart; their QEMUs ended above).
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
        Ok(())
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
    use MicrovmState::*;

    /// Every (recorded state, process alive, suspend state saved) case, the
    /// table checked to name each combination exactly once.
    #[test]
    fn reconcile_decisions() {
        let table = [
            // recorded, running, suspended -> target
            (Pending, true, false, Some(Running)),
            (Pending, true, true, Some(Running)),
            (Pending, false, true, Some(Suspended)),
            (Pending, false, false, None),
            (Running, true, false, Some(Running)),
            (Running, true, true, Some(Running)),
            // A RUNNING record never suspended: a saved state is stale.
            (Running, false, true, None),
            (Running, false, false, None),
            (Suspending, true, false, Some(Running)),
            (Suspending, true, true, Some(Running)),
            (Suspending, false, true, Some(Suspended)),
            (Suspending, false, false, None),
            // A SUSPENDED record whose process runs was resumed by nobody.
            (Suspended, true, false, None),
            (Suspended, true, true, None),
            (Suspended, false, true, Some(Suspended)),
            (Suspended, false, false, None),
            (Terminating, true, false, None),
            (Terminating, true, true, None),
            (Terminating, false, true, None),
            (Terminating, false, false, None),
            // Not a live record (reconcile never reads one): never revived.
            (Terminated, true, false, None),
            (Terminated, true, true, None),
            (Terminated, false, true, None),
            (Terminated, false, false, None),
        ];
        let mut cases: Vec<(MicrovmState, bool, bool)> = table
            .iter()
            .map(|&(state, r, s, _)| (state, r, s))
            .collect();
        cases.sort_by_key(|&(state, r, s)| (state.as_str(), r, s));
        cases.dedup();
        assert_eq!(cases.len(), table.len(), "a case is listed twice");
        assert_eq!(
            cases.len(),
            MicrovmState::ALL.len() * 4,
            "every state with every (running, suspended)"
        );
        for (recorded, running, suspended, target) in table {
            assert_eq!(
                target_state(recorded, running, suspended),
                target,
                "{recorded} running={running} suspended={suspended}"
            );
        }
    }
}

//! Benchmark-only VMM paths (`hearth bench launch`), behind the `bench`
//! feature so the product's API does not offer them: the naive snapshot
//! format, a full migration stream (RAM included) restored by a fresh QEMU
//! reading all of it, to compare with hearth's shared-memory launches.

use std::path::Path;
use std::time::{Duration, Instant};

use super::{restored_record, Incoming, QemuDriver, MIGRATION_TIMEOUT, RESTORE_TIMEOUT};
use crate::agent::AgentClient;
use crate::disk::{self, BackingFormat};
use crate::driver::{Driver, VmError};
use crate::qmp::{Qmp, QmpError};
use crate::record::{Memory, VmRecord};
use crate::snapshot::Snapshot;

impl QemuDriver {
    /// Writes a running VM's full state (RAM included) and its
    /// disk overlay into `out` (files `stream` and `disk.qcow2`), as the naive
    /// snapshot format would; the VM runs on.
    pub async fn save_full_stream(&self, vm: &VmRecord, out: &Path) -> Result<(), VmError> {
        disk::create_private_dir_all(out)?;
        let mut qmp = Qmp::connect(&vm.qmp_socket()).await?;
        qmp.stop().await?;
        let saved = async {
            qmp.set_ignore_shared(false).await?;
            // Written in the VM's own directory (all a jailed QEMU sees), then moved.
            let staged = vm.dir.join(".stream");
            let _ = std::fs::remove_file(&staged);
            let uri = format!("file:{}", staged.display());
            qmp.migrate_and_wait(&uri, MIGRATION_TIMEOUT).await?;
            super::move_file(&staged, &out.join("stream"))?;
            disk::sparse_copy(&vm.disk, &out.join("disk.qcow2"))?;
            Ok::<(), VmError>(())
        }
        .await;
        qmp.cont().await?;
        saved
    }

    /// The naive restore of a [`Self::save_full_stream`]
    /// directory, a fresh QEMU reading the whole stream through `-incoming file:`.
    pub async fn launch_naive(
        &self,
        snapshot: &Snapshot,
        saved: &Path,
        name: &str,
    ) -> Result<(VmRecord, AgentClient), VmError> {
        let manifest = &snapshot.manifest;
        let dir = self.create_dir(name)?;
        let mut vm = restored_record(
            manifest,
            name,
            &dir,
            Memory::Anonymous,
            saved,
            self.claim_uid(&dir)?,
        );
        let launched = async {
            disk::create_overlay(&vm.disk, &saved.join("disk.qcow2"), BackingFormat::Qcow2).await?;
            // `file:`, not `exec:cat`: the jail's seccomp filter forbids QEMU to spawn.
            let uri = format!("file:{}", saved.join("stream").display());
            let (pid, mut qmp) = self.spawn(&vm, Incoming::Uri(&uri)).await?;
            vm.pid = Some(pid);
            self.save(&vm)?;
            let deadline = Instant::now() + MIGRATION_TIMEOUT;
            while qmp.query_status().await?.status == "inmigrate" {
                if Instant::now() > deadline {
                    return Err(QmpError::Timeout("incoming migration").into());
                }
                tokio::time::sleep(Duration::from_micros(300)).await;
            }
            qmp.cont().await?;
            let agent = AgentClient::connect(&vm.agent_socket(), RESTORE_TIMEOUT).await?;
            agent.restored().await?;
            Ok(agent)
        }
        .await
        .map(|agent| (vm.clone(), agent));
        if launched.is_err() {
            let _ = self.remove(&vm).await;
        }
        launched
    }
}

impl QemuDriver {
    /// The jail step's own cost, without QEMU: `/usr/bin/true` started
    /// `rounds` times in the jail a clone of `snapshot` gets (its files
    /// prepared, its binds, namespaces, `pivot_root`, ids) and as many times
    /// plainly, alternating. Returns (jailed, plain) start-to-exit times in ms.
    pub async fn time_jail_step(
        &self,
        snapshot: &Snapshot,
        name: &str,
        rounds: u32,
    ) -> Result<(Vec<f64>, Vec<f64>), VmError> {
        if !self.jail.enabled() {
            return Ok((Vec::new(), Vec::new()));
        }
        let (vm, qmp) = self.prepare_clone(snapshot, name, false, false).await?;
        drop(qmp);
        let timed = async {
            let stub = self.kernel_stub(&vm.kernel)?;
            let root = self.assets.state_dir.join("jail").join("root");
            disk::create_private_dir_all(&root)?;
            let mut jailed = Vec::new();
            let mut plain = Vec::new();
            for _ in 0..rounds {
                let start = Instant::now();
                let spec = self.jail_spec(&vm, &stub, Incoming::Defer, None)?;
                let (plan, pipe) = super::Plan::new(&self.jail, &spec, &root)?;
                let mut command = std::process::Command::new("/usr/bin/true");
                // SAFETY: `Plan::enter` makes only system calls on prepared data.
                unsafe {
                    std::os::unix::process::CommandExt::pre_exec(&mut command, move || {
                        plan.enter()
                    });
                }
                let mut child = command.spawn().map_err(VmError::Spawn)?;
                drop(command);
                let pid = pipe.read_pid();
                let _ = child.wait();
                let pid = pid?;
                // The jailed process is this one's child once its parent exited
                // (child subreaper): wait for its exit.
                let mut status = 0;
                // SAFETY: waitpid(2) for one pid with a local status word.
                unsafe {
                    libc::waitpid(pid as libc::pid_t, &mut status, 0);
                }
                jailed.push(start.elapsed().as_secs_f64() * 1e3);

                let start = Instant::now();
                std::process::Command::new("/usr/bin/true")
                    .status()
                    .map_err(VmError::Spawn)?;
                plain.push(start.elapsed().as_secs_f64() * 1e3);
            }
            Ok::<_, VmError>((jailed, plain))
        }
        .await;
        let _ = self.remove(&vm).await;
        timed
    }
}

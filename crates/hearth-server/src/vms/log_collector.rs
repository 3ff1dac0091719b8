//! Ships each RUNNING microVM's app output from its agent into the
//! [`LogStore`]: one task per microVM, reading from the last stored
//! sequence number for as long as the agent connection lives. A suspend (or a
//! dead VM) ends the task; the next tick after a resume, a launch or a server
//! restart starts another from the stored end, so a line is neither lost
//! (the guest still holds it) nor stored twice.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hearth_vm::error_chain;
use tracing::{debug, warn};

use crate::db::records::MicrovmRow;
use crate::db::resources::MicrovmState;
use crate::db::spec::Logging;
use crate::db::store::unix_now_ms;
use crate::vms::engine::{lock, Engine};
use crate::vms::log_store::{utc_date, LogMeta, LogStore};

/// How often RUNNING microVMs without a collector are looked for.
const TICK: Duration = Duration::from_secs(1);
/// Ticks between retention sweeps.
const SWEEP_TICKS: u32 = 60;

#[derive(Debug)]
pub struct LogCollector {
    engine: Arc<Engine>,
    logs: LogStore,
    /// MicroVMs with a collecting task.
    active: Mutex<HashSet<String>>,
    /// MicroVMs not collected: their `logging` is disabled, or their agent
    /// does not speak `AppLogs` (an image snapshotted with an older agent).
    not_collected: Mutex<HashSet<String>>,
}

/// The log group and stream a microVM's output is filed under: the request's
/// own `logging`, else the image's default group (a RunMicrovm without
/// `logging` does not inherit the image's group).
pub fn log_meta(row: &MicrovmRow) -> LogMeta {
    let cloud_watch = row
        .spec
        .logging
        .as_ref()
        .and_then(|l| l.cloud_watch.as_ref());
    LogMeta {
        microvm_id: row.microvm_id.clone(),
        account_id: row.account_id.clone(),
        log_group: cloud_watch
            .and_then(|c| c.log_group.clone())
            .unwrap_or_else(|| format!("/aws/lambda-microvms/{}", row.image_name)),
        log_stream: cloud_watch
            .and_then(|c| c.log_stream.clone())
            .unwrap_or_else(|| {
                format!(
                    "{}[{}]{}",
                    utc_date(row.started_at),
                    row.image_version,
                    row.microvm_id
                )
            }),
        disabled: row
            .spec
            .logging
            .as_ref()
            .is_some_and(|l: &Logging| l.disabled.is_some()),
    }
}

impl LogCollector {
    pub fn new(engine: Arc<Engine>, logs: LogStore) -> Arc<Self> {
        Arc::new(Self {
            engine,
            logs,
            active: Mutex::default(),
            not_collected: Mutex::default(),
        })
    }

    /// Runs forever.
    pub async fn run(self: Arc<Self>) {
        let mut ticker = tokio::time::interval(TICK);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ticks = 0u32;
        loop {
            ticker.tick().await;
            self.start_missing();
            if ticks.is_multiple_of(SWEEP_TICKS) {
                self.sweep().await;
            }
            ticks = ticks.wrapping_add(1);
        }
    }

    fn start_missing(self: &Arc<Self>) {
        let rows = match self.engine.store.live_microvms() {
            Ok(rows) => rows,
            Err(err) => {
                warn!(error = %err, "cannot list microVMs for log collection");
                return;
            }
        };
        for row in rows {
            if row.state != MicrovmState::Running
                || lock(&self.not_collected).contains(&row.microvm_id)
                || !lock(&self.active).insert(row.microvm_id.clone())
            {
                continue;
            }
            let collector = self.clone();
            tokio::spawn(async move {
                let id = row.microvm_id.clone();
                collector.collect(row).await;
                lock(&collector.active).remove(&id);
            });
        }
    }

    async fn collect(&self, row: MicrovmRow) {
        let meta = log_meta(&row);
        if let Err(err) = self.logs.write_meta(&meta) {
            warn!(microvm = %row.microvm_id, error = %error_chain(&err), "cannot record the log's names");
        }
        if meta.disabled {
            lock(&self.not_collected).insert(row.microvm_id.clone());
            return;
        }
        let mut writer = match self.logs.writer(&row.microvm_id) {
            Ok(writer) => writer,
            Err(err) => {
                warn!(microvm = %row.microvm_id, error = %error_chain(&err), "cannot open the log");
                return;
            }
        };
        let Ok(agent) = self.engine.agent(&row).await else {
            return;
        };
        let mut stream = match agent.app_logs(writer.next_seq(), true).await {
            Ok(stream) => stream,
            Err(err) => {
                debug!(microvm = %row.microvm_id, error = %error_chain(&err), "no app log stream");
                return;
            }
        };
        drop(agent);
        loop {
            match stream.next_app_logs().await {
                Ok(Some(batch)) => {
                    if let Err(err) = writer.append(&batch) {
                        warn!(microvm = %row.microvm_id, error = %error_chain(&err), "cannot store app output");
                        return;
                    }
                }
                Ok(None) => return,
                Err(err) => {
                    if err.remote_kind() == Some(hearth_proto::ErrorKind::Protocol) {
                        // An agent from before app logs refuses the request.
                        lock(&self.not_collected).insert(row.microvm_id.clone());
                    }
                    debug!(microvm = %row.microvm_id, error = %error_chain(&err), "app log stream ended");
                    return;
                }
            }
        }
    }

    /// Starts the retention clock of ended microVMs' logs, removes expired ones.
    async fn sweep(&self) {
        let logs = self.logs.clone();
        let store = self.engine.store.clone();
        let swept = tokio::task::spawn_blocking(move || {
            logs.sweep(unix_now_ms(), |id| match store.microvm_by_id(id) {
                Ok(Some(row)) => row.state == MicrovmState::Terminated,
                Ok(None) => true,
                Err(_) => false,
            });
        })
        .await;
        if swept.is_err() {
            warn!("the log sweep failed");
        }
        lock(&self.not_collected).retain(|id| {
            self.engine
                .store
                .microvm_by_id(id)
                .is_ok_and(|row| row.is_some_and(|r| r.state != MicrovmState::Terminated))
        });
    }
}

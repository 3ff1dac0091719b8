//! The usage meter: every `interval` it samples each running microVM (the
//! baseline of its size for the time since its mark, plus CPU and memory used
//! above the baseline from the VMM's counters, [`hearth_vm::Driver::usage`])
//! and each stored snapshot (GB-hours), and commits the increments with the
//! new marks in one transaction (`db/usage.rs`). Snapshot reads and writes are
//! recorded by the engine as they happen ([`snapshot_transfer`]).
//!
//! Crash safety: a mark moves only with the increments it accounts for, so a
//! restart resumes from the last commit (the time the server was down is
//! billed then, since the VMs ran on); CPU is a per-process counter, so a
//! new process (a resume) starts a new base rather than a negative delta.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hearth_vm::{Driver, MachineShape, VmUsage};
use tracing::warn;

use crate::db::records::MicrovmRow;
use crate::db::resources::MicrovmState;
use crate::db::store::{unix_now_ms, Store, StoreError};
use crate::db::usage::{
    vm_subject, Increment, Mark, MarkChange, MeterUpdate, MeteredVm, StoredSnapshot,
};
use crate::pricing::{UsageType, MICRO};

const BYTES_PER_GIB: i128 = 1 << 30;
const MIB_PER_GIB: i128 = 1024;
const MS_PER_HOUR: i128 = 3_600_000;

/// What the meter read of one running microVM at one instant.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VmReading {
    pub now_ms: i64,
    /// Its VM record's shape (baseline and peak); `None` when unreadable.
    pub shape: Option<MachineShape>,
    /// The VMM process's counters; `None` when it has no live process.
    pub usage: Option<VmUsage>,
    /// Which process the counters belong to (`VmRecord::instance`).
    pub instance: String,
    /// The networking layer's cumulative egress byte counter for the VM.
    pub egress_bytes: u64,
}

/// The latest figures per microVM, for `/metrics`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VmFigures {
    pub account_id: String,
    /// CPU seconds of the VMM process (the counter last read).
    pub cpu_seconds: f64,
    pub memory_bytes: u64,
    /// vCPU-seconds used above the baseline, since the server started.
    pub burst_seconds: f64,
    pub egress_bytes: u64,
}

#[derive(Debug)]
pub struct Meter {
    driver: Arc<dyn Driver>,
    store: Store,
    interval: Duration,
    figures: Mutex<HashMap<String, VmFigures>>,
    /// CPU time the meter's rounds took, in nanoseconds (for `hearth bench`).
    spent_ns: std::sync::atomic::AtomicU64,
    rounds: std::sync::atomic::AtomicU64,
    /// Rounds are skipped while set (`hearth bench api` measures launches
    /// without the meter); the marks stay, so the next round bills the time.
    paused: std::sync::atomic::AtomicBool,
}

impl Meter {
    pub fn new(driver: Arc<dyn Driver>, store: Store, interval: Duration) -> Arc<Self> {
        Arc::new(Self {
            driver,
            store,
            interval,
            figures: Mutex::default(),
            spent_ns: Default::default(),
            rounds: Default::default(),
            paused: Default::default(),
        })
    }

    /// Skips the sampler's rounds until resumed (benchmarks).
    pub fn set_paused(&self, paused: bool) {
        self.paused
            .store(paused, std::sync::atomic::Ordering::Relaxed);
    }

    /// Samples every `interval` until the process ends. Each round runs on
    /// the blocking pool (SQLite and /proc reads), never on an async worker.
    pub async fn run(self: Arc<Self>) {
        let mut ticks = tokio::time::interval(self.interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            if self.paused.load(std::sync::atomic::Ordering::Relaxed) {
                continue;
            }
            let egress = self.egress_counters().await;
            let meter = self.clone();
            match tokio::task::spawn_blocking(move || meter.sample_round_with(&egress)).await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => {
                    warn!(error = %hearth_vm::error_chain(&err), "usage sample failed")
                }
                Err(_) => warn!("usage sample stopped"),
            }
        }
    }

    /// The networking layer's egress byte counter of every running VM, by VM
    /// name (read asynchronously before a round: it asks nftables).
    async fn egress_counters(&self) -> HashMap<String, u64> {
        let driver = self.driver.clone();
        let records = tokio::task::spawn_blocking(move || driver.list())
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        let mut counters = HashMap::new();
        for record in records {
            if let Some(bytes) = self.driver.egress_bytes(&record).await {
                counters.insert(record.name.clone(), bytes);
            }
        }
        counters
    }

    /// One round without egress counters (tests; VMs without a network).
    pub fn sample_round(&self) -> Result<(), StoreError> {
        self.sample_round_with(&HashMap::new())
    }

    /// One round: every metered microVM and stored snapshot, one commit.
    pub fn sample_round_with(&self, egress: &HashMap<String, u64>) -> Result<(), StoreError> {
        let started = thread_cpu_ns();
        let mut updates = Vec::new();
        let mut figures = HashMap::new();
        for vm in self.store.metered_vms()? {
            let reading = self.read(&vm, egress);
            let VmSample {
                increments,
                change,
                burst_micro: burst,
            } = meter_vm(&vm, &reading);
            if let (MarkChange::Set(_), Some(usage)) = (&change, reading.usage) {
                let before = lock(&self.figures)
                    .get(&vm.microvm_id)
                    .map_or(0.0, |f| f.burst_seconds);
                figures.insert(
                    vm.microvm_id.clone(),
                    VmFigures {
                        account_id: vm.account_id.clone(),
                        cpu_seconds: usage.cpu_ns as f64 / 1e9,
                        memory_bytes: usage.memory_bytes,
                        burst_seconds: before + burst as f64 / MICRO as f64,
                        egress_bytes: reading.egress_bytes,
                    },
                );
            }
            updates.push(MeterUpdate {
                subject: vm_subject(&vm.microvm_id),
                previous: vm.mark.as_ref().map(|m| m.metered_to),
                increments,
                change,
            });
        }
        let now_ms = unix_now_ms();
        for snapshot in self.store.stored_snapshots()? {
            let snapshot = self.with_suspended_size(snapshot);
            let (increments, change) = meter_storage(&snapshot, now_ms);
            updates.push(MeterUpdate {
                subject: snapshot.subject.clone(),
                previous: snapshot.metered_to,
                increments,
                change,
            });
        }
        self.store.commit_meter(&updates)?;
        *lock(&self.figures) = figures;
        let spent = thread_cpu_ns().saturating_sub(started);
        self.spent_ns
            .fetch_add(spent, std::sync::atomic::Ordering::Relaxed);
        self.rounds
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    fn read(&self, vm: &MeteredVm, egress: &HashMap<String, u64>) -> VmReading {
        let now_ms = unix_now_ms();
        match self.driver.load(&vm.vm_name) {
            Ok(record) => VmReading {
                now_ms,
                shape: Some(record.shape),
                usage: self.driver.usage(&record),
                instance: record.instance.clone(),
                egress_bytes: egress.get(&record.name).copied().unwrap_or(0),
            },
            Err(_) => VmReading {
                now_ms,
                ..VmReading::default()
            },
        }
    }

    /// A suspended microVM first seen: its size is its saved state's.
    fn with_suspended_size(&self, mut snapshot: StoredSnapshot) -> StoredSnapshot {
        if snapshot.live && snapshot.bytes == 0 {
            if let Some(record) = snapshot
                .vm_name
                .as_deref()
                .and_then(|n| self.driver.load(n).ok())
            {
                snapshot.bytes = stored_bytes(&record.suspend_state());
            }
        }
        snapshot
    }

    /// The latest figures per microVM (for `/metrics`).
    pub fn figures(&self) -> HashMap<String, VmFigures> {
        lock(&self.figures).clone()
    }

    /// CPU seconds the meter has spent and the rounds it ran.
    pub fn cost(&self) -> (f64, u64) {
        (
            self.spent_ns.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1e9,
            self.rounds.load(std::sync::atomic::Ordering::Relaxed),
        )
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// CPU time of the calling thread, in nanoseconds.
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec the call writes into.
    let ok = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } == 0;
    if !ok {
        return 0;
    }
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// Bytes a file takes on disk (a sparse memory file's holes do not count).
pub fn stored_bytes(path: &std::path::Path) -> u64 {
    std::fs::metadata(path)
        .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
        .unwrap_or(0)
}

/// A snapshot read (a launch, a resume) or write (a suspend) of `bytes` by
/// the microVM, now: the engine records it with the state change.
pub fn snapshot_transfer(row: &MicrovmRow, usage_type: UsageType, bytes: u64) -> Increment {
    let now = unix_now_ms();
    Increment {
        account_id: row.account_id.clone(),
        microvm_id: row.microvm_id.clone(),
        image_name: row.image_name.clone(),
        usage_type,
        from_ms: now,
        to_ms: now,
        amount: i64::try_from(bytes).unwrap_or(i64::MAX),
    }
}

/// Records a build's usage: the baseline of its size from `from_ms` to
/// `to_ms`, to its image (no microVM).
pub fn build_usage(
    store: &Store,
    account_id: &str,
    image_name: &str,
    shape: MachineShape,
    from_ms: i64,
    to_ms: i64,
) {
    let build = MeteredVm {
        microvm_id: String::new(),
        account_id: account_id.to_string(),
        image_name: image_name.to_string(),
        state: MicrovmState::Running,
        vm_name: String::new(),
        memory_mib: shape.baseline_memory_mib(),
        running_at: Some(from_ms),
        stopped_running_at: None,
        mark: None,
    };
    let mut increments = Vec::new();
    baseline(
        &build,
        &Baseline::of(&build, Some(shape)),
        from_ms,
        to_ms,
        &mut increments,
    );
    if let Err(err) = store.add_usage(&increments) {
        warn!(image = %image_name, error = %hearth_vm::error_chain(&err), "cannot record a build's usage");
    }
}

/// The baseline of a size over `[from, to]`: vCPU-seconds and GB-seconds,
/// in millionths.
fn baseline(vm: &MeteredVm, shape: &Baseline, from: i64, to: i64, out: &mut Vec<Increment>) {
    if to <= from {
        return;
    }
    let ms = i128::from(to - from);
    // vCPU-µs = vcpus x ms x 1000; the ratio keeps it in integers.
    let vcpu = ms * 1000 * i128::from(shape.vcpu_numerator) / i128::from(shape.vcpu_denominator);
    let memory = ms * 1000 * i128::from(shape.memory_mib) / MIB_PER_GIB;
    out.push(increment(vm, UsageType::VcpuSeconds, from, to, vcpu));
    out.push(increment(vm, UsageType::MemoryGbSeconds, from, to, memory));
}

fn increment(vm: &MeteredVm, usage_type: UsageType, from: i64, to: i64, amount: i128) -> Increment {
    Increment {
        account_id: vm.account_id.clone(),
        microvm_id: vm.microvm_id.clone(),
        image_name: vm.image_name.clone(),
        usage_type,
        from_ms: from,
        to_ms: to,
        amount: i64::try_from(amount).unwrap_or(i64::MAX),
    }
}

/// A size's baseline: vCPUs as a fraction (peak vCPUs x baseline / peak
/// memory) and memory in MiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Baseline {
    vcpu_numerator: u64,
    vcpu_denominator: u64,
    memory_mib: u32,
}

impl Baseline {
    fn of(vm: &MeteredVm, shape: Option<MachineShape>) -> Self {
        match shape {
            Some(shape) if shape.memory_mib > 0 => Self {
                vcpu_numerator: u64::from(shape.vcpus) * u64::from(shape.baseline_memory_mib()),
                vcpu_denominator: u64::from(shape.memory_mib),
                memory_mib: shape.baseline_memory_mib(),
            },
            // The reference's rule: one vCPU per 2 GiB.
            _ => Self {
                vcpu_numerator: u64::from(vm.memory_mib),
                vcpu_denominator: 2048,
                memory_mib: vm.memory_mib,
            },
        }
    }
}

/// What one sample of a microVM adds and where its mark moves: the baseline
/// for the time it ran since its mark; CPU and memory above the baseline
/// when the same process's counters were read at both ends. Pure, so the
/// arithmetic is tested without VMs.
pub fn meter_vm(vm: &MeteredVm, reading: &VmReading) -> VmSample {
    let (increments, change, burst_micro) = meter_vm_parts(vm, reading);
    VmSample {
        increments,
        change,
        burst_micro,
    }
}

/// One microVM's sample: what it adds, where its mark moves, and the
/// vCPU-millionths of it used above the baseline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSample {
    pub increments: Vec<Increment>,
    pub change: MarkChange,
    pub burst_micro: i64,
}

fn meter_vm_parts(vm: &MeteredVm, reading: &VmReading) -> (Vec<Increment>, MarkChange, i64) {
    let now = reading.now_ms;
    let runs = matches!(vm.state, MicrovmState::Running | MicrovmState::Suspending);
    let base = Baseline::of(vm, reading.shape);
    let mut out = Vec::new();
    let Some(mark) = &vm.mark else {
        if !runs {
            return (out, MarkChange::Close, 0);
        }
        // First sample: the baseline since it began running; the counters
        // become the base of the next sample's CPU and memory.
        let start = vm.running_at.unwrap_or(now).min(now);
        baseline(vm, &base, start, now, &mut out);
        return (out, MarkChange::Set(new_mark(now, reading, None)), 0);
    };
    let from = mark.metered_to;
    if !runs {
        // It stopped running since the last sample: the baseline up to then.
        let end = vm
            .stopped_running_at
            .unwrap_or(from)
            .clamp(from, now.max(from));
        baseline(vm, &base, from, end, &mut out);
        return (out, MarkChange::Close, 0);
    }
    // Suspended and resumed between two samples: bill up to the suspend,
    // then from the resume, and take the new process's counters as a base.
    if let Some(resumed) = vm.running_at.filter(|&r| r > from) {
        let resumed = resumed.min(now);
        let stopped = vm
            .stopped_running_at
            .filter(|&s| s > from && s <= resumed)
            .unwrap_or(from);
        baseline(vm, &base, from, stopped, &mut out);
        baseline(vm, &base, resumed, now, &mut out);
        return (out, MarkChange::Set(new_mark(now, reading, Some(mark))), 0);
    }
    baseline(vm, &base, from, now, &mut out);
    let mut burst = 0;
    let same_process = !mark.instance.is_empty() && mark.instance == reading.instance;
    if let (Some(usage), true) = (reading.usage, same_process) {
        if now > from {
            let ms = i128::from(now - from);
            let used = i128::from(usage.cpu_ns.saturating_sub(mark.cpu_ns)) / 1000;
            let guaranteed =
                ms * 1000 * i128::from(base.vcpu_numerator) / i128::from(base.vcpu_denominator);
            if used > guaranteed {
                burst = i64::try_from(used - guaranteed).unwrap_or(i64::MAX);
                out.push(increment(
                    vm,
                    UsageType::VcpuSeconds,
                    from,
                    now,
                    used - guaranteed,
                ));
            }
            let baseline_bytes = i128::from(base.memory_mib) << 20;
            let above = i128::from(usage.memory_bytes) - baseline_bytes;
            if above > 0 {
                // GB-µs = bytes / 2^30 x ms x 1000
                let amount = above * ms * 1000 / BYTES_PER_GIB;
                out.push(increment(vm, UsageType::MemoryGbSeconds, from, now, amount));
            }
        }
    }
    let sent = reading.egress_bytes.saturating_sub(mark.egress_bytes);
    if sent > 0 {
        out.push(increment(
            vm,
            UsageType::EgressBytes,
            now,
            now,
            i128::from(sent),
        ));
    }
    (
        out,
        MarkChange::Set(new_mark(now, reading, Some(mark))),
        burst,
    )
}

fn new_mark(now: i64, reading: &VmReading, previous: Option<&Mark>) -> Mark {
    match reading.usage {
        Some(usage) => Mark {
            metered_to: now,
            cpu_ns: usage.cpu_ns,
            instance: reading.instance.clone(),
            egress_bytes: reading.egress_bytes,
            ..Mark::default()
        },
        // No live process: keep the last counters.
        None => Mark {
            metered_to: now,
            ..previous.cloned().unwrap_or_default()
        },
    }
}

/// What one sample of a stored snapshot adds: GB-hours since its mark (or
/// since it was made); one no longer stored is billed to its minimum (an
/// image version's week) and its mark closed.
pub fn meter_storage(snapshot: &StoredSnapshot, now: i64) -> (Vec<Increment>, MarkChange) {
    let from = snapshot.metered_to.unwrap_or(snapshot.since).min(now);
    let to = if snapshot.live {
        now
    } else {
        from.max(snapshot.since.saturating_add(snapshot.minimum_ms))
    };
    let mut out = Vec::new();
    if to > from && snapshot.bytes > 0 {
        let amount = i128::from(snapshot.bytes) * i128::from(to - from) * i128::from(MICRO)
            / (BYTES_PER_GIB * MS_PER_HOUR);
        out.push(Increment {
            account_id: snapshot.account_id.clone(),
            microvm_id: snapshot.microvm_id.clone(),
            image_name: snapshot.image_name.clone(),
            usage_type: UsageType::SnapshotStorageGbHours,
            from_ms: from,
            to_ms: to,
            amount: i64::try_from(amount).unwrap_or(i64::MAX),
        });
    }
    let change = if snapshot.live {
        MarkChange::Set(Mark {
            metered_to: to,
            stored_bytes: snapshot.bytes,
            account_id: snapshot.account_id.clone(),
            image_name: snapshot.image_name.clone(),
            since: snapshot.since,
            ..Mark::default()
        })
    } else {
        MarkChange::Close
    };
    (out, change)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: i64 = 3_600_000;

    fn version(metered_to: Option<i64>, live: bool) -> StoredSnapshot {
        StoredSnapshot {
            subject: "version:111111111111/web/1".into(),
            account_id: "111111111111".into(),
            microvm_id: String::new(),
            vm_name: None,
            image_name: "web".into(),
            since: 0,
            bytes: 1 << 30,
            minimum_ms: crate::pricing::VERSION_STORAGE_MINIMUM_MS,
            metered_to,
            live,
        }
    }

    fn amount(increments: &[Increment]) -> i64 {
        increments.iter().map(|i| i.amount).sum()
    }

    #[test]
    fn stored_snapshots_bill_gb_hours_with_a_week_for_versions() {
        // (metered_to, live, now) -> GB-hours billed, mark kept
        let cases = [
            // A 1 GiB version stored for an hour: 1 GB-hour.
            (None, true, HOUR, MICRO, true),
            // Metered on from its mark.
            (Some(HOUR), true, 3 * HOUR, 2 * MICRO, true),
            // Deleted after a day: billed up to its week, then forgotten.
            (
                Some(24 * HOUR),
                false,
                25 * HOUR,
                (7 * 24 - 24) * MICRO,
                false,
            ),
            // Deleted after two weeks: nothing more.
            (Some(14 * 24 * HOUR), false, 15 * 24 * HOUR, 0, false),
        ];
        for (metered_to, live, now, expected, kept) in cases {
            let (increments, change) = meter_storage(&version(metered_to, live), now);
            assert_eq!(amount(&increments), expected, "{metered_to:?} {live}");
            assert_eq!(matches!(change, MarkChange::Set(_)), kept);
        }
    }

    fn vm(state: MicrovmState, mark: Option<Mark>) -> MeteredVm {
        MeteredVm {
            microvm_id: "microvm-1".into(),
            account_id: "111111111111".into(),
            image_name: "web".into(),
            state,
            vm_name: "mv-1".into(),
            memory_mib: 512,
            running_at: Some(0),
            stopped_running_at: None,
            mark,
        }
    }

    #[test]
    fn a_suspend_and_resume_between_samples_bills_only_the_running_time() {
        let shape = MachineShape::burst_of(512);
        let mark = Mark {
            metered_to: 10_000,
            cpu_ns: 5_000_000_000,
            instance: "old".into(),
            ..Mark::default()
        };
        let mut resumed = vm(MicrovmState::Running, Some(mark));
        // Suspended at 14 s, resumed at 18 s, sampled at 20 s.
        resumed.stopped_running_at = Some(14_000);
        resumed.running_at = Some(18_000);
        let sample = meter_vm(
            &resumed,
            &VmReading {
                now_ms: 20_000,
                shape: Some(shape),
                usage: Some(VmUsage {
                    cpu_ns: 1_000_000_000,
                    memory_bytes: 100 << 20,
                }),
                instance: "new".into(),
                egress_bytes: 0,
            },
        );
        let vcpu: i64 = sample
            .increments
            .iter()
            .filter(|i| i.usage_type == UsageType::VcpuSeconds)
            .map(|i| i.amount)
            .sum();
        // 4 s + 2 s at a quarter vCPU; the new process's counter is a base.
        assert_eq!(vcpu, 6 * MICRO / 4);
        assert_eq!(sample.burst_micro, 0);
        let MarkChange::Set(next) = sample.change else {
            panic!("the mark moves on")
        };
        assert_eq!((next.metered_to, next.cpu_ns), (20_000, 1_000_000_000));
        assert_eq!(next.instance, "new");
    }
}

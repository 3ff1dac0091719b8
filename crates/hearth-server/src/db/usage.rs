//! Metered usage in SQLite: hourly buckets per account, microVM, image and
//! usage type, and per metered subject a watermark ("metered up to", plus the
//! counters last read) written in the same transaction as the increments it
//! accounts for, so a crash between two samples loses at most the interval in
//! flight and never counts one twice.

use rusqlite::{params, OptionalExtension, Transaction};

use crate::db::resources::MicrovmState;
use crate::db::store::{Store, StoreError};
use crate::pricing::UsageType;

const HOUR_MS: i64 = 3_600_000;

/// An amount of one usage type accrued over `[from_ms, to_ms]` (spread over
/// the hours it spans in proportion to time; an instant when equal).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Increment {
    pub account_id: String,
    /// Empty for usage of no microVM (a build, an image version's storage).
    pub microvm_id: String,
    pub image_name: String,
    pub usage_type: UsageType,
    pub from_ms: i64,
    pub to_ms: i64,
    pub amount: i64,
}

/// Splits `amount` over the hours `[from_ms, to_ms]` spans, in proportion to
/// the time in each, as `(hour start in unix seconds, part)`. The parts sum
/// to `amount` exactly (cumulative rounding).
pub fn split_by_hour(from_ms: i64, to_ms: i64, amount: i64) -> Vec<(i64, i64)> {
    let hour_of = |ms: i64| ms.div_euclid(HOUR_MS) * HOUR_MS;
    if to_ms <= from_ms {
        return vec![(hour_of(to_ms) / 1000, amount)];
    }
    let total = i128::from(to_ms - from_ms);
    let mut parts = Vec::new();
    let (mut start, mut given) = (from_ms, 0i64);
    while start < to_ms {
        let hour = hour_of(start);
        let end = (hour + HOUR_MS).min(to_ms);
        let elapsed = i128::from(end - from_ms);
        let due = i64::try_from(i128::from(amount) * elapsed / total).unwrap_or(amount);
        parts.push((hour / 1000, due - given));
        given = due;
        start = end;
    }
    parts
}

/// A microVM the meter looks at: one that runs now, or one metered before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeteredVm {
    pub microvm_id: String,
    pub account_id: String,
    pub image_name: String,
    pub state: MicrovmState,
    pub vm_name: String,
    /// The baseline memory of its size, in MiB.
    pub memory_mib: u32,
    pub running_at: Option<i64>,
    pub stopped_running_at: Option<i64>,
    pub mark: Option<Mark>,
}

/// How far a subject is metered and the counters read then.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Mark {
    pub metered_to: i64,
    /// The VMM process's CPU counter at `metered_to`.
    pub cpu_ns: u64,
    /// The process the counter belongs to (a new process starts from 0).
    pub instance: String,
    /// The networking layer's egress counter at `metered_to`.
    pub egress_bytes: u64,
    /// A stored snapshot's size, owner and when it was made.
    pub stored_bytes: u64,
    pub account_id: String,
    pub image_name: String,
    pub since: i64,
}

/// What a sample does to a subject's watermark.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MarkChange {
    Set(Mark),
    /// The subject stopped (its last interval was metered): forget it.
    Close,
}

/// One row of a usage report: a bucket sum.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageSum {
    pub account_id: String,
    pub microvm_id: String,
    pub image_name: String,
    pub usage_type: UsageType,
    pub amount: i64,
}

/// One subject's part of a round of samples.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeterUpdate {
    pub subject: String,
    /// The mark's `metered_to` the sample started from (`None`: no mark).
    pub previous: Option<i64>,
    pub increments: Vec<Increment>,
    pub change: MarkChange,
}

/// The mark subject of a running microVM.
pub fn vm_subject(microvm_id: &str) -> String {
    format!("vm:{microvm_id}")
}

pub(crate) fn add(tx: &Transaction<'_>, increments: &[Increment]) -> Result<(), StoreError> {
    let mut insert = tx.prepare_cached(
        "INSERT INTO usage_buckets (account_id, hour, microvm_id, image_name, usage_type, amount)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (account_id, hour, microvm_id, image_name, usage_type)
         DO UPDATE SET amount = amount + excluded.amount",
    )?;
    for inc in increments {
        for (hour, amount) in split_by_hour(inc.from_ms, inc.to_ms, inc.amount) {
            if amount != 0 {
                insert.execute(params![
                    inc.account_id,
                    hour,
                    inc.microvm_id,
                    inc.image_name,
                    inc.usage_type.as_str(),
                    amount
                ])?;
            }
        }
    }
    Ok(())
}

/// Moves a subject's mark from `previous` (compare-and-set): false when
/// another sampler moved it first, whose increments then stand alone.
fn move_mark(
    tx: &Transaction<'_>,
    subject: &str,
    previous: Option<i64>,
    change: &MarkChange,
) -> Result<bool, StoreError> {
    let changed = match (change, previous) {
        (MarkChange::Set(mark), previous) => {
            let values = params![
                subject,
                mark.metered_to,
                i64::try_from(mark.cpu_ns).unwrap_or(i64::MAX),
                mark.instance,
                i64::try_from(mark.egress_bytes).unwrap_or(i64::MAX),
                i64::try_from(mark.stored_bytes).unwrap_or(i64::MAX),
                mark.account_id,
                mark.image_name,
                mark.since,
                previous
            ];
            match previous {
                None => tx.execute(
                    "INSERT INTO usage_marks (subject, metered_to, cpu_ns, instance, egress_bytes,
                        stored_bytes, account_id, image_name, since)
                     SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9 WHERE ?10 IS NULL
                     ON CONFLICT (subject) DO NOTHING",
                    values,
                )?,
                Some(_) => tx.execute(
                    "UPDATE usage_marks SET metered_to = ?2, cpu_ns = ?3, instance = ?4,
                        egress_bytes = ?5, stored_bytes = ?6, account_id = ?7, image_name = ?8,
                        since = ?9
                     WHERE subject = ?1 AND metered_to = ?10",
                    values,
                )?,
            }
        }
        (MarkChange::Close, Some(previous)) => tx.execute(
            "DELETE FROM usage_marks WHERE subject = ?1 AND metered_to = ?2",
            params![subject, previous],
        )?,
        (MarkChange::Close, None) => 1,
    };
    Ok(changed == 1)
}

impl Store {
    /// Adds usage that happened once (a snapshot read or write, a build).
    pub fn add_usage(&self, increments: &[Increment]) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = Store::write_transaction(&mut conn)?;
        add(&tx, increments)?;
        tx.commit()?;
        Ok(())
    }

    /// Every microVM that runs (RUNNING or SUSPENDING) or still has a mark.
    pub fn metered_vms(&self) -> Result<Vec<MeteredVm>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT m.microvm_id, m.account_id, m.image_name, m.state, m.vm_name, m.memory_mib,
                    m.running_at, m.stopped_running_at,
                    k.metered_to, k.cpu_ns, k.instance, k.egress_bytes
             FROM microvms m LEFT JOIN usage_marks k ON k.subject = 'vm:' || m.microvm_id
             WHERE m.state IN ('RUNNING', 'SUSPENDING') OR k.subject IS NOT NULL",
        )?;
        let rows = stmt.query_map([], |row| {
            let metered_to: Option<i64> = row.get(8)?;
            let counter = |i| -> rusqlite::Result<u64> {
                Ok(u64::try_from(row.get::<_, Option<i64>>(i)?.unwrap_or(0)).unwrap_or(0))
            };
            Ok((
                row.get::<_, String>(3)?,
                MeteredVm {
                    microvm_id: row.get(0)?,
                    account_id: row.get(1)?,
                    image_name: row.get(2)?,
                    state: MicrovmState::Pending,
                    vm_name: row.get(4)?,
                    memory_mib: row.get(5)?,
                    running_at: row.get(6)?,
                    stopped_running_at: row.get(7)?,
                    mark: match metered_to {
                        Some(metered_to) => Some(Mark {
                            metered_to,
                            cpu_ns: counter(9)?,
                            instance: row.get::<_, Option<String>>(10)?.unwrap_or_default(),
                            egress_bytes: counter(11)?,
                            ..Mark::default()
                        }),
                        None => None,
                    },
                },
            ))
        })?;
        let mut vms = Vec::new();
        for row in rows {
            let (state, mut vm) = row?;
            vm.state = MicrovmState::parse(&state)
                .ok_or_else(|| StoreError::Corrupt("microVM state".into()))?;
            vms.push(vm);
        }
        Ok(vms)
    }

    /// Records one round of samples: every subject's increments and new
    /// mark, all together or none (one commit per round keeps the meter cheap).
    pub fn commit_meter(&self, updates: &[MeterUpdate]) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = Store::write_transaction(&mut conn)?;
        for update in updates {
            if move_mark(&tx, &update.subject, update.previous, &update.change)? {
                add(&tx, &update.increments)?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Stored snapshots to bill: every SUCCESSFUL image version (its build's
    /// memory and disk snapshot bytes, since it was made) and every SUSPENDED
    /// microVM (since it was suspended); with each one's mark.
    pub fn stored_snapshots(&self) -> Result<Vec<StoredSnapshot>, StoreError> {
        let conn = self.conn();
        let mut out = Vec::new();
        // Marks of versions, by subject: the ones whose row is gone (an
        // image deleted and made again) are closed from these alone.
        let mut marks: std::collections::HashMap<String, StoredSnapshot> = conn
            .prepare_cached(
                "SELECT subject, metered_to, stored_bytes, account_id, image_name, since
                 FROM usage_marks WHERE subject LIKE 'version:%'",
            )?
            .query_map([], |row| {
                let subject: String = row.get(0)?;
                Ok((
                    subject.clone(),
                    StoredSnapshot {
                        subject,
                        account_id: row.get(3)?,
                        microvm_id: String::new(),
                        vm_name: None,
                        image_name: row.get(4)?,
                        since: row.get(5)?,
                        bytes: u64::try_from(row.get::<_, i64>(2)?).unwrap_or(0),
                        minimum_ms: crate::pricing::VERSION_STORAGE_MINIMUM_MS,
                        metered_to: row.get(1)?,
                        live: false,
                    },
                ))
            })?
            .collect::<Result<_, _>>()?;
        let mut versions = conn.prepare_cached(
            "SELECT v.account_id, v.image_name, v.version, v.created_at,
                    (SELECT b.snapshot_build FROM builds b
                     WHERE b.account_id = v.account_id AND b.image_name = v.image_name
                       AND b.version = v.version AND b.state = 'SUCCESSFUL' LIMIT 1)
             FROM image_versions v WHERE v.state = 'SUCCESSFUL'",
        )?;
        let rows = versions.query_map([], |row| {
            let sizes: Option<String> = row.get(4)?;
            let bytes = sizes
                .and_then(|s| serde_json::from_str::<crate::db::spec::SnapshotSizes>(&s).ok())
                .map_or(0, |s| {
                    s.memory_snapshot_size_in_bytes
                        .saturating_add(s.disk_snapshot_size_in_bytes)
                });
            let (account_id, image_name, version): (String, String, u32) =
                (row.get(0)?, row.get(1)?, row.get(2)?);
            Ok(StoredSnapshot {
                subject: format!("version:{account_id}/{image_name}/{version}"),
                account_id,
                microvm_id: String::new(),
                vm_name: None,
                image_name,
                since: row.get(3)?,
                bytes,
                minimum_ms: crate::pricing::VERSION_STORAGE_MINIMUM_MS,
                metered_to: None,
                live: true,
            })
        })?;
        for row in rows {
            let mut snapshot = row?;
            snapshot.metered_to = marks.remove(&snapshot.subject).and_then(|m| m.metered_to);
            out.push(snapshot);
        }
        out.extend(marks.into_values());
        let mut suspended = conn.prepare_cached(
            "SELECT m.microvm_id, m.account_id, m.image_name, m.vm_name, m.suspended_at,
                    m.state = 'SUSPENDED', k.metered_to, k.stored_bytes
             FROM microvms m
             LEFT JOIN usage_marks k ON k.subject = 'suspended:' || m.microvm_id
             WHERE m.state = 'SUSPENDED' OR k.subject IS NOT NULL",
        )?;
        let rows = suspended.query_map([], |row| {
            let microvm_id: String = row.get(0)?;
            Ok(StoredSnapshot {
                subject: format!("suspended:{microvm_id}"),
                account_id: row.get(1)?,
                microvm_id,
                vm_name: Some(row.get(3)?),
                image_name: row.get(2)?,
                since: row.get::<_, Option<i64>>(4)?.unwrap_or(0),
                // The suspend state's size, recorded when the suspend was metered.
                bytes: u64::try_from(row.get::<_, Option<i64>>(7)?.unwrap_or(0)).unwrap_or(0),
                minimum_ms: 0,
                metered_to: row.get(6)?,
                live: row.get(5)?,
            })
        })?;
        for row in rows {
            out.push(row?);
        }
        Ok(out)
    }

    /// Sums of the buckets whose hour starts in `[since, until)` (unix
    /// seconds), of one account or all, by account, microVM, image and type.
    pub fn usage_sums(
        &self,
        account: Option<&str>,
        since: i64,
        until: i64,
    ) -> Result<Vec<UsageSum>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT account_id, microvm_id, image_name, usage_type, SUM(amount)
             FROM usage_buckets
             WHERE (?1 IS NULL OR account_id = ?1) AND hour >= ?2 AND hour < ?3
             GROUP BY account_id, microvm_id, image_name, usage_type
             ORDER BY account_id, image_name, microvm_id, usage_type",
        )?;
        let rows = stmt.query_map(params![account, since, until], |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, String>(1)?,
                row.get::<_, String>(2)?,
                row.get::<_, String>(3)?,
                row.get::<_, i64>(4)?,
            ))
        })?;
        let mut sums = Vec::new();
        for row in rows {
            let (account_id, microvm_id, image_name, usage_type, amount) = row?;
            let usage_type = UsageType::parse(&usage_type)
                .ok_or_else(|| StoreError::Corrupt("usage type".into()))?;
            sums.push(UsageSum {
                account_id,
                microvm_id,
                image_name,
                usage_type,
                amount,
            });
        }
        Ok(sums)
    }

    /// The mark of a microVM, if it is metered (tests and reports).
    pub fn vm_mark(&self, microvm_id: &str) -> Result<Option<Mark>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT metered_to, cpu_ns, instance, egress_bytes, stored_bytes
                 FROM usage_marks WHERE subject = ?1",
                params![vm_subject(microvm_id)],
                |row| {
                    Ok(Mark {
                        metered_to: row.get(0)?,
                        cpu_ns: u64::try_from(row.get::<_, i64>(1)?).unwrap_or(0),
                        instance: row.get(2)?,
                        egress_bytes: u64::try_from(row.get::<_, i64>(3)?).unwrap_or(0),
                        stored_bytes: u64::try_from(row.get::<_, i64>(4)?).unwrap_or(0),
                        ..Mark::default()
                    })
                },
            )
            .optional()?)
    }
}

/// A stored snapshot the meter bills per GB-hour.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSnapshot {
    pub subject: String,
    pub account_id: String,
    pub microvm_id: String,
    /// The VM of a suspended microVM (its saved state is the snapshot).
    pub vm_name: Option<String>,
    pub image_name: String,
    /// When it was made (unix ms).
    pub since: i64,
    pub bytes: u64,
    /// It is billed for at least this long after `since`.
    pub minimum_ms: i64,
    pub metered_to: Option<i64>,
    /// Still stored (false: deleted or resumed since the last sample).
    pub live: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sample_from_a_stale_mark_counts_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("store");
        let update = |previous: Option<i64>, to: i64| MeterUpdate {
            subject: "vm:microvm-1".into(),
            previous,
            increments: vec![Increment {
                account_id: "111111111111".into(),
                microvm_id: "microvm-1".into(),
                image_name: "web".into(),
                usage_type: UsageType::VcpuSeconds,
                from_ms: previous.unwrap_or(0),
                to_ms: to,
                amount: 7,
            }],
            change: MarkChange::Set(Mark {
                metered_to: to,
                ..Mark::default()
            }),
        };
        let total = || -> i64 {
            store
                .usage_sums(None, 0, i64::MAX / 2)
                .expect("sums")
                .iter()
                .map(|s| s.amount)
                .sum()
        };
        store.commit_meter(&[update(None, 1000)]).expect("first");
        // Two samplers that both read the first mark: one wins.
        store
            .commit_meter(&[update(Some(1000), 2000)])
            .expect("second");
        store
            .commit_meter(&[update(Some(1000), 2500)])
            .expect("stale");
        // A second "first" sample of a subject that has a mark: ignored too.
        store
            .commit_meter(&[update(None, 3000)])
            .expect("stale first");
        assert_eq!(total(), 14);
        assert_eq!(
            store
                .vm_mark("microvm-1")
                .expect("mark")
                .map(|m| m.metered_to),
            Some(2000)
        );
        let close = MeterUpdate {
            change: MarkChange::Close,
            ..update(Some(1000), 2000)
        };
        store.commit_meter(&[close]).expect("stale close");
        assert!(store.vm_mark("microvm-1").expect("mark").is_some());
    }

    #[test]
    fn hour_split_table() {
        let h = HOUR_MS;
        // (from, to, amount) -> parts
        type Case = (i64, i64, i64, Vec<(i64, i64)>);
        let cases: Vec<Case> = vec![
            // Inside one hour.
            (10, 20, 7, vec![(0, 7)]),
            // An instant goes to its hour.
            (h + 5, h + 5, 9, vec![(3600, 9)]),
            // Half in each of two hours.
            (h / 2, h + h / 2, 100, vec![(0, 50), (3600, 50)]),
            // Three hours, odd amount: parts still sum exactly.
            (h - 1, 2 * h + 1, 10, vec![(0, 0), (3600, 9), (7200, 1)]),
            // Exact boundaries: nothing in the hour that starts at `to`.
            (h, 2 * h, 60, vec![(3600, 60)]),
            (0, 3 * h, 3, vec![(0, 1), (3600, 1), (7200, 1)]),
        ];
        for (from, to, amount, expected) in cases {
            let parts = split_by_hour(from, to, amount);
            assert_eq!(parts, expected, "{from}..{to} of {amount}");
            assert_eq!(parts.iter().map(|p| p.1).sum::<i64>(), amount);
        }
        // Any split sums exactly.
        for (from, to, amount) in [(17, 5 * h + 3, 1_000_003), (h - 7, h + 11, 5)] {
            assert_eq!(
                split_by_hour(from, to, amount)
                    .iter()
                    .map(|p| p.1)
                    .sum::<i64>(),
                amount
            );
        }
    }
}

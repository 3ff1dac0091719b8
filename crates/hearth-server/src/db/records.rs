//! Rows of the resource tables (images, versions, builds, microVMs, tags,
//! idempotency keys) and the queries over them. State changes are
//! compare-and-set on the current state (see [`crate::db::resources`]), inside
//! transactions where several rows move together, so a crash between two
//! statements never leaves a half-made resource.

use std::path::PathBuf;

use rusqlite::{params, OptionalExtension, Row, Transaction};
use serde::de::DeserializeOwned;

use crate::config::Quotas;
use crate::db::resources::{BuildState, ImageState, MicrovmState, VersionState, VersionStatus};
use crate::db::spec::{ImageSpec, MicrovmSpec};
use crate::db::store::{unix_now_ms, Store, StoreError};

#[derive(Debug, Clone, PartialEq)]
pub struct ImageRow {
    pub account_id: String,
    pub name: String,
    pub state: ImageState,
    pub latest_active_version: Option<u32>,
    pub latest_failed_version: Option<u32>,
    pub created_at: i64,
    pub updated_at: Option<i64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct VersionRow {
    pub account_id: String,
    pub image_name: String,
    pub version: u32,
    pub state: VersionState,
    pub status: VersionStatus,
    pub state_reason: Option<String>,
    /// The frozen request fields (baseImageArn, codeArtifact, hooks, ...).
    pub spec: ImageSpec,
    pub snapshot_dir: Option<PathBuf>,
    pub memory_mib: u32,
    pub created_at: i64,
    pub updated_at: Option<i64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BuildRow {
    pub build_id: String,
    pub account_id: String,
    pub image_name: String,
    pub version: u32,
    pub state: BuildState,
    pub architecture: String,
    pub chipset: String,
    pub chipset_generation: String,
    pub state_reason: Option<String>,
    pub snapshot_build: Option<SnapshotSizes>,
    pub created_at: i64,
}

pub use crate::db::spec::SnapshotSizes;

#[derive(Debug, Clone, PartialEq)]
pub struct MicrovmRow {
    pub microvm_id: String,
    pub account_id: String,
    pub image_name: String,
    pub image_version: u32,
    pub state: MicrovmState,
    pub state_reason: Option<String>,
    /// Echoed request fields: executionRoleArn, idlePolicy, connectors, ...
    pub spec: MicrovmSpec,
    pub memory_mib: u32,
    /// The engine's name for the VM (its directory under the state dir).
    pub vm_name: String,
    pub started_at: i64,
    pub terminated_at: Option<i64>,
    pub deadline_at: i64,
    /// Last bytes through the endpoint (idle policy), unix ms.
    pub last_activity_at: Option<i64>,
    /// When the VM last became SUSPENDED, unix ms.
    pub suspended_at: Option<i64>,
}

/// What a `clientToken` lookup found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Idempotent {
    /// The token is new.
    New,
    /// Same token, same request: the resource it made.
    Replay(String),
    /// Same token, different request.
    Mismatch,
}

/// Why a new resource could not be recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    Quota(String),
    Conflict(String),
    NotFound(String),
}

fn state_err(column: usize, text: &str) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        column,
        rusqlite::types::Type::Text,
        format!("unknown state {text:?}").into(),
    )
}

/// A JSON column read into its type.
fn json_col<T: DeserializeOwned>(row: &Row<'_>, index: usize) -> rusqlite::Result<T> {
    let text: String = row.get(index)?;
    serde_json::from_str(&text).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(index, rusqlite::types::Type::Text, e.into())
    })
}

/// A spec as its stored JSON text.
fn spec_text(spec: &impl serde::Serialize) -> Result<String, StoreError> {
    serde_json::to_string(spec).map_err(StoreError::Spec)
}

fn image_from_row(row: &Row<'_>) -> rusqlite::Result<ImageRow> {
    let state: String = row.get(2)?;
    Ok(ImageRow {
        account_id: row.get(0)?,
        name: row.get(1)?,
        state: ImageState::parse(&state).ok_or_else(|| state_err(2, &state))?,
        latest_active_version: row.get(3)?,
        latest_failed_version: row.get(4)?,
        created_at: row.get(5)?,
        updated_at: row.get(6)?,
    })
}

const IMAGE_COLS: &str =
    "account_id, name, state, latest_active_version, latest_failed_version, created_at, updated_at";

fn version_from_row(row: &Row<'_>) -> rusqlite::Result<VersionRow> {
    let state: String = row.get(3)?;
    let status: String = row.get(4)?;
    let dir: Option<String> = row.get(7)?;
    Ok(VersionRow {
        account_id: row.get(0)?,
        image_name: row.get(1)?,
        version: row.get(2)?,
        state: VersionState::parse(&state).ok_or_else(|| state_err(3, &state))?,
        status: VersionStatus::parse(&status).ok_or_else(|| state_err(4, &status))?,
        state_reason: row.get(5)?,
        spec: json_col(row, 6)?,
        snapshot_dir: dir.map(PathBuf::from),
        memory_mib: row.get(8)?,
        created_at: row.get(9)?,
        updated_at: row.get(10)?,
    })
}

const VERSION_COLS: &str = "account_id, image_name, version, state, status, state_reason, spec, snapshot_dir, memory_mib, created_at, updated_at";

fn build_from_row(row: &Row<'_>) -> rusqlite::Result<BuildRow> {
    let state: String = row.get(4)?;
    let snapshot: Option<String> = row.get(9)?;
    Ok(BuildRow {
        build_id: row.get(0)?,
        account_id: row.get(1)?,
        image_name: row.get(2)?,
        version: row.get(3)?,
        state: BuildState::parse(&state).ok_or_else(|| state_err(4, &state))?,
        architecture: row.get(5)?,
        chipset: row.get(6)?,
        chipset_generation: row.get(7)?,
        state_reason: row.get(8)?,
        snapshot_build: snapshot.and_then(|s| serde_json::from_str(&s).ok()),
        created_at: row.get(10)?,
    })
}

const BUILD_COLS: &str = "build_id, account_id, image_name, version, state, architecture, chipset, chipset_generation, state_reason, snapshot_build, created_at";

fn microvm_from_row(row: &Row<'_>) -> rusqlite::Result<MicrovmRow> {
    let state: String = row.get(4)?;
    Ok(MicrovmRow {
        microvm_id: row.get(0)?,
        account_id: row.get(1)?,
        image_name: row.get(2)?,
        image_version: row.get(3)?,
        state: MicrovmState::parse(&state).ok_or_else(|| state_err(4, &state))?,
        state_reason: row.get(5)?,
        spec: json_col(row, 6)?,
        memory_mib: row.get(7)?,
        vm_name: row.get(8)?,
        started_at: row.get(9)?,
        terminated_at: row.get(10)?,
        deadline_at: row.get(11)?,
        last_activity_at: row.get(12)?,
        suspended_at: row.get(13)?,
    })
}

const MICROVM_COLS: &str = "microvm_id, account_id, image_name, image_version, state, state_reason, spec, memory_mib, vm_name, started_at, terminated_at, deadline_at, last_activity_at, suspended_at";

fn idempotency_check(
    tx: &Transaction<'_>,
    account: &str,
    operation: &str,
    token: Option<&str>,
    fingerprint: &str,
) -> Result<Idempotent, StoreError> {
    let Some(token) = token else {
        return Ok(Idempotent::New);
    };
    let found: Option<(String, String)> = tx
        .query_row(
            "SELECT fingerprint, resource FROM idempotency
             WHERE account_id = ?1 AND operation = ?2 AND client_token = ?3",
            params![account, operation, token],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .optional()?;
    Ok(match found {
        None => Idempotent::New,
        Some((stored, resource)) if stored == fingerprint => Idempotent::Replay(resource),
        Some(_) => Idempotent::Mismatch,
    })
}

fn idempotency_record(
    tx: &Transaction<'_>,
    account: &str,
    operation: &str,
    token: Option<&str>,
    fingerprint: &str,
    resource: &str,
) -> Result<(), StoreError> {
    if let Some(token) = token {
        tx.execute(
            "INSERT INTO idempotency (account_id, operation, client_token, fingerprint, resource, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![account, operation, token, fingerprint, resource, unix_now_ms()],
        )?;
    }
    Ok(())
}

/// Memory held by the account's non-terminated microVMs and running builds
/// (every VM a build holds: one per live stage).
fn memory_in_use(tx: &Transaction<'_>, account: &str) -> Result<u64, StoreError> {
    let vms: i64 = tx.query_row(
        "SELECT COALESCE(SUM(memory_mib), 0) FROM microvms
         WHERE account_id = ?1 AND state != 'TERMINATED'",
        params![account],
        |row| row.get(0),
    )?;
    let builds: i64 = tx.query_row(
        "SELECT COALESCE(SUM(v.memory_mib * MAX(b.live_vms, 1)), 0) FROM builds b
         JOIN image_versions v ON v.account_id = b.account_id
            AND v.image_name = b.image_name AND v.version = b.version
         WHERE b.account_id = ?1 AND b.state IN ('PENDING', 'IN_PROGRESS')",
        params![account],
        |row| row.get(0),
    )?;
    Ok((vms.max(0) + builds.max(0)) as u64)
}

/// A new image version to record (with its image when the name is new).
#[derive(Debug, Clone)]
pub struct NewVersion {
    pub account_id: String,
    pub image_name: String,
    pub spec: ImageSpec,
    pub memory_mib: u32,
    pub architecture: String,
    pub chipset: String,
    pub client_token: Option<String>,
    pub fingerprint: String,
    /// CreateMicrovmImage (the name must be new) or UpdateMicrovmImage (it must exist).
    pub create: bool,
    /// The stored request is whole (no build arguments): after a restart
    /// interrupts the build it runs again. Recorded with the build, so no
    /// crash can fall between the two.
    pub restartable: bool,
}

/// The version and build a [`NewVersion`] became.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartedVersion {
    pub version: u32,
    pub build_id: String,
    /// True when a clientToken replayed an earlier request.
    pub replayed: bool,
}

impl Store {
    // ---- images -------------------------------------------------------------

    /// An image that is not DELETED.
    pub fn image(&self, account: &str, name: &str) -> Result<Option<ImageRow>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                &format!(
                    "SELECT {IMAGE_COLS} FROM images
                     WHERE account_id = ?1 AND name = ?2 AND state != 'DELETED'"
                ),
                params![account, name],
                image_from_row,
            )
            .optional()?)
    }

    /// An image in any state, including DELETED (for idempotent deletes).
    pub fn image_any(&self, account: &str, name: &str) -> Result<Option<ImageRow>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                &format!("SELECT {IMAGE_COLS} FROM images WHERE account_id = ?1 AND name = ?2"),
                params![account, name],
                image_from_row,
            )
            .optional()?)
    }

    /// Images after `after` (by name), at most `limit`.
    pub fn images(
        &self,
        account: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<ImageRow>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {IMAGE_COLS} FROM images
             WHERE account_id = ?1 AND state != 'DELETED' AND name > ?2
             ORDER BY name LIMIT ?3"
        ))?;
        let rows = stmt.query_map(
            params![account, after.unwrap_or(""), limit as i64],
            image_from_row,
        )?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Records a new version (and its image, for a create) with one build,
    /// checking quotas and the clientToken, in one transaction.
    pub fn start_version(
        &self,
        new: &NewVersion,
        quotas: &Quotas,
    ) -> Result<Result<StartedVersion, Refusal>, StoreError> {
        let operation = if new.create {
            "CreateMicrovmImage"
        } else {
            "UpdateMicrovmImage"
        };
        let mut conn = self.conn();
        let tx = Store::write_transaction(&mut conn)?;
        match idempotency_check(
            &tx,
            &new.account_id,
            operation,
            new.client_token.as_deref(),
            &new.fingerprint,
        )? {
            Idempotent::New => {}
            Idempotent::Replay(resource) => {
                let (version, build_id) = resource
                    .split_once('/')
                    .and_then(|(v, b)| Some((v.parse().ok()?, b.to_string())))
                    .ok_or_else(|| StoreError::Corrupt("idempotency record".into()))?;
                return Ok(Ok(StartedVersion {
                    version,
                    build_id,
                    replayed: true,
                }));
            }
            Idempotent::Mismatch => {
                return Ok(Err(Refusal::Conflict(
                    "The clientToken was already used with different parameters".into(),
                )))
            }
        }
        let now = unix_now_ms();
        let existing: Option<ImageRow> = tx
            .query_row(
                &format!("SELECT {IMAGE_COLS} FROM images WHERE account_id = ?1 AND name = ?2"),
                params![new.account_id, new.image_name],
                image_from_row,
            )
            .optional()?;
        match (&existing, new.create) {
            (Some(image), true) if image.state != ImageState::Deleted => {
                return Ok(Err(Refusal::Conflict(format!(
                    "MicroVM image {} already exists",
                    new.image_name
                ))));
            }
            (None, false) => {
                return Ok(Err(Refusal::NotFound(format!(
                    "MicroVM image {} not found",
                    new.image_name
                ))))
            }
            (Some(image), false) if image.state == ImageState::Deleted => {
                return Ok(Err(Refusal::NotFound(format!(
                    "MicroVM image {} not found",
                    new.image_name
                ))))
            }
            (Some(image), false) if !image.state.can_become(ImageState::Updating) => {
                return Ok(Err(Refusal::Conflict(format!(
                    "MicroVM image {} is {}; try again when it settles",
                    new.image_name, image.state
                ))))
            }
            _ => {}
        }
        if new.create {
            let images: i64 = tx.query_row(
                "SELECT COUNT(*) FROM images WHERE account_id = ?1 AND state != 'DELETED'",
                params![new.account_id],
                |row| row.get(0),
            )?;
            if images >= i64::from(quotas.images) {
                return Ok(Err(Refusal::Quota(format!(
                    "This account already has {images} MicroVM images (quota {})",
                    quotas.images
                ))));
            }
            // A DELETED tombstone of the same name gives way to the new image.
            tx.execute(
                "DELETE FROM tags WHERE account_id = ?1 AND resource_arn LIKE ?2",
                params![
                    new.account_id,
                    format!("%:microvm-image:{}", new.image_name)
                ],
            )?;
            tx.execute(
                "DELETE FROM builds WHERE account_id = ?1 AND image_name = ?2",
                params![new.account_id, new.image_name],
            )?;
            tx.execute(
                "DELETE FROM image_versions WHERE account_id = ?1 AND image_name = ?2",
                params![new.account_id, new.image_name],
            )?;
            tx.execute(
                "DELETE FROM images WHERE account_id = ?1 AND name = ?2",
                params![new.account_id, new.image_name],
            )?;
            tx.execute(
                &format!(
                    "INSERT INTO images ({IMAGE_COLS}) VALUES (?1, ?2, ?3, NULL, NULL, ?4, ?4)"
                ),
                params![
                    new.account_id,
                    new.image_name,
                    ImageState::Creating.as_str(),
                    now
                ],
            )?;
        } else {
            tx.execute(
                "UPDATE images SET state = ?3, updated_at = ?4 WHERE account_id = ?1 AND name = ?2",
                params![
                    new.account_id,
                    new.image_name,
                    ImageState::Updating.as_str(),
                    now
                ],
            )?;
        }
        let live_versions: i64 = tx.query_row(
            "SELECT COUNT(*) FROM image_versions
             WHERE account_id = ?1 AND image_name = ?2 AND state != 'DELETED'",
            params![new.account_id, new.image_name],
            |row| row.get(0),
        )?;
        if live_versions >= i64::from(quotas.versions_per_image) {
            return Ok(Err(Refusal::Quota(format!(
                "MicroVM image {} already has {live_versions} versions (quota {})",
                new.image_name, quotas.versions_per_image
            ))));
        }
        let builds: i64 = tx.query_row(
            "SELECT COUNT(*) FROM builds WHERE account_id = ?1 AND state IN ('PENDING', 'IN_PROGRESS')",
            params![new.account_id],
            |row| row.get(0),
        )?;
        if builds >= i64::from(quotas.concurrent_builds) {
            return Ok(Err(Refusal::Quota(format!(
                "This account already runs {builds} image builds (quota {})",
                quotas.concurrent_builds
            ))));
        }
        if memory_in_use(&tx, &new.account_id)? + u64::from(new.memory_mib) > quotas.memory_mib {
            return Ok(Err(Refusal::Quota(format!(
                "The build needs {} MiB of memory beyond this account's quota of {} MiB",
                new.memory_mib, quotas.memory_mib
            ))));
        }
        let version: u32 = tx.query_row(
            "SELECT COALESCE(MAX(version), 0) + 1 FROM image_versions
             WHERE account_id = ?1 AND image_name = ?2",
            params![new.account_id, new.image_name],
            |row| row.get(0),
        )?;
        tx.execute(
            &format!(
                "INSERT INTO image_versions ({VERSION_COLS})
                 VALUES (?1, ?2, ?3, ?4, ?5, NULL, ?6, NULL, ?7, ?8, ?8)"
            ),
            params![
                new.account_id,
                new.image_name,
                version,
                VersionState::Pending.as_str(),
                VersionStatus::Active.as_str(),
                spec_text(&new.spec)?,
                new.memory_mib,
                now
            ],
        )?;
        let build_id = crate::db::ids::new_uuid();
        tx.execute(
            &format!(
                "INSERT INTO builds ({BUILD_COLS})
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, NULL, NULL, ?9)"
            ),
            params![
                build_id,
                new.account_id,
                new.image_name,
                version,
                BuildState::Pending.as_str(),
                new.architecture,
                new.chipset,
                "1",
                now
            ],
        )?;
        if new.restartable {
            tx.execute(
                "UPDATE builds SET restartable = 1 WHERE build_id = ?1",
                params![build_id],
            )?;
        }
        idempotency_record(
            &tx,
            &new.account_id,
            operation,
            new.client_token.as_deref(),
            &new.fingerprint,
            &format!("{version}/{build_id}"),
        )?;
        tx.commit()?;
        Ok(Ok(StartedVersion {
            version,
            build_id,
            replayed: false,
        }))
    }

    /// Lets a build run again after a restart interrupts it: its whole
    /// request is stored (it has no build arguments).
    pub fn allow_build_restart(&self, build_id: &str) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE builds SET restartable = 1 WHERE build_id = ?1",
            params![build_id],
        )?;
        Ok(())
    }

    /// Puts an interrupted restartable build (and its version) back to
    /// PENDING, to run again; false if it may not run again.
    pub fn requeue_build(&self, build_id: &str) -> Result<bool, StoreError> {
        let mut conn = self.conn();
        let tx = Store::write_transaction(&mut conn)?;
        let changed = tx.execute(
            "UPDATE builds SET state = 'PENDING', owner_pid = NULL, owner_start = NULL
             WHERE build_id = ?1 AND restartable = 1 AND state IN ('PENDING', 'IN_PROGRESS')",
            params![build_id],
        )?;
        if changed == 1 {
            tx.execute(
                "UPDATE image_versions SET state = 'PENDING', updated_at = ?2
                 WHERE state = 'IN_PROGRESS' AND (account_id, image_name, version) =
                   (SELECT account_id, image_name, version FROM builds WHERE build_id = ?1)",
                params![build_id, unix_now_ms()],
            )?;
        }
        tx.commit()?;
        Ok(changed == 1)
    }

    /// Marks a build IN_PROGRESS (and its version).
    pub fn build_started(&self, account: &str, build_id: &str) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = Store::write_transaction(&mut conn)?;
        let owner = ProcessIdentity::current();
        tx.execute(
            "UPDATE builds SET state = 'IN_PROGRESS', owner_pid = ?3, owner_start = ?4
             WHERE build_id = ?1 AND account_id = ?2 AND state = 'PENDING'",
            params![build_id, account, owner.pid, owner.start_ticks],
        )?;
        tx.execute(
            "UPDATE image_versions SET state = 'IN_PROGRESS', updated_at = ?3
             WHERE state = 'PENDING' AND (account_id, image_name, version) =
               (SELECT account_id, image_name, version FROM builds WHERE build_id = ?1 AND account_id = ?2)",
            params![build_id, account, unix_now_ms()],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Ends a build: its version SUCCESSFUL or FAILED, the image CREATED/UPDATED
    /// or *_FAILED with its latest versions.
    /// Records how many VMs a running build holds now (see `memory_in_use`).
    pub fn set_build_live_vms(&self, build_id: &str, count: usize) -> Result<(), StoreError> {
        let count = i64::try_from(count).unwrap_or(i64::MAX);
        self.conn().execute(
            "UPDATE builds SET live_vms = ?2 WHERE build_id = ?1",
            params![build_id, count],
        )?;
        Ok(())
    }

    pub fn finish_build(
        &self,
        account: &str,
        build_id: &str,
        outcome: Result<(PathBuf, SnapshotSizes), hearth_api::BuildFailure>,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = Store::write_transaction(&mut conn)?;
        let build: BuildRow = tx.query_row(
            &format!("SELECT {BUILD_COLS} FROM builds WHERE build_id = ?1 AND account_id = ?2"),
            params![build_id, account],
            build_from_row,
        )?;
        let image: ImageRow = tx.query_row(
            &format!("SELECT {IMAGE_COLS} FROM images WHERE account_id = ?1 AND name = ?2"),
            params![account, build.image_name],
            image_from_row,
        )?;
        let now = unix_now_ms();
        let creating = image.state == ImageState::Creating;
        match outcome {
            Ok((snapshot_dir, sizes)) => {
                tx.execute(
                    "UPDATE builds SET state = 'SUCCESSFUL', snapshot_build = ?2 WHERE build_id = ?1",
                    params![build_id, spec_text(&sizes)?],
                )?;
                tx.execute(
                    "UPDATE image_versions SET state = 'SUCCESSFUL', snapshot_dir = ?4, updated_at = ?5
                     WHERE account_id = ?1 AND image_name = ?2 AND version = ?3",
                    params![
                        account,
                        build.image_name,
                        build.version,
                        snapshot_dir.to_string_lossy(),
                        now
                    ],
                )?;
                let state = if creating {
                    ImageState::Created
                } else {
                    ImageState::Updated
                };
                tx.execute(
                    "UPDATE images SET state = ?3, latest_active_version = ?4, updated_at = ?5
                     WHERE account_id = ?1 AND name = ?2",
                    params![
                        account,
                        build.image_name,
                        state.as_str(),
                        build.version,
                        now
                    ],
                )?;
            }
            Err(reason) => {
                tx.execute(
                    "UPDATE builds SET state = 'FAILED', state_reason = ?2 WHERE build_id = ?1",
                    params![build_id, reason.to_string()],
                )?;
                tx.execute(
                    "UPDATE image_versions SET state = 'FAILED', updated_at = ?4
                     WHERE account_id = ?1 AND image_name = ?2 AND version = ?3",
                    params![account, build.image_name, build.version, now],
                )?;
                let state = if creating {
                    ImageState::CreateFailed
                } else {
                    ImageState::UpdateFailed
                };
                tx.execute(
                    "UPDATE images SET state = ?3, latest_failed_version = ?4, updated_at = ?5
                     WHERE account_id = ?1 AND name = ?2",
                    params![
                        account,
                        build.image_name,
                        state.as_str(),
                        build.version,
                        now
                    ],
                )?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// The process that runs a build.
    pub fn build_owner(&self, build_id: &str) -> Result<Option<ProcessIdentity>, StoreError> {
        let row: Option<(Option<u32>, Option<i64>)> = self
            .conn()
            .query_row(
                "SELECT owner_pid, owner_start FROM builds WHERE build_id = ?1",
                params![build_id],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .optional()?;
        Ok(row.and_then(|(pid, start)| {
            Some(ProcessIdentity {
                pid: pid?,
                start_ticks: start.and_then(|s| u64::try_from(s).ok()),
            })
        }))
    }

    /// Builds that are PENDING or IN_PROGRESS.
    pub fn unfinished_builds(&self) -> Result<Vec<BuildRow>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {BUILD_COLS} FROM builds WHERE state IN ('PENDING', 'IN_PROGRESS')"
        ))?;
        let rows = stmt.query_map([], build_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    // ---- versions -----------------------------------------------------------

    pub fn version(
        &self,
        account: &str,
        image: &str,
        version: u32,
    ) -> Result<Option<VersionRow>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                &format!(
                    "SELECT {VERSION_COLS} FROM image_versions
                     WHERE account_id = ?1 AND image_name = ?2 AND version = ?3 AND state != 'DELETED'"
                ),
                params![account, image, version],
                version_from_row,
            )
            .optional()?)
    }

    /// A version's state, DELETED included.
    pub fn version_state_any(
        &self,
        account: &str,
        image: &str,
        version: u32,
    ) -> Result<Option<VersionState>, StoreError> {
        let state: Option<String> = self
            .conn()
            .query_row(
                "SELECT state FROM image_versions
                 WHERE account_id = ?1 AND image_name = ?2 AND version = ?3",
                params![account, image, version],
                |row| row.get(0),
            )
            .optional()?;
        Ok(state.as_deref().and_then(VersionState::parse))
    }

    pub fn versions(
        &self,
        account: &str,
        image: &str,
        after: u32,
        limit: usize,
    ) -> Result<Vec<VersionRow>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {VERSION_COLS} FROM image_versions
             WHERE account_id = ?1 AND image_name = ?2 AND state != 'DELETED' AND version > ?3
             ORDER BY version LIMIT ?4"
        ))?;
        let rows = stmt.query_map(
            params![account, image, after, limit as i64],
            version_from_row,
        )?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The newest SUCCESSFUL, ACTIVE version of an image.
    pub fn latest_runnable_version(
        &self,
        account: &str,
        image: &str,
    ) -> Result<Option<VersionRow>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                &format!(
                    "SELECT {VERSION_COLS} FROM image_versions
                     WHERE account_id = ?1 AND image_name = ?2
                       AND state = 'SUCCESSFUL' AND status = 'ACTIVE'
                     ORDER BY version DESC LIMIT 1"
                ),
                params![account, image],
                version_from_row,
            )
            .optional()?)
    }

    pub fn set_version_status(
        &self,
        account: &str,
        image: &str,
        version: u32,
        status: VersionStatus,
    ) -> Result<bool, StoreError> {
        let changed = self.conn().execute(
            "UPDATE image_versions SET status = ?4, updated_at = ?5
             WHERE account_id = ?1 AND image_name = ?2 AND version = ?3 AND state != 'DELETED'",
            params![account, image, version, status.as_str(), unix_now_ms()],
        )?;
        Ok(changed == 1)
    }

    /// Non-terminated microVMs running from a version (or any version: None).
    pub fn microvms_using(
        &self,
        account: &str,
        image: &str,
        version: Option<u32>,
    ) -> Result<u32, StoreError> {
        Ok(self.conn().query_row(
            "SELECT COUNT(*) FROM microvms
             WHERE account_id = ?1 AND image_name = ?2 AND state != 'TERMINATED'
               AND (?3 IS NULL OR image_version = ?3)",
            params![account, image, version],
            |row| row.get(0),
        )?)
    }

    /// Compare-and-set of a version's state.
    pub fn set_version_state(
        &self,
        account: &str,
        image: &str,
        version: u32,
        from: VersionState,
        to: VersionState,
    ) -> Result<bool, StoreError> {
        if !from.can_become(to) {
            return Ok(false);
        }
        let changed = self.conn().execute(
            "UPDATE image_versions SET state = ?5, updated_at = ?6
             WHERE account_id = ?1 AND image_name = ?2 AND version = ?3 AND state = ?4",
            params![
                account,
                image,
                version,
                from.as_str(),
                to.as_str(),
                unix_now_ms()
            ],
        )?;
        Ok(changed == 1)
    }

    /// Recomputes an image's latest active/failed versions after a delete.
    pub fn refresh_image_latest(&self, account: &str, image: &str) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE images SET
               latest_active_version = (SELECT MAX(version) FROM image_versions
                 WHERE account_id = ?1 AND image_name = ?2 AND state = 'SUCCESSFUL'),
               latest_failed_version = (SELECT MAX(version) FROM image_versions
                 WHERE account_id = ?1 AND image_name = ?2 AND state = 'FAILED'),
               updated_at = ?3
             WHERE account_id = ?1 AND name = ?2",
            params![account, image, unix_now_ms()],
        )?;
        Ok(())
    }

    /// Compare-and-set of an image's state.
    pub fn set_image_state(
        &self,
        account: &str,
        image: &str,
        from: ImageState,
        to: ImageState,
    ) -> Result<bool, StoreError> {
        if !from.can_become(to) {
            return Ok(false);
        }
        let changed = self.conn().execute(
            "UPDATE images SET state = ?4, updated_at = ?5
             WHERE account_id = ?1 AND name = ?2 AND state = ?3",
            params![account, image, from.as_str(), to.as_str(), unix_now_ms()],
        )?;
        Ok(changed == 1)
    }

    // ---- builds -------------------------------------------------------------

    pub fn build(&self, account: &str, build_id: &str) -> Result<Option<BuildRow>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                &format!("SELECT {BUILD_COLS} FROM builds WHERE build_id = ?1 AND account_id = ?2"),
                params![build_id, account],
                build_from_row,
            )
            .optional()?)
    }

    pub fn builds(
        &self,
        account: &str,
        image: &str,
        version: u32,
    ) -> Result<Vec<BuildRow>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {BUILD_COLS} FROM builds
             WHERE account_id = ?1 AND image_name = ?2 AND version = ?3 ORDER BY build_id"
        ))?;
        let rows = stmt.query_map(params![account, image, version], build_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    // ---- microVMs -----------------------------------------------------------

    /// Records a new PENDING microVM, checking the clientToken and the memory
    /// quota in the same transaction. Returns the id of the microVM the token
    /// already made when it replays.
    pub fn insert_microvm(
        &self,
        row: &MicrovmRow,
        client_token: Option<&str>,
        fingerprint: &str,
        quotas: &Quotas,
    ) -> Result<Result<Option<String>, Refusal>, StoreError> {
        let mut conn = self.conn();
        let tx = Store::write_transaction(&mut conn)?;
        match idempotency_check(
            &tx,
            &row.account_id,
            "RunMicrovm",
            client_token,
            fingerprint,
        )? {
            Idempotent::New => {}
            Idempotent::Replay(id) => return Ok(Ok(Some(id))),
            Idempotent::Mismatch => {
                return Ok(Err(Refusal::Conflict(
                    "The clientToken was already used with different parameters".into(),
                )))
            }
        }
        let used = memory_in_use(&tx, &row.account_id)?;
        if used + u64::from(row.memory_mib) > quotas.memory_mib {
            return Ok(Err(Refusal::Quota(format!(
                "Running this MicroVM needs {} MiB; {used} MiB of this account's {} MiB memory quota are in use",
                row.memory_mib, quotas.memory_mib
            ))));
        }
        tx.execute(
            &format!(
                "INSERT INTO microvms ({MICROVM_COLS})
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)"
            ),
            params![
                row.microvm_id,
                row.account_id,
                row.image_name,
                row.image_version,
                row.state.as_str(),
                row.state_reason,
                spec_text(&row.spec)?,
                row.memory_mib,
                row.vm_name,
                row.started_at,
                row.terminated_at,
                row.deadline_at,
                row.last_activity_at,
                row.suspended_at
            ],
        )?;
        idempotency_record(
            &tx,
            &row.account_id,
            "RunMicrovm",
            client_token,
            fingerprint,
            &row.microvm_id,
        )?;
        tx.commit()?;
        Ok(Ok(None))
    }

    pub fn microvm(&self, account: &str, id: &str) -> Result<Option<MicrovmRow>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                &format!(
                    "SELECT {MICROVM_COLS} FROM microvms WHERE microvm_id = ?1 AND account_id = ?2"
                ),
                params![id, account],
                microvm_from_row,
            )
            .optional()?)
    }

    /// A microVM by id, whatever its account (for the engine's own tasks).
    pub fn microvm_by_id(&self, id: &str) -> Result<Option<MicrovmRow>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                &format!("SELECT {MICROVM_COLS} FROM microvms WHERE microvm_id = ?1"),
                params![id],
                microvm_from_row,
            )
            .optional()?)
    }

    pub fn microvms(
        &self,
        account: &str,
        image: Option<(&str, Option<u32>)>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<MicrovmRow>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {MICROVM_COLS} FROM microvms
             WHERE account_id = ?1 AND microvm_id > ?2
               AND (?3 IS NULL OR image_name = ?3)
               AND (?4 IS NULL OR image_version = ?4)
             ORDER BY microvm_id LIMIT ?5"
        ))?;
        let (name, version) = match image {
            Some((name, version)) => (Some(name), version),
            None => (None, None),
        };
        let rows = stmt.query_map(
            params![account, after.unwrap_or(""), name, version, limit as i64],
            microvm_from_row,
        )?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// How many microVMs are in each state, across accounts.
    pub fn microvm_counts(&self) -> Result<Vec<(String, i64)>, StoreError> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare("SELECT state, COUNT(*) FROM microvms GROUP BY state ORDER BY state")?;
        let rows = stmt.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Every microVM that is not TERMINATED, across accounts.
    pub fn live_microvms(&self) -> Result<Vec<MicrovmRow>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {MICROVM_COLS} FROM microvms WHERE state != 'TERMINATED' ORDER BY microvm_id"
        ))?;
        let rows = stmt.query_map([], microvm_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The versions microVMs were started from since `since_ms` (unix ms), as
    /// (account, image, version, memory MiB): the demand warm pools follow.
    pub fn recent_launches(
        &self,
        since_ms: i64,
    ) -> Result<Vec<(String, String, u32, u32)>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT account_id, image_name, image_version, MAX(memory_mib) FROM microvms
             WHERE started_at >= ?1 GROUP BY account_id, image_name, image_version",
        )?;
        let rows = stmt.query_map(params![since_ms], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Compare-and-set of a microVM's state: moves it to `to` only from one of
    /// `from` (and only along a valid transition). TERMINATED sets `terminatedAt`.
    pub fn transition_microvm(
        &self,
        id: &str,
        from: &[MicrovmState],
        to: MicrovmState,
        reason: Option<&str>,
    ) -> Result<Option<MicrovmState>, StoreError> {
        self.transition_microvm_metered(id, from, to, reason, &[])
    }

    /// [`Self::transition_microvm`], adding `usage` (a snapshot read or
    /// write the change made) in the same transaction: both or neither.
    pub fn transition_microvm_metered(
        &self,
        id: &str,
        from: &[MicrovmState],
        to: MicrovmState,
        reason: Option<&str>,
        usage: &[crate::db::usage::Increment],
    ) -> Result<Option<MicrovmState>, StoreError> {
        let mut conn = self.conn();
        let conn = Store::write_transaction(&mut conn)?;
        let current: Option<String> = conn
            .query_row(
                "SELECT state FROM microvms WHERE microvm_id = ?1",
                params![id],
                |row| row.get(0),
            )
            .optional()?;
        let Some(current) = current.as_deref().and_then(MicrovmState::parse) else {
            return Ok(None);
        };
        if !from.contains(&current) || !current.can_become(to) {
            return Ok(None);
        }
        let now = unix_now_ms();
        let terminated_at = (to == MicrovmState::Terminated).then_some(now);
        let suspended_at = (to == MicrovmState::Suspended).then_some(now);
        // Running again (launch or resume) counts as activity for the idle timer.
        let active_at = (to == MicrovmState::Running).then_some(now);
        // What the usage meter bills the baseline between.
        let runs = |state| matches!(state, MicrovmState::Running | MicrovmState::Suspending);
        let running_at = (!runs(current) && runs(to)).then_some(now);
        let stopped_running_at = (runs(current) && !runs(to)).then_some(now);
        let changed = conn.execute(
            "UPDATE microvms SET state = ?3,
                state_reason = COALESCE(?4, state_reason),
                terminated_at = COALESCE(?5, terminated_at),
                suspended_at = COALESCE(?6, suspended_at),
                last_activity_at = COALESCE(?7, last_activity_at),
                running_at = COALESCE(?8, running_at),
                stopped_running_at = COALESCE(?9, stopped_running_at)
             WHERE microvm_id = ?1 AND state = ?2",
            params![
                id,
                current.as_str(),
                to.as_str(),
                reason,
                terminated_at,
                suspended_at,
                active_at,
                running_at,
                stopped_running_at
            ],
        )?;
        if changed == 1 {
            crate::db::usage::add(&conn, usage)?;
        }
        conn.commit()?;
        Ok((changed == 1).then_some(current))
    }

    /// Records endpoint activity (idle policy); a newer time only.
    pub fn note_activity(&self, id: &str, at_ms: i64) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE microvms SET last_activity_at = ?2
             WHERE microvm_id = ?1 AND (last_activity_at IS NULL OR last_activity_at < ?2)",
            params![id, at_ms],
        )?;
        Ok(())
    }

    /// Sets a state without the transition check: only for reconciliation
    /// after a restart, which undoes or finishes interrupted steps.
    /// SUSPENDED sets `suspended_at` as a transition does (a later PENDING is
    /// then known for a resume, and the idle timer counts from it).
    pub fn force_microvm_state(&self, id: &str, to: MicrovmState) -> Result<(), StoreError> {
        let suspended_at = (to == MicrovmState::Suspended).then(unix_now_ms);
        self.conn().execute(
            "UPDATE microvms SET state = ?2, suspended_at = COALESCE(?3, suspended_at)
             WHERE microvm_id = ?1 AND state != 'TERMINATED'",
            params![id, to.as_str(), suspended_at],
        )?;
        Ok(())
    }

    // ---- tags ---------------------------------------------------------------

    pub fn tags(
        &self,
        account: &str,
        arn: &str,
    ) -> Result<std::collections::BTreeMap<String, String>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT key, value FROM tags WHERE account_id = ?1 AND resource_arn = ?2 ORDER BY key",
        )?;
        let rows = stmt.query_map(params![account, arn], |row| Ok((row.get(0)?, row.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Adds or replaces tags, keeping at most `max` per resource.
    pub fn tag(
        &self,
        account: &str,
        arn: &str,
        tags: &[(String, String)],
        max: usize,
    ) -> Result<Result<(), Refusal>, StoreError> {
        let mut conn = self.conn();
        let tx = Store::write_transaction(&mut conn)?;
        for (key, value) in tags {
            tx.execute(
                "INSERT INTO tags (account_id, resource_arn, key, value) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (account_id, resource_arn, key) DO UPDATE SET value = excluded.value",
                params![account, arn, key, value],
            )?;
        }
        let count: i64 = tx.query_row(
            "SELECT COUNT(*) FROM tags WHERE account_id = ?1 AND resource_arn = ?2",
            params![account, arn],
            |row| row.get(0),
        )?;
        if count as usize > max {
            return Ok(Err(Refusal::Quota(format!(
                "A resource can have at most {max} tags"
            ))));
        }
        tx.commit()?;
        Ok(Ok(()))
    }

    pub fn untag(&self, account: &str, arn: &str, keys: &[String]) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = Store::write_transaction(&mut conn)?;
        for key in keys {
            tx.execute(
                "DELETE FROM tags WHERE account_id = ?1 AND resource_arn = ?2 AND key = ?3",
                params![account, arn, key],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    pub fn drop_tags(&self, account: &str, arn: &str) -> Result<(), StoreError> {
        self.conn().execute(
            "DELETE FROM tags WHERE account_id = ?1 AND resource_arn = ?2",
            params![account, arn],
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::spec::{HookCall, RuntimeHook};

    /// A spec as a server before the typed specs stored it (members in key
    /// order, as serde_json's maps print them).
    const LEGACY_VERSION_SPEC: &str = r#"{"baseImageArn":"arn:aws:lambda:us-east-1:aws:microvm-image:debian-12","buildRoleArn":"arn:aws:iam::123456789012:role/b","codeArtifact":{"uri":"s3://b/app.zip"},"cpuConfigurations":[{"architecture":"X86_64"}],"egressNetworkConnectors":["arn:aws:lambda:us-east-1:aws:network-connector:aws-network-connector:INTERNET_EGRESS"],"environmentVariables":{"A":"1"},"hooks":{"microvmHooks":{"run":"ENABLED"},"microvmImageHooks":{"ready":"ENABLED"},"port":8080},"resources":[{"minimumMemoryInMiB":512}]}"#;
    const LEGACY_MICROVM_SPEC: &str = r#"{"hooks":{"microvmHooks":{"run":"ENABLED"},"microvmImageHooks":{"ready":"ENABLED"},"port":8080},"idlePolicy":{"autoResumeEnabled":true,"maxIdleDurationSeconds":60,"suspendedDurationSeconds":30},"ingressNetworkConnectors":["arn:aws:lambda:us-east-1:aws:network-connector:aws-network-connector:HTTP_INGRESS"],"maximumDurationInSeconds":600,"runHookPayload":"p"}"#;

    fn version(store: &Store, account: &str, spec: ImageSpec) -> StartedVersion {
        store
            .start_version(
                &NewVersion {
                    account_id: account.into(),
                    image_name: "web".into(),
                    memory_mib: spec.memory_mib(),
                    spec,
                    architecture: "X86_64".into(),
                    chipset: "INTEL".into(),
                    client_token: None,
                    fingerprint: String::new(),
                    create: true,
                    restartable: false,
                },
                &Quotas::default(),
            )
            .expect("store")
            .expect("recorded")
    }

    fn microvm(account: &str, spec: MicrovmSpec) -> MicrovmRow {
        MicrovmRow {
            microvm_id: "microvm-1".into(),
            account_id: account.into(),
            image_name: "web".into(),
            image_version: 1,
            state: MicrovmState::Pending,
            state_reason: None,
            spec,
            memory_mib: 512,
            vm_name: "mv-1".into(),
            started_at: 1,
            terminated_at: None,
            deadline_at: 2,
            last_activity_at: None,
            suspended_at: None,
        }
    }

    #[test]
    fn a_build_owner_is_its_process_not_just_its_pid() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let account = store.create_account("a").expect("account").account_id;
        let spec: ImageSpec = serde_json::from_str(LEGACY_VERSION_SPEC).expect("parse");
        let started = version(&store, &account, spec);
        store
            .build_started(&account, &started.build_id)
            .expect("started");
        let owner = store
            .build_owner(&started.build_id)
            .expect("query")
            .expect("owner");
        assert_eq!(owner, ProcessIdentity::current());
        assert!(owner.is_alive());
        // The same pid with another start time: a later process that reused
        // the pid (a restarted server), not the owner.
        store
            .conn()
            .execute(
                "UPDATE builds SET owner_start = owner_start + 1 WHERE build_id = ?1",
                params![started.build_id],
            )
            .expect("update");
        let stale = store
            .build_owner(&started.build_id)
            .expect("query")
            .expect("owner");
        assert_eq!(stale.pid, std::process::id());
        assert!(!stale.is_alive());
        assert!(!ProcessIdentity {
            pid: u32::MAX - 1,
            start_ticks: None
        }
        .is_alive());
    }

    #[test]
    fn a_full_disk_is_told_apart_from_other_database_failures() {
        let full = StoreError::Query(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL),
            None,
        ));
        assert!(full.is_disk_full());
        let busy = StoreError::Query(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
            None,
        ));
        assert!(!busy.is_disk_full());
        assert!(!StoreError::BadAccountName.is_disk_full());
    }

    #[test]
    fn only_a_build_whose_whole_request_is_stored_is_requeued() {
        let (_dir, store, account) = store();
        let spec: ImageSpec = serde_json::from_str(LEGACY_VERSION_SPEC).expect("parse");
        let whole = version(&store, &account, spec.clone());
        store.allow_build_restart(&whole.build_id).expect("allow");
        store
            .build_started(&account, &whole.build_id)
            .expect("started");
        assert!(store.requeue_build(&whole.build_id).expect("requeue"));
        let build = store
            .build(&account, &whole.build_id)
            .expect("query")
            .expect("build");
        assert_eq!(build.state, BuildState::Pending);
        assert_eq!(store.build_owner(&whole.build_id).expect("owner"), None);
        let version = store
            .version(&account, "web", whole.version)
            .expect("query")
            .expect("version");
        assert_eq!(version.state, VersionState::Pending);
        // Runs again: PENDING -> IN_PROGRESS as the first time.
        store
            .build_started(&account, &whole.build_id)
            .expect("started");
        assert!(store.build_owner(&whole.build_id).expect("owner").is_some());

        // Build arguments (never stored): not requeued; nor a finished build.
        let quota = Quotas {
            concurrent_builds: 10,
            ..Quotas::default()
        };
        let partial = store
            .start_version(
                &NewVersion {
                    account_id: account.clone(),
                    image_name: "other".into(),
                    memory_mib: spec.memory_mib(),
                    spec: spec.clone(),
                    architecture: "X86_64".into(),
                    chipset: "INTEL".into(),
                    client_token: None,
                    fingerprint: String::new(),
                    create: true,
                    restartable: false,
                },
                &quota,
            )
            .expect("store")
            .expect("recorded");
        store
            .build_started(&account, &partial.build_id)
            .expect("started");
        assert!(!store.requeue_build(&partial.build_id).expect("requeue"));
        // Marked restartable with the version itself (no separate step a
        // crash could fall before).
        let recorded = store
            .start_version(
                &NewVersion {
                    account_id: account.clone(),
                    image_name: "third".into(),
                    memory_mib: spec.memory_mib(),
                    spec,
                    architecture: "X86_64".into(),
                    chipset: "INTEL".into(),
                    client_token: None,
                    fingerprint: String::new(),
                    create: true,
                    restartable: true,
                },
                &quota,
            )
            .expect("store")
            .expect("recorded");
        store
            .build_started(&account, &recorded.build_id)
            .expect("started");
        assert!(store.requeue_build(&recorded.build_id).expect("requeue"));
        let sizes = SnapshotSizes {
            memory_snapshot_size_in_bytes: 1,
            disk_snapshot_size_in_bytes: 1,
            code_install_size_in_bytes: 0,
        };
        store
            .finish_build(&account, &whole.build_id, Ok((PathBuf::from("/s"), sizes)))
            .expect("finish");
        assert!(!store.requeue_build(&whole.build_id).expect("requeue"));
    }

    #[test]
    fn rows_keep_typed_specs_and_read_legacy_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let account = store.create_account("a").expect("account").account_id;

        let legacy: ImageSpec = serde_json::from_str(LEGACY_VERSION_SPEC).expect("parse");
        let started = version(&store, &account, legacy.clone());
        let read = store
            .version(&account, "web", started.version)
            .expect("query")
            .expect("row");
        assert_eq!(read.spec, legacy);
        // A row as the untyped server wrote it reads the same.
        store
            .conn()
            .execute(
                "UPDATE image_versions SET spec = ?1",
                params![LEGACY_VERSION_SPEC],
            )
            .expect("update");
        let read = store
            .version(&account, "web", started.version)
            .expect("query")
            .expect("row");
        assert_eq!(read.spec, legacy);
        assert!(read.spec.internet_egress());
        assert_eq!(read.memory_mib, 512);

        let spec: MicrovmSpec = serde_json::from_str(LEGACY_MICROVM_SPEC).expect("parse");
        let row = microvm(&account, spec.clone());
        store
            .insert_microvm(&row, None, "", &Quotas::default())
            .expect("store")
            .expect("inserted");
        store
            .conn()
            .execute(
                "UPDATE microvms SET spec = ?1",
                params![LEGACY_MICROVM_SPEC],
            )
            .expect("update");
        let read = store
            .microvm(&account, "microvm-1")
            .expect("query")
            .expect("row");
        assert_eq!(read, row);
        assert_eq!(
            read.spec.hook(RuntimeHook::Run),
            Some(HookCall {
                name: "run",
                port: 8080,
                timeout: std::time::Duration::from_secs(1)
            })
        );
        assert_eq!(
            read.spec.idle_policy.map(|p| p.suspended_ms()),
            Some(30_000)
        );
    }

    #[test]
    fn an_unreadable_spec_is_an_error_not_a_default() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let account = store.create_account("a").expect("account").account_id;
        store
            .insert_microvm(
                &microvm(&account, MicrovmSpec::default()),
                None,
                "",
                &Quotas::default(),
            )
            .expect("store")
            .expect("inserted");
        store
            .conn()
            .execute(
                "UPDATE microvms SET spec = '{\"maximumDurationInSeconds\": \"soon\"}'",
                [],
            )
            .expect("update");
        assert!(store.microvm(&account, "microvm-1").is_err());
    }

    fn store() -> (tempfile::TempDir, Store, String) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let account = store.create_account("a").expect("account").account_id;
        (dir, store, account)
    }

    fn numbered(account: &str, n: u32, memory_mib: u32) -> MicrovmRow {
        MicrovmRow {
            microvm_id: format!("microvm-{n:03}"),
            vm_name: format!("mv-{n}"),
            memory_mib,
            ..microvm(account, MicrovmSpec::default())
        }
    }

    fn quota(memory_mib: u64) -> Quotas {
        Quotas {
            memory_mib,
            ..Quotas::default()
        }
    }

    #[test]
    fn the_memory_quota_counts_live_microvms_only() {
        let (_dir, store, account) = store();
        let quotas = quota(1024);
        for n in 0..2 {
            store
                .insert_microvm(&numbered(&account, n, 512), None, "", &quotas)
                .expect("store")
                .expect("within the quota");
        }
        let refused = store
            .insert_microvm(&numbered(&account, 2, 512), None, "", &quotas)
            .expect("store");
        assert!(matches!(refused, Err(Refusal::Quota(_))), "{refused:?}");
        assert!(store
            .microvm(&account, "microvm-002")
            .expect("query")
            .is_none());
        // A terminated microVM's memory is free again.
        store
            .force_microvm_state("microvm-000", MicrovmState::Terminating)
            .expect("force");
        store
            .transition_microvm(
                "microvm-000",
                &[MicrovmState::Terminating],
                MicrovmState::Terminated,
                None,
            )
            .expect("cas");
        store
            .insert_microvm(&numbered(&account, 2, 512), None, "", &quotas)
            .expect("store")
            .expect("room again");
        // Another account has its own quota.
        let other = store.create_account("b").expect("account").account_id;
        store
            .insert_microvm(&numbered(&other, 3, 1024), None, "", &quotas)
            .expect("store")
            .expect("own quota");
    }

    #[test]
    fn every_live_vm_of_a_build_counts_against_the_memory_quota() {
        let (_dir, store, account) = store();
        // The legacy spec asks for 512 MiB.
        let spec: ImageSpec = serde_json::from_str(LEGACY_VERSION_SPEC).expect("parse");
        let started = version(&store, &account, spec);
        let quotas = quota(1536);
        // The build's one VM and one microVM fit.
        store
            .insert_microvm(&numbered(&account, 0, 512), None, "", &quotas)
            .expect("store")
            .expect("within the quota");
        // A second stage VM of the build takes the rest.
        store
            .set_build_live_vms(&started.build_id, 2)
            .expect("record");
        let refused = store
            .insert_microvm(&numbered(&account, 1, 512), None, "", &quotas)
            .expect("store");
        assert!(matches!(refused, Err(Refusal::Quota(_))), "{refused:?}");
        store
            .set_build_live_vms(&started.build_id, 1)
            .expect("record");
        store
            .insert_microvm(&numbered(&account, 1, 512), None, "", &quotas)
            .expect("store")
            .expect("room again");
    }

    #[test]
    fn racing_inserts_on_two_connections_never_exceed_the_quota() {
        let (dir, store, account) = store();
        let second = Store::open(dir.path()).expect("second connection");
        let quotas = quota(512);
        let handles: Vec<_> = [store.clone(), second]
            .into_iter()
            .enumerate()
            .map(|(n, store)| {
                let account = account.clone();
                std::thread::spawn(move || {
                    let row = numbered(&account, n as u32, 512);
                    matches!(store.insert_microvm(&row, None, "", &quotas), Ok(Ok(None)))
                })
            })
            .collect();
        let inserted = handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .filter(|ok| *ok)
            .count();
        assert_eq!(inserted, 1, "one fits, the other is refused or fails");
        assert_eq!(
            store
                .microvms(&account, None, None, 10)
                .expect("list")
                .len(),
            1
        );
    }

    #[test]
    fn a_client_token_replays_the_same_request_and_refuses_another() {
        let (_dir, store, account) = store();
        let quotas = Quotas::default();
        let first = numbered(&account, 1, 256);
        assert_eq!(
            store
                .insert_microvm(&first, Some("t"), "fp-1", &quotas)
                .expect("store"),
            Ok(None)
        );
        // Same token, same parameters: the microVM the token made.
        let again = numbered(&account, 2, 256);
        assert_eq!(
            store
                .insert_microvm(&again, Some("t"), "fp-1", &quotas)
                .expect("store"),
            Ok(Some("microvm-001".to_string()))
        );
        assert!(store
            .microvm(&account, "microvm-002")
            .expect("query")
            .is_none());
        // Same token, other parameters: a conflict.
        let refused = store
            .insert_microvm(&again, Some("t"), "fp-2", &quotas)
            .expect("store");
        assert!(matches!(refused, Err(Refusal::Conflict(_))), "{refused:?}");
        // Tokens are per account.
        let other = store.create_account("b").expect("account").account_id;
        assert_eq!(
            store
                .insert_microvm(&numbered(&other, 3, 256), Some("t"), "fp-2", &quotas)
                .expect("store"),
            Ok(None)
        );
    }

    #[test]
    fn a_state_change_happens_only_from_an_expected_state() {
        let (_dir, store, account) = store();
        store
            .insert_microvm(&numbered(&account, 1, 256), None, "", &Quotas::default())
            .expect("store")
            .expect("inserted");
        let id = "microvm-001";
        let cas = |from: &[MicrovmState], to| store.transition_microvm(id, from, to, None);
        // Not from an expected state: nothing changes.
        assert_eq!(
            cas(&[MicrovmState::Running], MicrovmState::Suspending).expect("cas"),
            None
        );
        // An expected state but not a valid transition (PENDING -> SUSPENDED).
        assert_eq!(
            cas(&[MicrovmState::Pending], MicrovmState::Suspended).expect("cas"),
            None
        );
        assert_eq!(
            cas(&[MicrovmState::Pending], MicrovmState::Running).expect("cas"),
            Some(MicrovmState::Pending)
        );
        assert_eq!(
            cas(&[MicrovmState::Running], MicrovmState::Suspending).expect("cas"),
            Some(MicrovmState::Running)
        );
        assert_eq!(
            cas(&[MicrovmState::Suspending], MicrovmState::Suspended).expect("cas"),
            Some(MicrovmState::Suspending)
        );
        let row = store.microvm(&account, id).expect("query").expect("row");
        assert_eq!(row.state, MicrovmState::Suspended);
        assert!(row.suspended_at.is_some() && row.last_activity_at.is_some());
        assert!(row.terminated_at.is_none());
        assert_eq!(
            store
                .transition_microvm(
                    "microvm-404",
                    &[MicrovmState::Pending],
                    MicrovmState::Running,
                    None
                )
                .expect("cas"),
            None
        );
    }

    #[test]
    fn of_racing_state_changes_exactly_one_wins() {
        let (dir, store, account) = store();
        store
            .insert_microvm(&numbered(&account, 1, 256), None, "", &Quotas::default())
            .expect("store")
            .expect("inserted");
        store
            .force_microvm_state("microvm-001", MicrovmState::Running)
            .expect("force");
        // Suspends and terminates at once, over two connections.
        let second = Store::open(dir.path()).expect("second connection");
        let handles: Vec<_> = (0..8)
            .map(|n| {
                let store = if n % 2 == 0 {
                    store.clone()
                } else {
                    second.clone()
                };
                let to = if n % 3 == 0 {
                    MicrovmState::Terminating
                } else {
                    MicrovmState::Suspending
                };
                std::thread::spawn(move || {
                    store
                        .transition_microvm("microvm-001", &[MicrovmState::Running], to, None)
                        .expect("cas")
                        .map(|_| to)
                })
            })
            .collect();
        let winners: Vec<MicrovmState> = handles
            .into_iter()
            .filter_map(|h| h.join().expect("thread"))
            .collect();
        assert_eq!(winners.len(), 1, "{winners:?}");
        let row = store
            .microvm(&account, "microvm-001")
            .expect("query")
            .expect("row");
        assert_eq!(row.state, winners[0]);
    }

    #[test]
    fn a_terminated_microvm_keeps_its_reason_and_is_never_revived() {
        let (_dir, store, account) = store();
        store
            .insert_microvm(&numbered(&account, 1, 256), None, "", &Quotas::default())
            .expect("store")
            .expect("inserted");
        let id = "microvm-001";
        store
            .transition_microvm(
                id,
                &[MicrovmState::Pending],
                MicrovmState::Terminating,
                Some("why"),
            )
            .expect("cas");
        store
            .transition_microvm(
                id,
                &[MicrovmState::Terminating],
                MicrovmState::Terminated,
                None,
            )
            .expect("cas");
        store
            .force_microvm_state(id, MicrovmState::Running)
            .expect("force");
        let row = store.microvm(&account, id).expect("query").expect("row");
        assert_eq!(row.state, MicrovmState::Terminated);
        assert_eq!(row.state_reason.as_deref(), Some("why"));
        assert!(row.terminated_at.is_some());
        assert!(store.live_microvms().expect("live").is_empty());
    }

    #[test]
    fn activity_only_moves_forward() {
        let (_dir, store, account) = store();
        store
            .insert_microvm(&numbered(&account, 1, 256), None, "", &Quotas::default())
            .expect("store")
            .expect("inserted");
        store.note_activity("microvm-001", 500).expect("note");
        store.note_activity("microvm-001", 300).expect("note");
        let row = store
            .microvm(&account, "microvm-001")
            .expect("query")
            .expect("row");
        assert_eq!(row.last_activity_at, Some(500));
    }

    #[test]
    fn microvms_page_in_id_order_within_the_account_and_image() {
        let (_dir, store, account) = store();
        let other = store.create_account("b").expect("account").account_id;
        for n in 0..7 {
            let mut row = numbered(&account, n, 64);
            if n % 2 == 1 {
                row.image_name = "api".into();
                row.image_version = 2;
            }
            store
                .insert_microvm(&row, None, "", &Quotas::default())
                .expect("store")
                .expect("inserted");
        }
        store
            .insert_microvm(&numbered(&other, 9, 64), None, "", &Quotas::default())
            .expect("store")
            .expect("inserted");
        let mut seen = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = store
                .microvms(&account, None, after.as_deref(), 3)
                .expect("page");
            assert!(page.len() <= 3);
            let Some(last) = page.last() else { break };
            after = Some(last.microvm_id.clone());
            seen.extend(page.into_iter().map(|row| row.microvm_id));
        }
        let expected: Vec<String> = (0..7).map(|n| format!("microvm-{n:03}")).collect();
        assert_eq!(seen, expected, "every row once, in order, none of b's");
        let api = store
            .microvms(&account, Some(("api", None)), None, 10)
            .expect("filter");
        assert_eq!(api.len(), 3);
        assert!(store
            .microvms(&account, Some(("api", Some(1))), None, 10)
            .expect("filter")
            .is_empty());
        assert_eq!(
            store
                .microvms(&account, Some(("web", Some(1))), Some("microvm-002"), 10)
                .expect("filter")
                .iter()
                .map(|row| row.microvm_id.as_str())
                .collect::<Vec<_>>(),
            vec!["microvm-004", "microvm-006"]
        );
    }

    #[test]
    fn snapshot_sizes_are_stored_as_the_wire_writes_them() {
        const STORED: &str = r#"{"memorySnapshotSizeInBytes":1,"diskSnapshotSizeInBytes":2,"codeInstallSizeInBytes":3}"#;
        let sizes = SnapshotSizes {
            memory_snapshot_size_in_bytes: 1,
            disk_snapshot_size_in_bytes: 2,
            code_install_size_in_bytes: 3,
        };
        assert_eq!(spec_text(&sizes).expect("encode"), STORED);
        let read: SnapshotSizes = serde_json::from_str(STORED).expect("decode");
        assert_eq!(read, sizes);
    }
}

/// A process as the owner of a build: its pid and its start time in clock
/// ticks since boot (`/proc/PID/stat` field 22). The pair names one process:
/// a later process that gets the same pid (a restarted server in a container
/// often does) has another start time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessIdentity {
    pub pid: u32,
    /// None for builds recorded before start times were (their pid alone).
    pub start_ticks: Option<u64>,
}

impl ProcessIdentity {
    pub fn current() -> Self {
        let pid = std::process::id();
        Self {
            pid,
            start_ticks: process_start_ticks(pid),
        }
    }

    /// True while this very process runs.
    pub fn is_alive(&self) -> bool {
        match (self.start_ticks, process_start_ticks(self.pid)) {
            (_, None) => false,
            (Some(recorded), Some(now)) => recorded == now,
            (None, Some(_)) => true,
        }
    }
}

/// Field 22 of `/proc/PID/stat`, read after the parenthesised command name
/// (which may itself hold spaces and parentheses).
fn process_start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(") ")?;
    // `rest` starts at field 3 (state); field 22 is the 20th of these.
    rest.split_whitespace().nth(19)?.parse().ok()
}

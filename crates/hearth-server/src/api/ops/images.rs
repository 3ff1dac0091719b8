//! Images, versions and builds of the caller's account.

use hearth_api::ApiError;
use serde_json::{json, Value};

use super::capacity_refusal;
use super::input::{
    connectors, fingerprint, image_name, image_not_found, internal, parse_version, string,
    timestamp, version_text, Caller, EGRESS,
};
use super::page::{keyset_page, paginate};
use crate::api::state::AppState;
use crate::arn::{Arn, MANAGED_ACCOUNT};
use crate::db::records::{BuildRow, ImageRow, NewVersion, Refusal, VersionRow};
use crate::db::resources::{ImageState, VersionState, VersionStatus};
use crate::db::spec::{CpuConfiguration, ImageSpec, Resources};
use crate::images::build::{BuildJob, BUILD_ARGS_MEMBER};
use crate::layout;
use crate::vms::capacity::Start;

fn version_not_found(identifier: &str, version: &str) -> ApiError {
    ApiError::not_found(format!(
        "Version {version} of MicroVM image {identifier} not found"
    ))
}

fn load_image(state: &AppState, caller: &Caller, identifier: &str) -> Result<ImageRow, ApiError> {
    let name = image_name(caller, identifier)?;
    state
        .store
        .image(&caller.account_id, &name)
        .map_err(internal)?
        .ok_or_else(|| image_not_found(identifier))
}

fn load_version(
    state: &AppState,
    caller: &Caller,
    input: &Value,
) -> Result<(ImageRow, VersionRow), ApiError> {
    let identifier = string(input, "imageIdentifier").unwrap_or_default();
    let version_text = string(input, "imageVersion").unwrap_or_default();
    let image = load_image(state, caller, identifier)?;
    let version = parse_version(version_text)
        .map(|v| state.store.version(&caller.account_id, &image.name, v))
        .transpose()
        .map_err(internal)?
        .flatten()
        .ok_or_else(|| version_not_found(identifier, version_text))?;
    Ok((image, version))
}

fn image_output(caller: &Caller, image: &ImageRow) -> Value {
    let mut out = json!({
        "imageArn": Arn::image(&caller.region, &image.account_id, &image.name),
        "name": image.name,
        "state": image.state.as_str(),
        "createdAt": timestamp(image.created_at),
    });
    if let Some(v) = image.latest_active_version {
        out["latestActiveImageVersion"] = json!(version_text(v));
    }
    if let Some(v) = image.latest_failed_version {
        out["latestFailedImageVersion"] = json!(version_text(v));
    }
    if let Some(updated) = image.updated_at {
        out["updatedAt"] = timestamp(updated);
    }
    out
}

/// Adds the members of a build request frozen into a version (its spec's
/// wire form), which the API echoes.
fn add_spec(out: &mut Value, spec: &ImageSpec) {
    if let (Some(out), Ok(Value::Object(members))) =
        (out.as_object_mut(), serde_json::to_value(spec))
    {
        out.extend(members);
    }
}

pub(crate) fn version_output(caller: &Caller, version: &VersionRow) -> Value {
    let mut out = json!({
        "imageArn": Arn::image(&caller.region, &version.account_id, &version.image_name),
        "imageVersion": version_text(version.version),
        "state": version.state.as_str(),
        "status": version.status.as_str(),
        "createdAt": timestamp(version.created_at),
    });
    add_spec(&mut out, &version.spec);
    if let Some(updated) = version.updated_at {
        out["updatedAt"] = timestamp(updated);
    }
    if let Some(reason) = &version.state_reason {
        out["stateReason"] = json!(reason);
    }
    out
}

fn build_output(caller: &Caller, build: &BuildRow) -> Value {
    let mut out = json!({
        "imageArn": Arn::image(&caller.region, &build.account_id, &build.image_name),
        "imageVersion": version_text(build.version),
        "buildId": build.build_id,
        "buildState": build.state.as_str(),
        "architecture": build.architecture,
        "chipset": build.chipset,
        "chipsetGeneration": build.chipset_generation,
        "createdAt": timestamp(build.created_at),
    });
    if let Some(reason) = &build.state_reason {
        out["stateReason"] = json!(reason);
    }
    out
}

pub(super) fn get_image(
    state: &AppState,
    caller: &Caller,
    input: &Value,
) -> Result<Value, ApiError> {
    let image = load_image(
        state,
        caller,
        string(input, "imageIdentifier").unwrap_or_default(),
    )?;
    let mut out = image_output(caller, &image);
    let arn = Arn::image(&caller.region, &caller.account_id, &image.name).to_string();
    add_tags(state, caller, &arn, &mut out)?;
    Ok(out)
}

/// Adds the resource's tags to an output, when it has any.
fn add_tags(state: &AppState, caller: &Caller, arn: &str, out: &mut Value) -> Result<(), ApiError> {
    let tags = state
        .store
        .tags(&caller.account_id, arn)
        .map_err(internal)?;
    if !tags.is_empty() {
        out["tags"] = json!(tags);
    }
    Ok(())
}

pub(super) fn list_images(
    state: &AppState,
    caller: &Caller,
    input: &Value,
) -> Result<Value, ApiError> {
    let filter = string(input, "nameFilter").map(str::to_string);
    keyset_page(
        input,
        50,
        |after, limit| {
            // The filter applies before the page is cut, so pages are never
            // emptied by it (the reference cuts first; both satisfy paginators).
            let mut rows = Vec::new();
            let mut after = after.map(str::to_string);
            loop {
                let batch = state
                    .store
                    .images(&caller.account_id, after.as_deref(), 200)?;
                let done = batch.len() < 200;
                after = batch.last().map(|r| r.name.clone());
                rows.extend(
                    batch
                        .into_iter()
                        .filter(|image| filter.as_deref().is_none_or(|f| image.name.contains(f))),
                );
                if done || rows.len() >= limit {
                    break;
                }
            }
            rows.truncate(limit);
            Ok(rows)
        },
        |image| image.name.clone(),
        |image| image_output(caller, image),
    )
}

pub(super) fn delete_image(
    state: &AppState,
    caller: &Caller,
    input: &Value,
) -> Result<Value, ApiError> {
    let identifier = string(input, "imageIdentifier").unwrap_or_default();
    let name = image_name(caller, identifier)?;
    let store = &state.store;
    let image = store
        .image_any(&caller.account_id, &name)
        .map_err(internal)?
        .ok_or_else(|| image_not_found(identifier))?;
    let reply = |state: ImageState| json!({"imageIdentifier": identifier, "state": state.as_str()});
    if image.state == ImageState::Deleted {
        return Ok(reply(ImageState::Deleted));
    }
    if image.state.is_busy() {
        return Err(ApiError::conflict(format!(
            "MicroVM image {identifier} is {}; try again when it settles",
            image.state
        )));
    }
    let in_use = store
        .microvms_using(&caller.account_id, &name, None)
        .map_err(internal)?;
    if in_use > 0 {
        return Err(ApiError::conflict(format!(
            "MicroVM image {identifier} is in use by {in_use} MicroVMs; terminate them first"
        )));
    }
    if !store
        .set_image_state(&caller.account_id, &name, image.state, ImageState::Deleting)
        .map_err(internal)?
    {
        return Err(ApiError::conflict(format!(
            "MicroVM image {identifier} changed meanwhile; try again"
        )));
    }
    let mut after = 0;
    loop {
        let versions = store
            .versions(&caller.account_id, &name, after, 100)
            .map_err(internal)?;
        let Some(last) = versions.last() else { break };
        after = last.version;
        for version in versions {
            remove_version_files(state, &version);
            let _ = store.set_version_state(
                &caller.account_id,
                &name,
                version.version,
                version.state,
                VersionState::Deleting,
            );
            let _ = store.set_version_state(
                &caller.account_id,
                &name,
                version.version,
                VersionState::Deleting,
                VersionState::Deleted,
            );
        }
    }
    let arn = Arn::image(&caller.region, &caller.account_id, &name).to_string();
    store
        .drop_tags(&caller.account_id, &arn)
        .map_err(internal)?;
    store
        .set_image_state(
            &caller.account_id,
            &name,
            ImageState::Deleting,
            ImageState::Deleted,
        )
        .map_err(internal)?;
    Ok(reply(ImageState::Deleted))
}

fn remove_version_files(state: &AppState, version: &VersionRow) {
    let dir = layout::version_dir(
        &state.config.data_dir,
        &version.account_id,
        &version.image_name,
        version.version,
    );
    if let Err(err) = make_writable_and_remove(&dir) {
        tracing::warn!(dir = %dir.display(), error = %err, "cannot remove version files");
    }
    state.engine.forget_snapshot(&layout::snapshot_dir(&dir));
    if let Some(snapshot) = &version.snapshot_dir {
        state.engine.drain_pool(snapshot);
    }
}

/// Snapshot files are read-only (0400) and their directories 0700; the owner
/// can still unlink them, so a plain recursive remove works.
fn make_writable_and_remove(dir: &std::path::Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

pub(super) fn get_version(
    state: &AppState,
    caller: &Caller,
    input: &Value,
) -> Result<Value, ApiError> {
    let (_, version) = load_version(state, caller, input)?;
    Ok(version_output(caller, &version))
}

pub(super) fn list_versions(
    state: &AppState,
    caller: &Caller,
    input: &Value,
) -> Result<Value, ApiError> {
    let image = load_image(
        state,
        caller,
        string(input, "imageIdentifier").unwrap_or_default(),
    )?;
    keyset_page(
        input,
        50,
        |after, limit| {
            let after = after.and_then(|a| a.parse().ok()).unwrap_or(0);
            state
                .store
                .versions(&caller.account_id, &image.name, after, limit)
        },
        |version| version.version.to_string(),
        |version| version_output(caller, version),
    )
}

pub(super) fn update_version(
    state: &AppState,
    caller: &Caller,
    input: &Value,
) -> Result<Value, ApiError> {
    let (image, version) = load_version(state, caller, input)?;
    let status = string(input, "status")
        .and_then(VersionStatus::parse)
        .ok_or_else(|| ApiError::validation("status must be ACTIVE or INACTIVE"))?;
    state
        .store
        .set_version_status(&caller.account_id, &image.name, version.version, status)
        .map_err(internal)?;
    if status == VersionStatus::Inactive {
        // No new microVM runs from it: its warm pool goes.
        if let Some(dir) = &version.snapshot_dir {
            state.engine.drain_pool(dir);
        }
    }
    let updated = state
        .store
        .version(&caller.account_id, &image.name, version.version)
        .map_err(internal)?
        .ok_or_else(|| version_not_found(&image.name, &version_text(version.version)))?;
    Ok(version_output(caller, &updated))
}

pub(super) fn delete_version(
    state: &AppState,
    caller: &Caller,
    input: &Value,
) -> Result<Value, ApiError> {
    let identifier = string(input, "imageIdentifier").unwrap_or_default();
    let version_arg = string(input, "imageVersion").unwrap_or_default();
    let image = load_image(state, caller, identifier)?;
    let store = &state.store;
    let reply = |state: VersionState| json!({"imageIdentifier": identifier, "imageVersion": version_arg, "state": state.as_str()});
    let Some(number) = parse_version(version_arg) else {
        return Err(version_not_found(identifier, version_arg));
    };
    let Some(version) = store
        .version(&caller.account_id, &image.name, number)
        .map_err(internal)?
    else {
        // Deleting a deleted version again is a no-op; a never-made one is 404.
        let deleted = store
            .version_state_any(&caller.account_id, &image.name, number)
            .map_err(internal)?
            == Some(VersionState::Deleted);
        return if deleted {
            Ok(reply(VersionState::Deleted))
        } else {
            Err(version_not_found(identifier, version_arg))
        };
    };
    if !matches!(
        version.state,
        VersionState::Successful | VersionState::Failed | VersionState::DeleteFailed
    ) || image.state.is_busy()
    {
        return Err(ApiError::conflict(format!(
            "Version {version_arg} of MicroVM image {identifier} is {}; try again when it settles",
            version.state
        )));
    }
    let live = store
        .versions(&caller.account_id, &image.name, 0, 10_000)
        .map_err(internal)?;
    if live.len() <= 1 {
        return Err(ApiError::conflict(
            "The last version of an image cannot be deleted; delete the image instead",
        ));
    }
    let in_use = store
        .microvms_using(&caller.account_id, &image.name, Some(number))
        .map_err(internal)?;
    if in_use > 0 {
        return Err(ApiError::conflict(format!(
            "Version {version_arg} is in use by {in_use} MicroVMs; terminate them first"
        )));
    }
    if !store
        .set_version_state(
            &caller.account_id,
            &image.name,
            number,
            version.state,
            VersionState::Deleting,
        )
        .map_err(internal)?
    {
        return Err(ApiError::conflict(
            "The version changed meanwhile; try again",
        ));
    }
    remove_version_files(state, &version);
    store
        .set_version_state(
            &caller.account_id,
            &image.name,
            number,
            VersionState::Deleting,
            VersionState::Deleted,
        )
        .map_err(internal)?;
    store
        .refresh_image_latest(&caller.account_id, &image.name)
        .map_err(internal)?;
    Ok(reply(VersionState::Deleted))
}

pub(super) fn get_build(
    state: &AppState,
    caller: &Caller,
    input: &Value,
) -> Result<Value, ApiError> {
    let (image, version) = load_version(state, caller, input)?;
    let build_id = string(input, "buildId").unwrap_or_default();
    let build = state
        .store
        .build(&caller.account_id, build_id)
        .map_err(internal)?
        .filter(|b| b.image_name == image.name && b.version == version.version)
        .ok_or_else(|| ApiError::not_found(format!("Build {build_id} not found")))?;
    let mut out = build_output(caller, &build);
    if let Some(sizes) = &build.snapshot_build {
        out["snapshotBuild"] = json!(sizes);
    }
    Ok(out)
}

pub(super) fn list_builds(
    state: &AppState,
    caller: &Caller,
    input: &Value,
) -> Result<Value, ApiError> {
    let (image, version) = load_version(state, caller, input)?;
    let builds = state
        .store
        .builds(&caller.account_id, &image.name, version.version)
        .map_err(internal)?;
    let wanted = |member: &str, value: &str| string(input, member).is_none_or(|w| w == value);
    let rows = builds
        .iter()
        .filter(|b| {
            wanted("architecture", &b.architecture)
                && wanted("chipset", &b.chipset)
                && wanted("chipsetGeneration", &b.chipset_generation)
        })
        .map(|b| (b.build_id.clone(), build_output(caller, b)))
        .collect();
    paginate(rows, input, 50)
}

/// The version a build request asks for, read once from the validated input,
/// after the checks the model cannot make: the base image, connectors,
/// architecture, memory and hooks.
fn build_spec(state: &AppState, caller: &Caller, input: &Value) -> Result<ImageSpec, ApiError> {
    // Connectors first: their messages name the ARN that is wrong.
    connectors(caller, input, "egressNetworkConnectors", EGRESS, "egress")?;
    let mut spec: ImageSpec = serde_json::from_value(input.clone())
        .map_err(|e| ApiError::validation(format!("Invalid build request: {e}")))?;
    let base = &spec.base_image_arn;
    // `base_image` refuses names that are not plain image names.
    let managed = Arn::parse(base)
        .and_then(|arn| {
            arn.image_of(&caller.region, MANAGED_ACCOUNT)
                .map(str::to_string)
        })
        .is_some_and(|name| state.assets.base_image(&name).is_ok());
    if !managed {
        return Err(ApiError::validation(format!(
            "baseImageArn {base} is not a managed MicroVM image in {} (see ListManagedMicrovmImages)",
            caller.region
        )));
    }
    if let Some(version) = &spec.base_image_version {
        if parse_version(version).is_none() && version.parse::<u32>().is_err() {
            return Err(ApiError::validation(format!(
                "baseImageVersion {version} is not a version"
            )));
        }
    }
    for cpu in spec.cpu_configurations.iter().flatten() {
        if cpu.architecture != "X86_64" {
            return Err(ApiError::validation(format!(
                "Architecture {} is not supported by this host (X86_64 only)",
                cpu.architecture
            )));
        }
    }
    let memory = spec.memory_mib();
    if state.config.sizes.get(memory).is_none() {
        return Err(ApiError::validation(format!(
            "Invalid minimumMemoryInMiB value {memory}. Valid values: {}.",
            state.config.sizes.accepted()
        )));
    }
    if let Some(hooks) = &spec.hooks {
        hooks
            .check()
            .map_err(|e| ApiError::validation(e.to_string()))?;
    }
    spec.cpu_configurations.get_or_insert_with(|| {
        vec![CpuConfiguration {
            architecture: "X86_64".into(),
        }]
    });
    spec.resources.get_or_insert_with(|| {
        vec![Resources {
            minimum_memory_in_mib: memory,
        }]
    });
    Ok(spec)
}

/// CreateMicrovmImage (`create`) and UpdateMicrovmImage: record the version
/// and its build, start the build, answer at once (state CREATING/UPDATING).
pub(super) fn create_or_update(
    state: &AppState,
    caller: &Caller,
    input: &Value,
    create: bool,
) -> Result<Value, ApiError> {
    let name = if create {
        string(input, "name").unwrap_or_default().to_string()
    } else {
        image_name(caller, string(input, "imageIdentifier").unwrap_or_default())?
    };
    let spec = build_spec(state, caller, input)?;
    let memory_mib = spec.memory_mib();
    // The build boots VMs of the image's memory, one at a time, each with a
    // RAM file; the host must hold one at its full size.
    let admission = format!("build {} {name}", caller.account_id);
    state
        .capacity
        .admit(
            &admission,
            state.capacity.demand(memory_mib, Start::WithRamFile),
        )
        .map_err(|err| capacity_refusal(err, false))?;
    let started = state
        .store
        .start_version(
            &NewVersion {
                account_id: caller.account_id.clone(),
                image_name: name.clone(),
                spec: spec.clone(),
                memory_mib,
                architecture: "X86_64".into(),
                chipset: "INTEL".into(),
                client_token: string(input, "clientToken").map(str::to_string),
                fingerprint: fingerprint(input),
                create,
                // After a crash the build runs again from its stored request,
                // which holds everything but build arguments.
                restartable: input
                    .get(BUILD_ARGS_MEMBER)
                    .and_then(Value::as_object)
                    .is_none_or(|args| args.is_empty()),
            },
            &state.config.quotas,
        )
        .map_err(|err| {
            state.capacity.release(&admission);
            internal(err)
        })?;
    if !matches!(&started, Ok(s) if !s.replayed) {
        state.capacity.release(&admission);
    }
    let started = match started {
        Ok(started) => started,
        Err(Refusal::Quota(m)) => return Err(ApiError::quota_exceeded(m)),
        Err(Refusal::Conflict(m)) => return Err(ApiError::conflict(m)),
        Err(Refusal::NotFound(m)) => {
            return Err(ApiError::not_found(m));
        }
    };
    let arn = Arn::image(&caller.region, &caller.account_id, &name).to_string();
    if create && !started.replayed {
        if let Some(tags) = input.get("tags").and_then(Value::as_object) {
            let tags: Vec<(String, String)> = tags
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect();
            if let Err(refusal) = state
                .store
                .tag(&caller.account_id, &arn, &tags, 50)
                .map_err(internal)?
            {
                tracing::warn!(?refusal, "tags of a new image refused");
            }
        }
    }
    if !started.replayed {
        state.builds.spawn(BuildJob {
            account_id: caller.account_id.clone(),
            image_name: name.clone(),
            version: started.version,
            build_id: started.build_id.clone(),
            spec: spec.clone(),
            memory_mib,
            build_args: input
                .get(BUILD_ARGS_MEMBER)
                .and_then(Value::as_object)
                .map(|args| {
                    args.iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                        .collect()
                })
                .unwrap_or_default(),
            restarted: false,
        });
    }
    let image = state
        .store
        .image(&caller.account_id, &name)
        .map_err(internal)?
        .ok_or_else(|| image_not_found(&name))?;
    let version = state
        .store
        .version(&caller.account_id, &name, started.version)
        .map_err(internal)?
        .ok_or_else(|| image_not_found(&name))?;
    let mut out = image_output(caller, &image);
    add_spec(&mut out, &version.spec);
    out["imageVersion"] = json!(version_text(started.version));
    if out.get("updatedAt").is_none() {
        out["updatedAt"] = timestamp(image.created_at);
    }
    if create {
        add_tags(state, caller, &arn, &mut out)?;
    }
    Ok(out)
}

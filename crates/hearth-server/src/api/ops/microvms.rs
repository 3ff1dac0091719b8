//! MicroVMs: RunMicrovm, GetMicrovm, ListMicrovms, SuspendMicrovm,
//! ResumeMicrovm, TerminateMicrovm. Handlers move the record with a
//! compare-and-set and leave the VM work to the engine's tasks; they answer at
//! once with the state the record is in.

use hearth_api::ApiError;
use serde::Deserialize;
use serde_json::{json, Value};

use super::capacity_refusal;
use super::input::{
    connectors, fingerprint, image_name, image_not_found, internal, parse_version, string,
    timestamp, version_text, Caller, EGRESS, INGRESS,
};
use super::page::keyset_page;
use crate::api::state::AppState;
use crate::arn::Arn;
use crate::db::records::{MicrovmRow, Refusal};
use crate::db::resources::{MicrovmState, VersionState, VersionStatus};
use crate::db::spec::{IdlePolicy, Logging, MicrovmSpec};
use crate::db::store::{unix_now, unix_now_ms};
use crate::endpoint::tokens::{Claims, PortRule, TokenKind};
use crate::vms::capacity::Start;

/// The members of RunMicrovm's input a microVM keeps as they are.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RunOptions {
    maximum_duration_in_seconds: Option<u64>,
    execution_role_arn: Option<String>,
    idle_policy: Option<IdlePolicy>,
    logging: Option<Logging>,
    run_hook_payload: Option<String>,
}

fn microvm_not_found(identifier: &str) -> ApiError {
    ApiError::not_found(format!("MicroVM {identifier} not found"))
}

/// The caller's microVM named by an id or ARN, or a 404 that does not say
/// whether it exists in another account.
fn load(state: &AppState, caller: &Caller, input: &Value) -> Result<MicrovmRow, ApiError> {
    let identifier = string(input, "microvmIdentifier").unwrap_or_default();
    let arn = Arn::parse(identifier);
    let id = arn
        .as_ref()
        .and_then(|arn| arn.microvm_of(&caller.region, &caller.account_id))
        .unwrap_or(identifier);
    if !id.starts_with("microvm-") {
        return Err(microvm_not_found(identifier));
    }
    state
        .store
        .microvm(&caller.account_id, id)
        .map_err(internal)?
        .ok_or_else(|| microvm_not_found(identifier))
}

fn endpoint(state: &AppState, row: &MicrovmRow) -> String {
    match state.config.endpoint_port {
        Some(port) if port != 80 && port != 443 => {
            format!("{}.{}:{port}", row.microvm_id, state.config.endpoint_domain)
        }
        _ => format!("{}.{}", row.microvm_id, state.config.endpoint_domain),
    }
}

/// GetMicrovm's and RunMicrovm's shape.
fn output(state: &AppState, caller: &Caller, row: &MicrovmRow) -> Value {
    let spec = &row.spec;
    let mut out = json!({
        "microvmId": row.microvm_id,
        "state": row.state.as_str(),
        "endpoint": endpoint(state, row),
        "imageArn": Arn::image(&caller.region, &row.account_id, &row.image_name),
        "imageVersion": version_text(row.image_version),
        "maximumDurationInSeconds": spec.maximum_duration_in_seconds,
        "startedAt": timestamp(row.started_at),
        "ingressNetworkConnectors": spec.ingress_network_connectors,
    });
    if let Some(arn) = &spec.execution_role_arn {
        out["executionRoleArn"] = json!(arn);
    }
    if let Some(policy) = &spec.idle_policy {
        out["idlePolicy"] = json!(policy);
    }
    if let Some(egress) = &spec.egress_network_connectors {
        out["egressNetworkConnectors"] = json!(egress);
    }
    if let Some(at) = row.terminated_at {
        out["terminatedAt"] = timestamp(at);
    }
    if let Some(reason) = &row.state_reason {
        out["stateReason"] = json!(reason);
    }
    out
}

pub(super) fn run(state: &AppState, caller: &Caller, input: &Value) -> Result<Value, ApiError> {
    let identifier = string(input, "imageIdentifier").unwrap_or_default();
    let name = image_name(caller, identifier)?;
    let store = &state.store;
    store
        .image(&caller.account_id, &name)
        .map_err(internal)?
        .ok_or_else(|| image_not_found(identifier))?;
    let no_active = || {
        ApiError::not_found(format!(
            "No active version found for MicroVM image {identifier}"
        ))
    };
    let version = match string(input, "imageVersion") {
        Some(text) => {
            let number = parse_version(text).ok_or_else(no_active)?;
            store
                .version(&caller.account_id, &name, number)
                .map_err(internal)?
                .filter(|v| {
                    v.state == VersionState::Successful && v.status == VersionStatus::Active
                })
                .ok_or_else(no_active)?
        }
        None => store
            .latest_runnable_version(&caller.account_id, &name)
            .map_err(internal)?
            .ok_or_else(no_active)?,
    };
    let snapshot_dir = version.snapshot_dir.clone().ok_or_else(no_active)?;

    let ingress = connectors(
        caller,
        input,
        "ingressNetworkConnectors",
        INGRESS,
        "ingress",
    )?;
    let egress = connectors(caller, input, "egressNetworkConnectors", EGRESS, "egress")?;
    if egress.as_ref().is_some_and(|e| e.len() > 1) {
        return Err(ApiError::validation(
            "At most one egress network connector can be given",
        ));
    }
    let options: RunOptions = serde_json::from_value(input.clone())
        .map_err(|e| ApiError::validation(format!("Invalid request: {e}")))?;
    let max_duration = options
        .maximum_duration_in_seconds
        .unwrap_or(state.config.max_lifetime_secs);
    if max_duration > state.config.max_lifetime_secs {
        return Err(ApiError::validation(format!(
            "maximumDurationInSeconds must be at most {}",
            state.config.max_lifetime_secs
        )));
    }
    let spec = MicrovmSpec {
        maximum_duration_in_seconds: max_duration,
        ingress_network_connectors: ingress
            .unwrap_or_else(|| vec![Arn::connector(&caller.region, "HTTP_INGRESS")]),
        egress_network_connectors: egress,
        execution_role_arn: options.execution_role_arn,
        idle_policy: options.idle_policy,
        logging: options.logging,
        run_hook_payload: options.run_hook_payload,
        // The image's hooks, frozen into the microVM (not echoed by the API).
        hooks: version.spec.hooks.clone(),
    };

    let (microvm_id, vm_name) = crate::db::ids::new_microvm_ids();
    let now = unix_now_ms();
    let row = MicrovmRow {
        microvm_id,
        account_id: caller.account_id.clone(),
        image_name: name,
        image_version: version.version,
        state: MicrovmState::Pending,
        state_reason: None,
        spec,
        memory_mib: version.memory_mib,
        vm_name,
        started_at: now,
        terminated_at: None,
        deadline_at: now.saturating_add((max_duration as i64).saturating_mul(1000)),
        last_activity_at: Some(now),
        suspended_at: None,
    };
    // The host must hold this microVM at its full size (its snapshot's RAM is
    // mapped copy-on-write: host memory, no RAM file).
    state
        .capacity
        .admit(
            &row.vm_name,
            state.capacity.demand(row.memory_mib, Start::Launch),
        )
        .map_err(|err| capacity_refusal(err, true))?;
    let inserted = store
        .insert_microvm(
            &row,
            string(input, "clientToken"),
            &fingerprint(input),
            &state.config.quotas,
        )
        .map_err(|err| {
            state.capacity.release(&row.vm_name);
            internal(err)
        })?;
    if !matches!(inserted, Ok(None)) {
        state.capacity.release(&row.vm_name);
    }
    match inserted {
        Ok(None) => {
            state.engine.spawn_launch(row.clone(), snapshot_dir);
            Ok(output(state, caller, &row))
        }
        // The same clientToken and request: the microVM it made, as it is now.
        Ok(Some(existing)) => {
            let row = store
                .microvm(&caller.account_id, &existing)
                .map_err(internal)?
                .ok_or_else(|| microvm_not_found(&existing))?;
            Ok(output(state, caller, &row))
        }
        Err(Refusal::Quota(message)) => Err(ApiError::quota_exceeded(message)),
        Err(Refusal::Conflict(message)) => Err(ApiError::conflict(message)),
        Err(Refusal::NotFound(message)) => Err(ApiError::not_found(message)),
    }
}

pub(super) fn get(state: &AppState, caller: &Caller, input: &Value) -> Result<Value, ApiError> {
    let row = load(state, caller, input)?;
    Ok(output(state, caller, &row))
}

pub(super) fn list(state: &AppState, caller: &Caller, input: &Value) -> Result<Value, ApiError> {
    let image = match string(input, "imageIdentifier") {
        Some(identifier) => {
            let name = image_name(caller, identifier)?;
            let version =
                match string(input, "imageVersion") {
                    Some(text) => Some(parse_version(text).ok_or_else(|| {
                        ApiError::validation(format!("Invalid imageVersion {text}"))
                    })?),
                    None => None,
                };
            Some((name, version))
        }
        None if input.get("imageVersion").is_some() => {
            return Err(ApiError::validation(
                "imageVersion requires imageIdentifier",
            ))
        }
        None => None,
    };
    keyset_page(
        input,
        50,
        |after, limit| {
            state.store.microvms(
                &caller.account_id,
                image.as_ref().map(|(n, v)| (n.as_str(), *v)),
                after,
                limit,
            )
        },
        |row| row.microvm_id.clone(),
        |row| {
            json!({
                "microvmId": row.microvm_id,
                "state": row.state.as_str(),
                "imageArn": Arn::image(&caller.region, &row.account_id, &row.image_name),
                "imageVersion": version_text(row.image_version),
                "startedAt": timestamp(row.started_at),
            })
        },
    )
}

fn wrong_state(row: &MicrovmRow, action: &str) -> ApiError {
    ApiError::conflict(format!(
        "MicroVM {} is {}; it cannot be {action}",
        row.microvm_id, row.state
    ))
}

pub(super) fn suspend(state: &AppState, caller: &Caller, input: &Value) -> Result<Value, ApiError> {
    let row = load(state, caller, input)?;
    match row.state {
        // As the reference: suspending a suspended microVM succeeds.
        MicrovmState::Suspending | MicrovmState::Suspended => Ok(json!({})),
        MicrovmState::Running => {
            let moved = state
                .store
                .transition_microvm(
                    &row.microvm_id,
                    &[MicrovmState::Running],
                    MicrovmState::Suspending,
                    None,
                )
                .map_err(internal)?;
            if moved.is_none() {
                return Err(ApiError::conflict(format!(
                    "MicroVM {} changed state meanwhile; try again",
                    row.microvm_id
                )));
            }
            // Its admission, if no admission saw it running, is done with.
            state.capacity.release(&row.vm_name);
            state.engine.spawn_suspend(row);
            Ok(json!({}))
        }
        _ => Err(wrong_state(&row, "suspended")),
    }
}

pub(super) fn resume(state: &AppState, caller: &Caller, input: &Value) -> Result<Value, ApiError> {
    let row = load(state, caller, input)?;
    match row.state {
        // As the reference: resuming a running microVM succeeds.
        MicrovmState::Running | MicrovmState::Pending => Ok(json!({})),
        MicrovmState::Suspended => {
            // A resumed VM's RAM lives in a RAM file that grows to its full size.
            state
                .capacity
                .admit(
                    &row.vm_name,
                    state.capacity.demand(row.memory_mib, Start::WithRamFile),
                )
                .map_err(|err| capacity_refusal(err, false))?;
            let moved = state
                .store
                .transition_microvm(
                    &row.microvm_id,
                    &[MicrovmState::Suspended],
                    MicrovmState::Pending,
                    None,
                )
                .map_err(internal)?;
            if moved.is_none() {
                state.capacity.release(&row.vm_name);
                return Err(ApiError::conflict(format!(
                    "MicroVM {} changed state meanwhile; try again",
                    row.microvm_id
                )));
            }
            state.engine.spawn_resume(row);
            Ok(json!({}))
        }
        _ => Err(wrong_state(&row, "resumed")),
    }
}

pub(super) fn terminate(
    state: &AppState,
    caller: &Caller,
    input: &Value,
) -> Result<Value, ApiError> {
    let row = load(state, caller, input)?;
    if matches!(
        row.state,
        MicrovmState::Terminating | MicrovmState::Terminated
    ) {
        return Ok(json!({}));
    }
    let moved = state
        .store
        .transition_microvm(
            &row.microvm_id,
            &[
                MicrovmState::Pending,
                MicrovmState::Running,
                MicrovmState::Suspending,
                MicrovmState::Suspended,
            ],
            MicrovmState::Terminating,
            None,
        )
        .map_err(internal)?;
    if moved.is_some() {
        // An admission counts a VM until one sees it running; one that ends
        // sooner (a short job) must not hold host capacity for the grace.
        state.capacity.release(&row.vm_name);
        state.engine.spawn_terminate(row, "Success.".into());
    }
    // Not moved: another request terminated it meanwhile, which is the same.
    Ok(json!({}))
}

/// Longest token lifetime (minutes), as the reference.
const MAX_TOKEN_MINUTES: u64 = 60;

fn token_expiry(input: &Value) -> Result<u64, ApiError> {
    let minutes = input["expirationInMinutes"].as_u64().unwrap_or(0);
    if !(1..=MAX_TOKEN_MINUTES).contains(&minutes) {
        return Err(ApiError::validation(format!(
            "expirationInMinutes must be between 1 and {MAX_TOKEN_MINUTES}"
        )));
    }
    Ok(minutes * 60)
}

/// A token can be minted for a microVM that has not ended.
fn tokenable(state: &AppState, caller: &Caller, input: &Value) -> Result<MicrovmRow, ApiError> {
    let row = load(state, caller, input)?;
    if matches!(
        row.state,
        MicrovmState::Terminating | MicrovmState::Terminated
    ) {
        return Err(wrong_state(&row, "given a token"));
    }
    Ok(row)
}

fn mint(
    state: &AppState,
    row: &MicrovmRow,
    kind: TokenKind,
    ports: Vec<PortRule>,
    lifetime_secs: u64,
) -> Value {
    let now = unix_now().max(0) as u64;
    let token = state.tokens.mint(Claims {
        kid: String::new(),
        kind,
        account: row.account_id.clone(),
        microvm: row.microvm_id.clone(),
        ports,
        issued_at: now,
        expires_at: now + lifetime_secs,
    });
    json!({ "authToken": { "X-aws-proxy-auth": token } })
}

pub(super) fn auth_token(
    state: &AppState,
    caller: &Caller,
    input: &Value,
) -> Result<Value, ApiError> {
    let lifetime = token_expiry(input)?;
    let specs = input["allowedPorts"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if specs.is_empty() {
        return Err(ApiError::validation(
            "allowedPorts must name at least one port",
        ));
    }
    let mut ports = Vec::new();
    for spec in &specs {
        let set: Vec<&String> = spec
            .as_object()
            .map(|m| m.keys().collect())
            .unwrap_or_default();
        if set.len() != 1 {
            return Err(ApiError::validation(
                "Each allowedPorts entry must set exactly one of port, range or allPorts",
            ));
        }
        let port_of = |v: &Value| {
            v.as_u64()
                .and_then(|p| u16::try_from(p).ok())
                .filter(|p| *p > 0)
                .ok_or_else(|| ApiError::validation("Ports are 1-65535"))
        };
        let rule = match set[0].as_str() {
            "port" => PortRule::Port(port_of(&spec["port"])?),
            "range" => {
                let start = port_of(&spec["range"]["startPort"])?;
                let end = port_of(&spec["range"]["endPort"])?;
                if start > end {
                    return Err(ApiError::validation("startPort must not exceed endPort"));
                }
                PortRule::Range(start, end)
            }
            _ => PortRule::All,
        };
        ports.push(rule);
    }
    let row = tokenable(state, caller, input)?;
    Ok(mint(state, &row, TokenKind::Proxy, ports, lifetime))
}

pub(super) fn shell_token(
    state: &AppState,
    caller: &Caller,
    input: &Value,
) -> Result<Value, ApiError> {
    let lifetime = token_expiry(input)?;
    let row = tokenable(state, caller, input)?;
    if !row.spec.shell_ingress() {
        return Err(ApiError::validation(
            "Shell access needs the SHELL_INGRESS network connector at RunMicrovm",
        ));
    }
    Ok(mint(state, &row, TokenKind::Shell, Vec::new(), lifetime))
}

//! Operation handlers: validated input (JSON keyed by member name) in, output
//! (JSON shaped by the model's output structure) out.
//!
//! Tenancy: every lookup is keyed by the caller's account, and a resource of
//! another account answers exactly as a missing one (same status, same body).

use hearth_api::{ApiError, ErrorCode};
use serde_json::Value;

use crate::api::state::AppState;

mod images;
pub(crate) mod input;
mod managed;
mod microvms;
mod page;
mod tags;

pub use input::Caller;

use crate::vms::capacity::CapacityError;

/// The error a request refused by host capacity admission gets. RunMicrovm
/// declares `InsufficientCapacityException` (500) and gets it; ResumeMicrovm,
/// CreateMicrovmImage and UpdateMicrovmImage declare no capacity error, so
/// they get the server fault they declare, `InternalServerException` (500,
/// retried by the SDKs), whose message says what is short. Not
/// `ServiceQuotaExceededException`: that is the caller's account's quota
/// (402, not retried), while host capacity comes back on its own.
fn capacity_refusal(err: CapacityError, insufficient_capacity_declared: bool) -> ApiError {
    let message = match &err {
        CapacityError::Short(short) => {
            format!("Insufficient capacity on this host, try again later: not enough {short}")
        }
        CapacityError::Probe(_) => {
            tracing::warn!(error = %hearth_vm::error_chain(&err), "host capacity probe failed");
            "Insufficient capacity on this host: its free resources cannot be read".to_string()
        }
    };
    if insufficient_capacity_declared {
        ApiError::insufficient_capacity(message)
    } else {
        ApiError::internal(message)
    }
}

/// Runs operation `name`.
pub async fn dispatch(
    state: &AppState,
    caller: &Caller,
    name: &str,
    input: Value,
) -> Result<Value, ApiError> {
    match name {
        "ListManagedMicrovmImages" => managed::list_managed_images(state, caller, &input),
        "ListManagedMicrovmImageVersions" => {
            managed::list_managed_image_versions(state, caller, &input)
        }
        "GetMicrovmImage" => images::get_image(state, caller, &input),
        "ListMicrovmImages" => images::list_images(state, caller, &input),
        "DeleteMicrovmImage" => images::delete_image(state, caller, &input),
        "GetMicrovmImageVersion" => images::get_version(state, caller, &input),
        "ListMicrovmImageVersions" => images::list_versions(state, caller, &input),
        "UpdateMicrovmImageVersion" => images::update_version(state, caller, &input),
        "DeleteMicrovmImageVersion" => images::delete_version(state, caller, &input),
        "GetMicrovmImageBuild" => images::get_build(state, caller, &input),
        "ListMicrovmImageBuilds" => images::list_builds(state, caller, &input),
        "RunMicrovm" => microvms::run(state, caller, &input),
        "GetMicrovm" => microvms::get(state, caller, &input),
        "ListMicrovms" => microvms::list(state, caller, &input),
        "SuspendMicrovm" => microvms::suspend(state, caller, &input),
        "ResumeMicrovm" => microvms::resume(state, caller, &input),
        "TerminateMicrovm" => microvms::terminate(state, caller, &input),
        "CreateMicrovmAuthToken" => microvms::auth_token(state, caller, &input),
        "CreateMicrovmShellAuthToken" => microvms::shell_token(state, caller, &input),
        "TagResource" => tags::tag(state, caller, &input),
        "UntagResource" => tags::untag(state, caller, &input),
        "ListTags" => tags::list(state, caller, &input),
        "CreateMicrovmImage" => images::create_or_update(state, caller, &input, true),
        "UpdateMicrovmImage" => images::create_or_update(state, caller, &input, false),
        other => Err(ApiError::new(
            ErrorCode::UnknownOperation,
            format!("{other} is not implemented by this hearth server yet"),
        )),
    }
}

//! Operation handlers: validated input (JSON keyed by member name) in, output
//! (JSON shaped by the model's output structure) out.
//!
//! Tenancy: every lookup is keyed by the caller's account, and a resource of
//! another account answers exactly as a missing one (same status, same body).

use base64::Engine as _;
use hearth_api::{ApiError, ErrorCode};
use serde_json::{json, Value};

use crate::store::StoreError;
use crate::AppState;

mod images;
mod managed;
mod microvms;
mod tags;

/// Who is calling, after authentication.
#[derive(Debug, Clone)]
pub struct Caller {
    pub account_id: String,
    pub region: String,
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

/// A database failure: logged here, a generic 500 to the caller.
pub(crate) fn internal(err: StoreError) -> ApiError {
    tracing::error!(error = %crate::engine::error_chain(&err), "database failure");
    ApiError::new(ErrorCode::InternalServer, "Internal error")
}

/// Milliseconds since the epoch as the wire's epoch seconds.
pub(crate) fn timestamp(ms: i64) -> Value {
    json!(ms as f64 / 1000.0)
}

pub(crate) fn string<'a>(input: &'a Value, member: &str) -> Option<&'a str> {
    input.get(member).and_then(Value::as_str)
}

/// Parses a version as the API writes it (`2.0`) or as callers often do (`2`).
pub(crate) fn parse_version(text: &str) -> Option<u32> {
    let number = text.strip_suffix(".0").unwrap_or(text);
    if number.is_empty() || number.len() > 9 || !number.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    number.parse().ok().filter(|v| *v > 0)
}

pub(crate) fn version_text(version: u32) -> String {
    format!("{version}.0")
}

/// Keyset pagination over rows sorted by key: `nextToken` is the opaque last key
/// of the previous page, so rows inserted meanwhile neither repeat nor shift pages.
pub(crate) fn paginate(
    mut rows: Vec<(String, Value)>,
    input: &Value,
    default_max: usize,
) -> Result<Value, ApiError> {
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    let max = page_size(input, default_max);
    let after = after_key(input)?;
    let mut page: Vec<Value> = Vec::new();
    let mut last = None;
    let mut more = false;
    for (key, row) in rows {
        if after.as_deref().is_some_and(|a| key.as_str() <= a) {
            continue;
        }
        if page.len() == max {
            more = true;
            break;
        }
        last = Some(key);
        page.push(row);
    }
    Ok(page_output(page, more.then_some(last).flatten()))
}

/// `maxResults` or the default, at least 1.
pub(crate) fn page_size(input: &Value, default_max: usize) -> usize {
    input["maxResults"]
        .as_u64()
        .map(|m| m as usize)
        .unwrap_or(default_max)
        .max(1)
}

/// The key a `nextToken` carries.
pub(crate) fn after_key(input: &Value) -> Result<Option<String>, ApiError> {
    input["nextToken"].as_str().map(decode_token).transpose()
}

/// `{"items": [...], "nextToken"?}`; `next` is the last key when more follow.
pub(crate) fn page_output(items: Vec<Value>, next: Option<String>) -> Value {
    let mut out = json!({ "items": items });
    if let Some(last) = next {
        out["nextToken"] = Value::String(encode_token(&last));
    }
    out
}

/// Fetches one page from a keyed query that returns up to `limit` rows after a
/// key: asks for one more row to learn whether another page follows.
pub(crate) fn keyset_page<T>(
    input: &Value,
    default_max: usize,
    fetch: impl FnOnce(Option<&str>, usize) -> Result<Vec<T>, StoreError>,
    key: impl Fn(&T) -> String,
    render: impl Fn(&T) -> Value,
) -> Result<Value, ApiError> {
    let max = page_size(input, default_max);
    let after = after_key(input)?;
    let mut rows = fetch(after.as_deref(), max + 1).map_err(internal)?;
    let more = rows.len() > max;
    rows.truncate(max);
    let next = if more { rows.last().map(&key) } else { None };
    Ok(page_output(rows.iter().map(render).collect(), next))
}

fn encode_token(key: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("k1:{key}"))
}

fn decode_token(token: &str) -> Result<String, ApiError> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .and_then(|text| text.strip_prefix("k1:").map(str::to_string))
        .ok_or_else(|| ApiError::new(ErrorCode::Validation, "Invalid nextToken"))
}

/// A stable fingerprint of a request's parameters, without its clientToken,
/// to tell a retry from a different request that reuses the token.
pub(crate) fn fingerprint(input: &Value) -> String {
    let mut input = input.clone();
    if let Some(map) = input.as_object_mut() {
        map.remove("clientToken");
    }
    // serde_json's maps are ordered by key, so equal requests serialise equally.
    blake3::hash(input.to_string().as_bytes())
        .to_hex()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse() {
        assert_eq!(parse_version("1.0"), Some(1));
        assert_eq!(parse_version("12"), Some(12));
        for bad in ["", "0", "1.5", "-1", "a", "1.0.0", "99999999999"] {
            assert_eq!(parse_version(bad), None, "{bad}");
        }
        assert_eq!(version_text(3), "3.0");
    }

    #[test]
    fn fingerprints_ignore_the_token_and_key_order() {
        let a = json!({"imageIdentifier": "x", "clientToken": "t1", "maximumDurationInSeconds": 5});
        let b = json!({"maximumDurationInSeconds": 5, "imageIdentifier": "x", "clientToken": "t2"});
        let c = json!({"imageIdentifier": "y", "clientToken": "t1"});
        assert_eq!(fingerprint(&a), fingerprint(&b));
        assert_ne!(fingerprint(&a), fingerprint(&c));
    }
}

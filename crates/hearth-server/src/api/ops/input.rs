//! What the handlers share about their input and output: the caller, names
//! and ARNs in the input, versions, timestamps, request fingerprints and
//! database failures.

use hearth_api::{ApiError, ErrorCode};
use serde_json::{json, Value};

use crate::arn::Arn;
use crate::db::store::StoreError;

/// Who is calling, after authentication.
#[derive(Debug, Clone)]
pub struct Caller {
    pub account_id: String,
    pub region: String,
}

/// A database failure: logged here, a generic 500 to the caller.
pub(crate) fn internal(err: StoreError) -> ApiError {
    tracing::error!(error = %hearth_vm::error_chain(&err), "database failure");
    if err.is_disk_full() {
        // Says why, so the operator (and client) know it passes once space is freed.
        return ApiError::new(
            ErrorCode::InternalServer,
            "The server's storage is full; try again once space is freed",
        );
    }
    ApiError::new(ErrorCode::InternalServer, "Internal error")
}

/// The image name an identifier (name or ARN) names in the caller's account,
/// or the same 404 whether it is missing, malformed or another account's.
pub(crate) fn image_name(caller: &Caller, identifier: &str) -> Result<String, ApiError> {
    let name = if identifier.starts_with("arn:") {
        Arn::parse(identifier)
            .and_then(|arn| {
                arn.image_of(&caller.region, &caller.account_id)
                    .map(str::to_string)
            })
            .unwrap_or_default()
    } else {
        identifier.to_string()
    };
    let valid = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if valid {
        Ok(name)
    } else {
        Err(image_not_found(identifier))
    }
}

pub(crate) fn image_not_found(identifier: &str) -> ApiError {
    ApiError::not_found(format!("MicroVM image {identifier} not found"))
}

/// The managed connectors RunMicrovm accepts as ingress.
pub(crate) const INGRESS: &[&str] = &["HTTP_INGRESS", "ALL_INGRESS", "NO_INGRESS", "SHELL_INGRESS"];
/// `NO_EGRESS` is hearth's extension: a VM with no network at all.
pub(crate) const EGRESS: &[&str] = &["INTERNET_EGRESS", "NO_EGRESS"];

/// The connectors of `member`, a list of managed connector ARNs in the
/// caller's region, each one of `allowed` (`kind` names them in errors).
pub(crate) fn connectors(
    caller: &Caller,
    input: &Value,
    member: &str,
    allowed: &[&str],
    kind: &str,
) -> Result<Option<Vec<Arn>>, ApiError> {
    let Some(list) = input.get(member).and_then(Value::as_array) else {
        return Ok(None);
    };
    let mut arns = Vec::new();
    for text in list.iter().filter_map(Value::as_str) {
        let arn = Arn::parse(text)
            .filter(|arn| arn.connector_in(&caller.region).is_some())
            .ok_or_else(|| {
                ApiError::validation(format!("Malformed network connector ARN: {text}"))
            })?;
        if !arn
            .connector_in(&caller.region)
            .is_some_and(|name| allowed.contains(&name))
        {
            return Err(ApiError::validation(format!(
                "{text} is not an {kind} network connector"
            )));
        }
        arns.push(arn);
    }
    Ok(Some(arns))
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

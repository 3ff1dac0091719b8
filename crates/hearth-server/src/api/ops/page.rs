//! Keyset pagination: `nextToken` is the opaque last key of the previous page.

use base64::Engine as _;
use hearth_api::{ApiError, ErrorCode};
use serde_json::{json, Value};

use super::input::internal;
use crate::db::store::StoreError;

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

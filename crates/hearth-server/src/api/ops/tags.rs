//! Tags on images (TagResource, UntagResource, ListTags at `/2017-03-31/tags/{arn}`).

use hearth_api::ApiError;
use serde_json::{json, Value};

use super::input::{internal, string, Caller};
use crate::api::state::AppState;
use crate::arn::Arn;
use crate::db::records::Refusal;

/// The most tags one resource can carry (as Lambda's other resources).
const MAX_TAGS: usize = 50;

/// The caller's existing image an ARN names; anything else is the same 404.
fn taggable(state: &AppState, caller: &Caller, input: &Value) -> Result<String, ApiError> {
    let arn = string(input, "Resource").unwrap_or_default();
    let not_found = || ApiError::not_found(format!("Resource {arn} not found"));
    let parsed = Arn::parse(arn).ok_or_else(not_found)?;
    let name = parsed
        .image_of(&caller.region, &caller.account_id)
        .ok_or_else(not_found)?;
    state
        .store
        .image(&caller.account_id, name)
        .map_err(internal)?
        .ok_or_else(not_found)?;
    Ok(arn.to_string())
}

pub(super) fn tag(state: &AppState, caller: &Caller, input: &Value) -> Result<Value, ApiError> {
    let arn = taggable(state, caller, input)?;
    let tags: Vec<(String, String)> = input["Tags"]
        .as_object()
        .map(|map| {
            map.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect()
        })
        .unwrap_or_default();
    if tags.iter().any(|(k, _)| k.starts_with("aws:")) {
        return Err(ApiError::validation(
            "Tag keys starting with aws: are reserved",
        ));
    }
    match state
        .store
        .tag(&caller.account_id, &arn, &tags, MAX_TAGS)
        .map_err(internal)?
    {
        Ok(()) => Ok(json!({})),
        Err(Refusal::Quota(m) | Refusal::Conflict(m) | Refusal::NotFound(m)) => {
            Err(ApiError::validation(m))
        }
    }
}

pub(super) fn untag(state: &AppState, caller: &Caller, input: &Value) -> Result<Value, ApiError> {
    let arn = taggable(state, caller, input)?;
    let keys: Vec<String> = input["TagKeys"]
        .as_array()
        .map(|keys| {
            keys.iter()
                .filter_map(Value::as_str)
                .map(String::from)
                .collect()
        })
        .unwrap_or_default();
    state
        .store
        .untag(&caller.account_id, &arn, &keys)
        .map_err(internal)?;
    Ok(json!({}))
}

pub(super) fn list(state: &AppState, caller: &Caller, input: &Value) -> Result<Value, ApiError> {
    let arn = taggable(state, caller, input)?;
    let tags = state
        .store
        .tags(&caller.account_id, &arn)
        .map_err(internal)?;
    Ok(json!({ "Tags": tags }))
}

//! Turns an operation name and a JSON input into the parts of an HTTP request,
//! as the model places each member: URI label, query string, header or body.

use std::collections::BTreeMap;

use hearth_api::{Location, Member};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde_json::{Map, Value};

/// RFC 3986 unreserved characters stay; everything else is percent-encoded,
/// as botocore does for query keys and values (so `+` and space are never
/// ambiguous to the server or to the SigV4 canonical query).
pub(crate) const PATH_SEGMENT: &AsciiSet = QUERY_SET;
const QUERY_SET: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// Why an operation and its input make no request.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("unknown operation {0}")]
    UnknownOperation(String),
    #[error("invalid input for {operation}: {reason}")]
    Invalid { operation: String, reason: String },
}

/// A request before signing.
#[derive(Debug)]
pub(crate) struct Prepared {
    pub method: http::Method,
    /// Path and query string, percent-encoded, starting with `/`.
    pub target: String,
    /// Headers from header-bound members, and `content-type` with a body.
    pub headers: Vec<(String, String)>,
    pub body: Option<Vec<u8>>,
}

pub(crate) fn prepare(operation: &str, input: Value) -> Result<Prepared, InputError> {
    let model = hearth_api::model();
    let op = model
        .operation(operation)
        .ok_or_else(|| InputError::UnknownOperation(operation.to_string()))?;
    let bad = |reason: String| InputError::Invalid {
        operation: op.name.clone(),
        reason,
    };
    let mut fields = match input {
        Value::Object(map) => map,
        Value::Null => Map::new(),
        _ => return Err(bad("the input must be a JSON object".into())),
    };
    let members: &[Member] = op
        .input
        .as_deref()
        .and_then(|name| model.shape(name))
        .map_or(&[], |shape| shape.members.as_slice());
    // An unknown key is most likely a typo that would otherwise be dropped silently.
    if let Some(key) = fields
        .keys()
        .find(|k| !members.iter().any(|m| &m.name == *k))
    {
        return Err(bad(format!("unknown member {key:?}")));
    }
    // Like the AWS SDKs: a call that sends no token still gets one, so the
    // server can recognise a retry of this very request.
    for m in members.iter().filter(|m| m.idempotency_token) {
        if fields.get(&m.name).is_none_or(Value::is_null) {
            fields.insert(m.name.clone(), Value::String(uuid_v4()));
        }
    }

    let mut labels = BTreeMap::new();
    let mut query: Vec<(String, String)> = Vec::new();
    let mut headers: Vec<(String, String)> = Vec::new();
    let mut body = Map::new();
    let has_body_members = members.iter().any(|m| m.location == Location::Body);
    for m in members {
        let Some(value) = fields.remove(&m.name).filter(|v| !v.is_null()) else {
            continue;
        };
        let scalar_of = |v: &Value| {
            scalar(v).ok_or_else(|| bad(format!("{} must be a string, number or boolean", m.name)))
        };
        match m.location {
            Location::Uri => {
                let label = scalar_of(&value)?;
                if label.is_empty() {
                    return Err(bad(format!("{} must not be empty", m.name)));
                }
                labels.insert(m.location_name.clone(), label);
            }
            Location::Querystring => match &value {
                // Lists are repeated keys; maps are their own key=value pairs.
                Value::Array(items) => {
                    for item in items {
                        query.push((m.location_name.clone(), scalar_of(item)?));
                    }
                }
                Value::Object(map) => {
                    for (k, v) in map {
                        query.push((k.clone(), scalar_of(v)?));
                    }
                }
                other => query.push((m.location_name.clone(), scalar_of(other)?)),
            },
            Location::Header => headers.push((m.location_name.clone(), scalar_of(&value)?)),
            Location::Headers => {
                let Value::Object(map) = &value else {
                    return Err(bad(format!("{} must be a map", m.name)));
                };
                for (k, v) in map {
                    headers.push((format!("{}{k}", m.location_name), scalar_of(v)?));
                }
            }
            Location::Body => {
                body.insert(m.location_name.clone(), value);
            }
            // Only outputs carry a status code.
            Location::StatusCode => {}
        }
    }
    for (name, value) in &headers {
        if http::HeaderName::from_bytes(name.as_bytes()).is_err()
            || http::HeaderValue::from_str(value).is_err()
        {
            return Err(bad(format!("header {name} cannot carry that value")));
        }
    }

    let mut target = match op.render_uri(&labels) {
        Some(path) => path,
        None => {
            let missing = op.labels().find(|l| !labels.contains_key(*l)).unwrap_or("");
            return Err(bad(format!("missing required member {missing}")));
        }
    };
    for (i, (k, v)) in query.iter().enumerate() {
        target.push(if i == 0 { '?' } else { '&' });
        target.extend(utf8_percent_encode(k, QUERY_SET));
        target.push('=');
        target.extend(utf8_percent_encode(v, QUERY_SET));
    }
    // botocore sends `{}` for an operation with body members even when none
    // is set, and no body at all for one without.
    let body = if has_body_members {
        headers.push(("content-type".into(), "application/json".into()));
        Some(serde_json::to_vec(&Value::Object(body)).map_err(|_| bad("unserialisable".into()))?)
    } else {
        None
    };
    Ok(Prepared {
        method: op.method.clone(),
        target,
        headers,
        body,
    })
}

fn scalar(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// A random (version 4) UUID, as the SDKs use for idempotency tokens.
fn uuid_v4() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn arn_label_is_percent_encoded() {
        let arn = "arn:aws:lambda:us-east-1:123456789012:microvm-image:web/x";
        let p = prepare("GetMicrovmImage", json!({ "imageIdentifier": arn })).expect("prepare");
        assert_eq!(p.method, http::Method::GET);
        assert_eq!(
            p.target,
            "/2025-09-09/microvm-images/arn%3Aaws%3Alambda%3Aus-east-1%3A123456789012%3Amicrovm-image%3Aweb%2Fx"
        );
        assert!(p.body.is_none());
        // The server's router decodes it back to the same ARN.
        let (op, labels) = hearth_api::model()
            .route(&http::Method::GET, &p.target)
            .expect("routes");
        assert_eq!(op.name, "GetMicrovmImage");
        assert_eq!(labels["imageIdentifier"], arn);
    }

    #[test]
    fn two_labels_and_delete() {
        let p = prepare(
            "DeleteMicrovmImageVersion",
            json!({ "imageIdentifier": "web", "imageVersion": "2.0" }),
        )
        .expect("prepare");
        assert_eq!(p.method, http::Method::DELETE);
        assert_eq!(p.target, "/2025-09-09/microvm-images/web/versions/2.0");
    }

    #[test]
    fn query_values_are_encoded_and_lists_repeat() {
        let p = prepare(
            "ListMicrovms",
            json!({ "maxResults": 5, "nextToken": "a+b/c= d", "imageIdentifier": "web" }),
        )
        .expect("prepare");
        assert_eq!(
            p.target,
            "/2025-09-09/microvms?imageIdentifier=web&maxResults=5&nextToken=a%2Bb%2Fc%3D%20d"
        );
        let p = prepare(
            "UntagResource",
            json!({ "Resource": "arn:x", "TagKeys": ["a", "b/c"] }),
        )
        .expect("prepare");
        assert_eq!(p.target, "/2017-03-31/tags/arn%3Ax?tagKeys=a&tagKeys=b%2Fc");
    }

    #[test]
    fn body_members_and_idempotency_token() {
        let p = prepare(
            "RunMicrovm",
            json!({ "imageIdentifier": "web", "maximumDurationInSeconds": 60 }),
        )
        .expect("prepare");
        assert_eq!(p.method, http::Method::POST);
        assert_eq!(p.target, "/2025-09-09/microvms");
        let body: Value = serde_json::from_slice(&p.body.expect("body")).expect("json");
        assert_eq!(body["imageIdentifier"], "web");
        assert_eq!(body["maximumDurationInSeconds"], 60);
        let token = body["clientToken"].as_str().expect("token filled");
        assert_eq!(token.len(), 36);
        assert_eq!(&token[14..15], "4");
        assert!(p
            .headers
            .contains(&("content-type".into(), "application/json".into())));
        // A given token is kept.
        let p = prepare(
            "RunMicrovm",
            json!({ "imageIdentifier": "web", "clientToken": "mine" }),
        )
        .expect("prepare");
        let body: Value = serde_json::from_slice(&p.body.expect("body")).expect("json");
        assert_eq!(body["clientToken"], "mine");
    }

    #[test]
    fn no_body_without_body_members() {
        let p = prepare(
            "SuspendMicrovm",
            json!({ "microvmIdentifier": "microvm-1" }),
        )
        .expect("prepare");
        assert_eq!(p.target, "/2025-09-09/microvms/microvm-1/suspend");
        assert!(p.body.is_none());
        assert!(p.headers.is_empty());
    }

    #[test]
    fn bad_inputs_are_refused() {
        let err = |op: &str, input: Value| prepare(op, input).expect_err("refused").to_string();
        assert_eq!(err("NoSuchOp", json!({})), "unknown operation NoSuchOp");
        assert_eq!(
            err("GetMicrovm", json!({})),
            "invalid input for GetMicrovm: missing required member microvmIdentifier"
        );
        assert_eq!(
            err("GetMicrovm", json!({ "microvmIdentifier": "" })),
            "invalid input for GetMicrovm: microvmIdentifier must not be empty"
        );
        assert_eq!(
            err("GetMicrovm", json!({ "microvmId": "x" })),
            "invalid input for GetMicrovm: unknown member \"microvmId\""
        );
        assert_eq!(
            err("GetMicrovm", json!({ "microvmIdentifier": ["x"] })),
            "invalid input for GetMicrovm: microvmIdentifier must be a string, number or boolean"
        );
        assert_eq!(
            err("GetMicrovm", json!("x")),
            "invalid input for GetMicrovm: the input must be a JSON object"
        );
    }
}

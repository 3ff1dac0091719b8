//! Input parsing and validation against the model, in AWS's wording, and the
//! output shape check used by tests.

use std::collections::BTreeMap;

use serde_json::{Map, Number, Value};

use crate::error::ApiError;
use crate::model::{Location, Member, Model, Operation, Shape, ShapeKind};

/// At most this many messages are listed in one ValidationException (the
/// count still says how many there were), so hostile input cannot make the
/// message grow without bound beyond the request itself.
const MAX_LISTED_ERRORS: usize = 100;

/// Rendered values in messages are cut after this many bytes, for the same
/// reason.
const MAX_RENDERED_VALUE: usize = 2048;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Requests: every constraint, unknown members ignored (as AWS does).
    Input,
    /// Responses: member names, types, required members and enum values; an
    /// unknown member is an error (it means the handler drifted from the
    /// model). Lengths, ranges and patterns are not checked: they constrain
    /// what callers send, and hearth's own ids need not fit AWS's patterns.
    Output,
}

struct Checker<'m> {
    model: &'m Model,
    mode: Mode,
    listed: Vec<String>,
    total: usize,
}

/// Java-style rendering (`[a, b]`, `{k=v}`) as Coral prints values, bounded.
fn render(v: &Value) -> String {
    fn go(v: &Value, out: &mut String) {
        if out.len() > MAX_RENDERED_VALUE {
            return;
        }
        match v {
            Value::Null => out.push_str("null"),
            Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Value::Number(n) => out.push_str(&n.to_string()),
            Value::String(s) => out.push_str(s),
            Value::Array(a) => {
                out.push('[');
                for (i, e) in a.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    go(e, out);
                    if out.len() > MAX_RENDERED_VALUE {
                        break;
                    }
                }
                out.push(']');
            }
            Value::Object(o) => {
                out.push('{');
                for (i, (k, e)) in o.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    out.push_str(k);
                    out.push('=');
                    go(e, out);
                    if out.len() > MAX_RENDERED_VALUE {
                        break;
                    }
                }
                out.push('}');
            }
        }
    }
    let mut out = String::new();
    go(v, &mut out);
    if out.len() > MAX_RENDERED_VALUE {
        let mut cut = MAX_RENDERED_VALUE;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
        out.push_str("...");
    }
    out
}

fn fail(value: Option<&Value>, path: &str, constraint: &str) -> String {
    match value {
        Some(Value::Null) | None if constraint == NOT_NULL => {
            format!("Value null at '{path}' failed to satisfy constraint: {constraint}")
        }
        Some(v) => format!(
            "Value '{}' at '{path}' failed to satisfy constraint: {constraint}",
            render(v)
        ),
        // Sensitive values are never echoed.
        None => format!("Value at '{path}' failed to satisfy constraint: {constraint}"),
    }
}

const NOT_NULL: &str = "Member must not be null";

fn is_scalar(kind: &ShapeKind) -> bool {
    !matches!(
        kind,
        ShapeKind::Structure | ShapeKind::List { .. } | ShapeKind::Map { .. } | ShapeKind::Document
    )
}

/// Whether a value of this shape may be echoed in a message: not when the
/// shape, or the elements or map values it holds, are sensitive.
fn echoable(model: &Model, shape: &Shape, member_sensitive: bool) -> bool {
    if member_sensitive || shape.sensitive {
        return false;
    }
    match &shape.kind {
        ShapeKind::List { member } => model.shape(member).is_none_or(|s| !s.sensitive),
        ShapeKind::Map { value, .. } => model.shape(value).is_none_or(|s| !s.sensitive),
        _ => true,
    }
}

impl<'m> Checker<'m> {
    fn new(model: &'m Model, mode: Mode) -> Self {
        Checker {
            model,
            mode,
            listed: Vec::new(),
            total: 0,
        }
    }

    fn push(&mut self, msg: String) {
        self.total += 1;
        if self.listed.len() < MAX_LISTED_ERRORS {
            self.listed.push(msg);
        }
    }

    fn constraints(&self) -> bool {
        self.mode == Mode::Input
    }

    fn shape(&self, name: &str) -> Option<&'m Shape> {
        self.model.shape(name)
    }

    /// Type-checks a scalar and returns its normalized value (None: wrong
    /// type, already reported with `type_path`).
    fn scalar_type(&mut self, shape: &Shape, v: &Value, path: &str, echo: bool) -> Option<Value> {
        let ok = match &shape.kind {
            ShapeKind::String => v.is_string(),
            ShapeKind::Integer => v.as_i64().is_some_and(|i| i32::try_from(i).is_ok()),
            ShapeKind::Long => v.as_i64().is_some(),
            ShapeKind::Float | ShapeKind::Double => v.is_number(),
            ShapeKind::Boolean => v.is_boolean(),
            // rest-json's default is epoch seconds (a JSON number, possibly
            // fractional); explicit string formats take a string.
            ShapeKind::Timestamp => match shape.timestamp_format.as_deref() {
                Some("iso8601") | Some("rfc822") => v.is_string(),
                _ => v.is_number(),
            },
            ShapeKind::Blob => v.as_str().is_some_and(is_base64),
            _ => true,
        };
        if ok {
            Some(v.clone())
        } else {
            let msg = format!("Member must be {}", shape.kind.description());
            self.push(fail(echo.then_some(v), path, &msg));
            None
        }
    }

    /// The constraint messages a well-typed scalar fails.
    fn scalar_constraints(&self, shape: &Shape, v: &Value) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(s) = v.as_str() {
            if !shape.enum_values.is_empty() && !shape.enum_values.iter().any(|e| e == s) {
                out.push(format!(
                    "Member must satisfy enum value set: [{}]",
                    shape.enum_values.join(", ")
                ));
            }
        }
        if !self.constraints() {
            return out;
        }
        match &shape.kind {
            ShapeKind::String | ShapeKind::Blob => {
                let s = v.as_str().unwrap_or_default();
                let len = if shape.kind == ShapeKind::Blob {
                    base64_decoded_len(s)
                } else {
                    s.chars().count()
                } as i64;
                if let Some(max) = shape.max {
                    if len > max {
                        out.push(format!(
                            "Member must have length less than or equal to {max}"
                        ));
                    }
                }
                if let Some(min) = shape.min {
                    if len < min {
                        out.push(format!(
                            "Member must have length greater than or equal to {min}"
                        ));
                    }
                }
                if shape.kind == ShapeKind::String && !shape.pattern_matches(s) {
                    if let Some(p) = &shape.pattern {
                        out.push(format!(
                            "Member must satisfy regular expression pattern: {p}"
                        ));
                    }
                }
            }
            ShapeKind::Integer | ShapeKind::Long | ShapeKind::Float | ShapeKind::Double => {
                let n = v.as_f64().unwrap_or_default();
                if let Some(max) = shape.max {
                    if n > max as f64 {
                        out.push(format!(
                            "Member must have value less than or equal to {max}"
                        ));
                    }
                }
                if let Some(min) = shape.min {
                    if n < min as f64 {
                        out.push(format!(
                            "Member must have value greater than or equal to {min}"
                        ));
                    }
                }
            }
            _ => {}
        }
        out
    }

    /// Checks a non-null value of `shape` at `path`; returns the normalized
    /// value (structures keyed by member name), None if it was unusable.
    fn value(&mut self, shape: &Shape, v: &Value, path: &str, sensitive: bool) -> Option<Value> {
        let echo = echoable(self.model, shape, sensitive);
        match &shape.kind {
            ShapeKind::Document => Some(v.clone()),
            ShapeKind::Structure => {
                let Some(obj) = v.as_object() else {
                    self.push(fail(echo.then_some(v), path, "Member must be a structure"));
                    return None;
                };
                Some(Value::Object(self.structure(shape, obj, Some(path))))
            }
            ShapeKind::List { member } => {
                let Some(items) = v.as_array() else {
                    self.push(fail(echo.then_some(v), path, "Member must be a list"));
                    return None;
                };
                self.length(shape, items.len(), v, path, echo);
                let elem = self.shape(member)?;
                let mut out = Vec::with_capacity(items.len());
                let mut agg: Vec<String> = Vec::new();
                for (i, item) in items.iter().enumerate() {
                    let ipath = format!("{path}.{}.member", i + 1);
                    if item.is_null() {
                        self.push(fail(None, &ipath, NOT_NULL));
                        continue;
                    }
                    if is_scalar(&elem.kind) {
                        let elem_echo = echo && !elem.sensitive;
                        if let Some(n) = self.scalar_type(elem, item, &ipath, elem_echo) {
                            for m in self.scalar_constraints(elem, &n) {
                                if !agg.contains(&m) {
                                    agg.push(m);
                                }
                            }
                            out.push(n);
                        }
                    } else if let Some(n) = self.value(elem, item, &ipath, false) {
                        out.push(n);
                    }
                }
                if !agg.is_empty() {
                    let msg = format!("Member must satisfy constraint: [{}]", agg.join(", "));
                    self.push(fail(echo.then_some(v), path, &msg));
                }
                Some(Value::Array(out))
            }
            ShapeKind::Map { key, value } => {
                let Some(obj) = v.as_object() else {
                    self.push(fail(echo.then_some(v), path, "Member must be a map"));
                    return None;
                };
                self.length(shape, obj.len(), v, path, echo);
                let kshape = self.shape(key)?;
                let vshape = self.shape(value)?;
                let mut out = Map::new();
                let mut key_agg: Vec<String> = Vec::new();
                let mut val_agg: Vec<String> = Vec::new();
                for (k, item) in obj {
                    let kv = Value::String(k.clone());
                    for m in self.scalar_constraints(kshape, &kv) {
                        if !key_agg.contains(&m) {
                            key_agg.push(m);
                        }
                    }
                    let ipath = format!("{path}.{k}");
                    if item.is_null() {
                        self.push(fail(None, &ipath, NOT_NULL));
                        continue;
                    }
                    if is_scalar(&vshape.kind) {
                        let val_echo = echo && !vshape.sensitive;
                        if let Some(n) = self.scalar_type(vshape, item, &ipath, val_echo) {
                            for m in self.scalar_constraints(vshape, &n) {
                                if !val_agg.contains(&m) {
                                    val_agg.push(m);
                                }
                            }
                            out.insert(k.clone(), n);
                        }
                    } else if let Some(n) = self.value(vshape, item, &ipath, false) {
                        out.insert(k.clone(), n);
                    }
                }
                if !key_agg.is_empty() {
                    let msg = format!("Map keys must satisfy constraint: [{}]", key_agg.join(", "));
                    self.push(fail(echo.then_some(v), path, &msg));
                }
                if !val_agg.is_empty() {
                    let msg = format!(
                        "Map value must satisfy constraint: [{}]",
                        val_agg.join(", ")
                    );
                    self.push(fail(echo.then_some(v), path, &msg));
                }
                Some(Value::Object(out))
            }
            _ => {
                let n = self.scalar_type(shape, v, path, echo)?;
                for m in self.scalar_constraints(shape, &n) {
                    self.push(fail(echo.then_some(&n), path, &m));
                }
                Some(n)
            }
        }
    }

    fn length(&mut self, shape: &Shape, len: usize, v: &Value, path: &str, echo: bool) {
        if !self.constraints() {
            return;
        }
        let len = len as i64;
        if let Some(max) = shape.max {
            if len > max {
                let msg = format!("Member must have length less than or equal to {max}");
                self.push(fail(echo.then_some(v), path, &msg));
            }
        }
        if let Some(min) = shape.min {
            if len < min {
                let msg = format!("Member must have length greater than or equal to {min}");
                self.push(fail(echo.then_some(v), path, &msg));
            }
        }
    }

    /// Checks a structure. `prefix` is the path of the structure (None at the
    /// top level, where paths are bare member names). At the top level of an
    /// input, `obj` is keyed by member name (it was assembled from all
    /// locations); elsewhere by JSON name.
    fn structure(
        &mut self,
        shape: &Shape,
        obj: &Map<String, Value>,
        prefix: Option<&str>,
    ) -> Map<String, Value> {
        let top_input = prefix.is_none() && self.mode == Mode::Input;
        let mut out = Map::new();
        let mut set = 0usize;
        for m in &shape.members {
            let key = if top_input { &m.name } else { &m.location_name };
            let path = match prefix {
                Some(p) => format!("{p}.{}", m.name),
                None => m.name.clone(),
            };
            match obj.get(key) {
                // JSON null is "not set", as in AWS's JSON protocols.
                None | Some(Value::Null) => {
                    if shape.is_required(&m.name) {
                        self.push(fail(None, &path, NOT_NULL));
                    }
                }
                Some(v) => {
                    set += 1;
                    let Some(target) = self.shape(&m.shape) else {
                        continue;
                    };
                    if let Some(n) = self.value(target, v, &path, m.sensitive) {
                        out.insert(m.name.clone(), n);
                    }
                }
            }
        }
        if shape.union && set != 1 {
            let path = prefix.unwrap_or(&shape.name);
            self.push(fail(
                None,
                path,
                &format!("Member must have exactly one member set (found {set})"),
            ));
        }
        if self.mode == Mode::Output {
            for k in obj.keys() {
                let known = shape
                    .members
                    .iter()
                    .any(|m| if top_input { &m.name } else { &m.location_name } == k);
                if !known {
                    let path = match prefix {
                        Some(p) => format!("{p}.{k}"),
                        None => k.clone(),
                    };
                    self.push(format!(
                        "Unknown member '{path}': not a member of shape {}",
                        shape.name
                    ));
                }
            }
        }
        out
    }

    fn message(&self) -> String {
        let noun = if self.total == 1 { "error" } else { "errors" };
        format!(
            "{} validation {noun} detected: {}",
            self.total,
            self.listed.join("; ")
        )
    }
}

fn is_base64(s: &str) -> bool {
    let body = s.trim_end_matches('=');
    s.len() - body.len() <= 2
        && body
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
}

fn base64_decoded_len(s: &str) -> usize {
    let body = s.trim_end_matches('=').len();
    body * 3 / 4
}

/// Turns a text value (label, query parameter, header) into the JSON value
/// its shape expects; text that does not parse is kept as a string so the
/// validator reports it as a type error with the value quoted.
fn text_to_wire(model: &Model, shape: &Shape, text: &str) -> Value {
    match &shape.kind {
        ShapeKind::Integer | ShapeKind::Long => text
            .parse::<i64>()
            .map(|i| Value::Number(i.into()))
            .unwrap_or_else(|_| Value::String(text.to_string())),
        ShapeKind::Float | ShapeKind::Double => text
            .parse::<f64>()
            .ok()
            .and_then(Number::from_f64)
            .map(Value::Number)
            .unwrap_or_else(|| Value::String(text.to_string())),
        ShapeKind::Boolean => match text {
            "true" => Value::Bool(true),
            "false" => Value::Bool(false),
            _ => Value::String(text.to_string()),
        },
        // Query timestamps default to ISO 8601 and headers to HTTP dates; the
        // model has none in inputs, so a number is taken as epoch seconds and
        // anything else is passed on as written.
        ShapeKind::Timestamp => match text.parse::<f64>().ok().and_then(Number::from_f64) {
            Some(n) if shape.timestamp_format.is_none() => Value::Number(n),
            _ => Value::String(text.to_string()),
        },
        ShapeKind::List { member } => match model.shape(member) {
            Some(m) => Value::Array(vec![text_to_wire(model, m, text)]),
            None => Value::String(text.to_string()),
        },
        _ => Value::String(text.to_string()),
    }
}

fn texts_to_wire(model: &Model, shape: &Shape, texts: &[String]) -> Option<Value> {
    match &shape.kind {
        ShapeKind::List { member } => {
            let m = model.shape(member)?;
            Some(Value::Array(
                texts.iter().map(|t| text_to_wire(model, m, t)).collect(),
            ))
        }
        // A scalar given twice: the first value counts.
        _ => texts.first().map(|t| text_to_wire(model, shape, t)),
    }
}

impl Model {
    /// Builds the operation's input as a JSON object keyed by member name (not
    /// locationName), from URI labels, the raw query string, headers and
    /// body, validated against the model. The body must be a JSON object
    /// (empty body = `{}`); it is only read when the input has body members.
    pub fn parse_input(
        &self,
        op: &Operation,
        labels: &BTreeMap<String, String>,
        raw_query: Option<&str>,
        headers: &http::HeaderMap,
        body: &[u8],
    ) -> Result<Value, ApiError> {
        let Some(shape) = op.input.as_deref().and_then(|n| self.shape(n)) else {
            return Ok(Value::Object(Map::new()));
        };

        let body_obj = if shape.members.iter().any(|m| m.location == Location::Body) {
            parse_body(body)?
        } else {
            Map::new()
        };

        let mut query: BTreeMap<String, Vec<String>> = BTreeMap::new();
        if let Some(q) = raw_query {
            for (k, v) in form_urlencoded::parse(q.as_bytes()) {
                query
                    .entry(k.into_owned())
                    .or_default()
                    .push(v.into_owned());
            }
        }

        let mut wire = Map::new();
        for m in &shape.members {
            let Some(target) = self.shape(&m.shape) else {
                continue;
            };
            if let Some(v) = self.member_wire(m, target, labels, &query, headers, &body_obj, shape)
            {
                wire.insert(m.name.clone(), v);
            }
        }

        let mut checker = Checker::new(self, Mode::Input);
        let out = checker.structure(shape, &wire, None);
        if checker.total > 0 {
            return Err(ApiError::validation(checker.message()));
        }
        Ok(Value::Object(out))
    }

    #[allow(clippy::too_many_arguments)] // Each source of a request is its own argument.
    fn member_wire(
        &self,
        m: &Member,
        target: &Shape,
        labels: &BTreeMap<String, String>,
        query: &BTreeMap<String, Vec<String>>,
        headers: &http::HeaderMap,
        body: &Map<String, Value>,
        input: &Shape,
    ) -> Option<Value> {
        match m.location {
            Location::Body => {
                if input.payload.as_deref() == Some(m.name.as_str()) {
                    return Some(Value::Object(body.clone()));
                }
                body.get(&m.location_name).cloned()
            }
            Location::Uri => labels
                .get(&m.location_name)
                .map(|t| text_to_wire(self, target, t)),
            Location::Querystring => {
                if let ShapeKind::Map { value, .. } = &target.kind {
                    // A map in the query takes every parameter no other
                    // member claims.
                    let claimed: Vec<&str> = input
                        .members
                        .iter()
                        .filter(|o| o.location == Location::Querystring && o.name != m.name)
                        .map(|o| o.location_name.as_str())
                        .collect();
                    let vshape = self.shape(value)?;
                    let map: Map<String, Value> = query
                        .iter()
                        .filter(|(k, _)| !claimed.contains(&k.as_str()))
                        .filter_map(|(k, vs)| Some((k.clone(), texts_to_wire(self, vshape, vs)?)))
                        .collect();
                    return (!map.is_empty()).then_some(Value::Object(map));
                }
                query
                    .get(&m.location_name)
                    .and_then(|vs| texts_to_wire(self, target, vs))
            }
            Location::Header => {
                let texts: Vec<String> = headers
                    .get_all(m.location_name.as_str())
                    .iter()
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                    .collect();
                if texts.is_empty() {
                    return None;
                }
                let texts = if matches!(target.kind, ShapeKind::List { .. }) {
                    texts
                        .iter()
                        .flat_map(|t| t.split(','))
                        .map(|t| t.trim().to_string())
                        .collect()
                } else {
                    texts
                };
                texts_to_wire(self, target, &texts)
            }
            Location::Headers => {
                let prefix = m.location_name.to_ascii_lowercase();
                let map: Map<String, Value> = headers
                    .iter()
                    .filter_map(|(name, v)| {
                        let rest = name.as_str().strip_prefix(prefix.as_str())?;
                        Some((
                            rest.to_string(),
                            Value::String(String::from_utf8_lossy(v.as_bytes()).into_owned()),
                        ))
                    })
                    .collect();
                (!map.is_empty()).then_some(Value::Object(map))
            }
            Location::StatusCode => None,
        }
    }

    /// Checks that an output value matches the operation's output shape
    /// (member names, types, required members, enum values). Used by tests so
    /// handlers cannot drift from the model. Keys are the JSON body names
    /// (equal to the member names throughout this model). An operation
    /// without output accepts `null` or `{}`.
    pub fn check_output(&self, op: &Operation, output: &Value) -> Result<(), String> {
        let Some(shape) = op.output.as_deref().and_then(|n| self.shape(n)) else {
            return match output {
                Value::Null => Ok(()),
                Value::Object(o) if o.is_empty() => Ok(()),
                _ => Err(format!("{} has no output, got {}", op.name, render(output))),
            };
        };
        let Some(obj) = output.as_object() else {
            return Err(format!("{} output must be an object", op.name));
        };
        let mut checker = Checker::new(self, Mode::Output);
        checker.structure(shape, obj, None);
        if checker.total > 0 {
            return Err(checker.listed.join("; "));
        }
        Ok(())
    }
}

fn parse_body(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    // serde_json's default recursion limit (128) stays on: deeply nested
    // input is an error, not a stack overflow.
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(o)) => Ok(o),
        Ok(_) => Err(ApiError::validation(
            "Could not parse request body into json: the request body must be a JSON object",
        )),
        Err(e) => Err(ApiError::validation(format!(
            "Could not parse request body into json: {e}"
        ))),
    }
}

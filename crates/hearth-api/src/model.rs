//! The service model, parsed from the embedded botocore JSON, and routing.

use std::collections::BTreeMap;

use serde_json::Value;

/// Where a member travels in the HTTP request or response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Location {
    /// The JSON body (no `location` in the model).
    Body,
    /// A URI label: `{name}` in the operation's `requestUri`.
    Uri,
    /// A query string parameter.
    Querystring,
    /// One HTTP header.
    Header,
    /// Every header with a prefix (a map).
    Headers,
    /// The HTTP status code (outputs only).
    StatusCode,
}

/// A member of a structure shape.
#[derive(Debug, Clone)]
pub struct Member {
    /// The member name: the key of the value built by `parse_input`.
    pub name: String,
    /// The target shape's name.
    pub shape: String,
    pub location: Location,
    /// The wire name: label, query key, header name or JSON key.
    pub location_name: String,
    pub idempotency_token: bool,
    pub sensitive: bool,
    /// A member-level `timestampFormat`, overriding the shape's.
    pub timestamp_format: Option<String>,
}

/// The kind of a shape, with what the kind carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShapeKind {
    String,
    Integer,
    Long,
    Float,
    Double,
    Boolean,
    Timestamp,
    Blob,
    Document,
    /// A structure; `union` shapes must have exactly one member set.
    Structure,
    List {
        member: String,
    },
    Map {
        key: String,
        value: String,
    },
}

impl ShapeKind {
    fn describe(&self) -> &'static str {
        match self {
            ShapeKind::String => "a string",
            ShapeKind::Integer => "an integer",
            ShapeKind::Long => "a long",
            ShapeKind::Float | ShapeKind::Double => "a number",
            ShapeKind::Boolean => "a boolean",
            ShapeKind::Timestamp => "a timestamp",
            ShapeKind::Blob => "a base64 string",
            ShapeKind::Document => "a document",
            ShapeKind::Structure => "a structure",
            ShapeKind::List { .. } => "a list",
            ShapeKind::Map { .. } => "a map",
        }
    }

    /// An article and name for type errors ("Member must be an integer").
    pub fn description(&self) -> &'static str {
        self.describe()
    }
}

/// A shape of the model with its constraints.
#[derive(Debug, Clone)]
pub struct Shape {
    pub name: String,
    pub kind: ShapeKind,
    /// Length (strings, lists, maps) or value (numbers) lower bound.
    pub min: Option<i64>,
    /// Length (strings, lists, maps) or value (numbers) upper bound.
    pub max: Option<i64>,
    /// The model's pattern, as written in the model (used in messages).
    pub pattern: Option<String>,
    pub enum_values: Vec<String>,
    /// Structures: members, sorted by name (the model's JSON object order is
    /// not kept by serde_json, and a stable order keeps messages stable).
    pub members: Vec<Member>,
    pub required: Vec<String>,
    pub union: bool,
    pub sensitive: bool,
    pub timestamp_format: Option<String>,
    /// Structures: the member that is the whole body, if any.
    pub payload: Option<String>,
    pub exception: bool,
    /// Error shapes: `error.httpStatusCode`.
    pub error_status: Option<u16>,
    /// Compiled, anchored patterns; a value passes if any matches. Empty when
    /// the shape has no pattern or its pattern failed to compile.
    pub(crate) regexes: Vec<regex::Regex>,
}

impl Shape {
    pub fn member(&self, name: &str) -> Option<&Member> {
        self.members.iter().find(|m| m.name == name)
    }

    pub fn is_required(&self, member: &str) -> bool {
        self.required.iter().any(|r| r == member)
    }

    /// Whether the pattern (if any) accepts `value`. A pattern that failed to
    /// compile accepts everything (see [`Model::pattern_failures`]).
    pub fn pattern_matches(&self, value: &str) -> bool {
        self.regexes.is_empty() || self.regexes.iter().any(|r| r.is_match(value))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Label(String),
    /// `{name+}`: matches one or more segments, slashes included.
    Greedy(String),
}

/// One operation of the API.
#[derive(Debug, Clone)]
pub struct Operation {
    pub name: String,
    pub method: http::Method,
    /// The `requestUri` template, e.g. `/2025-09-09/microvms/{microvmIdentifier}`.
    pub uri: String,
    /// `http.responseCode`, 200 when the model does not say.
    pub success_code: u16,
    /// The input structure's shape name.
    pub input: Option<String>,
    /// The output structure's shape name (None: empty response body).
    pub output: Option<String>,
    /// The error shapes the operation may answer with.
    pub errors: Vec<String>,
    pub idempotent: bool,
    pub readonly: bool,
    segments: Vec<Segment>,
    /// Query literals of the template (`?versions` or `?x=y`): must be present.
    query_literals: Vec<(String, Option<String>)>,
}

impl Operation {
    /// The URI label names of the template, in order.
    pub fn labels(&self) -> impl Iterator<Item = &str> {
        self.segments.iter().filter_map(|s| match s {
            Segment::Label(n) | Segment::Greedy(n) => Some(n.as_str()),
            Segment::Literal(_) => None,
        })
    }

    /// Fills the template with labels, percent-encoding each as botocore does
    /// (everything but unreserved characters; greedy labels keep `/`).
    pub fn render_uri(&self, labels: &BTreeMap<String, String>) -> Option<String> {
        let mut out = String::new();
        for seg in self.segments.iter().skip(1) {
            out.push('/');
            match seg {
                Segment::Literal(l) => out.push_str(l),
                Segment::Label(n) => out.push_str(&encode_label(labels.get(n)?, false)),
                Segment::Greedy(n) => out.push_str(&encode_label(labels.get(n)?, true)),
            }
        }
        if out.is_empty() {
            out.push('/');
        }
        Some(out)
    }

    /// Matches a split raw path; returns the number of literal segments
    /// (higher = more specific) and the decoded labels.
    fn match_path(&self, raw: &[&str]) -> Option<(usize, BTreeMap<String, String>)> {
        let mut labels = BTreeMap::new();
        let mut literals = 0;
        let mut i = 0;
        for (si, seg) in self.segments.iter().enumerate() {
            match seg {
                Segment::Literal(l) => {
                    let got = decode(raw.get(i)?)?;
                    if &got != l {
                        return None;
                    }
                    literals += 1;
                    i += 1;
                }
                Segment::Label(n) => {
                    let got = decode(raw.get(i)?)?;
                    // Smithy: a label never matches an empty segment.
                    if got.is_empty() {
                        return None;
                    }
                    labels.insert(n.clone(), got);
                    i += 1;
                }
                Segment::Greedy(n) => {
                    // The greedy label takes what the remaining literals leave.
                    let rest = self.segments.len() - si - 1;
                    let end = raw.len().checked_sub(rest)?;
                    if end <= i {
                        return None;
                    }
                    let joined = raw[i..end].join("/");
                    let got = decode(&joined)?;
                    if got.is_empty() {
                        return None;
                    }
                    labels.insert(n.clone(), got);
                    i = end;
                }
            }
        }
        if i != raw.len() {
            return None;
        }
        Some((literals, labels))
    }
}

const LABEL_SET: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');
const GREEDY_SET: &percent_encoding::AsciiSet = &LABEL_SET.remove(b'/');

fn encode_label(value: &str, greedy: bool) -> String {
    let set = if greedy { GREEDY_SET } else { LABEL_SET };
    percent_encoding::utf8_percent_encode(value, set).to_string()
}

/// Percent-decodes a path segment; None for invalid UTF-8. (`+` is literal in
/// paths, unlike in query strings.)
fn decode(raw: &str) -> Option<String> {
    percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .ok()
        .map(|c| c.into_owned())
}

fn parse_template(uri: &str) -> (Vec<Segment>, Vec<(String, Option<String>)>) {
    let (path, query) = match uri.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (uri, None),
    };
    let segments = path
        .split('/')
        .map(|s| {
            if let Some(inner) = s.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                match inner.strip_suffix('+') {
                    Some(n) => Segment::Greedy(n.to_string()),
                    None => Segment::Label(inner.to_string()),
                }
            } else {
                Segment::Literal(s.to_string())
            }
        })
        .collect();
    let query_literals = query
        .map(|q| {
            q.split('&')
                .filter(|p| !p.is_empty())
                .map(|p| match p.split_once('=') {
                    Some((k, v)) => (k.to_string(), Some(v.to_string())),
                    None => (p.to_string(), None),
                })
                .collect()
        })
        .unwrap_or_default();
    (segments, query_literals)
}

/// Translates a model pattern (Java `java.util.regex` syntax, as AWS
/// validates with) into the `regex` crate's syntax with the same meaning.
/// The model's patterns all compile as they are, but three escapes and `.`
/// mean something else: in Java `\d`, `\s` and `\w` are ASCII-only while the
/// `regex` crate makes them Unicode-aware (so `[^\s]+` would reject a
/// no-break space that AWS accepts), and Java's `.` also excludes `\r`,
/// U+0085, U+2028 and U+2029. Nested classes (`[^[...]]`) keep the
/// replacements valid inside brackets.
pub(crate) fn translate_java(pattern: &str) -> String {
    const SPACE: &str = r"\t\n\x0B\x0C\r ";
    let mut out = String::with_capacity(pattern.len() + 16);
    let mut chars = pattern.chars();
    let mut class_depth = 0usize;
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some('d') => out.push_str("[0-9]"),
                Some('D') => out.push_str("[^0-9]"),
                Some('s') => out.push_str(&format!("[{SPACE}]")),
                Some('S') => out.push_str(&format!("[^{SPACE}]")),
                Some('w') => out.push_str("[a-zA-Z_0-9]"),
                Some('W') => out.push_str("[^a-zA-Z_0-9]"),
                Some(other) => {
                    out.push('\\');
                    out.push(other);
                }
                None => out.push('\\'),
            },
            '[' => {
                class_depth += 1;
                out.push(c);
            }
            ']' if class_depth > 0 => {
                class_depth -= 1;
                out.push(c);
            }
            '.' if class_depth == 0 => out.push_str(r"[^\n\r\x{85}\x{2028}\x{2029}]"),
            _ => out.push(c),
        }
    }
    out
}

/// Extra accepted patterns per shape, for hearth's documented deviations
/// (shared/spec/BEHAVIOUR.md, DEVIATIONS): MicroVMs can be tagged too, so a
/// MicroVM ARN is a taggable resource. The model's pattern still applies and
/// is the one quoted in messages.
const PATTERN_EXTENSIONS: &[(&str, &str)] = &[(
    "TaggableResource",
    r"arn:(aws[a-zA-Z-]*):lambda:(eusc-)?[a-z]{2}((-gov)|(-iso([a-z]?)))?-[a-z]+-\d{1}:\d{12}:microvm:[a-zA-Z0-9-_]+",
)];

/// The parsed model.
#[derive(Debug)]
pub struct Model {
    pub version: String,
    pub api_version: String,
    pub metadata: Value,
    operations: BTreeMap<String, Operation>,
    shapes: BTreeMap<String, Shape>,
    /// `(shape, pattern, regex error)` for every pattern that did not compile.
    pattern_failures: Vec<(String, String, String)>,
    paginators: Value,
}

/// Anchors a model pattern. The model's patterns are meant as whole-value
/// matches (AWS validates with Java's `Pattern.matches`), so `[a-z]+` must
/// reject `a b`; `regex` searches, hence the anchors.
fn compile_anchored(pattern: &str) -> Result<regex::Regex, regex::Error> {
    let translated = translate_java(pattern);
    regex::Regex::new(&format!("^(?:{translated})$"))
}

fn int_of(v: Option<&Value>) -> Option<i64> {
    let v = v?;
    // Bounds are integers in this model; a decimal bound is floored rather
    // than dropped so it still constrains.
    v.as_i64().or_else(|| v.as_f64().map(|f| f.floor() as i64))
}

fn str_of(v: Option<&Value>) -> Option<String> {
    v.and_then(Value::as_str).map(str::to_string)
}

impl Model {
    /// Parses a botocore service model (and its paginators file, which may be
    /// `{}`).
    pub fn from_json(model: &str, paginators: &str) -> Result<Model, String> {
        let root: Value = serde_json::from_str(model).map_err(|e| format!("model: {e}"))?;
        let paginators: Value =
            serde_json::from_str(paginators).map_err(|e| format!("paginators: {e}"))?;
        let metadata = root.get("metadata").cloned().unwrap_or(Value::Null);
        let api_version = str_of(metadata.get("apiVersion")).unwrap_or_default();
        let version = str_of(root.get("version")).unwrap_or_default();

        let mut shapes = BTreeMap::new();
        let mut pattern_failures = Vec::new();
        let raw_shapes = root
            .get("shapes")
            .and_then(Value::as_object)
            .ok_or("model has no shapes")?;
        for (name, s) in raw_shapes {
            let shape = parse_shape(name, s, &mut pattern_failures)?;
            shapes.insert(name.clone(), shape);
        }

        let mut operations = BTreeMap::new();
        let raw_ops = root
            .get("operations")
            .and_then(Value::as_object)
            .ok_or("model has no operations")?;
        for (name, o) in raw_ops {
            let http_def = o.get("http").ok_or(format!("{name}: no http"))?;
            let method_str = str_of(http_def.get("method")).ok_or(format!("{name}: no method"))?;
            let method = http::Method::from_bytes(method_str.as_bytes())
                .map_err(|e| format!("{name}: method: {e}"))?;
            let uri = str_of(http_def.get("requestUri")).ok_or(format!("{name}: no uri"))?;
            let success_code = int_of(http_def.get("responseCode"))
                .and_then(|c| u16::try_from(c).ok())
                .unwrap_or(200);
            let shape_ref = |key: &str| o.get(key).and_then(|v| str_of(v.get("shape")));
            let input = shape_ref("input");
            let output = shape_ref("output");
            for s in input.iter().chain(output.iter()) {
                if !shapes.contains_key(s) {
                    return Err(format!("{name}: unknown shape {s}"));
                }
            }
            let errors = o
                .get("errors")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(|e| str_of(e.get("shape"))).collect())
                .unwrap_or_default();
            let (segments, query_literals) = parse_template(&uri);
            operations.insert(
                name.clone(),
                Operation {
                    name: name.clone(),
                    method,
                    uri,
                    success_code,
                    input,
                    output,
                    errors,
                    idempotent: o
                        .get("idempotent")
                        .and_then(Value::as_bool)
                        .unwrap_or(false),
                    readonly: o.get("readonly").and_then(Value::as_bool).unwrap_or(false),
                    segments,
                    query_literals,
                },
            );
        }

        // Every referenced shape must exist, or validation would have holes.
        for shape in shapes.values() {
            let targets: Vec<&str> = match &shape.kind {
                ShapeKind::List { member } => vec![member],
                ShapeKind::Map { key, value } => vec![key, value],
                ShapeKind::Structure => shape.members.iter().map(|m| m.shape.as_str()).collect(),
                _ => vec![],
            };
            for t in targets {
                if !shapes.contains_key(t) {
                    return Err(format!("{}: unknown shape {t}", shape.name));
                }
            }
        }

        for (shape, pattern, err) in &pattern_failures {
            tracing::warn!(shape, pattern, error = %err, "model pattern does not compile; not enforced");
        }

        Ok(Model {
            version,
            api_version,
            metadata,
            operations,
            shapes,
            pattern_failures,
            paginators,
        })
    }

    pub fn operation(&self, name: &str) -> Option<&Operation> {
        self.operations.get(name)
    }

    pub fn operations(&self) -> impl Iterator<Item = &Operation> {
        self.operations.values()
    }

    pub fn shape(&self, name: &str) -> Option<&Shape> {
        self.shapes.get(name)
    }

    pub fn shapes(&self) -> impl Iterator<Item = &Shape> {
        self.shapes.values()
    }

    /// `(shape, pattern, error)` for each model pattern the `regex` crate
    /// rejected even after translation; those patterns are not enforced.
    pub fn pattern_failures(&self) -> &[(String, String, String)] {
        &self.pattern_failures
    }

    /// The paginators file (`{"pagination": {Op: {input_token, ...}}}`).
    pub fn paginators(&self) -> &Value {
        &self.paginators
    }

    /// Finds the operation for a method and a raw (percent-encoded) path;
    /// returns it with the decoded URI labels. A query string on `raw_path`
    /// is ignored except for templates that require query literals.
    /// The most specific match (most literal segments) wins.
    pub fn route(
        &self,
        method: &http::Method,
        raw_path: &str,
    ) -> Option<(&Operation, BTreeMap<String, String>)> {
        let (path, query) = match raw_path.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (raw_path, None),
        };
        if !path.starts_with('/') {
            return None;
        }
        let raw: Vec<&str> = path.split('/').collect();
        let mut best: Option<(usize, &Operation, BTreeMap<String, String>)> = None;
        for op in self.operations.values() {
            if op.method != *method {
                continue;
            }
            if !op.query_literals.is_empty() && !query_has_literals(query, &op.query_literals) {
                continue;
            }
            if let Some((score, labels)) = op.match_path(&raw) {
                let score = score + op.query_literals.len();
                if best.as_ref().is_none_or(|(s, _, _)| score > *s) {
                    best = Some((score, op, labels));
                }
            }
        }
        best.map(|(_, op, labels)| (op, labels))
    }

    /// Whether some operation has this path with another method; lets a
    /// server tell "wrong method" from "no such path" if it wants to.
    pub fn path_exists(&self, raw_path: &str) -> bool {
        let path = raw_path.split_once('?').map_or(raw_path, |(p, _)| p);
        let raw: Vec<&str> = path.split('/').collect();
        path.starts_with('/')
            && self
                .operations
                .values()
                .any(|op| op.match_path(&raw).is_some())
    }
}

fn query_has_literals(query: Option<&str>, literals: &[(String, Option<String>)]) -> bool {
    let pairs: Vec<(String, String)> = query
        .map(|q| {
            form_urlencoded::parse(q.as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect()
        })
        .unwrap_or_default();
    literals.iter().all(|(k, v)| {
        pairs
            .iter()
            .any(|(pk, pv)| pk == k && v.as_ref().is_none_or(|v| v == pv))
    })
}

fn parse_shape(
    name: &str,
    s: &Value,
    pattern_failures: &mut Vec<(String, String, String)>,
) -> Result<Shape, String> {
    let ty = str_of(s.get("type")).ok_or(format!("{name}: no type"))?;
    let target = |key: &str| -> Result<String, String> {
        s.get(key)
            .and_then(|m| str_of(m.get("shape")))
            .ok_or(format!("{name}: no {key}"))
    };
    let kind = match ty.as_str() {
        "string" => ShapeKind::String,
        "integer" => ShapeKind::Integer,
        "long" => ShapeKind::Long,
        "float" => ShapeKind::Float,
        "double" => ShapeKind::Double,
        "boolean" => ShapeKind::Boolean,
        "timestamp" => ShapeKind::Timestamp,
        "blob" => ShapeKind::Blob,
        "document" => ShapeKind::Document,
        "structure" => ShapeKind::Structure,
        "list" => ShapeKind::List {
            member: target("member")?,
        },
        "map" => ShapeKind::Map {
            key: target("key")?,
            value: target("value")?,
        },
        other => return Err(format!("{name}: unknown type {other}")),
    };
    let mut members: Vec<Member> = s
        .get("members")
        .and_then(Value::as_object)
        .map(|ms| {
            ms.iter()
                .map(|(mname, m)| {
                    let location = match m.get("location").and_then(Value::as_str) {
                        Some("uri") => Location::Uri,
                        Some("querystring") => Location::Querystring,
                        Some("header") => Location::Header,
                        Some("headers") => Location::Headers,
                        Some("statusCode") => Location::StatusCode,
                        _ => Location::Body,
                    };
                    Member {
                        name: mname.clone(),
                        shape: str_of(m.get("shape")).unwrap_or_default(),
                        location,
                        location_name: str_of(m.get("locationName"))
                            .unwrap_or_else(|| mname.clone()),
                        idempotency_token: m
                            .get("idempotencyToken")
                            .and_then(Value::as_bool)
                            .unwrap_or(false),
                        sensitive: m.get("sensitive").and_then(Value::as_bool).unwrap_or(false),
                        timestamp_format: str_of(m.get("timestampFormat")),
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    members.sort_by(|a, b| a.name.cmp(&b.name));
    let pattern = str_of(s.get("pattern"));
    let mut regexes = Vec::new();
    if let Some(p) = &pattern {
        match compile_anchored(p) {
            Ok(r) => {
                regexes.push(r);
                for (_, extra) in PATTERN_EXTENSIONS.iter().filter(|(n, _)| *n == name) {
                    match compile_anchored(extra) {
                        Ok(r) => regexes.push(r),
                        Err(e) => pattern_failures.push((
                            name.to_string(),
                            extra.to_string(),
                            e.to_string(),
                        )),
                    }
                }
            }
            Err(e) => pattern_failures.push((name.to_string(), p.clone(), e.to_string())),
        }
    }
    let error_status = s
        .get("error")
        .and_then(|e| int_of(e.get("httpStatusCode")))
        .and_then(|c| u16::try_from(c).ok());
    Ok(Shape {
        name: name.to_string(),
        kind,
        min: int_of(s.get("min")),
        max: int_of(s.get("max")),
        pattern,
        enum_values: strings_of(s.get("enum")),
        members,
        required: strings_of(s.get("required")),
        union: s.get("union").and_then(Value::as_bool).unwrap_or(false),
        sensitive: s.get("sensitive").and_then(Value::as_bool).unwrap_or(false),
        timestamp_format: str_of(s.get("timestampFormat")),
        payload: str_of(s.get("payload")),
        exception: s.get("exception").and_then(Value::as_bool).unwrap_or(false),
        error_status,
        regexes,
    })
}

/// A JSON array of strings, or empty when absent or of another type.
fn strings_of(value: Option<&Value>) -> Vec<String> {
    value
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
pub(crate) fn pattern_extensions() -> &'static [(&'static str, &'static str)] {
    PATTERN_EXTENSIONS
}

#[cfg(test)]
pub(crate) fn compile_for_test(p: &str) -> Result<regex::Regex, regex::Error> {
    compile_anchored(p)
}

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

use super::*;
use crate::model::translate_java;

const TAG_ARN: &str = "arn:aws:lambda:us-east-1:123456789012:microvm-image:foo";

fn parse(op: &str, query: Option<&str>, body: &str) -> Result<Value, ApiError> {
    let m = model();
    let op = m.operation(op).expect("operation");
    m.parse_input(
        op,
        &BTreeMap::new(),
        query,
        &http::HeaderMap::new(),
        body.as_bytes(),
    )
}

fn parse_err(op: &str, query: Option<&str>, body: &str) -> ApiError {
    parse(op, query, body).expect_err("should fail validation")
}

// ---------------------------------------------------------------- the model

#[test]
fn model_parses() {
    let m = Model::from_json(MODEL_JSON, PAGINATORS_JSON).expect("embedded model parses");
    assert_eq!(m.operations().count(), 24);
    assert_eq!(m.api_version, "2025-09-09");
    assert_eq!(m.metadata["protocol"], "rest-json");
    assert!(m.paginators()["pagination"]["ListMicrovms"].is_object());
    assert_eq!(model().operations().count(), 24);
}

#[test]
fn embedded_model_matches_shared_spec() {
    // The spec lives outside the repository (/work/shared/spec here,
    // `../shared/spec` beside CI's checkout); skip silently where it is absent.
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/spec");
    for (file, embedded) in [
        ("lambda-microvms-2025-09-09.json", MODEL_JSON),
        (
            "lambda-microvms-2025-09-09.paginators.json",
            PAGINATORS_JSON,
        ),
    ] {
        let Ok(shared) = std::fs::read(format!("{dir}/{file}")) else {
            continue;
        };
        assert!(
            shared == embedded.as_bytes(),
            "{file} differs from shared/spec"
        );
    }
}

#[test]
fn all_patterns_compile() {
    let m = model();
    assert!(
        m.pattern_failures().is_empty(),
        "{:?}",
        m.pattern_failures()
    );
    let mut patterned = 0;
    for s in m.shapes() {
        if let Some(p) = &s.pattern {
            patterned += 1;
            crate::model::compile_for_test(p).expect("pattern compiles");
        }
    }
    assert_eq!(patterned, 12);
    for (shape, extra) in crate::model::pattern_extensions() {
        assert!(
            m.shape(shape).is_some_and(|s| s.pattern.is_some()),
            "{shape}"
        );
        crate::model::compile_for_test(extra).expect("extension compiles");
    }
}

#[test]
fn java_pattern_semantics() {
    assert_eq!(translate_java(r"[^\s]+"), r"[^[\t\n\x0B\x0C\r ]]+");
    assert_eq!(translate_java(r"\d{12}"), "[0-9]{12}");
    assert_eq!(
        translate_java(r"a\.b.c[.]"),
        r"a\.b[^\n\r\x{85}\x{2028}\x{2029}]c[.]"
    );
    assert_eq!(translate_java(r"[\p{L}\-@]*"), r"[\p{L}\-@]*");
    let m = model();
    let nbs = m.shape("NonBlankString").expect("shape");
    // Java's \s is ASCII: a no-break space is "non-blank" to AWS.
    assert!(nbs.pattern_matches("a\u{a0}b"));
    assert!(!nbs.pattern_matches("a b"));
    assert!(!nbs.pattern_matches("a\tb"));
    // Whole-value match, as Java's Pattern.matches.
    let name = m.shape("ImageName").expect("shape");
    assert!(name.pattern_matches("my-image_1"));
    assert!(!name.pattern_matches("my image"));
    assert!(!name.pattern_matches("x!"));
    let arn = m.shape("TaggableResource").expect("shape");
    assert!(arn.pattern_matches(TAG_ARN));
    // Java's \d is ASCII-only.
    assert!(!arn.pattern_matches("arn:aws:lambda:us-east-1:١٢٣٤٥٦٧٨٩٠١٢:microvm-image:foo"));
    // hearth's extension: MicroVMs are taggable.
    assert!(arn.pattern_matches("arn:aws:lambda:us-east-1:123456789012:microvm:microvm-0a1b"));
    assert!(!arn.pattern_matches("arn:aws:lambda:us-east-1:123456789012:bogus:x"));
}

// ------------------------------------------------------------------ errors

#[test]
fn error_statuses_match_model() {
    let m = model();
    let mut seen = 0;
    for s in m.shapes().filter(|s| s.exception) {
        let code = ErrorCode::from_type_name(&s.name)
            .unwrap_or_else(|| panic!("no ErrorCode for {}", s.name));
        assert_eq!(Some(code.status()), s.error_status, "{}", s.name);
        seen += 1;
    }
    assert_eq!(seen, 12);
    // Every error an operation lists has a code.
    for op in m.operations() {
        for e in &op.errors {
            assert!(ErrorCode::from_type_name(e).is_some(), "{}: {e}", op.name);
        }
    }
    assert_eq!(ErrorCode::ServiceQuotaExceeded.status(), 402);
    assert_eq!(ErrorCode::UnknownOperation.status(), 404);
    assert_eq!(ErrorCode::MissingAuthenticationToken.status(), 403);
    assert_eq!(
        ErrorCode::InvalidSignature.type_name(),
        "InvalidSignatureException"
    );
    assert_eq!(ErrorCode::InvalidSignature.status(), 403);
    assert_eq!(ErrorCode::UnrecognizedClient.status(), 403);
    for c in ErrorCode::ALL {
        assert_eq!(ErrorCode::from_type_name(c.type_name()), Some(c));
    }
}

#[test]
fn error_to_http() {
    let r = ApiError::not_found("MicroVM microvm-1 not found").to_http();
    assert_eq!(r.status(), 404);
    assert_eq!(r.headers()["x-amzn-errortype"], "ResourceNotFoundException");
    assert_eq!(r.headers()["content-type"], "application/json");
    let body: Value = serde_json::from_slice(r.body()).expect("json body");
    assert_eq!(body, json!({"message": "MicroVM microvm-1 not found"}));

    let r = ApiError::new(ErrorCode::ServiceQuotaExceeded, "quota \"x\"").to_http();
    assert_eq!(r.status(), 402);
    let body: Value = serde_json::from_slice(r.body()).expect("json body");
    assert_eq!(body["message"], "quota \"x\"");

    let r = ApiError::missing_authentication_token().to_http();
    assert_eq!(r.status(), 403);
    assert_eq!(
        r.headers()["x-amzn-errortype"],
        "MissingAuthenticationTokenException"
    );
    assert_eq!(
        serde_json::from_slice::<Value>(r.body()).expect("json"),
        json!({"message": "Missing Authentication Token"})
    );
    let r = ApiError::unknown_operation().to_http();
    assert_eq!(r.status(), 404);
    assert_eq!(r.headers()["x-amzn-errortype"], "UnknownOperationException");
    assert_eq!(
        ApiError::validation("x").to_string(),
        "Validation: x",
        "Display is for logs"
    );
}

// ----------------------------------------------------------------- routing

fn sample_labels(op: &Operation) -> BTreeMap<String, String> {
    op.labels()
        .map(|l| {
            let v = match l {
                "Resource" => TAG_ARN.to_string(),
                "imageVersion" => "1.0".to_string(),
                "microvmIdentifier" => "microvm-0123 4/x".to_string(),
                other => format!("{other}-value"),
            };
            (l.to_string(), v)
        })
        .collect()
}

#[test]
fn every_operation_routes() {
    let m = model();
    for op in m.operations() {
        let labels = sample_labels(op);
        let path = op.render_uri(&labels).expect("all labels given");
        let (found, got) = m
            .route(&op.method, &path)
            .unwrap_or_else(|| panic!("{} {path} does not route", op.name));
        assert_eq!(found.name, op.name, "{path}");
        assert_eq!(got, labels, "{path}");
        // With a query string too.
        let (found, _) = m
            .route(&op.method, &format!("{path}?maxResults=3"))
            .expect("routes");
        assert_eq!(found.name, op.name);
        // Trailing junk and trailing slashes do not route to this operation
        // (`x` appended to a final label is just another label value).
        for junk in [
            format!("{path}/junk"),
            format!("{path}/"),
            format!("{path}x"),
        ] {
            if let Some((other, got)) = m.route(&op.method, &junk) {
                assert!(other.name != op.name || got != labels, "{junk}");
            }
        }
        // No other method reaches this operation.
        for method in [
            http::Method::GET,
            http::Method::POST,
            http::Method::PUT,
            http::Method::PATCH,
            http::Method::DELETE,
            http::Method::HEAD,
        ] {
            if method != op.method {
                if let Some((other, _)) = m.route(&method, &path) {
                    assert_ne!(other.name, op.name);
                }
            }
        }
        assert!(m.path_exists(&path));
    }
}

#[test]
fn routing_examples() {
    let m = model();
    let path =
        "/2017-03-31/tags/arn%3Aaws%3Alambda%3Aus-east-1%3A123456789012%3Amicrovm-image%3Afoo";
    let (op, labels) = m.route(&http::Method::POST, path).expect("routes");
    assert_eq!(op.name, "TagResource");
    assert_eq!(op.success_code, 204);
    assert_eq!(labels["Resource"], TAG_ARN);
    // Colons need no escaping in a path; both spellings work.
    let (op, labels) = m
        .route(&http::Method::GET, &format!("/2017-03-31/tags/{TAG_ARN}"))
        .expect("routes");
    assert_eq!(op.name, "ListTags");
    assert_eq!(labels["Resource"], TAG_ARN);
    let (op, _) = m.route(&http::Method::DELETE, path).expect("routes");
    assert_eq!(op.name, "UntagResource");

    let (op, _) = m
        .route(&http::Method::POST, "/2025-09-09/microvms")
        .expect("routes");
    assert_eq!((op.name.as_str(), op.success_code), ("RunMicrovm", 200));
    let (op, _) = m
        .route(&http::Method::POST, "/2025-09-09/microvm-images")
        .expect("routes");
    assert_eq!(
        (op.name.as_str(), op.success_code),
        ("CreateMicrovmImage", 201)
    );
    let (op, l) = m
        .route(&http::Method::GET, "/2025-09-09/microvms/microvm-1")
        .expect("routes");
    assert_eq!(op.name, "GetMicrovm");
    assert_eq!(l["microvmIdentifier"], "microvm-1");
    let (op, l) = m
        .route(&http::Method::POST, "/2025-09-09/microvms/microvm-1/resume")
        .expect("routes");
    assert_eq!(op.name, "ResumeMicrovm");
    assert_eq!(l["microvmIdentifier"], "microvm-1");
    // A label is one segment: an encoded slash stays inside it.
    let (_, l) = m
        .route(&http::Method::GET, "/2025-09-09/microvms/a%2Fb")
        .expect("routes");
    assert_eq!(l["microvmIdentifier"], "a/b");

    assert!(m
        .route(&http::Method::PUT, "/2025-09-09/microvms")
        .is_none());
    assert!(m
        .route(&http::Method::GET, "/2025-09-09/microvms/")
        .is_none());
    assert!(m
        .route(&http::Method::GET, "/2025-09-09/microvms//resume")
        .is_none());
    assert!(m
        .route(&http::Method::GET, "/2025-09-09/microvms/x/y/z")
        .is_none());
    assert!(m.route(&http::Method::GET, "/2025-09-09/nothing").is_none());
    assert!(m.route(&http::Method::GET, "").is_none());
    assert!(m.route(&http::Method::GET, "2025-09-09/microvms").is_none());
    // Not UTF-8 once decoded.
    assert!(m
        .route(&http::Method::GET, "/2025-09-09/microvms/%FF")
        .is_none());
    assert!(m.path_exists("/2025-09-09/microvms"));
    assert!(!m.path_exists("/2025-09-09/nothing"));
}

// ------------------------------------------------------------ parse_input

#[test]
fn run_microvm_valid() {
    let v = parse(
        "RunMicrovm",
        None,
        r#"{"imageIdentifier":"my-image","imageVersion":"1.0",
            "idlePolicy":{"maxIdleDurationSeconds":60,"suspendedDurationSeconds":0,"autoResumeEnabled":true},
            "logging":{"cloudWatch":{"logGroup":"/aws/x"}},
            "ingressNetworkConnectors":["arn:aws:lambda:us-east-1:aws:network-connector:aws-network-connector:HTTP_INGRESS"],
            "runHookPayload":"{\"a\":1}","maximumDurationInSeconds":28800,
            "clientToken":"tok","someUnknownMember":{"ignored":true}}"#,
    )
    .expect("valid");
    assert_eq!(v["imageIdentifier"], "my-image");
    assert_eq!(v["idlePolicy"]["autoResumeEnabled"], true);
    assert_eq!(v["maximumDurationInSeconds"], 28800);
    assert!(
        v.get("someUnknownMember").is_none(),
        "unknown members dropped"
    );
    // null is "not set".
    let v = parse(
        "RunMicrovm",
        None,
        r#"{"imageIdentifier":"i","imageVersion":null}"#,
    )
    .expect("valid");
    assert_eq!(v, json!({"imageIdentifier":"i"}));
    // Empty lists are fine where the model allows them.
    let v = parse(
        "RunMicrovm",
        None,
        r#"{"imageIdentifier":"i","egressNetworkConnectors":[]}"#,
    )
    .expect("valid");
    assert_eq!(v["egressNetworkConnectors"], json!([]));
}

#[test]
fn validation_messages() {
    let e = parse_err("RunMicrovm", None, "");
    assert_eq!(e.code, ErrorCode::Validation);
    assert_eq!(
        e.message,
        "1 validation error detected: Value null at 'imageIdentifier' failed to satisfy constraint: Member must not be null"
    );

    let long = "a".repeat(65);
    let e = parse_err(
        "CreateMicrovmImage",
        None,
        &format!(
            r#"{{"name":"{long}","baseImageArn":"b","buildRoleArn":"arn:aws:iam::123456789012:role/r","codeArtifact":{{"uri":"s3://b/k.zip"}}}}"#
        ),
    );
    assert_eq!(
        e.message,
        format!("1 validation error detected: Value '{long}' at 'name' failed to satisfy constraint: Member must have length less than or equal to 64")
    );

    let e = parse_err(
        "CreateMicrovmImage",
        None,
        r#"{"name":"bad name!","baseImageArn":"b","buildRoleArn":"arn:aws:iam::123456789012:role/r","codeArtifact":{"uri":"s3://b/k.zip"}}"#,
    );
    assert_eq!(
        e.message,
        "1 validation error detected: Value 'bad name!' at 'name' failed to satisfy constraint: Member must satisfy regular expression pattern: [a-zA-Z0-9-_]+"
    );

    // Several errors, nested paths, enum.
    let e = parse_err(
        "CreateMicrovmImage",
        None,
        r#"{"name":"","baseImageArn":"b","buildRoleArn":"arn:aws:iam::123456789012:role/r",
            "codeArtifact":{"uri":"s3://b/k.zip"},"cpuConfigurations":[{"architecture":"MIPS"}],
            "hooks":{"port":0,"microvmHooks":{"run":"ON"}}}"#,
    );
    assert_eq!(
        e.message,
        "5 validation errors detected: \
         Value 'MIPS' at 'cpuConfigurations.1.member.architecture' failed to satisfy constraint: Member must satisfy enum value set: [ARM_64, X86_64]; \
         Value 'ON' at 'hooks.microvmHooks.run' failed to satisfy constraint: Member must satisfy enum value set: [DISABLED, ENABLED]; \
         Value '0' at 'hooks.port' failed to satisfy constraint: Member must have value greater than or equal to 1; \
         Value '' at 'name' failed to satisfy constraint: Member must have length greater than or equal to 1; \
         Value '' at 'name' failed to satisfy constraint: Member must satisfy regular expression pattern: [a-zA-Z0-9-_]+"
    );

    // Wrong JSON types.
    let e = parse_err(
        "RunMicrovm",
        None,
        r#"{"imageIdentifier":5,"maximumDurationInSeconds":"10","idlePolicy":[]}"#,
    );
    assert_eq!(
        e.message,
        "3 validation errors detected: \
         Value '[]' at 'idlePolicy' failed to satisfy constraint: Member must be a structure; \
         Value '5' at 'imageIdentifier' failed to satisfy constraint: Member must be a string; \
         Value '10' at 'maximumDurationInSeconds' failed to satisfy constraint: Member must be an integer"
    );
    // Integers: no fractions, no overflow.
    for bad in ["1.5", "1e3", "4294967296", "-1"] {
        let e = parse_err(
            "RunMicrovm",
            None,
            &format!(r#"{{"imageIdentifier":"i","maximumDurationInSeconds":{bad}}}"#),
        );
        assert_eq!(e.code, ErrorCode::Validation, "{bad}");
        assert!(
            e.message.contains("'maximumDurationInSeconds'"),
            "{bad}: {}",
            e.message
        );
    }

    // Non-JSON, non-object bodies.
    for body in ["{", "[]", "\"x\"", "null", "{\"a\":1}x"] {
        let e = parse_err("RunMicrovm", None, body);
        assert_eq!(e.code, ErrorCode::Validation, "{body}");
        assert!(
            e.message
                .starts_with("Could not parse request body into json"),
            "{}",
            e.message
        );
    }

    // Unions: exactly one member.
    let e = parse_err(
        "CreateMicrovmAuthToken",
        None,
        r#"{"expirationInMinutes":5,"allowedPorts":[{"port":8080,"allPorts":{}}]}"#,
    );
    assert!(
        e.message.contains("Value at 'allowedPorts.1.member' failed to satisfy constraint: Member must have exactly one member set"),
        "{}",
        e.message
    );
}

#[test]
fn sensitive_values_are_not_echoed() {
    let payload = "p".repeat(4097);
    let e = parse_err(
        "RunMicrovm",
        None,
        &format!(r#"{{"imageIdentifier":"i","runHookPayload":"{payload}"}}"#),
    );
    assert_eq!(
        e.message,
        "1 validation error detected: Value at 'runHookPayload' failed to satisfy constraint: Member must have length less than or equal to 4096"
    );
    let e = parse_err(
        "CreateMicrovmImage",
        None,
        r#"{"name":"n","baseImageArn":"b","buildRoleArn":"arn:aws:iam::123456789012:role/r","codeArtifact":{"uri":"u"},
            "environmentVariables":{"BAD KEY":"secret-value"}}"#,
    );
    assert!(!e.message.contains("secret-value"), "{}", e.message);
    assert!(
        e.message.contains("Value at 'environmentVariables' failed to satisfy constraint: Map keys must satisfy constraint: [Member must satisfy regular expression pattern: [^\\s]+]"),
        "{}",
        e.message
    );
}

#[test]
fn query_parameters() {
    let v = parse(
        "ListMicrovms",
        Some("maxResults=10&nextToken=abc%3D%3D&imageIdentifier=img&junk=1"),
        "",
    )
    .expect("valid");
    assert_eq!(
        v,
        json!({"maxResults": 10, "nextToken": "abc==", "imageIdentifier": "img"})
    );
    let e = parse_err("ListMicrovms", Some("maxResults=51"), "");
    assert_eq!(
        e.message,
        "1 validation error detected: Value '51' at 'maxResults' failed to satisfy constraint: Member must have value less than or equal to 50"
    );
    let e = parse_err("ListMicrovms", Some("maxResults=0"), "");
    assert_eq!(
        e.message,
        "1 validation error detected: Value '0' at 'maxResults' failed to satisfy constraint: Member must have value greater than or equal to 1"
    );
    let e = parse_err("ListMicrovms", Some("maxResults=ten"), "");
    assert_eq!(
        e.message,
        "1 validation error detected: Value 'ten' at 'maxResults' failed to satisfy constraint: Member must be an integer"
    );
    let e = parse_err("ListMicrovms", Some("maxResults=99999999999"), "");
    assert_eq!(e.code, ErrorCode::Validation);
    // Query enums and a GET body that is ignored.
    let m = model();
    let op = m.operation("ListMicrovmImageBuilds").expect("op");
    let labels = BTreeMap::from([
        ("imageIdentifier".to_string(), "img".to_string()),
        ("imageVersion".to_string(), "1.0".to_string()),
    ]);
    let v = m
        .parse_input(
            op,
            &labels,
            Some("architecture=X86_64&chipset=INTEL"),
            &http::HeaderMap::new(),
            b"not json",
        )
        .expect("valid");
    assert_eq!(v["architecture"], "X86_64");
    let e = m
        .parse_input(
            op,
            &labels,
            Some("architecture=x86"),
            &http::HeaderMap::new(),
            b"",
        )
        .expect_err("bad enum");
    assert!(e
        .message
        .contains("Member must satisfy enum value set: [ARM_64, X86_64]"));
    // Repeated keys make a list.
    let op = m.operation("UntagResource").expect("op");
    let labels = BTreeMap::from([("Resource".to_string(), TAG_ARN.to_string())]);
    let v = m
        .parse_input(
            op,
            &labels,
            Some("tagKeys=a&tagKeys=b%20c"),
            &http::HeaderMap::new(),
            b"",
        )
        .expect("valid");
    assert_eq!(v["TagKeys"], json!(["a", "b c"]));
    let e = m
        .parse_input(op, &labels, None, &http::HeaderMap::new(), b"")
        .expect_err("TagKeys required");
    assert!(
        e.message.contains("Value null at 'TagKeys'"),
        "{}",
        e.message
    );
    // Labels are validated too.
    let bad = BTreeMap::from([("Resource".to_string(), "not-an-arn".to_string())]);
    let e = m
        .parse_input(op, &bad, Some("tagKeys=a"), &http::HeaderMap::new(), b"")
        .expect_err("bad arn");
    assert!(e.message.starts_with("1 validation error detected: Value 'not-an-arn' at 'Resource' failed to satisfy constraint: Member must satisfy regular expression pattern: arn:"), "{}", e.message);
}

#[test]
fn hostile_input_is_bounded() {
    // Deep nesting: serde_json's recursion limit answers, no stack overflow.
    let deep = format!(
        "{{\"idlePolicy\":{}{}}}",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let e = parse_err("RunMicrovm", None, &deep);
    assert_eq!(e.code, ErrorCode::Validation);
    assert!(e.message.contains("recursion limit"), "{}", e.message);

    // A huge list of wrong elements: every one is counted, few are listed.
    let ports = vec!["{\"port\":\"x\"}"; 50_000].join(",");
    let e = parse_err(
        "CreateMicrovmAuthToken",
        None,
        &format!(r#"{{"expirationInMinutes":5,"allowedPorts":[{ports}]}}"#),
    );
    // (plus the missing microvmIdentifier label)
    assert!(
        e.message.starts_with("50001 validation errors detected: "),
        "{}",
        &e.message[..80]
    );
    assert!(e.message.len() < 20_000, "{}", e.message.len());

    // A huge scalar list: one aggregated message, value rendering capped.
    let keys: Vec<String> = (0..100_000)
        .map(|i| format!("tagKeys={}", "k".repeat(129 + i % 2)))
        .collect();
    let m = model();
    let op = m.operation("UntagResource").expect("op");
    let labels = BTreeMap::from([("Resource".to_string(), TAG_ARN.to_string())]);
    let e = m
        .parse_input(
            op,
            &labels,
            Some(&keys.join("&")),
            &http::HeaderMap::new(),
            b"",
        )
        .expect_err("too long keys");
    assert!(
        e.message
            .starts_with("1 validation error detected: Value '[kkk"),
        "{}",
        &e.message[..80]
    );
    assert!(e.message.ends_with("...' at 'TagKeys' failed to satisfy constraint: Member must satisfy constraint: [Member must have length less than or equal to 128]"));
}

// --------------------------------------------- generated inputs and outputs

/// Strings tried, in order, for a string shape; padded to its minimum length.
/// The first that satisfies the shape is used, so a new pattern in the model
/// with no fitting candidate fails the test by name.
const CANDIDATES: &[&str] = &[
    "a",
    "1.0",
    "arn:aws:lambda:us-east-1:123456789012:microvm-image:foo",
    "arn:aws:iam::123456789012:role/build-role",
    "/aws/lambda-microvms/foo",
];

fn sample_string(shape: &Shape) -> String {
    if let Some(e) = shape.enum_values.first() {
        return e.clone();
    }
    let min = shape.min.unwrap_or(0).max(1) as usize;
    for c in CANDIDATES {
        let mut s = c.to_string();
        while s.chars().count() < min {
            s.push('a');
        }
        let fits_len = shape.max.is_none_or(|m| s.chars().count() as i64 <= m);
        if fits_len && shape.pattern_matches(&s) {
            return s;
        }
    }
    panic!("no sample string fits shape {}", shape.name)
}

/// A value of `shape` satisfying every constraint: only required members
/// (and the minimum list/map sizes) when `full` is false, every member when
/// it is true.
fn sample(m: &Model, shape: &Shape, full: bool, depth: usize) -> Value {
    assert!(depth < 20, "model recursion at {}", shape.name);
    let child = |n: &str| m.shape(n).unwrap_or_else(|| panic!("shape {n}"));
    // At least one element even when minimal: a required list in the query
    // string cannot be sent empty (there is no spelling for `[]`).
    let count = |shape: &Shape| {
        let min = shape.min.unwrap_or(0).max(1);
        shape.max.map_or(min, |max| min.min(max)) as usize
    };
    match &shape.kind {
        ShapeKind::String => Value::String(sample_string(shape)),
        ShapeKind::Integer | ShapeKind::Long => {
            let v = shape.min.unwrap_or(1).max(shape.min.unwrap_or(i64::MIN));
            json!(shape.max.map_or(v, |max| v.min(max)))
        }
        ShapeKind::Float | ShapeKind::Double => json!(1.5),
        ShapeKind::Boolean => json!(true),
        ShapeKind::Timestamp => json!(1_767_225_600),
        ShapeKind::Blob => json!("aGVhcnRo"),
        ShapeKind::Document => json!({"any": ["thing"]}),
        ShapeKind::Structure => {
            let mut out = Map::new();
            for mem in &shape.members {
                let wanted = if shape.union {
                    // Exactly one: the first member.
                    shape.members.first().is_some_and(|f| f.name == mem.name)
                } else {
                    full || shape.is_required(&mem.name)
                };
                if wanted && mem.location != Location::StatusCode {
                    out.insert(
                        mem.name.clone(),
                        sample(m, child(&mem.shape), full, depth + 1),
                    );
                }
            }
            Value::Object(out)
        }
        ShapeKind::List { member } => {
            let n = count(shape);
            Value::Array(
                (0..n)
                    .map(|_| sample(m, child(member), full, depth + 1))
                    .collect(),
            )
        }
        ShapeKind::Map { key, value } => {
            let n = count(shape);
            let k = child(key);
            let base = sample_string(k);
            Value::Object(
                (0..n)
                    .map(|i| {
                        let key = if i == 0 {
                            base.clone()
                        } else {
                            format!("{base}{i}")
                        };
                        (key, sample(m, child(value), full, depth + 1))
                    })
                    .collect(),
            )
        }
    }
}

fn text_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Puts a generated input on the wire, as an SDK would: labels, query,
/// headers and the JSON body.
fn to_request(
    m: &Model,
    op: &Operation,
    input: &Value,
) -> (String, String, http::HeaderMap, Vec<u8>) {
    let shape = m.shape(op.input.as_deref().expect("input")).expect("shape");
    let mut labels = BTreeMap::new();
    let mut query = form_urlencoded::Serializer::new(String::new());
    let mut headers = http::HeaderMap::new();
    let mut body = Map::new();
    for (name, v) in input.as_object().expect("object") {
        let mem = shape.member(name).expect("member");
        match mem.location {
            Location::Uri => {
                labels.insert(mem.location_name.clone(), text_of(v));
            }
            Location::Querystring => match v {
                Value::Array(items) => {
                    for i in items {
                        query.append_pair(&mem.location_name, &text_of(i));
                    }
                }
                other => {
                    query.append_pair(&mem.location_name, &text_of(other));
                }
            },
            Location::Header => {
                headers.insert(
                    http::HeaderName::from_bytes(mem.location_name.as_bytes()).expect("name"),
                    http::HeaderValue::from_str(&text_of(v)).expect("value"),
                );
            }
            _ => {
                body.insert(mem.location_name.clone(), v.clone());
            }
        }
    }
    let path = op.render_uri(&labels).expect("labels");
    let body = serde_json::to_vec(&Value::Object(body)).expect("json");
    (path, query.finish(), headers, body)
}

#[test]
fn generated_inputs_round_trip_for_every_operation() {
    let m = model();
    for op in m.operations() {
        let Some(input_shape) = op.input.as_deref() else {
            continue;
        };
        let shape = m.shape(input_shape).expect("shape");
        for full in [false, true] {
            let input = sample(m, shape, full, 0);
            let (path, query, headers, body) = to_request(m, op, &input);
            let (found, labels) = m
                .route(&op.method, &path)
                .unwrap_or_else(|| panic!("{}: {path} does not route", op.name));
            assert_eq!(found.name, op.name);
            let query = (!query.is_empty()).then_some(query.as_str());
            let parsed = m
                .parse_input(found, &labels, query, &headers, &body)
                .unwrap_or_else(|e| {
                    panic!("{} (full={full}) rejected {input}: {}", op.name, e.message)
                });
            assert_eq!(parsed, input, "{} (full={full})", op.name);
        }
    }
}

#[test]
fn generated_outputs_pass_check_output() {
    let m = model();
    for op in m.operations() {
        match op.output.as_deref() {
            Some(name) => {
                let shape = m.shape(name).expect("shape");
                for full in [false, true] {
                    let out = sample(m, shape, full, 0);
                    m.check_output(op, &out)
                        .unwrap_or_else(|e| panic!("{}: {e}", op.name));
                }
            }
            None => {
                m.check_output(op, &Value::Null).expect("no output");
                m.check_output(op, &json!({})).expect("no output");
                assert!(m.check_output(op, &json!({"x": 1})).is_err());
            }
        }
    }
}

#[test]
fn check_output_get_microvm() {
    let m = model();
    let op = m.operation("GetMicrovm").expect("op");
    let good = json!({
        "microvmId": "microvm-0123",
        "state": "RUNNING",
        "endpoint": "0123.lambda-microvm.us-east-1.on.aws",
        "imageArn": "arn:aws:lambda:us-east-1:123456789012:microvm-image:foo",
        "imageVersion": "1.0",
        "maximumDurationInSeconds": 28800,
        "startedAt": 1_767_225_600.25,
        "idlePolicy": {"maxIdleDurationSeconds": 60, "suspendedDurationSeconds": 0, "autoResumeEnabled": false},
        "ingressNetworkConnectors": ["arn:aws:lambda:us-east-1:aws:network-connector:aws-network-connector:HTTP_INGRESS"],
    });
    m.check_output(op, &good).expect("matches the model");

    let mut misspelled = good.clone();
    let obj = misspelled.as_object_mut().expect("object");
    let v = obj.remove("startedAt").expect("member");
    obj.insert("startAt".into(), v);
    let e = m
        .check_output(op, &misspelled)
        .expect_err("misspelled member");
    assert!(e.contains("'startedAt'") && e.contains("'startAt'"), "{e}");

    let mut bad = good.clone();
    bad["state"] = json!("RUNNNING");
    assert!(m
        .check_output(op, &bad)
        .expect_err("bad enum")
        .contains("enum value set"));
    let mut bad = good.clone();
    bad["startedAt"] = json!("2026-01-01T00:00:00Z");
    assert!(m
        .check_output(op, &bad)
        .expect_err("timestamp")
        .contains("must be a timestamp"));
    let mut bad = good;
    bad["idlePolicy"] = json!({"maxIdleDurationSeconds": 60});
    assert!(m.check_output(op, &bad).is_err());
}

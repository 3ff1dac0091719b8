//! Runs `hearth_auth::verify` against AWS's published SigV4 test suite, as vendored in
//! `tests/aws-sig-v4-test-suite/` (origin and license in its README.md).
//!
//! Every case is signed with AKIDEXAMPLE for `us-east-1`/`service` at
//! 2015-08-30T12:36:00Z. Each case is in exactly one of these groups:
//!
//! * [`ACCEPTED`]: the signed request must verify, our canonical request and string
//!   to sign must equal the published ones byte for byte, and tampering with the
//!   signature, a signed header, the method, path, query, body or timestamp must
//!   make it fail.
//! * [`UNNORMALIZED_PATH`]: the request path has `.`/`..` segments or `//`. Hearth
//!   refuses such paths instead of normalising them (see the crate docs), so these
//!   are checked to be refused. The `-unnormalized` cases are signed with S3's rules
//!   (path not normalised), which hearth's services do not use at all; for the
//!   `-normalized` ones (non-S3 rules), the request with the path in normal form —
//!   what a client that normalises before sending puts on the wire — must verify
//!   with the published signature and canonical request.
//! * [`NOT_HTTP`]: the signed request is not something an HTTP/1.1 server receives:
//!   a raw space in the request target (`get-space-*`) or a header folded over
//!   several lines (`get-header-value-multiline`, obs-fold, which RFC 9112 lets a
//!   server refuse and hyper does). A client would have to send `%20` or one line,
//!   which changes the canonical request, so the published signature cannot apply.
//!
//! Not vendored: the `query-*` (presigned URL) files, because hearth only accepts
//! signatures in the `Authorization` header, and the v4a (ECDSA) suite.
//!
//! [`double_url_encode_lambda_arn`] additionally runs `double-url-encode`, a Lambda
//! case that the Rust SDK added to its copy of the suite.

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hearth_auth::{signing_strings, verify, AuthError, Verified, VerifyConfig};
use http::request::Parts;
use http::{HeaderName, HeaderValue, Method, Uri};

const AKID: &str = "AKIDEXAMPLE";
const SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";
/// 2015-08-30T12:36:00Z, when the suite was signed.
const SIGNED_AT: u64 = 1_440_938_160;
const MAX_SKEW: Duration = Duration::from_secs(15 * 60);

const ACCEPTED: &[&str] = &[
    "get-header-key-duplicate",
    "get-header-value-order",
    "get-header-value-trim",
    "get-unreserved",
    "get-utf8",
    "get-vanilla",
    "get-vanilla-empty-query-key",
    "get-vanilla-query",
    "get-vanilla-query-order-encoded",
    "get-vanilla-query-order-key-case",
    "get-vanilla-query-unreserved",
    "get-vanilla-utf8-query",
    "get-vanilla-with-session-token",
    "post-header-key-case",
    "post-header-key-sort",
    "post-header-value-case",
    "post-sts-header-after",
    "post-sts-header-before",
    "post-vanilla",
    "post-vanilla-empty-query-value",
    "post-vanilla-query",
    "post-x-www-form-urlencoded",
    "post-x-www-form-urlencoded-parameters",
];

const UNNORMALIZED_PATH: &[&str] = &[
    "get-relative-normalized",
    "get-relative-relative-normalized",
    "get-relative-relative-unnormalized",
    "get-relative-unnormalized",
    "get-slash-dot-slash-normalized",
    "get-slash-dot-slash-unnormalized",
    "get-slash-normalized",
    "get-slash-pointless-dot-normalized",
    "get-slash-pointless-dot-unnormalized",
    "get-slash-unnormalized",
    "get-slashes-normalized",
    "get-slashes-unnormalized",
];

const NOT_HTTP: &[&str] = &[
    "get-header-value-multiline",
    "get-space-normalized",
    "get-space-unnormalized",
];

const DOUBLE_URL_ENCODE: &str = "double-url-encode";

fn read(case: &str, file: &str) -> Vec<u8> {
    let path = suite_dir().join(case).join(file);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn read_text(case: &str, file: &str) -> String {
    String::from_utf8(read(case, file)).expect("UTF-8 test vector")
}

fn suite_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/aws-sig-v4-test-suite")
}

fn at(unix_seconds: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(unix_seconds)
}

fn config() -> VerifyConfig {
    VerifyConfig {
        region: "us-east-1".to_owned(),
        service: "service".to_owned(),
        max_skew: MAX_SKEW,
    }
}

fn lookup(akid: &str) -> Option<String> {
    (akid == AKID).then(|| SECRET.to_owned())
}

fn check(parts: &Parts, body: &[u8], now: SystemTime) -> Result<Verified, AuthError> {
    verify(parts, body, &config(), now, lookup)
}

fn ok() -> Result<Verified, AuthError> {
    Ok(Verified {
        access_key_id: AKID.to_owned(),
    })
}

fn trim_ows(mut b: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = b {
        b = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = b {
        b = rest;
    }
    b
}

/// Parses a request file (`GET /path HTTP/1.1`, `Name:value` lines, a blank line,
/// the body) into what an HTTP server hands over. Like hyper, refuses a target that
/// `http::Uri` does not take and obs-fold continuation lines.
fn parse_request(raw: &[u8]) -> Result<(Parts, Vec<u8>), String> {
    let (head, body) = match raw.windows(2).position(|w| w == b"\n\n") {
        Some(i) => (&raw[..i], raw[i + 2..].to_vec()),
        None => (raw.strip_suffix(b"\n").unwrap_or(raw), Vec::new()),
    };
    let mut lines = head.split(|&b| b == b'\n');
    let request_line = lines.next().ok_or("empty request")?;
    let (method, rest) = request_line
        .iter()
        .position(|&b| b == b' ')
        .map(|i| (&request_line[..i], &request_line[i + 1..]))
        .ok_or("no request target")?;
    // `double-url-encode` leaves out the version.
    let target = rest.strip_suffix(b" HTTP/1.1").unwrap_or(rest);
    let mut builder = http::Request::builder()
        .method(Method::from_bytes(method).map_err(|e| e.to_string())?)
        .uri(Uri::try_from(target).map_err(|e| e.to_string())?);
    for line in lines {
        if line.starts_with(b" ") || line.starts_with(b"\t") {
            return Err("obs-fold header line".to_owned());
        }
        let colon = line
            .iter()
            .position(|&b| b == b':')
            .ok_or("header line without ':'")?;
        let name = HeaderName::from_bytes(&line[..colon]).map_err(|e| e.to_string())?;
        let value =
            HeaderValue::from_bytes(trim_ows(&line[colon + 1..])).map_err(|e| e.to_string())?;
        builder = builder.header(name, value);
    }
    let request = builder.body(()).map_err(|e| e.to_string())?;
    Ok((request.into_parts().0, body))
}

fn signed_request(case: &str) -> (Parts, Vec<u8>) {
    parse_request(&read(case, "header-signed-request.txt"))
        .unwrap_or_else(|e| panic!("{case}: {e}"))
}

fn authorization(p: &Parts) -> &str {
    p.headers
        .get("authorization")
        .expect("Authorization header")
        .to_str()
        .expect("ASCII Authorization header")
}

fn signed_header_names(p: &Parts) -> Vec<String> {
    let auth = authorization(p);
    let start = auth.find("SignedHeaders=").expect("SignedHeaders") + "SignedHeaders=".len();
    let list = auth[start..].split(',').next().unwrap_or_default();
    list.split(';').map(str::to_owned).collect()
}

fn with_target(p: &Parts, target: &str) -> Parts {
    let mut p = p.clone();
    p.uri = Uri::try_from(target).expect("valid target");
    p
}

fn with_header(p: &Parts, name: &str, value: &str) -> Parts {
    let mut p = p.clone();
    p.headers.insert(
        HeaderName::from_bytes(name.as_bytes()).expect("header name"),
        HeaderValue::from_str(value).expect("header value"),
    );
    p
}

/// Appends `x` to the first value of header `name`, keeping any further values.
fn with_tampered_header(p: &Parts, name: &str) -> Parts {
    let mut p = p.clone();
    let mut values: Vec<HeaderValue> = p.headers.get_all(name).iter().cloned().collect();
    let first = [values[0].as_bytes(), b"x"].concat();
    values[0] = HeaderValue::from_bytes(&first).expect("header value");
    p.headers.remove(name);
    let name = HeaderName::from_bytes(name.as_bytes()).expect("header name");
    for v in values {
        p.headers.append(name.clone(), v);
    }
    p
}

#[test]
fn every_vendored_case_is_classified() {
    let mut on_disk: Vec<String> = std::fs::read_dir(suite_dir())
        .expect("suite directory")
        .map(|e| e.expect("dir entry"))
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().into_string().expect("UTF-8 name"))
        .collect();
    on_disk.sort();
    let mut listed: Vec<String> = [ACCEPTED, UNNORMALIZED_PATH, NOT_HTTP, &[DOUBLE_URL_ENCODE]]
        .concat()
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    listed.sort();
    assert_eq!(on_disk, listed);

    for case in [ACCEPTED, UNNORMALIZED_PATH, NOT_HTTP].concat() {
        let context = read_text(case, "context.json");
        for expected in [
            r#""access_key_id": "AKIDEXAMPLE""#,
            r#""secret_access_key": "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY""#,
            r#""region": "us-east-1""#,
            r#""service": "service""#,
            r#""timestamp": "2015-08-30T12:36:00Z""#,
        ] {
            assert!(context.contains(expected), "{case}: {expected}");
        }
        // Hearth's services sign with the non-S3 rules, i.e. with path normalisation.
        let normalize = context.contains(r#""normalize": true"#);
        assert_eq!(normalize, !case.ends_with("-unnormalized"), "{case}");
    }
}

#[test]
fn accepted_cases_verify() {
    for case in ACCEPTED {
        let (p, body) = signed_request(case);
        for now in [SIGNED_AT - 900, SIGNED_AT, SIGNED_AT + 900] {
            assert_eq!(check(&p, &body, at(now)), ok(), "{case} at {now}");
        }
    }
}

#[test]
fn accepted_cases_match_published_canonical_request_and_string_to_sign() {
    for case in ACCEPTED {
        let (p, body) = signed_request(case);
        let (creq, sts) = signing_strings(&p, &body).expect(case);
        assert_eq!(
            String::from_utf8_lossy(&creq),
            read_text(case, "header-canonical-request.txt"),
            "{case}"
        );
        assert_eq!(sts, read_text(case, "header-string-to-sign.txt"), "{case}");
        let signature = read_text(case, "header-signature.txt");
        assert!(
            authorization(&p).ends_with(&format!("Signature={signature}")),
            "{case}"
        );
    }
}

#[test]
fn accepted_cases_refuse_tampering() {
    use AuthError::{Expired, NotYetValid, PayloadHashMismatch, SignatureMismatch};
    let t = at(SIGNED_AT);
    for case in ACCEPTED {
        let (p, body) = signed_request(case);

        // One hex digit of the signature.
        let auth = authorization(&p);
        let flipped = if auth.ends_with('0') { '1' } else { '0' };
        let tampered = format!("{}{flipped}", &auth[..auth.len() - 1]);
        let q = with_header(&p, "authorization", &tampered);
        assert_eq!(check(&q, &body, t), Err(SignatureMismatch), "{case}");

        // Every signed header value (the date and payload hash have their own checks).
        for name in signed_header_names(&p) {
            let want = match name.as_str() {
                "x-amz-date" => continue,
                "x-amz-content-sha256" => PayloadHashMismatch,
                _ => SignatureMismatch,
            };
            let q = with_tampered_header(&p, &name);
            assert_eq!(check(&q, &body, t), Err(want), "{case}: {name}");
        }

        // Method, path and query.
        let mut q = p.clone();
        q.method = if p.method == Method::GET {
            Method::POST
        } else {
            Method::GET
        };
        assert_eq!(check(&q, &body, t), Err(SignatureMismatch), "{case}");
        let path = p.uri.path();
        let query = p.uri.query();
        let retarget = |path: &str, query: Option<&str>| match query {
            Some(query) => with_target(&p, &format!("{path}?{query}")),
            None => with_target(&p, path),
        };
        let q = retarget(&format!("{path}x"), query);
        assert_eq!(check(&q, &body, t), Err(SignatureMismatch), "{case}");
        let extra = match query {
            Some(query) => format!("{query}&x=y"),
            None => "x=y".to_owned(),
        };
        let q = retarget(path, Some(&extra));
        assert_eq!(check(&q, &body, t), Err(SignatureMismatch), "{case}");
        if let Some(query) = query {
            // The query is canonicalised by sorting, so the order on the wire is free.
            let reversed: Vec<&str> = query.split('&').rev().collect();
            let q = retarget(path, Some(&reversed.join("&")));
            assert_eq!(check(&q, &body, t), ok(), "{case}");
        }

        // Body.
        let longer = [body.as_slice(), b"x"].concat();
        let want = if p.headers.contains_key("x-amz-content-sha256") {
            PayloadHashMismatch
        } else {
            SignatureMismatch
        };
        assert_eq!(check(&p, &longer, t), Err(want), "{case}");

        // Time: the clock beyond the allowed skew, or the signed date changed.
        let late = at(SIGNED_AT + 901);
        assert_eq!(check(&p, &body, late), Err(Expired), "{case}");
        let early = at(SIGNED_AT - 901);
        assert_eq!(check(&p, &body, early), Err(NotYetValid), "{case}");
        for (date, want) in [
            ("20150830T123601Z", SignatureMismatch),
            ("20150830T125101Z", NotYetValid),
            ("20150830T122059Z", Expired),
        ] {
            let q = with_header(&p, "x-amz-date", date);
            assert_eq!(check(&q, &body, t), Err(want), "{case}: {date}");
        }

        // Key, secret and scope.
        let r = verify(&p, &body, &config(), t, |_| Some("wrong".to_owned()));
        assert_eq!(r, Err(SignatureMismatch), "{case}");
        let r = verify(&p, &body, &config(), t, |_| None);
        assert_eq!(r, Err(AuthError::UnknownKey), "{case}");
        let mut other = config();
        other.region = "us-west-2".to_owned();
        let r = verify(&p, &body, &other, t, lookup);
        assert_eq!(r, Err(AuthError::WrongRegion), "{case}");
        let mut other = config();
        other.service = "lambda".to_owned();
        let r = verify(&p, &body, &other, t, lookup);
        assert_eq!(r, Err(AuthError::WrongService), "{case}");
    }
}

#[test]
fn unnormalized_paths_are_refused() {
    for case in UNNORMALIZED_PATH {
        let (p, body) = signed_request(case);
        assert_eq!(
            check(&p, &body, at(SIGNED_AT)),
            Err(AuthError::Malformed("path is not normalized")),
            "{case}"
        );
    }
}

#[test]
fn normalized_cases_verify_when_sent_with_the_normalized_path() {
    for case in UNNORMALIZED_PATH
        .iter()
        .filter(|c| c.ends_with("-normalized"))
    {
        let (p, body) = signed_request(case);
        let creq = read_text(case, "header-canonical-request.txt");
        // The second line of the canonical request is the normalised path (these
        // paths have nothing to percent-encode).
        let path = creq.lines().nth(1).expect("canonical URI");
        let p = with_target(&p, path);
        assert_eq!(check(&p, &body, at(SIGNED_AT)), ok(), "{case}");
        let (ours, _) = signing_strings(&p, &body).expect(case);
        assert_eq!(String::from_utf8_lossy(&ours), creq, "{case}");
    }
}

#[test]
fn not_http_cases_do_not_parse() {
    for case in NOT_HTTP {
        let raw = read(case, "header-signed-request.txt");
        let want = if case.starts_with("get-space") {
            "invalid uri character"
        } else {
            "obs-fold header line"
        };
        assert_eq!(parse_request(&raw).err().as_deref(), Some(want), "{case}");
    }
}

/// `double-url-encode` (Rust SDK addition): an Invoke request whose path holds a
/// percent-encoded function ARN, which the signer encodes a second time.
#[test]
fn double_url_encode_lambda_arn() {
    let case = DOUBLE_URL_ENCODE;
    let (p, body) = signed_request(case);
    let (creq, sts) = signing_strings(&p, &body).expect(case);
    assert_eq!(
        String::from_utf8_lossy(&creq),
        read_text(case, "header-canonical-request.txt")
    );
    // This one file ends in a newline.
    assert_eq!(sts, read_text(case, "header-string-to-sign.txt").trim_end());
    let config = VerifyConfig {
        region: "us-east-2".to_owned(),
        service: "lambda".to_owned(),
        max_skew: MAX_SKEW,
    };
    // 2021-05-11T15:40:45Z
    let r = verify(&p, &body, &config, at(1_620_747_645), lookup);
    assert_eq!(r, ok());
}

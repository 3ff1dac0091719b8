//! Verification of AWS Signature Version 4 (`Authorization: AWS4-HMAC-SHA256 ...`)
//! on incoming HTTP requests, so that boto3, the AWS CLI and the other AWS SDKs can
//! talk to hearth unchanged.
//!
//! The canonicalisation follows what the signers do for non-S3 services
//! (botocore's `SigV4Auth`, the Rust `aws-sigv4` crate with its defaults):
//!
//! * canonical URI: the path exactly as received (still percent-encoded) with every
//!   byte outside RFC 3986 "unreserved" and `/` percent-encoded *again* (so `%3A`
//!   becomes `%253A`). Signers remove `.`/`..` segments and collapse `//` before
//!   encoding; we instead refuse paths that are not already in that normal form, so
//!   that the path the signature covers is byte-for-byte the path the router sees.
//! * canonical query: every `&`-separated parameter is percent-decoded and
//!   re-encoded (unreserved characters bare, everything else `%XX`, `+` is a literal
//!   plus), then sorted by encoded key and then encoded value; `k` without `=` is
//!   `k=`.
//! * canonical headers: the headers named in `SignedHeaders`, values trimmed and
//!   runs of spaces/tabs collapsed to one space, repeated headers joined with `,`.
//! * payload hash: hex SHA-256 of the body; an `x-amz-content-sha256` header, when
//!   present, must equal it (unsigned or streaming payloads are refused).
//!
//! Everything taken from the request is treated as hostile: nothing here panics on
//! request data, and the work done is bounded by the limits below plus one SHA-256
//! pass over the body and a fixed number of HMAC-SHA256 computations.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use http::header::{HeaderMap, HeaderValue, AUTHORIZATION};
use http::request::Parts;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

const ALGORITHM: &str = "AWS4-HMAC-SHA256";
/// Longest `Authorization` header value we look at.
const MAX_AUTHORIZATION_LEN: usize = 8 * 1024;
/// Most entries accepted in `SignedHeaders`.
const MAX_SIGNED_HEADERS: usize = 64;
/// Most values a single signed header may have (repeated header lines).
const MAX_VALUES_PER_HEADER: usize = 32;
/// Most query parameters accepted.
const MAX_QUERY_PARAMS: usize = 1024;
/// Longest request target (path + query) accepted.
const MAX_URI_LEN: usize = 16 * 1024;
/// Longest access key id accepted (AWS's are 16..=128 characters).
const MAX_ACCESS_KEY_ID_LEN: usize = 128;
/// Longest region or service name accepted in the credential scope.
const MAX_SCOPE_PART_LEN: usize = 64;

/// Verification settings, fixed for a server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyConfig {
    /// The region clients must scope their credentials to, e.g. `us-east-1`.
    pub region: String,
    /// The signing service name; `lambda` for the Lambda API.
    pub service: String,
    /// How far the request's timestamp may be from the server clock, either way.
    pub max_skew: Duration,
}

impl VerifyConfig {
    /// Service `lambda`, 5 minutes of allowed clock skew.
    pub fn new(region: impl Into<String>) -> Self {
        VerifyConfig {
            region: region.into(),
            service: "lambda".to_owned(),
            max_skew: Duration::from_secs(5 * 60),
        }
    }
}

/// A request whose signature checked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The access key id that signed the request.
    pub access_key_id: String,
}

/// Why a request was refused. `Display` gives detail for the server's logs; only
/// [`AuthError::public_message`] may be shown to the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `Authorization` header at all.
    #[error("request has no Authorization header")]
    MissingAuthorization,
    /// The `Authorization` header names an algorithm other than `AWS4-HMAC-SHA256`.
    #[error("unsupported signing algorithm")]
    UnsupportedAlgorithm,
    /// Something in the request could not be parsed or is out of bounds.
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    /// `host` is not among the signed headers.
    #[error("the host header is not signed")]
    UnsignedHost,
    /// The date header used for the signature is not among the signed headers.
    #[error("the date header is not signed")]
    UnsignedDate,
    /// The credential scope names another region.
    #[error("credential scope has the wrong region")]
    WrongRegion,
    /// The credential scope names another service.
    #[error("credential scope has the wrong service")]
    WrongService,
    /// The credential scope date is not the date of the request timestamp.
    #[error("credential scope date does not match the request date")]
    ScopeDateMismatch,
    /// The request timestamp is older than the allowed skew.
    #[error("request timestamp is too old")]
    Expired,
    /// The request timestamp is further in the future than the allowed skew.
    #[error("request timestamp is in the future")]
    NotYetValid,
    /// `lookup` did not know the access key id.
    #[error("unknown access key id")]
    UnknownKey,
    /// `x-amz-content-sha256` does not match the body.
    #[error("x-amz-content-sha256 does not match the body")]
    PayloadHashMismatch,
    /// The signature does not match.
    #[error("signature mismatch")]
    SignatureMismatch,
}

/// What AWS answers for a signature that does not verify. Used, on purpose, for every
/// failure that must not tell an attacker which check failed.
const MSG_SIGNATURE: &str = "The request signature we calculated does not match the signature you provided. Check your AWS Secret Access Key and signing method. Consult the service documentation for details.";

impl AuthError {
    /// The text the server may send to the client. A bad signature, an unknown key
    /// and a stale or future timestamp all give the same text.
    pub fn public_message(&self) -> &'static str {
        match self {
            AuthError::MissingAuthorization => "Missing Authentication Token",
            AuthError::UnsupportedAlgorithm => {
                "Unsupported signing algorithm; use AWS4-HMAC-SHA256."
            }
            AuthError::Malformed(_) | AuthError::UnsignedDate => {
                "The Authorization header or the signed request is malformed."
            }
            AuthError::UnsignedHost => "The host header must be signed.",
            AuthError::WrongRegion => "Credential should be scoped to a valid region.",
            AuthError::WrongService => "Credential should be scoped to correct service.",
            AuthError::PayloadHashMismatch => {
                "The provided 'x-amz-content-sha256' header does not match what was computed."
            }
            AuthError::ScopeDateMismatch
            | AuthError::Expired
            | AuthError::NotYetValid
            | AuthError::UnknownKey
            | AuthError::SignatureMismatch => MSG_SIGNATURE,
        }
    }

    /// The AWS error code to send (`x-amzn-ErrorType` / `__type`); the HTTP status is
    /// 403 for all of them except `Malformed`-like ones, see [`AuthError::status`].
    pub fn error_code(&self) -> &'static str {
        match self {
            AuthError::MissingAuthorization => "MissingAuthenticationTokenException",
            AuthError::Malformed(_)
            | AuthError::UnsupportedAlgorithm
            | AuthError::UnsignedHost
            | AuthError::UnsignedDate => "IncompleteSignatureException",
            AuthError::WrongRegion
            | AuthError::WrongService
            | AuthError::ScopeDateMismatch
            | AuthError::Expired
            | AuthError::NotYetValid
            | AuthError::UnknownKey
            | AuthError::PayloadHashMismatch
            | AuthError::SignatureMismatch => "InvalidSignatureException",
        }
    }

    /// The HTTP status to answer with: 400 for requests that are not well-formed
    /// SigV4, 403 otherwise.
    pub fn status(&self) -> http::StatusCode {
        match self.error_code() {
            "IncompleteSignatureException" => http::StatusCode::BAD_REQUEST,
            _ => http::StatusCode::FORBIDDEN,
        }
    }
}

/// Verifies the SigV4 signature of a request.
///
/// `parts.uri` must be the request target exactly as received (raw path and query),
/// `body` the complete body. `lookup` maps an access key id to its secret access key,
/// or `None` when the key is unknown; it is called at most once, and only after the
/// request has been parsed and its timestamp checked.
pub fn verify(
    parts: &Parts,
    body: &[u8],
    config: &VerifyConfig,
    now: SystemTime,
    lookup: impl FnOnce(&str) -> Option<String>,
) -> Result<Verified, AuthError> {
    let auth = single_header(&parts.headers, AUTHORIZATION.as_str())?
        .ok_or(AuthError::MissingAuthorization)?;
    let auth = parse_authorization(auth)?;

    // Credential scope.
    if auth.region != config.region {
        return Err(AuthError::WrongRegion);
    }
    if auth.service != config.service {
        return Err(AuthError::WrongService);
    }

    // Signed headers must cover host and the date.
    if !auth.signed_headers.contains(&"host") {
        return Err(AuthError::UnsignedHost);
    }
    let (amz_date, date_header) = request_timestamp(&parts.headers)?;
    if !auth.signed_headers.contains(&date_header) {
        return Err(AuthError::UnsignedDate);
    }
    if auth.date != amz_date.date_str() {
        return Err(AuthError::ScopeDateMismatch);
    }
    check_skew(amz_date.unix_seconds, now, config.max_skew)?;

    let payload_hash = payload_hash(&parts.headers, body)?;
    let canonical = canonical_request(parts, &auth, &payload_hash)?;
    let string_to_sign = string_to_sign(&amz_date, &auth, &canonical);

    let secret = lookup(auth.access_key_id);
    let known = secret.is_some();
    // For an unknown key, still compute a signature (with a dummy secret) so that
    // the time taken does not say whether the key exists.
    let secret = secret.unwrap_or_else(|| "hearth-unknown-access-key".to_owned());
    let expected = signature(
        &secret,
        auth.date,
        auth.region,
        auth.service,
        &string_to_sign,
    );
    let matches: bool = expected.ct_eq(&auth.signature).into();
    if !known {
        return Err(AuthError::UnknownKey);
    }
    if !matches {
        return Err(AuthError::SignatureMismatch);
    }
    Ok(Verified {
        access_key_id: auth.access_key_id.to_owned(),
    })
}

/// The canonical request and the string to sign that [`verify`] builds for a
/// request, without checking scope, timestamp or signature. Only for comparing
/// against published SigV4 test vectors; not part of the supported API.
#[doc(hidden)]
pub fn signing_strings(parts: &Parts, body: &[u8]) -> Result<(Vec<u8>, String), AuthError> {
    let auth = single_header(&parts.headers, AUTHORIZATION.as_str())?
        .ok_or(AuthError::MissingAuthorization)?;
    let auth = parse_authorization(auth)?;
    let (amz_date, _) = request_timestamp(&parts.headers)?;
    let payload_hash = payload_hash(&parts.headers, body)?;
    let canonical = canonical_request(parts, &auth, &payload_hash)?;
    let string_to_sign = string_to_sign(&amz_date, &auth, &canonical);
    Ok((canonical, string_to_sign))
}

/// The payload hash for the canonical request: hex SHA-256 of the body, or the
/// `x-amz-content-sha256` header's literal value when it is present and matches.
fn payload_hash(headers: &HeaderMap, body: &[u8]) -> Result<String, AuthError> {
    let body_hash = hex::encode(Sha256::digest(body));
    let Some(v) = single_header(headers, "x-amz-content-sha256")? else {
        return Ok(body_hash);
    };
    let v = v
        .to_str()
        .map_err(|_| AuthError::Malformed("x-amz-content-sha256 is not ASCII"))?;
    if v == "UNSIGNED-PAYLOAD" || v.starts_with("STREAMING-") {
        return Err(AuthError::Malformed("unsigned payloads are not accepted"));
    }
    if !v.eq_ignore_ascii_case(&body_hash) {
        return Err(AuthError::PayloadHashMismatch);
    }
    // The signer put the header's literal value into its canonical request.
    Ok(v.to_owned())
}

fn string_to_sign(amz_date: &AmzDate, auth: &Authorization<'_>, canonical: &[u8]) -> String {
    format!(
        "{ALGORITHM}\n{}\n{}/{}/{}/aws4_request\n{}",
        amz_date.text,
        auth.date,
        auth.region,
        auth.service,
        hex::encode(Sha256::digest(canonical)),
    )
}

/// The parsed `Authorization` header.
#[derive(Debug)]
struct Authorization<'a> {
    access_key_id: &'a str,
    date: &'a str,
    region: &'a str,
    service: &'a str,
    /// Lowercase, strictly increasing, non-empty.
    signed_headers: Vec<&'a str>,
    /// The literal `SignedHeaders` value (equal to `signed_headers` joined by `;`).
    signed_headers_text: &'a str,
    signature: [u8; 32],
}

fn is_ws(c: char) -> bool {
    c == ' ' || c == '\t'
}

fn parse_authorization(value: &HeaderValue) -> Result<Authorization<'_>, AuthError> {
    if value.len() > MAX_AUTHORIZATION_LEN {
        return Err(AuthError::Malformed("Authorization header too long"));
    }
    let value = value
        .to_str()
        .map_err(|_| AuthError::Malformed("Authorization header is not ASCII"))?
        .trim_matches(is_ws);
    let (algorithm, rest) = value.split_once(is_ws).ok_or(AuthError::Malformed(
        "Authorization header has no parameters",
    ))?;
    if algorithm != ALGORITHM {
        return Err(AuthError::UnsupportedAlgorithm);
    }

    let mut credential = None;
    let mut signed_headers = None;
    let mut signature = None;
    for (i, component) in rest.split(',').enumerate() {
        if i >= 3 {
            return Err(AuthError::Malformed("too many Authorization parameters"));
        }
        let (key, val) = component
            .split_once('=')
            .ok_or(AuthError::Malformed("Authorization parameter without '='"))?;
        let val = val.trim_matches(is_ws);
        let slot = match key.trim_matches(is_ws) {
            "Credential" => &mut credential,
            "SignedHeaders" => &mut signed_headers,
            "Signature" => &mut signature,
            _ => return Err(AuthError::Malformed("unknown Authorization parameter")),
        };
        if slot.replace(val).is_some() {
            return Err(AuthError::Malformed("repeated Authorization parameter"));
        }
    }
    let credential = credential.ok_or(AuthError::Malformed("missing Credential"))?;
    let signed_headers_text =
        signed_headers.ok_or(AuthError::Malformed("missing SignedHeaders"))?;
    let signature_text = signature.ok_or(AuthError::Malformed("missing Signature"))?;

    // Credential=AKID/YYYYMMDD/region/service/aws4_request
    let mut scope = credential.split('/');
    let (Some(access_key_id), Some(date), Some(region), Some(service), Some(terminator), None) = (
        scope.next(),
        scope.next(),
        scope.next(),
        scope.next(),
        scope.next(),
        scope.next(),
    ) else {
        return Err(AuthError::Malformed(
            "Credential must have five '/'-separated parts",
        ));
    };
    if access_key_id.is_empty()
        || access_key_id.len() > MAX_ACCESS_KEY_ID_LEN
        || !access_key_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(AuthError::Malformed("bad access key id"));
    }
    if date.len() != 8 || !date.bytes().all(|b| b.is_ascii_digit()) {
        return Err(AuthError::Malformed("bad Credential date"));
    }
    for part in [region, service] {
        if part.is_empty()
            || part.len() > MAX_SCOPE_PART_LEN
            || !part
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(AuthError::Malformed("bad Credential region or service"));
        }
    }
    if terminator != "aws4_request" {
        return Err(AuthError::Malformed("Credential must end in aws4_request"));
    }

    // SignedHeaders=a;b;c  (lowercase header names, sorted, unique)
    let mut signed_headers: Vec<&str> = Vec::new();
    for name in signed_headers_text.split(';') {
        if signed_headers.len() >= MAX_SIGNED_HEADERS {
            return Err(AuthError::Malformed("too many SignedHeaders"));
        }
        if name.is_empty() || !name.bytes().all(is_lower_token_byte) {
            return Err(AuthError::Malformed("bad header name in SignedHeaders"));
        }
        if signed_headers.last().is_some_and(|prev| *prev >= name) {
            return Err(AuthError::Malformed(
                "SignedHeaders not sorted or not unique",
            ));
        }
        signed_headers.push(name);
    }

    // Signature=64 hex digits
    let mut signature = [0u8; 32];
    if signature_text.len() != 64 {
        return Err(AuthError::Malformed("Signature must be 64 hex digits"));
    }
    hex::decode_to_slice(signature_text, &mut signature)
        .map_err(|_| AuthError::Malformed("Signature must be 64 hex digits"))?;

    Ok(Authorization {
        access_key_id,
        date,
        region,
        service,
        signed_headers,
        signed_headers_text,
        signature,
    })
}

/// RFC 9110 token characters, lowercase letters only.
fn is_lower_token_byte(b: u8) -> bool {
    b.is_ascii_lowercase()
        || b.is_ascii_digit()
        || matches!(
            b,
            b'!' | b'#'
                | b'$'
                | b'%'
                | b'&'
                | b'\''
                | b'*'
                | b'+'
                | b'-'
                | b'.'
                | b'^'
                | b'_'
                | b'`'
                | b'|'
                | b'~'
        )
}

/// The value of a header that may appear at most once.
fn single_header<'a>(
    headers: &'a HeaderMap,
    name: &str,
) -> Result<Option<&'a HeaderValue>, AuthError> {
    let mut values = headers.get_all(name).iter();
    let first = values.next();
    if values.next().is_some() {
        return Err(AuthError::Malformed("header repeated"));
    }
    Ok(first)
}

/// A request timestamp, whole seconds, UTC.
#[derive(Debug, Clone, PartialEq, Eq)]
struct AmzDate {
    /// `YYYYMMDDTHHMMSSZ`
    text: String,
    unix_seconds: i64,
}

impl AmzDate {
    fn date_str(&self) -> &str {
        self.text.get(..8).unwrap_or_default()
    }

    fn from_fields(
        year: i64,
        month: u32,
        day: u32,
        hour: u32,
        minute: u32,
        second: u32,
    ) -> Option<AmzDate> {
        if !(1970..=9999).contains(&year)
            || !(1..=12).contains(&month)
            || day < 1
            || day > days_in_month(year, month)
            || hour > 23
            || minute > 59
            || second > 59
        {
            return None;
        }
        let days = days_from_civil(year, month, day);
        let unix_seconds =
            days * 86_400 + i64::from(hour) * 3600 + i64::from(minute) * 60 + i64::from(second);
        let text = format!("{year:04}{month:02}{day:02}T{hour:02}{minute:02}{second:02}Z");
        Some(AmzDate { text, unix_seconds })
    }

    /// Parses the basic ISO 8601 form `YYYYMMDDTHHMMSSZ`.
    fn parse_amz(s: &str) -> Option<AmzDate> {
        let b = s.as_bytes();
        if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
            return None;
        }
        let num = |range: std::ops::Range<usize>| -> Option<u32> {
            let digits = b.get(range)?;
            digits.iter().try_fold(0u32, |acc, &d| {
                d.is_ascii_digit().then(|| acc * 10 + u32::from(d - b'0'))
            })
        };
        let date = AmzDate::from_fields(
            i64::from(num(0..4)?),
            num(4..6)?,
            num(6..8)?,
            num(9..11)?,
            num(11..13)?,
            num(13..15)?,
        )?;
        // from_fields re-formats; it must give back exactly what was sent.
        (date.text == s).then_some(date)
    }

    /// Parses an HTTP `Date` value: `[Day, ]DD Mon YYYY HH:MM:SS GMT` (IMF-fixdate),
    /// also with the zone written `UT`, `UTC`, `Z`, `+0000` or `-0000` (botocore uses
    /// `email.utils.formatdate`, which writes `-0000`).
    fn parse_http_date(s: &str) -> Option<AmzDate> {
        let s = s.trim_matches(is_ws);
        let s = match s.split_once(',') {
            Some((day_name, rest)) if day_name.len() == 3 => rest,
            Some(_) => return None,
            None => s,
        };
        let mut fields = s.split_ascii_whitespace();
        let (Some(day), Some(month), Some(year), Some(time), Some(zone), None) = (
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
        ) else {
            return None;
        };
        if !matches!(zone, "GMT" | "UT" | "UTC" | "Z" | "+0000" | "-0000") {
            return None;
        }
        let small = |t: &str, max_len: usize| -> Option<u32> {
            if t.is_empty() || t.len() > max_len || !t.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            t.parse().ok()
        };
        const MONTHS: [&str; 12] = [
            "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
        ];
        let month = MONTHS.iter().position(|m| *m == month)?;
        let month = u32::try_from(month).ok()? + 1;
        let mut hms = time.split(':');
        let (Some(h), Some(m), Some(sec), None) = (hms.next(), hms.next(), hms.next(), hms.next())
        else {
            return None;
        };
        if year.len() != 4 || h.len() != 2 || m.len() != 2 || sec.len() != 2 {
            return None;
        }
        AmzDate::from_fields(
            i64::from(small(year, 4)?),
            month,
            small(day, 2)?,
            small(h, 2)?,
            small(m, 2)?,
            small(sec, 2)?,
        )
    }
}

fn is_leap(year: i64) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

fn days_in_month(year: i64, month: u32) -> u32 {
    match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if is_leap(year) => 29,
        2 => 28,
        _ => 0,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The request timestamp and the (lowercase) header it came from: `x-amz-date`, or
/// `date` when there is no `x-amz-date`.
fn request_timestamp(headers: &HeaderMap) -> Result<(AmzDate, &'static str), AuthError> {
    if let Some(v) = single_header(headers, "x-amz-date")? {
        let v = v
            .to_str()
            .map_err(|_| AuthError::Malformed("bad X-Amz-Date"))?;
        let date = AmzDate::parse_amz(v).ok_or(AuthError::Malformed("bad X-Amz-Date"))?;
        return Ok((date, "x-amz-date"));
    }
    if let Some(v) = single_header(headers, "date")? {
        let v = v.to_str().map_err(|_| AuthError::Malformed("bad Date"))?;
        let date = AmzDate::parse_http_date(v).ok_or(AuthError::Malformed("bad Date"))?;
        return Ok((date, "date"));
    }
    Err(AuthError::Malformed("missing X-Amz-Date"))
}

fn check_skew(
    request_unix_seconds: i64,
    now: SystemTime,
    max_skew: Duration,
) -> Result<(), AuthError> {
    let now_nanos: i128 = match now.duration_since(UNIX_EPOCH) {
        Ok(d) => i128::try_from(d.as_nanos()).unwrap_or(i128::MAX),
        Err(e) => -i128::try_from(e.duration().as_nanos()).unwrap_or(i128::MAX),
    };
    let skew = i128::try_from(max_skew.as_nanos()).unwrap_or(i128::MAX);
    let request_nanos = i128::from(request_unix_seconds) * 1_000_000_000;
    let age = now_nanos.saturating_sub(request_nanos);
    if age > skew {
        return Err(AuthError::Expired);
    }
    if age < skew.saturating_neg() {
        return Err(AuthError::NotYetValid);
    }
    Ok(())
}

/// RFC 3986 unreserved characters, which SigV4 never percent-encodes.
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~')
}

/// Appends `bytes` percent-encoded: unreserved bytes (and `/` when `keep_slash`)
/// as they are, everything else as `%XX` with uppercase hex. Hand-rolled rather than
/// taken from `percent-encoding` because the exact set matters and is this small.
fn encode_into(out: &mut Vec<u8>, bytes: &[u8], keep_slash: bool) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in bytes {
        if is_unreserved(b) || (keep_slash && b == b'/') {
            out.push(b);
        } else {
            out.extend_from_slice(&[b'%', HEX[usize::from(b >> 4)], HEX[usize::from(b & 0x0f)]]);
        }
    }
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Percent-decodes `s`; a `%` not followed by two hex digits stays a literal `%`.
/// `+` stays `+` (SigV4 query strings are RFC 3986, not form encoding).
fn percent_decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            if let (Some(hi), Some(lo)) = (
                b.get(i + 1).copied().and_then(hex_value),
                b.get(i + 2).copied().and_then(hex_value),
            ) {
                out.push(hi << 4 | lo);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// botocore's `remove_dot_segments`: drops empty, `.` and `..` segments.
/// Returns true when `path` is already in that form (what signers sign).
fn is_normalized_path(path: &str) -> bool {
    let Some(rest) = path.strip_prefix('/') else {
        return false;
    };
    if rest.is_empty() {
        return true;
    }
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    rest.split('/')
        .all(|seg| !seg.is_empty() && seg != "." && seg != "..")
}

fn canonical_request(
    parts: &Parts,
    auth: &Authorization<'_>,
    payload_hash: &str,
) -> Result<Vec<u8>, AuthError> {
    let uri = &parts.uri;
    let path = uri.path();
    let query = uri.query().unwrap_or("");
    if path.len() + query.len() > MAX_URI_LEN {
        return Err(AuthError::Malformed("request target too long"));
    }
    if !is_normalized_path(path) {
        return Err(AuthError::Malformed("path is not normalized"));
    }

    let mut out = Vec::with_capacity(512 + 3 * (path.len() + query.len()));
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b'\n');

    // Canonical URI: the received (already encoded) path, encoded once more.
    encode_into(&mut out, path.as_bytes(), true);
    out.push(b'\n');

    // Canonical query string.
    let mut params: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        if params.len() >= MAX_QUERY_PARAMS {
            return Err(AuthError::Malformed("too many query parameters"));
        }
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let mut key = Vec::with_capacity(k.len());
        encode_into(&mut key, &percent_decode(k), false);
        let mut value = Vec::with_capacity(v.len());
        encode_into(&mut value, &percent_decode(v), false);
        params.push((key, value));
    }
    params.sort();
    for (i, (k, v)) in params.iter().enumerate() {
        if i > 0 {
            out.push(b'&');
        }
        out.extend_from_slice(k);
        out.push(b'=');
        out.extend_from_slice(v);
    }
    out.push(b'\n');

    // Canonical headers.
    for &name in &auth.signed_headers {
        out.extend_from_slice(name.as_bytes());
        out.push(b':');
        let mut values = parts.headers.get_all(name).iter().peekable();
        if values.peek().is_none() {
            // HTTP/2 carries the host in :authority, which ends up in the URI.
            match (name, uri.authority()) {
                ("host", Some(authority)) => push_trimmed(&mut out, authority.as_str().as_bytes()),
                _ => return Err(AuthError::Malformed("a signed header is missing")),
            }
        }
        for (i, value) in values.enumerate() {
            if i >= MAX_VALUES_PER_HEADER {
                return Err(AuthError::Malformed("signed header repeated too often"));
            }
            if i > 0 {
                out.push(b',');
            }
            push_trimmed(&mut out, value.as_bytes());
        }
        out.push(b'\n');
    }
    out.push(b'\n');

    out.extend_from_slice(auth.signed_headers_text.as_bytes());
    out.push(b'\n');
    out.extend_from_slice(payload_hash.as_bytes());
    Ok(out)
}

/// Appends a header value with leading/trailing whitespace removed and inner runs
/// of spaces and tabs replaced by one space (botocore: `' '.join(value.split())`).
fn push_trimmed(out: &mut Vec<u8>, value: &[u8]) {
    let mut words = value
        .split(|&b| b == b' ' || b == b'\t')
        .filter(|w| !w.is_empty());
    if let Some(first) = words.next() {
        out.extend_from_slice(first);
    }
    for w in words {
        out.push(b' ');
        out.extend_from_slice(w);
    }
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    // HMAC accepts keys of any length, so this cannot fail; the fallback keeps the
    // code free of unwrap and would only ever produce a non-matching signature.
    match HmacSha256::new_from_slice(key) {
        Ok(mut mac) => {
            mac.update(data);
            mac.finalize().into_bytes().into()
        }
        Err(_) => [0u8; 32],
    }
}

fn signature(
    secret: &str,
    date: &str,
    region: &str,
    service: &str,
    string_to_sign: &str,
) -> [u8; 32] {
    let mut k_secret = Vec::with_capacity(4 + secret.len());
    k_secret.extend_from_slice(b"AWS4");
    k_secret.extend_from_slice(secret.as_bytes());
    let k_date = hmac(&k_secret, date.as_bytes());
    let k_region = hmac(&k_date, region.as_bytes());
    let k_service = hmac(&k_region, service.as_bytes());
    let k_signing = hmac(&k_service, b"aws4_request");
    hmac(&k_signing, string_to_sign.as_bytes())
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    #[test]
    fn amz_date_roundtrip_and_rejects() {
        let d = AmzDate::parse_amz("20150830T123600Z").expect("valid");
        assert_eq!(d.unix_seconds, 1_440_938_160);
        assert_eq!(d.date_str(), "20150830");
        for bad in [
            "20150830T123600",
            "20151330T123600Z",
            "20150230T123600Z",
            "20150830T243600Z",
            "2015083OT123600Z",
            "+0150830T123600Z",
            "20150830t123600Z",
            "",
            "20150830T12360Z",
            "20150830T123660Z",
            "19690101T000000Z",
            "２0150830T12360Z",
        ] {
            assert!(AmzDate::parse_amz(bad).is_none(), "{bad}");
        }
        assert!(AmzDate::parse_amz("20160229T000000Z").is_some());
        assert!(AmzDate::parse_amz("21000229T000000Z").is_none());
    }

    #[test]
    fn http_date() {
        let want = AmzDate::parse_amz("20150830T123600Z");
        assert_eq!(
            AmzDate::parse_http_date("Sun, 30 Aug 2015 12:36:00 GMT"),
            want
        );
        assert_eq!(
            AmzDate::parse_http_date("Sun, 30 Aug 2015 12:36:00 -0000"),
            want
        );
        assert_eq!(AmzDate::parse_http_date("30 Aug 2015 12:36:00 GMT"), want);
        assert!(AmzDate::parse_http_date("Sun, 30 Aug 2015 12:36:00 +0100").is_none());
        assert!(AmzDate::parse_http_date("Sunday, 30 Aug 2015 12:36:00 GMT").is_none());
        assert!(AmzDate::parse_http_date("Sun, 30 Aug 2015 12:36 GMT").is_none());
        assert!(AmzDate::parse_http_date("Sun, 30 Aug 2015 12:36:+0 GMT").is_none());
    }

    #[test]
    fn days() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(days_from_civil(2024, 2, 29), 19_782);
    }

    #[test]
    fn path_normal_form() {
        for ok in [
            "/",
            "/a",
            "/a/",
            "/2017-03-31/tags/arn%3Aaws%3Alambda",
            "/a/.b/..c/",
        ] {
            assert!(is_normalized_path(ok), "{ok}");
        }
        for bad in [
            "", "a", "//", "/a//b", "/a/./b", "/a/../b", "/..", "/.", "/a/.", "/a//",
        ] {
            assert!(!is_normalized_path(bad), "{bad}");
        }
    }

    #[test]
    fn encoding() {
        let mut out = Vec::new();
        encode_into(&mut out, b"/a%3Ab c~_.-+/", true);
        assert_eq!(out, b"/a%253Ab%20c~_.-%2B/");
        assert_eq!(percent_decode("a%3a%zz%4"), b"a:%zz%4");
        let mut out = Vec::new();
        push_trimmed(&mut out, b"  a \t b   c  ");
        assert_eq!(out, b"a b c");
    }

    #[test]
    fn aws_documentation_example() {
        // The worked example from the AWS SigV4 documentation (IAM ListUsers).
        let sts = "AWS4-HMAC-SHA256\n20150830T123600Z\n20150830/us-east-1/iam/aws4_request\nf536975d06c0309214f805bb90ccff089219ecd68b2577efef23edd43b7e1a59";
        let sig = signature(
            "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
            "20150830",
            "us-east-1",
            "iam",
            sts,
        );
        assert_eq!(
            hex::encode(sig),
            "5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7"
        );
    }
}

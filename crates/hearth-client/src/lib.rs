//! An async client for the hearth API (AWS Lambda MicroVMs, 2025-09-09):
//! requests are built from the API model (`hearth-api`), signed with SigV4
//! (service `lambda`) and sent over HTTP/1.1.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use hearth_client::{Client, ClientConfig, ConfigFlags};
//! let resolved = ClientConfig::resolve(&ConfigFlags::default())?;
//! let client = Client::new(resolved.config);
//! let vms = client.paginate("ListMicrovms", serde_json::json!({})).await?;
//! # Ok(()) }
//! ```

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SigningSettings};
use aws_sigv4::sign::v4;
use aws_smithy_runtime_api::client::identity::Identity;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Map, Value};

mod config;
mod request;

pub use config::{
    config_path, resolve_from, write_config_file, ClientConfig, ConfigError, ConfigFile,
    ConfigFlags, ConfigPaths, ConfigTexts, Resolved, Settings, DEFAULT_ENDPOINT, DEFAULT_REGION,
};
pub use request::InputError;

/// Responses larger than this are refused rather than buffered.
pub const MAX_RESPONSE_BYTES: usize = 8 * 1024 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// A server that keeps handing out new page tokens is not followed forever.
const MAX_PAGES: usize = 10_000;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an error (`x-amzn-errortype`).
    #[error("{code}{}", if message.is_empty() { String::new() } else { format!(": {message}") })]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    #[error("{0} does not paginate")]
    NotPaginated(String),
    #[error(transparent)]
    Input(#[from] InputError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot sign the request")]
    Sign(#[source] BoxError),
    #[error("cannot build the request")]
    Request(#[source] http::Error),
    #[error("request to {endpoint} failed")]
    Transport {
        endpoint: String,
        #[source]
        source: hyper_util::client::legacy::Error,
    },
    #[error("no answer from {endpoint} within {} s", REQUEST_TIMEOUT.as_secs())]
    Timeout { endpoint: String },
    #[error("cannot read the response")]
    ReadBody(#[source] BoxError),
    #[error("the response is larger than {} MiB", MAX_RESPONSE_BYTES >> 20)]
    TooLarge,
    #[error("the response is not JSON")]
    NotJson(#[source] serde_json::Error),
    #[error("the server keeps returning the same page token")]
    PaginationLoop,
}

impl ClientError {
    /// The API error code (`ResourceNotFoundException`, ...), if the server answered with one.
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Api { code, .. } => Some(code),
            _ => None,
        }
    }

    /// The HTTP status of an API error.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// HTTP or HTTPS, by the URL's scheme.
pub type Connector = hyper_rustls::HttpsConnector<HttpConnector>;

/// The body of a streaming answer ([`Client::get_extension_stream`]).
#[derive(Debug)]
pub struct BodyStream {
    body: hyper::body::Incoming,
}

impl BodyStream {
    /// The next piece of the body as it arrives; `None` at its end.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, ClientError> {
        loop {
            let Some(frame) = self.body.frame().await else {
                return Ok(None);
            };
            let frame = frame.map_err(|e| ClientError::ReadBody(e.into()))?;
            if let Ok(data) = frame.into_data() {
                return Ok(Some(data));
            }
        }
    }
}

/// A connection to one endpoint with one set of keys; cheap to clone.
#[derive(Debug, Clone)]
pub struct Client {
    config: ClientConfig,
    http: hyper_util::client::legacy::Client<Connector, Full<Bytes>>,
}

/// TLS settings for https endpoints: the system's roots and `extra_roots`
/// (a private CA, e.g. the one `--ca-bundle` names).
pub fn tls_config(
    extra_roots: &[rustls_pki_types::CertificateDer<'static>],
) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    // Unreadable system certificates are skipped: the extra roots may be all we need.
    let native = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(native.certs);
    roots.add_parsable_certificates(extra_roots.iter().cloned());
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    match rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
    {
        Ok(builder) => builder.with_root_certificates(roots).with_no_client_auth(),
        // The ring provider supports the default versions, so this is not
        // reached; ring is rustls's only provider in the build, which the
        // plain builder then uses (verifying against no roots: https fails
        // closed).
        Err(_) => rustls::ClientConfig::builder()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth(),
    }
}

/// A connector for http and https URLs with [`tls_config`].
pub fn connector(extra_roots: &[rustls_pki_types::CertificateDer<'static>]) -> Connector {
    let mut http = HttpConnector::new();
    http.set_connect_timeout(Some(CONNECT_TIMEOUT));
    http.enforce_http(false);
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls_config(extra_roots))
        .https_or_http()
        .enable_http1()
        .wrap_connector(http)
}

impl Client {
    pub fn new(config: ClientConfig) -> Self {
        let http = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .build(connector(config.extra_roots()));
        Self { config, http }
    }

    pub fn config(&self) -> &ClientConfig {
        &self.config
    }

    /// Calls `operation` (a model operation name, e.g. `GetMicrovm`) with
    /// `input` keyed by member name, as in the AWS SDKs; returns the
    /// response's JSON body (`{}` when it has none).
    pub async fn call(&self, operation: &str, input: Value) -> Result<Value, ClientError> {
        let prepared = request::prepare(operation, input)?;
        self.send(prepared).await
    }

    /// [`Self::call`] with extra headers (hearth's extensions to an
    /// operation, e.g. `x-hearth-build-args`), signed with the rest.
    pub async fn call_with_headers(
        &self,
        operation: &str,
        input: Value,
        headers: &[(String, String)],
    ) -> Result<Value, ClientError> {
        let mut prepared = request::prepare(operation, input)?;
        prepared.headers.extend(headers.iter().cloned());
        self.send(prepared).await
    }

    /// Calls one of hearth's extension routes (outside the model, e.g.
    /// `POST /hearth/2025-09-09/microvms/{id}/exec`), signed like the API.
    pub async fn call_extension(
        &self,
        method: http::Method,
        path: &str,
        body: Value,
    ) -> Result<Value, ClientError> {
        let prepared = request::Prepared {
            method,
            target: path.to_string(),
            headers: vec![("content-type".into(), "application/json".into())],
            body: Some(body.to_string().into_bytes()),
        };
        self.send(prepared).await
    }

    /// Sends a signed GET to an extension route whose answer streams as it
    /// is produced (e.g. `.../logs?follow=true`), without the request
    /// timeout; an error answer is read whole and returned as
    /// [`ClientError::Api`].
    pub async fn get_extension_stream(&self, path: &str) -> Result<BodyStream, ClientError> {
        let request = self.sign(request::Prepared {
            method: http::Method::GET,
            target: path.to_string(),
            headers: Vec::new(),
            body: None,
        })?;
        let response = tokio::time::timeout(REQUEST_TIMEOUT, self.http.request(request))
            .await
            .map_err(|_| ClientError::Timeout {
                endpoint: self.config.endpoint_url().to_string(),
            })?
            .map_err(|source| ClientError::Transport {
                endpoint: self.config.endpoint_url().to_string(),
                source,
            })?;
        let (parts, body) = response.into_parts();
        if !parts.status.is_success() {
            let body = Limited::new(body, MAX_RESPONSE_BYTES)
                .collect()
                .await
                .map_err(ClientError::ReadBody)?
                .to_bytes();
            let code = parts
                .headers
                .get("x-amzn-errortype")
                .and_then(|v| v.to_str().ok());
            return Err(api_error(parts.status.as_u16(), code, &body));
        }
        Ok(BodyStream { body })
    }

    async fn send(&self, prepared: request::Prepared) -> Result<Value, ClientError> {
        let request = self.sign(prepared)?;
        let (parts, body) = self.exchange(request).await?;
        if !parts.status.is_success() {
            let code = parts
                .headers
                .get("x-amzn-errortype")
                .and_then(|v| v.to_str().ok());
            return Err(api_error(parts.status.as_u16(), code, &body));
        }
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(Value::Object(Map::new()));
        }
        serde_json::from_slice(&body).map_err(ClientError::NotJson)
    }

    /// Calls a paginated operation until the last page, following
    /// `nextToken` as the model's paginators say; returns all items.
    pub async fn paginate(&self, operation: &str, input: Value) -> Result<Vec<Value>, ClientError> {
        let not_paginated = || ClientError::NotPaginated(operation.to_string());
        let paginator = hearth_api::model()
            .paginators()
            .get("pagination")
            .and_then(|p| p.get(operation))
            .ok_or_else(not_paginated)?;
        let key = |name: &str| paginator.get(name).and_then(Value::as_str);
        let (Some(input_token), Some(output_token), Some(result_key)) =
            (key("input_token"), key("output_token"), key("result_key"))
        else {
            return Err(not_paginated());
        };
        let mut input = match input {
            Value::Object(map) => map,
            Value::Null => Map::new(),
            _ => {
                return Err(ClientError::Input(InputError::Invalid {
                    operation: operation.to_string(),
                    reason: "the input must be a JSON object".into(),
                }))
            }
        };
        let mut items = Vec::new();
        let mut seen = HashSet::new();
        for _ in 0..MAX_PAGES {
            let mut page = self.call(operation, Value::Object(input.clone())).await?;
            if let Some(Value::Array(page_items)) = page.get_mut(result_key).map(Value::take) {
                items.extend(page_items);
            }
            let token = match page.get(output_token).and_then(Value::as_str) {
                Some(token) if !token.is_empty() => token.to_string(),
                _ => return Ok(items),
            };
            if !seen.insert(token.clone()) {
                return Err(ClientError::PaginationLoop);
            }
            input.insert(input_token.to_string(), Value::String(token));
        }
        Err(ClientError::PaginationLoop)
    }

    /// Creates `bucket` in the endpoint's S3-compatible store (service `s3`,
    /// path-style); a bucket the caller already owns is fine.
    pub async fn s3_create_bucket(&self, bucket: &str) -> Result<(), ClientError> {
        match self
            .s3(http::Method::PUT, &format!("/{bucket}"), Vec::new())
            .await
        {
            Ok(_) => Ok(()),
            Err(ClientError::Api { code, .. }) if code == "BucketAlreadyOwnedByYou" => Ok(()),
            Err(err) => Err(err),
        }
    }

    /// Uploads `body` as `s3://bucket/key` to the endpoint's S3-compatible store.
    pub async fn s3_put_object(
        &self,
        bucket: &str,
        key: &str,
        body: Vec<u8>,
    ) -> Result<(), ClientError> {
        let key: String = key
            .split('/')
            .map(|part| {
                percent_encoding::utf8_percent_encode(part, request::PATH_SEGMENT).to_string()
            })
            .collect::<Vec<_>>()
            .join("/");
        self.s3(http::Method::PUT, &format!("/{bucket}/{key}"), body)
            .await
            .map(drop)
    }

    async fn s3(
        &self,
        method: http::Method,
        target: &str,
        body: Vec<u8>,
    ) -> Result<Bytes, ClientError> {
        let prepared = request::Prepared {
            method,
            target: target.to_string(),
            headers: Vec::new(),
            body: Some(body),
        };
        let request = self.sign_for(prepared, "s3")?;
        let (parts, body) = self.exchange(request).await?;
        if !parts.status.is_success() {
            // S3 errors are XML: <Error><Code>..</Code><Message>..</Message></Error>.
            let text = String::from_utf8_lossy(&body);
            let tag = |name: &str| {
                text.split(&format!("<{name}>"))
                    .nth(1)
                    .and_then(|rest| rest.split(&format!("</{name}>")).next())
                    .unwrap_or_default()
                    .to_string()
            };
            let code = tag("Code");
            return Err(ClientError::Api {
                status: parts.status.as_u16(),
                code: if code.is_empty() {
                    format!("HTTP {}", parts.status.as_u16())
                } else {
                    code
                },
                message: tag("Message"),
            });
        }
        Ok(body)
    }

    /// Sends a signed request; returns the answer's head and its body (bounded,
    /// within [`REQUEST_TIMEOUT`]).
    async fn exchange(
        &self,
        request: http::Request<Full<Bytes>>,
    ) -> Result<(http::response::Parts, Bytes), ClientError> {
        let endpoint = || self.config.endpoint_url().to_string();
        let exchange = async {
            let response =
                self.http
                    .request(request)
                    .await
                    .map_err(|source| ClientError::Transport {
                        endpoint: endpoint(),
                        source,
                    })?;
            let (parts, body) = response.into_parts();
            let body = Limited::new(body, MAX_RESPONSE_BYTES)
                .collect()
                .await
                .map_err(|e| {
                    if e.is::<LengthLimitError>() {
                        ClientError::TooLarge
                    } else {
                        ClientError::ReadBody(e)
                    }
                })?
                .to_bytes();
            Ok::<_, ClientError>((parts, body))
        };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| ClientError::Timeout {
                endpoint: endpoint(),
            })?
    }

    fn sign(&self, prepared: request::Prepared) -> Result<http::Request<Full<Bytes>>, ClientError> {
        self.sign_for(prepared, "lambda")
    }

    fn sign_for(
        &self,
        prepared: request::Prepared,
        service: &str,
    ) -> Result<http::Request<Full<Bytes>>, ClientError> {
        let url = format!("{}{}", self.config.endpoint_url(), prepared.target);
        let mut headers = prepared.headers;
        headers.push(("host".into(), self.config.authority().to_string()));
        headers.push((
            "user-agent".into(),
            concat!("hearth-client/", env!("CARGO_PKG_VERSION")).into(),
        ));
        let body = prepared.body.unwrap_or_default();
        let mut settings = SigningSettings::default();
        if service == "s3" {
            // S3 signs the payload hash as a header and the path as sent.
            settings.payload_checksum_kind =
                aws_sigv4::http_request::PayloadChecksumKind::XAmzSha256;
            settings.percent_encoding_mode = aws_sigv4::http_request::PercentEncodingMode::Single;
            settings.uri_path_normalization_mode =
                aws_sigv4::http_request::UriPathNormalizationMode::Disabled;
        }

        let identity: Identity = Credentials::new(
            self.config.access_key_id(),
            self.config.secret_access_key(),
            self.config.session_token().map(str::to_string),
            None,
            "hearth",
        )
        .into();
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region(self.config.region())
            .name(service)
            .time(SystemTime::now())
            .settings(settings)
            .build()
            .map_err(|e| ClientError::Sign(e.into()))?
            .into();
        let signable = SignableRequest::new(
            prepared.method.as_str(),
            &url,
            headers.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            SignableBody::Bytes(&body),
        )
        .map_err(|e| ClientError::Sign(e.into()))?;
        let (instructions, _signature) = sign(signable, &params)
            .map_err(|e| ClientError::Sign(e.into()))?
            .into_parts();

        let mut builder = http::Request::builder().method(prepared.method).uri(&url);
        for (k, v) in &headers {
            builder = builder.header(k, v);
        }
        let mut request = builder
            .body(Full::new(Bytes::from(body)))
            .map_err(ClientError::Request)?;
        instructions.apply_to_request_http1x(&mut request);
        Ok(request)
    }
}

/// Builds the error for a non-2xx answer: the code from `x-amzn-errortype`
/// (else the body's `__type`/`code`), the message from the body's `message`.
fn api_error(status: u16, header: Option<&str>, body: &[u8]) -> ClientError {
    let json: Option<Value> = serde_json::from_slice(body).ok();
    let field = |names: &[&str]| {
        names.iter().find_map(|n| {
            json.as_ref()
                .and_then(|j| j.get(*n))
                .and_then(Value::as_str)
                .map(str::to_string)
        })
    };
    // AWS may append `:http://...` to the header and prefix `namespace#` in the body.
    let code = header
        .map(str::to_string)
        .or_else(|| field(&["__type", "code", "Code"]))
        .map(|c| {
            let c = c.split(':').next().unwrap_or_default();
            c.rsplit('#').next().unwrap_or_default().trim().to_string()
        })
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| format!("HTTP {status}"));
    let message = match &json {
        Some(_) => field(&["message", "Message", "errorMessage"]).unwrap_or_default(),
        // Not JSON (a proxy's error page?): the start of its first line.
        None => String::from_utf8_lossy(body)
            .lines()
            .next()
            .unwrap_or_default()
            .chars()
            .filter(|c| !c.is_control())
            .take(200)
            .collect(),
    };
    ClientError::Api {
        status,
        code,
        message,
    }
}

/// Renders a wire timestamp (epoch seconds, possibly fractional) as RFC 3339
/// UTC to the second, e.g. `2026-03-01T12:00:00Z`.
pub fn rfc3339(epoch_seconds: f64) -> Option<String> {
    use aws_smithy_types::date_time::{DateTime, Format};
    if !epoch_seconds.is_finite() {
        return None;
    }
    DateTime::from_secs(epoch_seconds.floor() as i64)
        .fmt(Format::DateTime)
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_errors_read_like_aws() {
        let e = api_error(
            404,
            Some("ResourceNotFoundException"),
            br#"{"message":"MicroVM microvm-x not found"}"#,
        );
        assert_eq!(
            e.to_string(),
            "ResourceNotFoundException: MicroVM microvm-x not found"
        );
        assert_eq!(e.status(), Some(404));
        assert_eq!(e.code(), Some("ResourceNotFoundException"));

        let e = api_error(
            400,
            Some("ValidationException:http://internal.amazon.com/coral/"),
            br#"{"Message":"bad"}"#,
        );
        assert_eq!(e.to_string(), "ValidationException: bad");

        let e = api_error(
            409,
            None,
            br#"{"__type":"com.amazonaws.lambda#ConflictException","message":"busy"}"#,
        );
        assert_eq!(e.to_string(), "ConflictException: busy");

        // AWS answers some errors with a null message.
        let e = api_error(403, Some("AccessDeniedException"), br#"{"message":null}"#);
        assert_eq!(e.to_string(), "AccessDeniedException");

        let e = api_error(502, None, b"<html>Bad Gateway</html>\nmore");
        assert_eq!(e.to_string(), "HTTP 502: <html>Bad Gateway</html>");
        assert_eq!(e.status(), Some(502));

        let e = api_error(500, None, b"");
        assert_eq!(e.to_string(), "HTTP 500");
    }

    #[test]
    fn timestamps_render_as_rfc3339() {
        assert_eq!(rfc3339(0.0).as_deref(), Some("1970-01-01T00:00:00Z"));
        assert_eq!(
            rfc3339(1_772_366_400.75).as_deref(),
            Some("2026-03-01T12:00:00Z")
        );
        assert_eq!(rfc3339(f64::NAN), None);
    }

    #[test]
    fn signed_request_carries_sigv4_headers() {
        let config = ClientConfig::new("http://127.0.0.1:9070", "us-east-1", "HKIATEST", "secret")
            .expect("config");
        let client = Client::new(config);
        let prepared = request::prepare(
            "GetMicrovm",
            serde_json::json!({ "microvmIdentifier": "microvm-1" }),
        )
        .expect("prepare");
        let request = client.sign(prepared).expect("signs");
        let auth = request.headers()["authorization"].to_str().expect("ascii");
        assert!(
            auth.starts_with("AWS4-HMAC-SHA256 Credential=HKIATEST/"),
            "{auth}"
        );
        assert!(auth.contains("/us-east-1/lambda/aws4_request"), "{auth}");
        assert!(!auth.contains("secret"));
        assert!(request.headers().contains_key("x-amz-date"));
        assert_eq!(request.headers()["host"], "127.0.0.1:9070");
        assert_eq!(
            request.uri().to_string(),
            "http://127.0.0.1:9070/2025-09-09/microvms/microvm-1"
        );
    }
}

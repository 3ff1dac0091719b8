//! Where build artifacts come from: `codeArtifact.uri` (`s3://bucket/key`,
//! or `file:///path` when the operator allows it) copied into a new file.
//!
//! By default `s3://` URIs resolve against the built-in store, as the calling
//! account sees it (another account's bucket is S3_ACCESS_DENIED). With an
//! external store configured, they resolve there with the operator's
//! credentials through a SigV4-signed GET: account isolation is then that
//! store's business (every account can name every object the operator's
//! credentials can read).

use std::fmt;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{
    sign, PayloadChecksumKind, PercentEncodingMode, SignableBody, SignableRequest, SigningSettings,
    UriPathNormalizationMode,
};
use aws_sigv4::sign::v4;
use aws_smithy_runtime_api::client::identity::Identity;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::io::AsyncWriteExt;

use hearth_api::{BuildErrorCode, BuildFailure};

use crate::store::{self, Store, StoreError};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for the external store's response headers, and then for
/// each chunk of the body.
const READ_TIMEOUT: Duration = Duration::from_secs(60);
const DEFAULT_MAX_ARTIFACT_BYTES: u64 = 5 * 1024 * 1024 * 1024;

/// A failed fetch; [`FetchError::code`] is the build error code the
/// reference reports for it.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("access to {uri} is denied")]
    AccessDenied { uri: String },
    #[error("the bucket of {uri} does not exist")]
    NoSuchBucket { uri: String },
    #[error("{uri} does not exist")]
    NoSuchKey { uri: String },
    #[error("the bucket of {uri} is in another region")]
    CrossRegion { uri: String },
    #[error("{uri}: {reason}")]
    InvalidObject { uri: String, reason: String },
    #[error("cannot fetch {uri}")]
    Internal {
        uri: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl FetchError {
    /// The build error code (of a failed build's `stateReason`).
    pub fn code(&self) -> BuildErrorCode {
        match self {
            Self::AccessDenied { .. } => BuildErrorCode::S3AccessDenied,
            Self::NoSuchBucket { .. } => BuildErrorCode::S3NoSuchBucket,
            Self::NoSuchKey { .. } => BuildErrorCode::S3NoSuchKey,
            Self::CrossRegion { .. } => BuildErrorCode::S3CrossRegionAccessDenied,
            Self::InvalidObject { .. } => BuildErrorCode::S3InvalidObject,
            Self::Internal { .. } => BuildErrorCode::InternalPlatformError,
        }
    }

    fn invalid(uri: &str, reason: impl Into<String>) -> Self {
        Self::InvalidObject {
            uri: uri.to_string(),
            reason: reason.into(),
        }
    }

    fn internal(uri: &str, source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::Internal {
            uri: uri.to_string(),
            source: source.into(),
        }
    }
}

/// The build's failure: the code and this error's own text (an internal
/// cause stays out of the build's reason; it goes to the log through `source()`).
impl From<&FetchError> for BuildFailure {
    fn from(err: &FetchError) -> BuildFailure {
        BuildFailure::new(err.code(), err.to_string())
    }
}

/// An external S3-compatible store reached with the operator's credentials.
#[derive(Clone)]
pub struct ExternalS3 {
    /// `http(s)://host[:port][/base]`.
    pub endpoint: String,
    pub region: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    /// `endpoint/bucket/key` instead of `bucket.endpoint/key`.
    pub path_style: bool,
}

impl fmt::Debug for ExternalS3 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExternalS3")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("path_style", &self.path_style)
            .finish_non_exhaustive()
    }
}

/// The operator's artifact settings (`hearth serve` flags).
#[derive(Debug, Clone)]
pub struct ArtifactsConfig {
    /// Fetch `s3://` artifacts from here instead of the built-in store.
    pub external: Option<ExternalS3>,
    /// Accept `file://` artifact URIs (paths on the server's host).
    pub allow_file_uris: bool,
    /// Largest artifact, and largest object the built-in store accepts.
    pub max_artifact_bytes: u64,
}

impl Default for ArtifactsConfig {
    fn default() -> Self {
        Self {
            external: None,
            allow_file_uris: false,
            max_artifact_bytes: DEFAULT_MAX_ARTIFACT_BYTES,
        }
    }
}

/// Which store `s3://` URIs name.
#[derive(Debug, Clone)]
pub enum ArtifactStore {
    Builtin(Arc<Store>),
    External(ExternalS3),
}

/// Where build artifacts come from.
#[derive(Debug, Clone)]
pub struct ArtifactSource {
    pub store: ArtifactStore,
    pub allow_file_uris: bool,
}

enum Location {
    S3 { bucket: String, key: String },
    File(PathBuf),
}

impl ArtifactSource {
    /// The source for a server: the external store when configured, else `builtin`.
    pub fn new(config: &ArtifactsConfig, builtin: Arc<Store>) -> Self {
        Self {
            store: match &config.external {
                Some(external) => ArtifactStore::External(external.clone()),
                None => ArtifactStore::Builtin(builtin),
            },
            allow_file_uris: config.allow_file_uris,
        }
    }

    fn parse(&self, uri: &str) -> Result<Location, FetchError> {
        if let Some(rest) = uri.strip_prefix("s3://") {
            let Some((bucket, key)) = rest.split_once('/') else {
                return Err(FetchError::invalid(
                    uri,
                    "an artifact URI looks like s3://bucket/key",
                ));
            };
            if !store::valid_bucket_name(bucket) {
                return Err(FetchError::invalid(
                    uri,
                    format!("{bucket:?} is not a valid bucket name"),
                ));
            }
            if key.is_empty() || key.ends_with('/') {
                return Err(FetchError::invalid(
                    uri,
                    "the key names a directory, not an object",
                ));
            }
            if key.len() > store::MAX_KEY_BYTES {
                return Err(FetchError::invalid(
                    uri,
                    "the key is longer than 1024 bytes",
                ));
            }
            return Ok(Location::S3 {
                bucket: bucket.to_string(),
                key: key.to_string(),
            });
        }
        if let Some(rest) = uri.strip_prefix("file://") {
            if !self.allow_file_uris {
                return Err(FetchError::invalid(
                    uri,
                    "file:// artifacts are disabled; start the server with --allow-file-artifacts",
                ));
            }
            let path = percent_encoding::percent_decode_str(rest)
                .decode_utf8()
                .map_err(|_| FetchError::invalid(uri, "the path is not UTF-8"))?;
            let path = PathBuf::from(path.as_ref());
            if !path.is_absolute() {
                return Err(FetchError::invalid(
                    uri,
                    "a file URI looks like file:///absolute/path",
                ));
            }
            return Ok(Location::File(path));
        }
        Err(FetchError::invalid(
            uri,
            "an artifact URI looks like s3://bucket/key",
        ))
    }

    /// Copies the artifact at `uri`, as `account_id` may see it, into `dest`
    /// (a new file); at most `max_bytes`. Returns the size. On failure `dest`
    /// does not exist.
    pub async fn fetch(
        &self,
        account_id: &str,
        uri: &str,
        dest: &Path,
        max_bytes: u64,
    ) -> Result<u64, FetchError> {
        let location = self.parse(uri)?;
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(dest)
            .await
            .map_err(|e| {
                FetchError::internal(uri, format!("cannot create {}: {e}", dest.display()))
            })?;
        let file = file.into_std().await;
        let result = match location {
            Location::File(path) => copy_file(uri, path, file, max_bytes).await,
            Location::S3 { bucket, key } => match &self.store {
                ArtifactStore::Builtin(store) => {
                    fetch_builtin(store, account_id, uri, &bucket, &key, file, max_bytes).await
                }
                ArtifactStore::External(external) => {
                    external.fetch(uri, &bucket, &key, file, max_bytes).await
                }
            },
        };
        if result.is_err() {
            let _ = tokio::fs::remove_file(dest).await;
        }
        result
    }
}

fn too_large(uri: &str, size: u64, max: u64) -> FetchError {
    FetchError::invalid(
        uri,
        format!("the object is {size} bytes, more than the {max}-byte limit"),
    )
}

/// Copies exactly `size` bytes from `from` into `to`, then syncs `to`.
async fn copy_exact(
    uri: &str,
    from: std::fs::File,
    mut to: std::fs::File,
    size: u64,
) -> Result<u64, FetchError> {
    let owned_uri = uri.to_string();
    tokio::task::spawn_blocking(move || {
        let copied = std::io::copy(&mut from.take(size), &mut to)
            .map_err(|e| FetchError::internal(&owned_uri, e))?;
        if copied != size {
            return Err(FetchError::internal(
                &owned_uri,
                format!("read {copied} of {size} bytes"),
            ));
        }
        to.flush()
            .and_then(|()| to.sync_all())
            .map_err(|e| FetchError::internal(&owned_uri, e))?;
        Ok(copied)
    })
    .await
    .map_err(|e| FetchError::internal(uri, e))?
}

async fn copy_file(
    uri: &str,
    path: PathBuf,
    to: std::fs::File,
    max_bytes: u64,
) -> Result<u64, FetchError> {
    let from = match std::fs::File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(FetchError::NoSuchKey {
                uri: uri.to_string(),
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            return Err(FetchError::AccessDenied {
                uri: uri.to_string(),
            })
        }
        Err(e) => return Err(FetchError::internal(uri, e)),
    };
    let meta = from.metadata().map_err(|e| FetchError::internal(uri, e))?;
    if !meta.is_file() {
        return Err(FetchError::invalid(uri, "not a regular file"));
    }
    if meta.len() > max_bytes {
        return Err(too_large(uri, meta.len(), max_bytes));
    }
    copy_exact(uri, from, to, meta.len()).await
}

async fn fetch_builtin(
    store: &Store,
    account_id: &str,
    uri: &str,
    bucket: &str,
    key: &str,
    to: std::fs::File,
    max_bytes: u64,
) -> Result<u64, FetchError> {
    let uri_owned = || uri.to_string();
    let (meta, file) =
        store
            .open_object(account_id, bucket, key)
            .await
            .map_err(|err| match err {
                StoreError::AccessDenied => FetchError::AccessDenied { uri: uri_owned() },
                StoreError::NoSuchBucket | StoreError::InvalidBucketName(_) => {
                    FetchError::NoSuchBucket { uri: uri_owned() }
                }
                StoreError::NoSuchKey => FetchError::NoSuchKey { uri: uri_owned() },
                StoreError::InvalidKey(reason) => FetchError::invalid(uri, reason),
                other => FetchError::internal(uri, other),
            })?;
    if meta.size > max_bytes {
        return Err(too_large(uri, meta.size, max_bytes));
    }
    copy_exact(uri, file, to, meta.size).await
}

/// Percent-encodes a key for a URL path (everything but unreserved characters and `/`).
fn encode_key(key: &str) -> String {
    const SET: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'_')
        .remove(b'.')
        .remove(b'~')
        .remove(b'/');
    percent_encoding::utf8_percent_encode(key, SET).to_string()
}

impl ExternalS3 {
    /// The object's URL on this endpoint.
    fn url(&self, bucket: &str, key: &str) -> Result<String, String> {
        let endpoint: http::Uri = self.endpoint.parse().map_err(|e| {
            format!(
                "the artifact S3 endpoint {:?} is not a URL: {e}",
                self.endpoint
            )
        })?;
        let scheme = endpoint.scheme_str().unwrap_or("https");
        let authority = endpoint
            .authority()
            .ok_or_else(|| format!("the artifact S3 endpoint {:?} has no host", self.endpoint))?;
        let base = endpoint.path().trim_end_matches('/');
        let key = encode_key(key);
        Ok(if self.path_style {
            format!("{scheme}://{authority}{base}/{bucket}/{key}")
        } else {
            format!("{scheme}://{bucket}.{authority}{base}/{key}")
        })
    }

    fn signed_get(
        &self,
        url: &str,
    ) -> Result<http::Request<Empty<Bytes>>, Box<dyn std::error::Error + Send + Sync>> {
        let uri: http::Uri = url.parse()?;
        let host = uri.authority().ok_or("no host")?.to_string();
        let headers = [("host", host.as_str())];
        let identity: Identity = Credentials::new(
            &self.access_key_id,
            &self.secret_access_key,
            None,
            None,
            "hearth-artifacts",
        )
        .into();
        let mut settings = SigningSettings::default();
        settings.percent_encoding_mode = PercentEncodingMode::Single;
        settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
        settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region(&self.region)
            .name("s3")
            .time(SystemTime::now())
            .settings(settings)
            .build()?
            .into();
        let signable =
            SignableRequest::new("GET", url, headers.into_iter(), SignableBody::Bytes(&[]))?;
        let (instructions, _) = sign(signable, &params)?.into_parts();
        let mut request = http::Request::builder().method("GET").uri(uri);
        for (name, value) in headers {
            request = request.header(name, value);
        }
        let mut request = request.body(Empty::new())?;
        instructions.apply_to_request_http1x(&mut request);
        Ok(request)
    }

    async fn fetch(
        &self,
        uri: &str,
        bucket: &str,
        key: &str,
        to: std::fs::File,
        max_bytes: u64,
    ) -> Result<u64, FetchError> {
        let url = self
            .url(bucket, key)
            .map_err(|e| FetchError::internal(uri, e))?;
        let request = self
            .signed_get(&url)
            .map_err(|e| FetchError::internal(uri, e))?;
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(CONNECT_TIMEOUT));
        http.enforce_http(false);
        let tls = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_native_roots(rustls::crypto::ring::default_provider())
            .map_err(|e| FetchError::internal(uri, e))?
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build(tls);
        let response = tokio::time::timeout(READ_TIMEOUT, client.request(request))
            .await
            .map_err(|_| FetchError::internal(uri, "the artifact store did not answer in time"))?
            .map_err(|e| FetchError::internal(uri, e))?;
        let status = response.status();
        if !status.is_success() {
            // The error document is small; read at most 64 KiB of it.
            let body = http_body_util::Limited::new(response.into_body(), 64 * 1024);
            let text = match tokio::time::timeout(READ_TIMEOUT, body.collect()).await {
                Ok(Ok(collected)) => String::from_utf8_lossy(&collected.to_bytes()).into_owned(),
                _ => String::new(),
            };
            return Err(error_for(uri, status, &text));
        }
        let length = response
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if let Some(length) = length.filter(|l| *l > max_bytes) {
            return Err(too_large(uri, length, max_bytes));
        }
        let mut to = tokio::fs::File::from_std(to);
        let mut body = response.into_body();
        let mut written: u64 = 0;
        loop {
            let frame = match tokio::time::timeout(READ_TIMEOUT, body.frame()).await {
                Err(_) => {
                    return Err(FetchError::internal(
                        uri,
                        "the artifact store stopped sending",
                    ))
                }
                Ok(None) => break,
                Ok(Some(frame)) => frame.map_err(|e| FetchError::internal(uri, e))?,
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            written += data.len() as u64;
            if written > max_bytes {
                return Err(too_large(uri, written, max_bytes));
            }
            to.write_all(&data)
                .await
                .map_err(|e| FetchError::internal(uri, e))?;
        }
        if length.is_some_and(|l| l != written) {
            return Err(FetchError::internal(
                uri,
                format!("received {written} bytes, Content-Length said {length:?}"),
            ));
        }
        to.flush().await.map_err(|e| FetchError::internal(uri, e))?;
        to.sync_all()
            .await
            .map_err(|e| FetchError::internal(uri, e))?;
        Ok(written)
    }
}

/// Maps an S3 error answer to a fetch error.
fn error_for(uri: &str, status: http::StatusCode, body: &str) -> FetchError {
    let code = body
        .split_once("<Code>")
        .and_then(|(_, rest)| rest.split_once("</Code>"))
        .map(|(code, _)| code.trim())
        .unwrap_or("");
    let uri = uri.to_string();
    match (status.as_u16(), code) {
        (_, "NoSuchBucket") => FetchError::NoSuchBucket { uri },
        (_, "NoSuchKey") => FetchError::NoSuchKey { uri },
        (
            _,
            "AuthorizationHeaderMalformed"
            | "PermanentRedirect"
            | "IllegalLocationConstraintException",
        )
        | (301, _) => FetchError::CrossRegion { uri },
        (403, _) => FetchError::AccessDenied { uri },
        (404, _) => FetchError::NoSuchKey { uri },
        (status, code) => FetchError::Internal {
            uri,
            source: format!("the artifact store answered {status} {code}").into(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let mut external = ExternalS3 {
            endpoint: "https://s3.example.com:9000/base/".into(),
            region: "us-east-1".into(),
            access_key_id: "AK".into(),
            secret_access_key: "SK".into(),
            path_style: true,
        };
        assert_eq!(
            external.url("b", "dir/a b+c.zip").as_deref(),
            Ok("https://s3.example.com:9000/base/b/dir/a%20b%2Bc.zip")
        );
        external.path_style = false;
        assert_eq!(
            external.url("b", "k").as_deref(),
            Ok("https://b.s3.example.com:9000/base/k")
        );
        let debug = format!("{external:?}");
        assert!(!debug.contains("SK") && !debug.contains("AK"), "{debug}");
    }

    #[test]
    fn error_answers() {
        let code = |status: u16, body: &str| {
            error_for(
                "s3://b/k",
                http::StatusCode::from_u16(status).expect("status"),
                body,
            )
            .code()
            .as_str()
        };
        assert_eq!(
            code(404, "<Error><Code>NoSuchBucket</Code></Error>"),
            "S3_NO_SUCH_BUCKET"
        );
        assert_eq!(
            code(404, "<Error><Code>NoSuchKey</Code></Error>"),
            "S3_NO_SUCH_KEY"
        );
        assert_eq!(code(404, ""), "S3_NO_SUCH_KEY");
        assert_eq!(
            code(403, "<Error><Code>AccessDenied</Code></Error>"),
            "S3_ACCESS_DENIED"
        );
        assert_eq!(
            code(
                400,
                "<Error><Code>AuthorizationHeaderMalformed</Code></Error>"
            ),
            "S3_CROSS_REGION_ACCESS_DENIED"
        );
        assert_eq!(
            code(500, "<Error><Code>InternalError</Code></Error>"),
            "INTERNAL_PLATFORM_ERROR"
        );
    }
}

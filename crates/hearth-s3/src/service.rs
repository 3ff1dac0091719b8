//! The S3 protocol over [`Store`]: s3s parses requests, checks SigV4 (with
//! the secret [`Accounts`] gives for the access key) and writes the XML; the
//! [`S3`] implementation here maps each operation to the store with the
//! caller's account.
//!
//! Tenancy: bucket names are global; every operation on another account's
//! bucket answers 403 AccessDenied (as S3 does), a missing bucket 404
//! NoSuchBucket, and ListBuckets shows only the caller's buckets.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::Stream;
use s3s::access::{S3Access, S3AccessContext};
use s3s::auth::{S3Auth, SecretKey};
use s3s::checksum::ChecksumHasher;
use s3s::dto::*;
use s3s::host::{S3Host, VirtualHost};
use s3s::service::{S3Service, S3ServiceBuilder};
use s3s::{s3_error, S3Error, S3ErrorCode, S3Request, S3Response, S3Result, TrailingHeaders, S3};

use crate::store::{self, ListQuery, PutOptions, Store, StoreError};

/// Where the S3 service finds an access key's account and secret.
pub trait Accounts: Send + Sync + 'static {
    /// `(account id, secret access key)` for an access key id, None when unknown.
    fn lookup(&self, access_key: &str) -> Option<(String, String)>;
}

/// How the service is set up.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// The region reported by HeadBucket and GetBucketLocation.
    pub region: String,
    /// Host names under which `<bucket>.<domain>[:port]` is virtual-host
    /// addressing; any other Host means path-style.
    pub virtual_host_domains: Vec<String>,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        Self {
            region: "us-east-1".into(),
            virtual_host_domains: vec!["localhost".into()],
        }
    }
}

/// Builds the S3 service (an s3s hyper/tower service) over a store.
pub fn service(store: Arc<Store>, accounts: Arc<dyn Accounts>, config: ServiceConfig) -> S3Service {
    let mut builder = S3ServiceBuilder::new(Backend {
        store,
        region: config.region,
    });
    builder.set_auth(Auth(accounts.clone()));
    builder.set_access(Access(accounts));
    builder.set_host(Hosts(config.virtual_host_domains));
    builder.build()
}

/// Whether a request is signed for S3: SigV4 with service `s3` in its
/// credential scope (`Authorization` header or presigned `X-Amz-Credential`),
/// or SigV2 (`Authorization: AWS AKID:sig`, or the `AWSAccessKeyId` and
/// `Signature` query of boto3's default presigned URLs), which the Lambda
/// MicroVMs API never uses. Such requests belong to the S3 service,
/// everything else to the API.
pub fn is_s3_request(headers: &http::HeaderMap, uri: &http::Uri) -> bool {
    let scope_is_s3 = |credential: &str| credential.split('/').nth(3) == Some("s3");
    if let Some(auth) = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        if let Some(rest) = auth.strip_prefix("AWS4-HMAC-SHA256") {
            return rest
                .split(',')
                .filter_map(|part| part.trim().strip_prefix("Credential="))
                .any(scope_is_s3);
        }
        return auth.starts_with("AWS ");
    }
    let Some(query) = uri.query() else {
        return false;
    };
    let (mut v2_key, mut v2_signature) = (false, false);
    for (name, value) in form_pairs(query) {
        match name.as_str() {
            "X-Amz-Credential" => return scope_is_s3(&value),
            "AWSAccessKeyId" => v2_key = true,
            "Signature" => v2_signature = true,
            _ => {}
        }
    }
    v2_key && v2_signature
}

fn form_pairs(query: &str) -> impl Iterator<Item = (String, String)> + '_ {
    query.split('&').filter_map(|pair| {
        let (name, value) = pair.split_once('=')?;
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8()
                .ok()
                .map(|c| c.into_owned())
        };
        Some((decode(name)?, decode(value)?))
    })
}

/// Runs one request through the service; a failure to answer becomes a 500.
pub async fn handle<B>(service: &S3Service, request: http::Request<B>) -> http::Response<s3s::Body>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let request = request.map(s3s::Body::http_body_unsync);
    match service.call(request).await {
        Ok(response) => response,
        Err(err) => {
            tracing::warn!(error = ?err, "S3 request failed");
            let mut response = http::Response::new(s3s::Body::empty());
            *response.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
            response
        }
    }
}

struct Auth(Arc<dyn Accounts>);

#[async_trait::async_trait]
impl S3Auth for Auth {
    async fn get_secret_key(&self, access_key: &str) -> S3Result<SecretKey> {
        match self.0.lookup(access_key) {
            Some((_, secret)) => Ok(SecretKey::from(secret)),
            None => Err(s3_error!(
                InvalidAccessKeyId,
                "The AWS Access Key Id you provided does not exist in our records."
            )),
        }
    }
}

/// The authenticated caller's account, put in the request's extensions.
#[derive(Debug, Clone)]
struct Caller(String);

struct Access(Arc<dyn Accounts>);

#[async_trait::async_trait]
impl S3Access for Access {
    async fn check(&self, cx: &mut S3AccessContext<'_>) -> S3Result<()> {
        let Some(credentials) = cx.credentials() else {
            return Err(s3_error!(AccessDenied, "Access Denied"));
        };
        let Some((account, _)) = self.0.lookup(&credentials.access_key) else {
            return Err(s3_error!(InvalidAccessKeyId));
        };
        cx.extensions_mut().insert(Caller(account));
        Ok(())
    }
}

struct Hosts(Vec<String>);

impl S3Host for Hosts {
    fn parse_host_header<'a>(&'a self, host: &'a str) -> S3Result<VirtualHost<'a>> {
        let name = host.rsplit_once(':').map_or(host, |(name, port)| {
            if port.bytes().all(|b| b.is_ascii_digit()) {
                name
            } else {
                host
            }
        });
        for domain in &self.0 {
            if let Some(bucket) = name
                .strip_suffix(domain.as_str())
                .and_then(|rest| rest.strip_suffix('.'))
                .filter(|bucket| !bucket.is_empty())
            {
                return Ok(VirtualHost::new(host).with_bucket(bucket));
            }
        }
        Ok(VirtualHost::new(host))
    }
}

struct Backend {
    store: Arc<Store>,
    region: String,
}

fn caller<T>(req: &S3Request<T>) -> S3Result<&str> {
    req.extensions
        .get::<Caller>()
        .map(|c| c.0.as_str())
        .ok_or_else(|| s3_error!(AccessDenied, "Access Denied"))
}

/// The S3 error for a store error.
fn s3_err(err: StoreError) -> S3Error {
    use StoreError as E;
    match err {
        E::NoSuchBucket => s3_error!(NoSuchBucket, "The specified bucket does not exist"),
        E::AccessDenied => s3_error!(AccessDenied, "Access Denied"),
        E::BucketAlreadyExists => s3_error!(
            BucketAlreadyExists,
            "The requested bucket name is not available. The bucket namespace is shared by all users of the system."
        ),
        E::BucketAlreadyOwnedByYou => s3_error!(
            BucketAlreadyOwnedByYou,
            "Your previous request to create the named bucket succeeded and you already own it."
        ),
        E::BucketNotEmpty => s3_error!(BucketNotEmpty, "The bucket you tried to delete is not empty"),
        E::NoSuchKey => s3_error!(NoSuchKey, "The specified key does not exist."),
        E::NoSuchUpload => s3_error!(NoSuchUpload, "The specified upload does not exist."),
        E::InvalidBucketName(_) => s3_error!(InvalidBucketName, "The specified bucket is not valid."),
        E::InvalidKey(what) => s3_error!(KeyTooLongError, "{what}"),
        E::EntityTooLarge(limit) => s3_error!(
            EntityTooLarge,
            "Your proposed upload exceeds the maximum allowed size ({limit} bytes)"
        ),
        E::EntityTooSmall(_) => s3_error!(
            EntityTooSmall,
            "Your proposed upload is smaller than the minimum allowed object size."
        ),
        E::InvalidPart(what) => s3_error!(InvalidPart, "{what}"),
        E::InvalidPartOrder => s3_error!(InvalidPartOrder, "The list of parts was not in ascending order."),
        E::InvalidPartNumber(max) => s3_error!(InvalidArgument, "Part number must be an integer between 1 and {max}"),
        E::IncompleteBody => s3_error!(
            IncompleteBody,
            "You did not provide the number of bytes specified by the Content-Length HTTP header"
        ),
        E::BadDigest => s3_error!(BadDigest, "The Content-MD5 you specified did not match what we received."),
        E::MetadataTooLarge => s3_error!(MetadataTooLarge, "Your metadata headers exceed the maximum allowed metadata size."),
        E::Body(source) => match source.downcast::<S3Error>() {
            // A checksum mismatch found at the end of the body.
            Ok(err) => *err,
            Err(source) => S3Error::with_source(S3ErrorCode::IncompleteBody, source),
        },
        err @ (E::Corrupt { .. } | E::Io { .. } | E::Join(_)) => {
            tracing::warn!(error = %error_chain(&err), "S3 store error");
            S3Error::internal_error(err)
        }
    }
}

fn etag(value: &str) -> ETag {
    ETag::Strong(value.to_string())
}

fn timestamp(ms: u64) -> Timestamp {
    Timestamp::from(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
}

fn metadata_map(metadata: Option<Metadata>) -> BTreeMap<String, String> {
    metadata.unwrap_or_default().into_iter().collect()
}

fn user_metadata(meta: &store::ObjectMeta) -> Option<Metadata> {
    (!meta.metadata.is_empty()).then(|| meta.metadata.clone().into_iter().collect())
}

fn content_md5(value: Option<&str>) -> S3Result<Option<[u8; 16]>> {
    let Some(value) = value else { return Ok(None) };
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(value.trim())
        .map_err(|_| s3_error!(InvalidDigest, "The Content-MD5 you specified was invalid."))?;
    let md5: [u8; 16] = bytes
        .try_into()
        .map_err(|_| s3_error!(InvalidDigest, "The Content-MD5 you specified was invalid."))?;
    Ok(Some(md5))
}

/// The checksums a request announces (headers, or trailers named by `x-amz-trailer`).
struct Expected {
    crc32: Option<String>,
    crc32c: Option<String>,
    crc64nvme: Option<String>,
    sha1: Option<String>,
    sha256: Option<String>,
}

impl Expected {
    fn hasher(
        &self,
        algorithm: Option<&ChecksumAlgorithm>,
        headers: &http::HeaderMap,
    ) -> ChecksumHasher {
        let trailer = headers
            .get("x-amz-trailer")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_ascii_lowercase();
        let algorithm = algorithm
            .map(|a| a.as_str().to_ascii_uppercase())
            .unwrap_or_default();
        let wants = |value: &Option<String>, name: &str| {
            value.is_some()
                || algorithm == name
                || trailer.contains(&format!("x-amz-checksum-{}", name.to_ascii_lowercase()))
        };
        let mut hasher = ChecksumHasher::default();
        if wants(&self.crc32, "CRC32") {
            hasher.crc32 = Some(Default::default());
        }
        if wants(&self.crc32c, "CRC32C") {
            hasher.crc32c = Some(Default::default());
        }
        if wants(&self.crc64nvme, "CRC64NVME") {
            hasher.crc64nvme = Some(Default::default());
        }
        if wants(&self.sha1, "SHA1") {
            hasher.sha1 = Some(Default::default());
        }
        if wants(&self.sha256, "SHA256") {
            hasher.sha256 = Some(Default::default());
        }
        hasher
    }
}

/// A request body that checks the announced checksums when it ends: a
/// mismatch ends it with BadDigest instead, so the store never commits it.
struct Checked<S> {
    inner: S,
    hasher: Option<ChecksumHasher>,
    expected: Expected,
    trailers: Option<TrailingHeaders>,
}

impl<S> Checked<S> {
    fn verify(&mut self) -> Result<(), S3Error> {
        let Some(hasher) = self.hasher.take() else {
            return Ok(());
        };
        let got = hasher.finalize();
        if let Some(trailers) = self.trailers.as_ref().and_then(TrailingHeaders::take) {
            let get = |name: &str| {
                trailers
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
            };
            let expected = &mut self.expected;
            for (slot, header) in [
                (&mut expected.crc32, "x-amz-checksum-crc32"),
                (&mut expected.crc32c, "x-amz-checksum-crc32c"),
                (&mut expected.crc64nvme, "x-amz-checksum-crc64nvme"),
                (&mut expected.sha1, "x-amz-checksum-sha1"),
                (&mut expected.sha256, "x-amz-checksum-sha256"),
            ] {
                // A checksum in the headers wins over the trailer's.
                if slot.is_none() {
                    *slot = get(header);
                }
            }
        }
        let pairs = [
            ("CRC32", &self.expected.crc32, &got.checksum_crc32),
            ("CRC32C", &self.expected.crc32c, &got.checksum_crc32c),
            (
                "CRC64NVME",
                &self.expected.crc64nvme,
                &got.checksum_crc64nvme,
            ),
            ("SHA1", &self.expected.sha1, &got.checksum_sha1),
            ("SHA256", &self.expected.sha256, &got.checksum_sha256),
        ];
        for (name, expected, got) in pairs {
            if let Some(expected) = expected {
                if Some(expected) != got.as_ref() {
                    return Err(s3_error!(
                        BadDigest,
                        "The {name} you specified did not match the calculated checksum."
                    ));
                }
            }
        }
        Ok(())
    }
}

impl<S> Stream for Checked<S>
where
    S: Stream<Item = Result<Bytes, s3s::StdError>> + Unpin,
{
    type Item = Result<Bytes, s3s::StdError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match Pin::new(&mut self.inner).poll_next(cx) {
            Poll::Ready(Some(Ok(chunk))) => {
                if let Some(hasher) = self.hasher.as_mut() {
                    hasher.update(&chunk);
                }
                Poll::Ready(Some(Ok(chunk)))
            }
            Poll::Ready(None) => match self.verify() {
                Ok(()) => Poll::Ready(None),
                Err(err) => Poll::Ready(Some(Err(Box::new(err)))),
            },
            other => other,
        }
    }
}

fn checked(
    body: Option<StreamingBlob>,
    expected: Expected,
    algorithm: Option<&ChecksumAlgorithm>,
    headers: &http::HeaderMap,
    trailers: Option<TrailingHeaders>,
) -> S3Result<Checked<StreamingBlob>> {
    let body = body.ok_or_else(|| s3_error!(IncompleteBody, "The request has no body"))?;
    let hasher = expected.hasher(algorithm, headers);
    Ok(Checked {
        inner: body,
        hasher: Some(hasher),
        expected,
        trailers,
    })
}

fn content_length(value: Option<i64>) -> Option<u64> {
    value.and_then(|l| u64::try_from(l).ok())
}

/// Percent-encodes a listing value when the client asked for `EncodingType=url`.
fn encode_list(value: String, url: bool) -> String {
    const SET: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'_')
        .remove(b'.')
        .remove(b'~')
        .remove(b'/');
    if url {
        percent_encoding::utf8_percent_encode(&value, SET).to_string()
    } else {
        value
    }
}

fn wants_url(encoding: Option<&EncodingType>) -> bool {
    encoding.is_some_and(|e| e.as_str() == EncodingType::URL)
}

fn max_keys(value: Option<i32>) -> usize {
    value.map_or(1000, |v| usize::try_from(v.clamp(0, 1000)).unwrap_or(1000))
}

/// A listing's objects and common prefixes as both ListObjects versions show them.
fn listing_entries(listing: store::Listing, url: bool) -> (Vec<Object>, Vec<CommonPrefix>) {
    let contents = listing
        .objects
        .into_iter()
        .map(|m| object_entry(m, url))
        .collect();
    let prefixes = listing
        .common_prefixes
        .into_iter()
        .map(|p| CommonPrefix {
            prefix: Some(encode_list(p, url)),
        })
        .collect();
    (contents, prefixes)
}

fn object_entry(meta: store::ObjectMeta, url: bool) -> Object {
    Object {
        e_tag: Some(etag(&meta.etag)),
        last_modified: Some(timestamp(meta.last_modified_ms)),
        size: Some(i64::try_from(meta.size).unwrap_or(i64::MAX)),
        storage_class: Some(ObjectStorageClass::from_static(
            ObjectStorageClass::STANDARD,
        )),
        key: Some(encode_list(meta.key, url)),
        ..Default::default()
    }
}

/// If-Match / If-None-Match against an object's ETag.
fn check_conditions(
    meta: &store::ObjectMeta,
    if_match: Option<&ETagCondition>,
    if_none_match: Option<&ETagCondition>,
) -> S3Result<()> {
    let matches = |condition: &ETagCondition| match condition {
        ETagCondition::Any => true,
        ETagCondition::ETag(tag) => tag.value() == meta.etag,
    };
    if if_match.is_some_and(|c| !matches(c)) {
        return Err(s3_error!(
            PreconditionFailed,
            "At least one of the pre-conditions you specified did not hold"
        ));
    }
    if if_none_match.is_some_and(matches) {
        return Err(s3_error!(NotModified));
    }
    Ok(())
}

#[async_trait::async_trait]
impl S3 for Backend {
    async fn create_bucket(
        &self,
        req: S3Request<CreateBucketInput>,
    ) -> S3Result<S3Response<CreateBucketOutput>> {
        let account = caller(&req)?;
        let bucket = &req.input.bucket;
        self.store
            .create_bucket(account, bucket)
            .await
            .map_err(s3_err)?;
        Ok(S3Response::new(CreateBucketOutput {
            location: Some(format!("/{bucket}")),
        }))
    }

    async fn delete_bucket(
        &self,
        req: S3Request<DeleteBucketInput>,
    ) -> S3Result<S3Response<DeleteBucketOutput>> {
        let account = caller(&req)?;
        self.store
            .delete_bucket(account, &req.input.bucket)
            .await
            .map_err(s3_err)?;
        Ok(S3Response::new(DeleteBucketOutput {}))
    }

    async fn head_bucket(
        &self,
        req: S3Request<HeadBucketInput>,
    ) -> S3Result<S3Response<HeadBucketOutput>> {
        let account = caller(&req)?;
        self.store
            .check_bucket(account, &req.input.bucket)
            .await
            .map_err(s3_err)?;
        Ok(S3Response::new(HeadBucketOutput {
            bucket_region: Some(self.region.clone()),
            ..Default::default()
        }))
    }

    async fn get_bucket_location(
        &self,
        req: S3Request<GetBucketLocationInput>,
    ) -> S3Result<S3Response<GetBucketLocationOutput>> {
        let account = caller(&req)?;
        self.store
            .check_bucket(account, &req.input.bucket)
            .await
            .map_err(s3_err)?;
        // us-east-1 answers an empty LocationConstraint, as in S3.
        let location_constraint = (self.region != "us-east-1")
            .then(|| BucketLocationConstraint::from(self.region.clone()));
        Ok(S3Response::new(GetBucketLocationOutput {
            location_constraint,
        }))
    }

    async fn list_buckets(
        &self,
        req: S3Request<ListBucketsInput>,
    ) -> S3Result<S3Response<ListBucketsOutput>> {
        let account = caller(&req)?;
        let prefix = req.input.prefix.clone().unwrap_or_default();
        let buckets = self.store.list_buckets(account).await.map_err(s3_err)?;
        let buckets = buckets
            .into_iter()
            .filter(|b| b.name.starts_with(&prefix))
            .map(|b| Bucket {
                name: Some(b.name),
                creation_date: Some(timestamp(b.created_ms)),
                bucket_region: Some(self.region.clone()),
            })
            .collect();
        Ok(S3Response::new(ListBucketsOutput {
            buckets: Some(buckets),
            owner: Some(Owner {
                display_name: Some(account.to_string()),
                id: Some(account.to_string()),
            }),
            prefix: req.input.prefix.clone(),
            continuation_token: None,
        }))
    }

    async fn put_object(
        &self,
        req: S3Request<PutObjectInput>,
    ) -> S3Result<S3Response<PutObjectOutput>> {
        let account = caller(&req)?.to_string();
        let input = req.input;
        if let Some(condition) = input.if_none_match.as_ref().or(input.if_match.as_ref()) {
            let existing = match self
                .store
                .head_object(&account, &input.bucket, &input.key)
                .await
            {
                Ok(meta) => Some(meta),
                Err(StoreError::NoSuchKey) => None,
                Err(err) => return Err(s3_err(err)),
            };
            let failed = match (&input.if_none_match, &input.if_match, existing) {
                (Some(_), _, Some(_)) => true,
                (None, Some(_), None) => true,
                (None, Some(_), Some(meta)) => match condition {
                    ETagCondition::Any => false,
                    ETagCondition::ETag(tag) => tag.value() != meta.etag,
                },
                _ => false,
            };
            if failed {
                return Err(s3_error!(
                    PreconditionFailed,
                    "At least one of the pre-conditions you specified did not hold"
                ));
            }
        }
        let options = PutOptions {
            content_type: input.content_type.clone(),
            metadata: metadata_map(input.metadata),
            content_length: content_length(input.content_length),
            content_md5: content_md5(input.content_md5.as_deref())?,
        };
        let expected = Expected {
            crc32: input.checksum_crc32,
            crc32c: input.checksum_crc32c,
            crc64nvme: input.checksum_crc64nvme,
            sha1: input.checksum_sha1,
            sha256: input.checksum_sha256,
        };
        let body = checked(
            input.body,
            expected,
            input.checksum_algorithm.as_ref(),
            &req.headers,
            req.trailing_headers,
        )?;
        let meta = self
            .store
            .put_object(&account, &input.bucket, &input.key, options, body)
            .await
            .map_err(s3_err)?;
        Ok(S3Response::new(PutObjectOutput {
            e_tag: Some(etag(&meta.etag)),
            ..Default::default()
        }))
    }

    async fn get_object(
        &self,
        req: S3Request<GetObjectInput>,
    ) -> S3Result<S3Response<GetObjectOutput>> {
        let account = caller(&req)?;
        let input = &req.input;
        let (meta, file) = self
            .store
            .open_object(account, &input.bucket, &input.key)
            .await
            .map_err(s3_err)?;
        check_conditions(&meta, input.if_match.as_ref(), input.if_none_match.as_ref())?;
        let (range, content_range) = match &input.range {
            None => (0..meta.size, None),
            Some(range) => {
                let range = range.check(meta.size)?;
                let content_range =
                    format!("bytes {}-{}/{}", range.start, range.end - 1, meta.size);
                (range, Some(content_range))
            }
        };
        let length = range.end - range.start;
        let stream =
            store::object_stream(file, range.start, length).map_err(S3Error::internal_error)?;
        Ok(S3Response::new(GetObjectOutput {
            body: Some(StreamingBlob::wrap(stream)),
            content_length: Some(i64::try_from(length).unwrap_or(i64::MAX)),
            content_range,
            accept_ranges: Some("bytes".into()),
            content_type: meta.content_type.clone(),
            e_tag: Some(etag(&meta.etag)),
            last_modified: Some(timestamp(meta.last_modified_ms)),
            metadata: user_metadata(&meta),
            ..Default::default()
        }))
    }

    async fn head_object(
        &self,
        req: S3Request<HeadObjectInput>,
    ) -> S3Result<S3Response<HeadObjectOutput>> {
        let account = caller(&req)?;
        let input = &req.input;
        let meta = self
            .store
            .head_object(account, &input.bucket, &input.key)
            .await
            .map_err(s3_err)?;
        check_conditions(&meta, input.if_match.as_ref(), input.if_none_match.as_ref())?;
        Ok(S3Response::new(HeadObjectOutput {
            content_length: Some(i64::try_from(meta.size).unwrap_or(i64::MAX)),
            accept_ranges: Some("bytes".into()),
            content_type: meta.content_type.clone(),
            e_tag: Some(etag(&meta.etag)),
            last_modified: Some(timestamp(meta.last_modified_ms)),
            metadata: user_metadata(&meta),
            ..Default::default()
        }))
    }

    async fn delete_object(
        &self,
        req: S3Request<DeleteObjectInput>,
    ) -> S3Result<S3Response<DeleteObjectOutput>> {
        let account = caller(&req)?;
        self.store
            .delete_object(account, &req.input.bucket, &req.input.key)
            .await
            .map_err(s3_err)?;
        Ok(S3Response::new(DeleteObjectOutput::default()))
    }

    async fn delete_objects(
        &self,
        req: S3Request<DeleteObjectsInput>,
    ) -> S3Result<S3Response<DeleteObjectsOutput>> {
        let account = caller(&req)?;
        let input = &req.input;
        self.store
            .check_bucket(account, &input.bucket)
            .await
            .map_err(s3_err)?;
        if input.delete.objects.len() > 1000 {
            return Err(s3_error!(MalformedXML, "at most 1000 keys per request"));
        }
        let quiet = input.delete.quiet.unwrap_or(false);
        let mut deleted = Vec::new();
        let mut errors = Vec::new();
        for object in &input.delete.objects {
            match self
                .store
                .delete_object(account, &input.bucket, &object.key)
                .await
            {
                Ok(()) => {
                    if !quiet {
                        deleted.push(DeletedObject {
                            key: Some(object.key.clone()),
                            ..Default::default()
                        });
                    }
                }
                Err(err) => {
                    let err = s3_err(err);
                    errors.push(Error {
                        code: Some(err.code().as_str().to_string()),
                        key: Some(object.key.clone()),
                        message: err.message().map(str::to_string),
                        ..Default::default()
                    });
                }
            }
        }
        Ok(S3Response::new(DeleteObjectsOutput {
            deleted: Some(deleted),
            errors: (!errors.is_empty()).then_some(errors),
            ..Default::default()
        }))
    }

    async fn list_objects_v2(
        &self,
        req: S3Request<ListObjectsV2Input>,
    ) -> S3Result<S3Response<ListObjectsV2Output>> {
        let account = caller(&req)?;
        let input = &req.input;
        let after = match &input.continuation_token {
            Some(token) => Some(
                hex::decode(token)
                    .ok()
                    .and_then(|b| String::from_utf8(b).ok())
                    .ok_or_else(|| {
                        s3_error!(
                            InvalidArgument,
                            "The continuation token provided is incorrect"
                        )
                    })?,
            ),
            None => input.start_after.clone(),
        };
        let limit = max_keys(input.max_keys);
        let listing = self
            .store
            .list_objects(
                account,
                &input.bucket,
                &ListQuery {
                    prefix: input.prefix.as_deref().unwrap_or(""),
                    delimiter: input.delimiter.as_deref(),
                    after: after.as_deref(),
                    max_keys: limit,
                },
            )
            .await
            .map_err(s3_err)?;
        let url = wants_url(input.encoding_type.as_ref());
        let key_count = listing.objects.len() + listing.common_prefixes.len();
        let next_marker = listing.next_marker.clone();
        let (contents, common_prefixes) = listing_entries(listing, url);
        Ok(S3Response::new(ListObjectsV2Output {
            name: Some(input.bucket.clone()),
            prefix: Some(encode_list(input.prefix.clone().unwrap_or_default(), url)),
            delimiter: input.delimiter.clone().map(|d| encode_list(d, url)),
            max_keys: Some(i32::try_from(limit).unwrap_or(1000)),
            key_count: Some(i32::try_from(key_count).unwrap_or(i32::MAX)),
            continuation_token: input.continuation_token.clone(),
            start_after: input.start_after.clone().map(|s| encode_list(s, url)),
            is_truncated: Some(next_marker.is_some()),
            next_continuation_token: next_marker.map(hex::encode),
            contents: Some(contents),
            common_prefixes: Some(common_prefixes),
            encoding_type: input.encoding_type.clone(),
            ..Default::default()
        }))
    }

    async fn list_objects(
        &self,
        req: S3Request<ListObjectsInput>,
    ) -> S3Result<S3Response<ListObjectsOutput>> {
        let account = caller(&req)?;
        let input = &req.input;
        let limit = max_keys(input.max_keys);
        let listing = self
            .store
            .list_objects(
                account,
                &input.bucket,
                &ListQuery {
                    prefix: input.prefix.as_deref().unwrap_or(""),
                    delimiter: input.delimiter.as_deref(),
                    after: input.marker.as_deref(),
                    max_keys: limit,
                },
            )
            .await
            .map_err(s3_err)?;
        let url = wants_url(input.encoding_type.as_ref());
        let next_marker = listing.next_marker.clone();
        let (contents, common_prefixes) = listing_entries(listing, url);
        Ok(S3Response::new(ListObjectsOutput {
            name: Some(input.bucket.clone()),
            prefix: Some(encode_list(input.prefix.clone().unwrap_or_default(), url)),
            delimiter: input.delimiter.clone().map(|d| encode_list(d, url)),
            marker: input.marker.clone().map(|m| encode_list(m, url)),
            max_keys: Some(i32::try_from(limit).unwrap_or(1000)),
            is_truncated: Some(next_marker.is_some()),
            next_marker: next_marker.map(|m| encode_list(m, url)),
            contents: Some(contents),
            common_prefixes: Some(common_prefixes),
            encoding_type: input.encoding_type.clone(),
            ..Default::default()
        }))
    }

    async fn create_multipart_upload(
        &self,
        req: S3Request<CreateMultipartUploadInput>,
    ) -> S3Result<S3Response<CreateMultipartUploadOutput>> {
        let account = caller(&req)?;
        let input = &req.input;
        let upload_id = self
            .store
            .create_upload(
                account,
                &input.bucket,
                &input.key,
                input.content_type.clone(),
                metadata_map(input.metadata.clone()),
            )
            .await
            .map_err(s3_err)?;
        Ok(S3Response::new(CreateMultipartUploadOutput {
            bucket: Some(input.bucket.clone()),
            key: Some(input.key.clone()),
            upload_id: Some(upload_id),
            ..Default::default()
        }))
    }

    async fn upload_part(
        &self,
        req: S3Request<UploadPartInput>,
    ) -> S3Result<S3Response<UploadPartOutput>> {
        let account = caller(&req)?.to_string();
        let input = req.input;
        let number = u32::try_from(input.part_number)
            .map_err(|_| s3_err(StoreError::InvalidPartNumber(self.store.config().max_parts)))?;
        let options = PutOptions {
            content_length: content_length(input.content_length),
            content_md5: content_md5(input.content_md5.as_deref())?,
            ..Default::default()
        };
        let expected = Expected {
            crc32: input.checksum_crc32.clone(),
            crc32c: input.checksum_crc32c.clone(),
            crc64nvme: input.checksum_crc64nvme.clone(),
            sha1: input.checksum_sha1.clone(),
            sha256: input.checksum_sha256.clone(),
        };
        let body = checked(
            input.body,
            expected,
            input.checksum_algorithm.as_ref(),
            &req.headers,
            req.trailing_headers,
        )?;
        let etag_value = self
            .store
            .upload_part(
                &account,
                &input.bucket,
                &input.key,
                &input.upload_id,
                number,
                options,
                body,
            )
            .await
            .map_err(s3_err)?;
        Ok(S3Response::new(UploadPartOutput {
            e_tag: Some(etag(&etag_value)),
            ..Default::default()
        }))
    }

    async fn list_parts(
        &self,
        req: S3Request<ListPartsInput>,
    ) -> S3Result<S3Response<ListPartsOutput>> {
        let account = caller(&req)?;
        let input = &req.input;
        let parts = self
            .store
            .list_parts(account, &input.bucket, &input.key, &input.upload_id)
            .await
            .map_err(s3_err)?;
        let marker = input.part_number_marker.unwrap_or(0);
        let max = usize::try_from(input.max_parts.unwrap_or(1000).clamp(0, 1000)).unwrap_or(1000);
        let mut rest = parts
            .into_iter()
            .filter(|p| i64::from(p.number) > i64::from(marker))
            .peekable();
        let page: Vec<_> = rest.by_ref().take(max).collect();
        let truncated = rest.peek().is_some();
        let next = page
            .last()
            .map(|p| i32::try_from(p.number).unwrap_or(i32::MAX));
        Ok(S3Response::new(ListPartsOutput {
            bucket: Some(input.bucket.clone()),
            key: Some(input.key.clone()),
            upload_id: Some(input.upload_id.clone()),
            part_number_marker: input.part_number_marker,
            next_part_number_marker: next,
            max_parts: Some(i32::try_from(max).unwrap_or(1000)),
            is_truncated: Some(truncated),
            parts: Some(
                page.into_iter()
                    .map(|p| Part {
                        part_number: Some(i32::try_from(p.number).unwrap_or(i32::MAX)),
                        size: Some(i64::try_from(p.size).unwrap_or(i64::MAX)),
                        e_tag: Some(etag(&p.etag)),
                        last_modified: Some(timestamp(p.last_modified_ms)),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        }))
    }

    async fn complete_multipart_upload(
        &self,
        req: S3Request<CompleteMultipartUploadInput>,
    ) -> S3Result<S3Response<CompleteMultipartUploadOutput>> {
        let account = caller(&req)?;
        let input = &req.input;
        let mut listed = Vec::new();
        for part in input
            .multipart_upload
            .as_ref()
            .and_then(|m| m.parts.as_ref())
            .into_iter()
            .flatten()
        {
            let number = part
                .part_number
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| s3_error!(InvalidPart, "a part has no valid PartNumber"))?;
            let tag = part
                .e_tag
                .as_ref()
                .map(|t| t.value().to_string())
                .ok_or_else(|| s3_error!(InvalidPart, "part {number} has no ETag"))?;
            listed.push((number, tag));
        }
        let meta = self
            .store
            .complete_upload(
                account,
                &input.bucket,
                &input.key,
                &input.upload_id,
                &listed,
            )
            .await
            .map_err(s3_err)?;
        Ok(S3Response::new(CompleteMultipartUploadOutput {
            bucket: Some(input.bucket.clone()),
            key: Some(input.key.clone()),
            e_tag: Some(etag(&meta.etag)),
            location: Some(format!("/{}/{}", input.bucket, input.key)),
            ..Default::default()
        }))
    }

    async fn abort_multipart_upload(
        &self,
        req: S3Request<AbortMultipartUploadInput>,
    ) -> S3Result<S3Response<AbortMultipartUploadOutput>> {
        let account = caller(&req)?;
        let input = &req.input;
        self.store
            .abort_upload(account, &input.bucket, &input.key, &input.upload_id)
            .await
            .map_err(s3_err)?;
        Ok(S3Response::new(AbortMultipartUploadOutput::default()))
    }
}

/// An error and its causes, `: `-separated, for logs.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing() {
        let mut headers = http::HeaderMap::new();
        let uri: http::Uri = "/b/k".parse().expect("uri");
        assert!(!is_s3_request(&headers, &uri));
        headers.insert(
            http::header::AUTHORIZATION,
            http::HeaderValue::from_static(
                "AWS4-HMAC-SHA256 Credential=AKID/20250101/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=00",
            ),
        );
        assert!(is_s3_request(&headers, &uri));
        headers.insert(
            http::header::AUTHORIZATION,
            http::HeaderValue::from_static(
                "AWS4-HMAC-SHA256 Credential=AKID/20250101/us-east-1/lambda/aws4_request, SignedHeaders=host, Signature=00",
            ),
        );
        assert!(!is_s3_request(&headers, &uri));
        let presigned: http::Uri = "/b/k?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKID%2F20250101%2Fus-east-1%2Fs3%2Faws4_request"
            .parse()
            .expect("uri");
        assert!(is_s3_request(&http::HeaderMap::new(), &presigned));
        let v2: http::Uri = "/b/k?AWSAccessKeyId=AKID&Signature=abc%3D&Expires=1"
            .parse()
            .expect("uri");
        assert!(is_s3_request(&http::HeaderMap::new(), &v2));
        let api: http::Uri = "/2025-09-09/microvms?maxResults=5".parse().expect("uri");
        assert!(!is_s3_request(&http::HeaderMap::new(), &api));
        headers.insert(
            http::header::AUTHORIZATION,
            http::HeaderValue::from_static("AWS AKID:c2ln"),
        );
        assert!(is_s3_request(&headers, &uri));
    }

    #[test]
    fn virtual_hosts() {
        let hosts = Hosts(vec!["localhost".into()]);
        let parse = |h: &str| {
            hosts
                .parse_host_header(h)
                .expect("parses")
                .bucket()
                .map(str::to_string)
        };
        assert_eq!(parse("my-bucket.localhost:9070"), Some("my-bucket".into()));
        assert_eq!(parse("localhost:9070"), None);
        assert_eq!(parse("127.0.0.1:9070"), None);
        assert_eq!(parse("server.example:9070"), None);
    }
}

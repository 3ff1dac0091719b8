//! The S3 service on a real socket: SigV4-signed requests, and the builder's
//! fetch from it as an external S3-compatible store.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{
    sign, PayloadChecksumKind, PercentEncodingMode, SignableBody, SignableRequest, SigningSettings,
    UriPathNormalizationMode,
};
use aws_sigv4::sign::v4;
use aws_smithy_runtime_api::client::identity::Identity;
use bytes::Bytes;
use hearth_s3::{
    Accounts, ArtifactSource, ArtifactStore, ExternalS3, ServiceConfig, Store, StoreConfig,
};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use sha2::Digest as _;

struct Keys(HashMap<String, (String, String)>);

impl Accounts for Keys {
    fn lookup(&self, access_key: &str) -> Option<(String, String)> {
        self.0.get(access_key).cloned()
    }
}

async fn serve(dir: &std::path::Path) -> SocketAddr {
    let store = Arc::new(Store::open(dir, StoreConfig::default()).expect("store"));
    let keys = Keys(HashMap::from([
        (
            "AKIDA".to_string(),
            ("111111111111".to_string(), "secret-a".to_string()),
        ),
        (
            "AKIDB".to_string(),
            ("222222222222".to_string(), "secret-b".to_string()),
        ),
    ]));
    let service = hearth_s3::service(store, Arc::new(keys), ServiceConfig::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binds");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let service = service.clone();
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

struct Response {
    status: u16,
    headers: http::HeaderMap,
    body: Vec<u8>,
}

async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    key: (&str, &str),
    extra: &[(&str, &str)],
    body: &[u8],
) -> Response {
    let url = format!("http://{addr}{path}");
    let host = addr.to_string();
    let sha = hex::encode(sha2::Sha256::digest(body));
    let mut headers: Vec<(&str, &str)> = vec![
        ("host", host.as_str()),
        ("x-amz-content-sha256", sha.as_str()),
    ];
    headers.extend_from_slice(extra);
    let mut request = http::Request::builder().method(method).uri(&url);
    for (name, value) in &headers {
        request = request.header(*name, *value);
    }
    let mut request = request
        .body(Full::new(Bytes::copy_from_slice(body)))
        .expect("request");
    if !key.0.is_empty() {
        let identity: Identity = Credentials::new(key.0, key.1, None, None, "test").into();
        let mut settings = SigningSettings::default();
        settings.percent_encoding_mode = PercentEncodingMode::Single;
        settings.payload_checksum_kind = PayloadChecksumKind::NoHeader;
        settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region("us-east-1")
            .name("s3")
            .time(SystemTime::now())
            .settings(settings)
            .build()
            .expect("params")
            .into();
        let signable = SignableRequest::new(
            method,
            &url,
            headers.iter().copied(),
            SignableBody::Bytes(body),
        )
        .expect("signable");
        let (instructions, _) = sign(signable, &params).expect("signs").into_parts();
        instructions.apply_to_request_http1x(&mut request);
    }
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .build(HttpConnector::new());
    let response = client.request(request).await.expect("answers");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes()
        .to_vec();
    Response {
        status,
        headers,
        body,
    }
}

const A: (&str, &str) = ("AKIDA", "secret-a");
const B: (&str, &str) = ("AKIDB", "secret-b");

fn external(addr: SocketAddr, key: (&str, &str)) -> ArtifactSource {
    ArtifactSource {
        store: ArtifactStore::External(ExternalS3 {
            endpoint: format!("http://{addr}"),
            region: "us-east-1".into(),
            access_key_id: key.0.into(),
            secret_access_key: key.1.into(),
            path_style: true,
        }),
        allow_file_uris: false,
    }
}

#[tokio::test]
async fn signed_requests_and_external_fetch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let addr = serve(&dir.path().join("s3")).await;

    assert_eq!(
        call(addr, "PUT", "/artifacts", A, &[], b"").await.status,
        200
    );
    let conflict = call(addr, "PUT", "/artifacts", B, &[], b"").await;
    assert_eq!(conflict.status, 409);
    assert!(String::from_utf8_lossy(&conflict.body).contains("<Code>BucketAlreadyExists</Code>"));

    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let put = call(
        addr,
        "PUT",
        "/artifacts/dir/app%20v1.zip",
        A,
        &[("content-type", "application/zip")],
        &data,
    )
    .await;
    assert_eq!(put.status, 200, "{}", String::from_utf8_lossy(&put.body));
    let etag = put
        .headers
        .get("etag")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert_eq!(
        etag,
        format!(
            "\"{}\"",
            hex::encode(<s3s::crypto::Md5 as s3s::crypto::Checksum>::checksum(&data))
        )
    );

    let range = call(
        addr,
        "GET",
        "/artifacts/dir/app%20v1.zip",
        A,
        &[("range", "bytes=2-5")],
        b"",
    )
    .await;
    assert_eq!(range.status, 206);
    assert_eq!(range.body, &data[2..6]);
    assert_eq!(
        range
            .headers
            .get("content-range")
            .and_then(|v| v.to_str().ok()),
        Some("bytes 2-5/100000")
    );

    let list = call(
        addr,
        "GET",
        "/artifacts?list-type=2&prefix=dir%2F",
        A,
        &[],
        b"",
    )
    .await;
    assert_eq!(list.status, 200);
    assert!(String::from_utf8_lossy(&list.body).contains("<Key>dir/app v1.zip</Key>"));

    // Another account: 403 for every operation on the bucket, and it is not in its ListBuckets.
    for (method, path) in [
        ("GET", "/artifacts/dir/app%20v1.zip"),
        ("GET", "/artifacts?list-type=2"),
        ("DELETE", "/artifacts"),
    ] {
        let denied = call(addr, method, path, B, &[], b"").await;
        assert_eq!(denied.status, 403, "{method} {path}");
        assert!(String::from_utf8_lossy(&denied.body).contains("<Code>AccessDenied</Code>"));
    }
    assert_eq!(
        call(addr, "HEAD", "/artifacts", B, &[], b"").await.status,
        403
    );
    assert_eq!(
        call(addr, "HEAD", "/nobody-has-this", B, &[], b"")
            .await
            .status,
        404
    );
    let buckets = call(addr, "GET", "/", B, &[], b"").await;
    assert_eq!(buckets.status, 200);
    assert!(!String::from_utf8_lossy(&buckets.body).contains("artifacts"));

    // Unsigned and badly signed requests.
    assert_eq!(
        call(
            addr,
            "GET",
            "/artifacts/dir/app%20v1.zip",
            ("", ""),
            &[],
            b""
        )
        .await
        .status,
        403
    );
    let bad = call(
        addr,
        "GET",
        "/artifacts/dir/app%20v1.zip",
        ("AKIDA", "wrong"),
        &[],
        b"",
    )
    .await;
    assert_eq!(bad.status, 403);
    assert!(String::from_utf8_lossy(&bad.body).contains("SignatureDoesNotMatch"));

    // The builder's fetch through the external-store path.
    let out = dir.path().join("out");
    std::fs::create_dir(&out).expect("mkdir");
    let fetched = external(addr, A)
        .fetch(
            "ignored",
            "s3://artifacts/dir/app v1.zip",
            &out.join("ok"),
            1 << 20,
        )
        .await
        .expect("fetches");
    assert_eq!(fetched, data.len() as u64);
    assert_eq!(std::fs::read(out.join("ok")).expect("reads"), data);
    let cases = [
        (
            B,
            "s3://artifacts/dir/app v1.zip",
            1 << 20,
            "S3_ACCESS_DENIED",
        ),
        (
            ("AKIDA", "wrong"),
            "s3://artifacts/dir/app v1.zip",
            1 << 20,
            "S3_ACCESS_DENIED",
        ),
        (
            A,
            "s3://artifacts/dir/missing.zip",
            1 << 20,
            "S3_NO_SUCH_KEY",
        ),
        (A, "s3://no-such-bucket/k", 1 << 20, "S3_NO_SUCH_BUCKET"),
        (
            A,
            "s3://artifacts/dir/app v1.zip",
            1000,
            "S3_INVALID_OBJECT",
        ),
    ];
    for (i, (key, uri, max, code)) in cases.into_iter().enumerate() {
        let dest = out.join(format!("case-{i}"));
        let err = external(addr, key)
            .fetch("ignored", uri, &dest, max)
            .await
            .expect_err(uri);
        assert_eq!(err.code().as_str(), code, "{uri}: {err}");
        assert!(!dest.exists());
    }
    // Nothing listens here.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binds");
        listener.local_addr().expect("addr")
    };
    let err = external(closed, A)
        .fetch("ignored", "s3://artifacts/k", &out.join("closed"), 1 << 20)
        .await
        .expect_err("refused");
    assert_eq!(
        err.code(),
        hearth_api::BuildErrorCode::InternalPlatformError
    );

    // Multipart over HTTP with small parts is refused as S3 does (EntityTooSmall).
    let created = call(addr, "POST", "/artifacts/mp?uploads", A, &[], b"").await;
    assert_eq!(created.status, 200);
    let text = String::from_utf8_lossy(&created.body).to_string();
    let upload_id = text
        .split_once("<UploadId>")
        .and_then(|(_, rest)| rest.split_once("</UploadId>"))
        .map(|(id, _)| id.to_string())
        .expect("upload id");
    let mut parts = String::new();
    for (n, data) in [(1, &b"first"[..]), (2, &b"second"[..])] {
        let part = call(
            addr,
            "PUT",
            &format!("/artifacts/mp?partNumber={n}&uploadId={upload_id}"),
            A,
            &[],
            data,
        )
        .await;
        assert_eq!(part.status, 200);
        let etag = part
            .headers
            .get("etag")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        parts.push_str(&format!(
            "<Part><PartNumber>{n}</PartNumber><ETag>{etag}</ETag></Part>"
        ));
    }
    let complete = format!("<CompleteMultipartUpload>{parts}</CompleteMultipartUpload>");
    let done = call(
        addr,
        "POST",
        &format!("/artifacts/mp?uploadId={upload_id}"),
        A,
        &[],
        complete.as_bytes(),
    )
    .await;
    assert_eq!(done.status, 400);
    assert!(String::from_utf8_lossy(&done.body).contains("EntityTooSmall"));
    let aborted = call(
        addr,
        "DELETE",
        &format!("/artifacts/mp?uploadId={upload_id}"),
        A,
        &[],
        b"",
    )
    .await;
    assert_eq!(aborted.status, 204);
}

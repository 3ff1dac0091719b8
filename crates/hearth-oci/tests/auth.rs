//! Authentication, redirects and hostile blob sizes against an in-process
//! fake registry (the real one in registry.rs runs without auth): a Bearer
//! token service, Basic auth, blobs redirected to a second "storage" server
//! that must never see the registry's credentials.

mod support;

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use hearth_oci::{
    parse_reference, pull, BlobError, Limits, OciError, RegistryConfig, RegistryError,
};
use support::{gzip, sha256, LayerBuilder, OCI_MANIFEST};

const NAME: &str = "team/app";
const TOKEN: &str = "tok-123";
const BASIC: &str = "Basic dXNlcjpwYXNz"; // user:pass

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Auth {
    Bearer,
    Basic,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum BlobMode {
    Honest,
    /// Serves extra bytes past the declared size.
    Longer,
    /// Stops short.
    Shorter,
}

#[derive(Default)]
struct Seen {
    /// Authorization headers the token service got.
    token_auth: Vec<Option<String>>,
    /// Query strings of token requests.
    token_queries: Vec<String>,
    /// Authorization headers the storage server got.
    storage_auth: Vec<Option<String>>,
    /// Requests the registry refused with 401.
    unauthorized: usize,
}

struct Fake {
    auth: Auth,
    blob_mode: BlobMode,
    blobs: HashMap<String, Bytes>,
    manifest: Bytes,
    registry_addr: String,
    storage_addr: String,
    seen: Mutex<Seen>,
}

fn respond(
    status: StatusCode,
    headers: &[(&str, String)],
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    for (name, value) in headers {
        response.headers_mut().insert(
            hyper::header::HeaderName::from_bytes(name.as_bytes()).expect("name"),
            value.parse().expect("value"),
        );
    }
    response
}

fn header(request: &Request<Incoming>, name: &str) -> Option<String> {
    request
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

async fn registry(
    fake: Arc<Fake>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = request.uri().path().to_owned();
    if path == "/token" {
        let mut seen = fake.seen.lock().expect("seen");
        let auth = header(&request, "authorization");
        seen.token_auth.push(auth.clone());
        seen.token_queries
            .push(request.uri().query().unwrap_or("").to_owned());
        if auth.is_some_and(|a| a != BASIC) {
            return Ok(respond(StatusCode::UNAUTHORIZED, &[], ""));
        }
        return Ok(respond(
            StatusCode::OK,
            &[],
            format!(r#"{{"token":"{TOKEN}","expires_in":300}}"#),
        ));
    }
    let expected = match fake.auth {
        Auth::Bearer => format!("Bearer {TOKEN}"),
        Auth::Basic => BASIC.to_owned(),
    };
    if header(&request, "authorization").as_deref() != Some(expected.as_str()) {
        fake.seen.lock().expect("seen").unauthorized += 1;
        let challenge = match fake.auth {
            Auth::Bearer => format!(
                r#"Bearer realm="http://{}/token",service="fake-registry",scope="repository:{NAME}:pull""#,
                fake.registry_addr
            ),
            Auth::Basic => r#"Basic realm="fake""#.to_owned(),
        };
        return Ok(respond(
            StatusCode::UNAUTHORIZED,
            &[("www-authenticate", challenge)],
            r#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#,
        ));
    }
    let prefix = format!("/v2/{NAME}/");
    let Some(rest) = path.strip_prefix(&prefix) else {
        return Ok(respond(StatusCode::NOT_FOUND, &[], ""));
    };
    if let Some(reference) = rest.strip_prefix("manifests/") {
        if reference == "v1" || reference == sha256(&fake.manifest) {
            return Ok(respond(
                StatusCode::OK,
                &[("content-type", OCI_MANIFEST.to_owned())],
                fake.manifest.clone(),
            ));
        }
        return Ok(respond(
            StatusCode::NOT_FOUND,
            &[],
            r#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}"#,
        ));
    }
    if let Some(digest) = rest.strip_prefix("blobs/") {
        // Blobs live on the storage server.
        return Ok(respond(
            StatusCode::TEMPORARY_REDIRECT,
            &[(
                "location",
                format!("http://{}/storage/{digest}", fake.storage_addr),
            )],
            "",
        ));
    }
    Ok(respond(StatusCode::NOT_FOUND, &[], ""))
}

async fn storage(
    fake: Arc<Fake>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    fake.seen
        .lock()
        .expect("seen")
        .storage_auth
        .push(header(&request, "authorization"));
    let digest = request.uri().path().trim_start_matches("/storage/");
    let Some(blob) = fake.blobs.get(digest) else {
        return Ok(respond(StatusCode::NOT_FOUND, &[], ""));
    };
    let body = match fake.blob_mode {
        BlobMode::Honest => blob.clone(),
        BlobMode::Longer => {
            let mut longer = blob.to_vec();
            longer.extend_from_slice(&[0u8; 100]);
            Bytes::from(longer)
        }
        BlobMode::Shorter => blob.slice(..blob.len() / 2),
    };
    Ok(respond(StatusCode::OK, &[], body))
}

async fn serve<F, Fut>(listener: TcpListener, fake: Arc<Fake>, handler: F)
where
    F: Fn(Arc<Fake>, Request<Incoming>) -> Fut + Copy + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send + 'static,
{
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            return;
        };
        let fake = fake.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| handler(fake.clone(), request));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Starts the fake registry and storage servers with a one-layer image.
async fn start(auth: Auth, blob_mode: BlobMode) -> Arc<Fake> {
    let registry_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let storage_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let layer = gzip(&LayerBuilder::new().file("hello.txt", b"hello").tar());
    let config =
        br#"{"architecture":"amd64","os":"linux","config":{"Cmd":["/bin/true"]}}"#.to_vec();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha256(&config), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": sha256(&layer), "size": layer.len()}],
    }))
    .expect("manifest");
    let mut blobs = HashMap::new();
    blobs.insert(sha256(&layer), Bytes::from(layer));
    blobs.insert(sha256(&config), Bytes::from(config));
    let fake = Arc::new(Fake {
        auth,
        blob_mode,
        blobs,
        manifest: Bytes::from(manifest),
        registry_addr: registry_listener.local_addr().expect("addr").to_string(),
        storage_addr: storage_listener.local_addr().expect("addr").to_string(),
        seen: Mutex::new(Seen::default()),
    });
    tokio::spawn(serve(registry_listener, fake.clone(), registry));
    tokio::spawn(serve(storage_listener, fake.clone(), storage));
    fake
}

async fn try_pull(
    fake: &Fake,
    username: Option<&str>,
    password: Option<&str>,
) -> Result<hearth_oci::PulledImage, OciError> {
    let work = tempfile::tempdir().expect("work");
    let dest = work.path().join("root");
    std::fs::create_dir(&dest).expect("dest");
    let config = RegistryConfig {
        registry: fake.registry_addr.clone(),
        insecure_http: true,
        username: username.map(str::to_owned),
        password: password.map(str::to_owned),
    };
    let reference = parse_reference(&format!("{NAME}:v1")).expect("reference");
    let quiet = |_: &str| {};
    let result = pull(
        &config,
        &reference,
        &work.path().join("cache"),
        &dest,
        &Limits::default(),
        &quiet,
    )
    .await;
    if result.is_ok() {
        assert_eq!(
            std::fs::read(dest.join("hello.txt")).expect("hello"),
            b"hello"
        );
    }
    result
}

#[tokio::test]
async fn bearer_token_with_credentials() {
    let fake = start(Auth::Bearer, BlobMode::Honest).await;
    let image = try_pull(&fake, Some("user"), Some("pass"))
        .await
        .expect("pull");
    assert_eq!(
        image.config.cmd.as_deref(),
        Some(&["/bin/true".to_owned()][..])
    );
    let seen = fake.seen.lock().expect("seen");
    // One challenge, one token, reused for the blobs.
    assert_eq!(seen.unauthorized, 1);
    assert_eq!(seen.token_auth, [Some(BASIC.to_owned())]);
    assert_eq!(
        seen.token_queries,
        ["service=fake-registry&scope=repository%3Ateam%2Fapp%3Apull"]
    );
    // Redirected blob downloads never carry the registry's token.
    assert_eq!(seen.storage_auth.len(), 2);
    assert!(
        seen.storage_auth.iter().all(Option::is_none),
        "{:?}",
        seen.storage_auth
    );
}

#[tokio::test]
async fn anonymous_bearer_token() {
    let fake = start(Auth::Bearer, BlobMode::Honest).await;
    try_pull(&fake, None, None).await.expect("pull");
    assert_eq!(fake.seen.lock().expect("seen").token_auth, [None]);
}

#[tokio::test]
async fn wrong_credentials_are_refused() {
    let fake = start(Auth::Bearer, BlobMode::Honest).await;
    let err = try_pull(&fake, Some("user"), Some("wrong"))
        .await
        .expect_err("refused");
    assert!(
        matches!(err, OciError::Registry(RegistryError::Unauthorized(_))),
        "{err:?}"
    );
}

#[tokio::test]
async fn basic_auth() {
    let fake = start(Auth::Basic, BlobMode::Honest).await;
    try_pull(&fake, Some("user"), Some("pass"))
        .await
        .expect("pull");
    assert!(fake
        .seen
        .lock()
        .expect("seen")
        .storage_auth
        .iter()
        .all(Option::is_none));
    let err = try_pull(&fake, None, None)
        .await
        .expect_err("no credentials");
    assert!(
        matches!(err, OciError::Registry(RegistryError::CredentialsRequired)),
        "{err:?}"
    );
    let err = try_pull(&fake, Some("user"), Some("nope"))
        .await
        .expect_err("wrong credentials");
    assert!(
        matches!(err, OciError::Registry(RegistryError::Unauthorized(_))),
        "{err:?}"
    );
}

#[tokio::test]
async fn blobs_must_have_their_declared_size() {
    let fake = start(Auth::Bearer, BlobMode::Longer).await;
    let err = try_pull(&fake, None, None).await.expect_err("longer");
    assert!(
        matches!(err, OciError::Blob(BlobError::TooLarge { .. })),
        "{err:?}"
    );
    let fake = start(Auth::Bearer, BlobMode::Shorter).await;
    let err = try_pull(&fake, None, None).await.expect_err("shorter");
    assert!(
        matches!(err, OciError::Blob(BlobError::Truncated { .. })),
        "{err:?}"
    );
}

#[tokio::test]
async fn limits_apply_before_downloading() {
    let fake = start(Auth::Bearer, BlobMode::Honest).await;
    let work = tempfile::tempdir().expect("work");
    let config = RegistryConfig {
        registry: fake.registry_addr.clone(),
        insecure_http: true,
        username: None,
        password: None,
    };
    let reference = parse_reference(&format!("{NAME}:v1")).expect("reference");
    let quiet = |_: &str| {};
    for (limits, what) in [
        (
            Limits {
                max_layers: 0,
                ..Limits::default()
            },
            "layers",
        ),
        (
            Limits {
                max_layer_bytes: 10,
                ..Limits::default()
            },
            "layer size",
        ),
        (
            Limits {
                max_total_bytes: 10,
                ..Limits::default()
            },
            "total size",
        ),
    ] {
        let dest = work.path().join(what);
        std::fs::create_dir(&dest).expect("dest");
        let err = pull(
            &config,
            &reference,
            &work.path().join("cache"),
            &dest,
            &limits,
            &quiet,
        )
        .await
        .expect_err(what);
        assert!(
            matches!(
                err,
                OciError::TooManyLayers { .. }
                    | OciError::LayerTooLarge { .. }
                    | OciError::ImageTooLarge { .. }
            ),
            "{what}: {err:?}"
        );
    }
    assert!(
        fake.seen.lock().expect("seen").storage_auth.is_empty(),
        "nothing downloaded"
    );
}

//! The client against a real `hearth serve`, in process, on a free local port.

use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use hearth_client::{Client, ClientConfig, ClientError};
use serde_json::json;

fn free_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_a_real_server() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // The server's VM layer reads these; keep it away from the user's dirs.
    // This binary has this one test, so nothing else reads the environment.
    for (var, sub) in [
        ("HEARTH_CACHE", "cache"),
        ("HEARTH_HOME", "home"),
        ("HEARTH_RAM_DIR", "ram"),
    ] {
        std::env::set_var(var, tmp.path().join(sub));
    }
    // Two managed base images, as scripts/setup-host lays them out, so that
    // pagination has pages to follow.
    for name in ["base-a", "base-b"] {
        let build = tmp.path().join("cache/images").join(name).join("k1");
        std::fs::create_dir_all(&build).expect("mkdir");
        std::fs::write(build.join("manifest.json"), "{}").expect("manifest");
    }
    let data_dir = tmp.path().join("data");
    std::fs::create_dir(&data_dir).expect("mkdir");
    let key = hearth_server::Store::open(&data_dir)
        .expect("store")
        .create_account("client-test")
        .expect("account");

    let addr = free_port();
    let server = tokio::spawn(hearth_server::serve(hearth_server::ServerConfig::new(
        data_dir.clone(),
        addr,
        "us-east-1".into(),
    )));
    let deadline = Instant::now() + Duration::from_secs(60);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(!server.is_finished(), "server ended: {:?}", server.await);
        assert!(Instant::now() < deadline, "server did not listen on {addr}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let endpoint = format!("http://{addr}");
    let config = ClientConfig::new(
        &endpoint,
        "us-east-1",
        &key.access_key_id,
        &key.secret_access_key,
    )
    .expect("config");
    let client = Client::new(config);

    let page = client
        .call("ListManagedMicrovmImages", json!({}))
        .await
        .expect("lists managed images");
    assert_eq!(page["items"].as_array().map(Vec::len), Some(2), "{page}");
    let items = client
        .paginate("ListManagedMicrovmImages", json!({ "maxResults": 1 }))
        .await
        .expect("paginates");
    let arns: Vec<&str> = items
        .iter()
        .filter_map(|i| i["imageArn"].as_str())
        .collect();
    assert_eq!(
        arns,
        [
            "arn:aws:lambda:us-east-1:aws:microvm-image:base-a",
            "arn:aws:lambda:us-east-1:aws:microvm-image:base-b"
        ]
    );

    // An ARN as a URI label: percent-encoded, it still reaches its image.
    let versions = client
        .call(
            "ListManagedMicrovmImageVersions",
            json!({ "imageIdentifier": arns[1] }),
        )
        .await
        .expect("lists versions by ARN");
    assert!(versions["items"].is_array(), "{versions}");

    // A VM that does not exist: an API error (404 today, whatever the op's state).
    let err = client
        .call("GetMicrovm", json!({ "microvmIdentifier": "microvm-nope" }))
        .await
        .expect_err("no such microvm");
    assert!(
        matches!(
            err,
            ClientError::Api {
                status: 400..=499,
                ..
            }
        ),
        "{err:?}"
    );

    let wrong = ClientConfig::new(&endpoint, "us-east-1", &key.access_key_id, "not-the-secret")
        .expect("config");
    let err = Client::new(wrong)
        .call("ListManagedMicrovmImages", json!({}))
        .await
        .expect_err("bad signature");
    match &err {
        ClientError::Api { status, code, .. } => {
            assert_eq!(*status, 403, "{err}");
            assert!(!code.is_empty());
        }
        other => panic!("expected an API error, got {other:?}"),
    }

    // Nothing listens there: a transport error naming the endpoint.
    let closed = ClientConfig::new(&format!("http://{}", free_port()), "us-east-1", "K", "S")
        .expect("config");
    let err = Client::new(closed)
        .call("ListManagedMicrovmImages", json!({}))
        .await
        .expect_err("refused");
    assert!(matches!(err, ClientError::Transport { .. }), "{err:?}");

    https_through_a_private_ca(addr, &key, tmp.path()).await;
    server.abort();
}

/// A TLS front (a self-signed certificate for localhost) before the server:
/// the client verifies it with the certificate as its CA bundle, and refuses
/// it without.
async fn https_through_a_private_ca(
    api: SocketAddr,
    key: &hearth_server::db::store::NewAccessKey,
    dir: &std::path::Path,
) {
    let certified =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("certificate");
    let bundle = dir.join("ca.pem");
    std::fs::write(&bundle, certified.cert.pem()).expect("write bundle");
    let tls = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(
        vec![certified.cert.der().clone()],
        rustls_pki_types::PrivateKeyDer::Pkcs8(certified.signing_key.serialize_der().into()),
    )
    .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(tls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let front = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                if let Ok(mut upstream) = tokio::net::TcpStream::connect(api).await {
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut upstream).await;
                }
            });
        }
    });
    let endpoint = format!("https://localhost:{port}");
    let trusting = ClientConfig::new(
        &endpoint,
        "us-east-1",
        &key.access_key_id,
        &key.secret_access_key,
    )
    .expect("config")
    .with_ca_bundle(&bundle)
    .expect("bundle");
    let page = Client::new(trusting)
        .call("ListManagedMicrovmImages", json!({}))
        .await
        .expect("https with the CA bundle");
    assert!(page["items"].is_array(), "{page}");
    let untrusting = ClientConfig::new(
        &endpoint,
        "us-east-1",
        &key.access_key_id,
        &key.secret_access_key,
    )
    .expect("config");
    let err = Client::new(untrusting)
        .call("ListManagedMicrovmImages", json!({}))
        .await
        .expect_err("an unknown CA is refused");
    assert!(matches!(err, ClientError::Transport { .. }), "{err:?}");
    front.abort();
}

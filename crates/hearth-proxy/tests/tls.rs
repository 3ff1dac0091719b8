//! The proxy under TLS: a self-signed `*.<domain>` certificate made at first
//! start, HTTP/1.1 and HTTP/2 chosen by ALPN, routing by Host / :authority.
//! (The domain has two labels: certificate verifiers refuse a wildcard directly
//! under a single label such as `*.localhost`.)
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use common::*;
use hearth_proxy::{tls, ProxyConfig};
use http::StatusCode;
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;

const DOMAIN: &str = "hearth.test";

async fn start_tls_proxy(backend: Arc<TestBackend>, dir: &std::path::Path) -> std::net::SocketAddr {
    let server_config = tls::load_or_generate(dir, DOMAIN).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = ProxyConfig {
        domain: DOMAIN.to_owned(),
        ..ProxyConfig::default()
    };
    tokio::spawn(hearth_proxy::serve_tls(
        listener,
        server_config,
        backend,
        config,
    ));
    addr
}

fn connector(dir: &std::path::Path, alpn: &[&[u8]]) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(dir.join(tls::CERT_FILE)).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    TlsConnector::from(Arc::new(config))
}

#[tokio::test]
async fn tls_with_alpn_http1_and_h2() {
    let dir = tempfile::tempdir().unwrap();
    let backend = TestBackend::new();
    let (app_addr, _) = start_app("8080").await;
    backend.map(VM, 8080, app_addr);
    let proxy = start_tls_proxy(Arc::clone(&backend), dir.path()).await;
    let host = format!("{VM}.{DOMAIN}:{}", proxy.port());
    let server_name = ServerName::try_from(format!("{VM}.{DOMAIN}")).unwrap();

    // HTTP/1.1
    let stream = TcpStream::connect(proxy).await.unwrap();
    let stream = connector(dir.path(), &[b"http/1.1"])
        .connect(server_name.clone(), stream)
        .await
        .unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let response = sender
        .send_request(
            request("GET", &host, "/headers", Some(TOKEN))
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let app_saw = seen(&response.into_body().collect().await.unwrap().to_bytes());
    assert_eq!(app_saw["headers"]["host"], serde_json::json!([host]));
    let response = sender
        .send_request(request("GET", &host, "/", None).body(empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);

    // HTTP/2 by ALPN
    let stream = TcpStream::connect(proxy).await.unwrap();
    let stream = connector(dir.path(), &[b"h2", b"http/1.1"])
        .connect(server_name, stream)
        .await
        .unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let h2_request = http::Request::builder()
        .uri(format!("https://{host}/headers"))
        .header("x-aws-proxy-auth", TOKEN)
        .body(empty())
        .unwrap();
    let response = sender.send_request(h2_request).await.unwrap();
    assert_eq!(
        (response.status(), response.version()),
        (StatusCode::OK, http::Version::HTTP_2)
    );
    let app_saw = seen(&response.into_body().collect().await.unwrap().to_bytes());
    assert_eq!(app_saw["version"], "HTTP/1.1");
    assert_eq!(app_saw["headers"]["host"], serde_json::json!([host]));

    // The certificate also covers the bare domain; a bad host still answers 404.
    let stream = TcpStream::connect(proxy).await.unwrap();
    let stream = connector(dir.path(), &[b"http/1.1"])
        .connect(ServerName::try_from(DOMAIN).unwrap(), stream)
        .await
        .unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let response = sender
        .send_request(
            request("GET", DOMAIN, "/", Some(TOKEN))
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);

    // A certificate for another name is refused by the client.
    let stream = TcpStream::connect(proxy).await.unwrap();
    let refused = connector(dir.path(), &[b"http/1.1"])
        .connect(ServerName::try_from("example.com").unwrap(), stream)
        .await;
    assert!(refused.is_err());
    // The proxy survives the failed handshake.
    assert_eq!(backend.connects(), 2);
}

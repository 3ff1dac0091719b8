//! The proxy over real sockets: a Backend double in front of real local servers.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use futures::{SinkExt, StreamExt};
use hearth_proxy::{
    BoxFuture, ExtensionHandler, ExtensionRequest, ProxyBody, ProxyConfig, VmLimits,
};
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const T: Duration = Duration::from_secs(10);

#[tokio::test]
async fn token_matrix() {
    let f = fixture(ProxyConfig::default()).await;
    let host = f.host(VM);

    let (status, headers, body) =
        get(f.proxy, &host, "/headers", &[("x-aws-proxy-auth", TOKEN)]).await;
    assert_eq!(status, StatusCode::OK, "{body:?}");
    assert_eq!(headers["x-app"], "8080");
    assert_eq!(f.backend.connects(), 1);

    let refused: [&[(&str, &str)]; 6] = [
        &[],
        &[("x-aws-proxy-auth", "")],
        &[("x-aws-proxy-auth", "hm1.wrong")],
        &[("x-aws-proxy-auth", OTHER_TOKEN)],
        &[
            ("x-aws-proxy-auth", TOKEN_8080),
            ("x-aws-proxy-port", "8081"),
        ],
        &[("x-aws-proxy-auth", SHELL_TOKEN)],
    ];
    for headers in refused {
        let (status, _, body) = get(f.proxy, &host, "/headers", headers).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{headers:?}");
        let message: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert!(message["message"].is_string(), "{body:?}");
    }
    // An unknown microVM answers exactly like a wrong token.
    let unknown = f.host("microvm-99999999-9999-4999-8999-999999999999");
    let (status, _, unknown_body) =
        get(f.proxy, &unknown, "/", &[("x-aws-proxy-auth", "hm1.wrong")]).await;
    let (_, _, wrong_body) = get(f.proxy, &host, "/", &[("x-aws-proxy-auth", "hm1.wrong")]).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(unknown_body, wrong_body);
    // The other microVM's token works on its own endpoint.
    let (status, headers, _) = get(
        f.proxy,
        &f.host(OTHER_VM),
        "/",
        &[("x-aws-proxy-auth", OTHER_TOKEN)],
    )
    .await;
    assert_eq!(
        (status, &headers["x-app"]),
        (StatusCode::OK, &"8081".parse().unwrap())
    );

    assert_eq!(f.backend.connects(), 2, "refused requests never connect");
}

#[tokio::test]
async fn missing_token_never_reaches_the_backend() {
    let f = fixture(ProxyConfig::default()).await;
    let (status, _, _) = get(f.proxy, &f.host(VM), "/", &[]).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(f.backend.authorizations.load(Ordering::SeqCst), 0);
    assert_eq!(f.backend.connects(), 0);
}

#[tokio::test]
async fn port_header_selects_the_guest_port() {
    let f = fixture(ProxyConfig::default()).await;
    let host = f.host(VM);
    let (status, headers, _) = get(f.proxy, &host, "/", &[("x-aws-proxy-auth", TOKEN)]).await;
    assert_eq!(
        (status, headers["x-app"].to_str().unwrap()),
        (StatusCode::OK, "8080")
    );
    let (status, headers, _) = get(
        f.proxy,
        &host,
        "/",
        &[("x-aws-proxy-auth", TOKEN), ("x-aws-proxy-port", "8081")],
    )
    .await;
    assert_eq!(
        (status, headers["x-app"].to_str().unwrap()),
        (StatusCode::OK, "8081")
    );
    let connects = f.backend.connects();
    for bad in ["0", "65536", "x", "-1", "80 80", ""] {
        let (status, _, _) = get(
            f.proxy,
            &host,
            "/",
            &[("x-aws-proxy-auth", TOKEN), ("x-aws-proxy-port", bad)],
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad:?}");
    }
    assert_eq!(f.backend.connects(), connects);
}

#[tokio::test]
async fn proxy_headers_are_stripped_and_request_id_added() {
    let f = fixture(ProxyConfig::default()).await;
    let host = f.host(VM);
    let (status, headers, body) = get(
        f.proxy,
        &host,
        "/headers?a=1",
        &[
            ("x-aws-proxy-auth", TOKEN),
            ("x-aws-proxy-port", "8080"),
            ("x-aws-proxy-force-h2", "false"),
            ("X-Aws-Proxy-Anything", "secret"),
            ("x-amzn-requestid", "forged"),
            ("x-app-header", "kept"),
            ("connection", "keep-alive, x-hop"),
            ("x-hop", "dropped"),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let seen = seen(&body);
    let app_headers = seen["headers"].as_object().unwrap();
    for name in app_headers.keys() {
        assert!(!name.starts_with("x-aws-proxy-"), "{name} reached the app");
    }
    assert!(!app_headers.contains_key("x-hop"));
    assert_eq!(seen["path"], "/headers?a=1");
    assert_eq!(seen["version"], "HTTP/1.1");
    assert_eq!(app_headers["host"], serde_json::json!([host]));
    assert_eq!(app_headers["x-app-header"], serde_json::json!(["kept"]));
    let ids = app_headers["x-amzn-requestid"].as_array().unwrap();
    assert_eq!(ids.len(), 1);
    let id = ids[0].as_str().unwrap();
    assert_ne!(id, "forged");
    assert!(uuid_like(id), "{id}");
    assert_eq!(
        headers["x-amzn-requestid"], id,
        "the response carries the same id"
    );

    // The proxy's own answers carry a request id too.
    let (_, headers, _) = get(f.proxy, &host, "/", &[]).await;
    assert!(uuid_like(headers["x-amzn-requestid"].to_str().unwrap()));
}

fn uuid_like(text: &str) -> bool {
    text.len() == 36 && text.chars().filter(|c| *c == '-').count() == 4
}

#[tokio::test]
async fn chunked_bodies_both_ways() {
    let f = fixture(ProxyConfig::default()).await;
    let host = f.host(VM);
    let mut client = h1(f.proxy).await;
    // A request body of unknown length goes out chunked.
    let total = 3 * 1024 * 1024 + 17;
    let upload = request("POST", &host, "/upload", Some(TOKEN))
        .body(pattern_body(total))
        .unwrap();
    let response = client.send_request(upload).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let reply: serde_json::Value =
        serde_json::from_slice(&response.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(reply["len"], total);
    assert_eq!(reply["sha256"], pattern_sha256(total));
    // A streamed response without a length arrives chunked.
    let request = request(
        "GET",
        &host,
        &format!("/download?bytes={total}"),
        Some(TOKEN),
    )
    .body(empty())
    .unwrap();
    let response = client.send_request(request).await.unwrap();
    assert_eq!(response.headers()["transfer-encoding"], "chunked");
    assert_eq!(
        hash_body(response.into_body()).await,
        (total, pattern_sha256(total))
    );
}

#[tokio::test]
async fn server_sent_events_arrive_as_sent() {
    let f = fixture(ProxyConfig::default()).await;
    let mut client = h1(f.proxy).await;
    let request = request("GET", &f.host(VM), "/sse", Some(TOKEN))
        .body(empty())
        .unwrap();
    let response = timeout(T, client.send_request(request))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut body = response.into_body();
    // The first event comes through while the app still holds the stream open.
    let first = timeout(T, body.frame()).await.unwrap().unwrap().unwrap();
    assert_eq!(
        first.into_data().unwrap(),
        Bytes::from_static(b"data: one\n\n")
    );
    f.app.sse_gate.notify_one();
    let second = timeout(T, body.frame()).await.unwrap().unwrap().unwrap();
    assert_eq!(
        second.into_data().unwrap(),
        Bytes::from_static(b"data: two\n\n")
    );
    let end = timeout(T, body.frame()).await.unwrap();
    assert!(end.is_none());
}

#[tokio::test]
async fn http2_clients_reach_an_http1_app() {
    let f = fixture(ProxyConfig::default()).await;
    let host = f.host(VM);
    let mut client = h2(f.proxy).await;
    let request = http::Request::builder()
        .uri(format!("http://{host}/headers"))
        .header("x-aws-proxy-auth", TOKEN)
        .body(empty())
        .unwrap();
    let response = client.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.version(), http::Version::HTTP_2);
    assert!(response.headers().contains_key("x-amzn-requestid"));
    let seen = seen(&response.into_body().collect().await.unwrap().to_bytes());
    assert_eq!(seen["version"], "HTTP/1.1");
    assert_eq!(seen["headers"]["host"], serde_json::json!([host]));
    assert!(seen["headers"].get("x-aws-proxy-auth").is_none());

    // Concurrent streams on one connection, with bodies.
    let total = 1024 * 1024 + 3;
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let mut client = client.clone();
        let host = host.clone();
        tasks.push(tokio::spawn(async move {
            let request = http::Request::builder()
                .method("POST")
                .uri(format!("http://{host}/upload"))
                .header("x-aws-proxy-auth", TOKEN)
                .body(pattern_body(total))
                .unwrap();
            let response = client.send_request(request).await.unwrap();
            let body = response.into_body().collect().await.unwrap().to_bytes();
            serde_json::from_slice::<serde_json::Value>(&body).unwrap()
        }));
    }
    for task in tasks {
        let reply = task.await.unwrap();
        assert_eq!(reply["sha256"], pattern_sha256(total));
    }
    // Missing token over h2 is a 403 as well.
    let request = http::Request::builder()
        .uri(format!("http://{host}/"))
        .body(empty())
        .unwrap();
    assert_eq!(
        client.send_request(request).await.unwrap().status(),
        StatusCode::FORBIDDEN
    );
}

async fn ws_connect(
    f: &Fixture,
    protocols: &str,
) -> Result<
    (
        tokio_tungstenite::WebSocketStream<TcpStream>,
        tokio_tungstenite::tungstenite::handshake::client::Response,
    ),
    tokio_tungstenite::tungstenite::Error,
> {
    let mut request = format!("ws://{}/chat", f.host(VM))
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("sec-websocket-protocol", protocols.parse().unwrap());
    let stream = TcpStream::connect(f.proxy).await.unwrap();
    timeout(T, tokio_tungstenite::client_async(request, stream))
        .await
        .unwrap()
}

#[tokio::test]
async fn websocket_subprotocols_route_and_are_stripped() {
    let f = fixture(ProxyConfig::default()).await;
    let protocols = format!("lambda-microvms, lambda-microvms.authentication.{TOKEN}, lambda-microvms.port.9000, chat.v2");
    let (mut ws, response) = ws_connect(&f, &protocols).await.unwrap();
    assert_eq!(response.headers()["sec-websocket-protocol"], "chat.v2");
    assert!(response.headers().contains_key("x-amzn-requestid"));
    ws.send(Message::text("hello")).await.unwrap();
    assert_eq!(
        timeout(T, ws.next()).await.unwrap().unwrap().unwrap(),
        Message::text("hello")
    );
    let blob = vec![7u8; 200_000];
    ws.send(Message::binary(blob.clone())).await.unwrap();
    assert_eq!(
        timeout(T, ws.next()).await.unwrap().unwrap().unwrap(),
        Message::binary(blob)
    );
    ws.close(None).await.unwrap();
    assert_eq!(
        f.ws_seen.lock().unwrap().clone(),
        vec![Some("chat.v2".to_owned())]
    );

    // Only the proxy's subprotocols: the app sees none, the client gets `lambda-microvms`.
    let protocols = format!(
        "lambda-microvms, lambda-microvms.authentication.{TOKEN}, lambda-microvms.port.9000"
    );
    let (mut ws, response) = ws_connect(&f, &protocols).await.unwrap();
    assert_eq!(
        response.headers()["sec-websocket-protocol"],
        "lambda-microvms"
    );
    ws.send(Message::text("again")).await.unwrap();
    assert_eq!(
        timeout(T, ws.next()).await.unwrap().unwrap().unwrap(),
        Message::text("again")
    );
    assert_eq!(f.ws_seen.lock().unwrap().last().cloned(), Some(None));
    assert!(
        f.backend.traffic() > 400_000,
        "upgraded streams are counted"
    );
}

#[tokio::test]
async fn websocket_without_a_valid_token_is_refused() {
    let f = fixture(ProxyConfig::default()).await;
    for protocols in [
        "lambda-microvms, lambda-microvms.port.9000".to_owned(),
        "lambda-microvms, lambda-microvms.authentication.hm1.wrong, lambda-microvms.port.9000".to_owned(),
        format!("lambda-microvms, lambda-microvms.authentication.{TOKEN_8080}, lambda-microvms.port.9000"),
    ] {
        match ws_connect(&f, &protocols).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                assert_eq!(response.status(), StatusCode::FORBIDDEN, "{protocols}");
            }
            other => panic!("{protocols}: {other:?}"),
        }
    }
    assert_eq!(f.backend.connects(), 0);
    assert!(f.ws_seen.lock().unwrap().is_empty());
}

#[tokio::test]
async fn unreachable_ports_answer_502() {
    let f = fixture(ProxyConfig::default()).await;
    for port in ["7000", "7001"] {
        let (status, _, body) = get(
            f.proxy,
            &f.host(VM),
            "/",
            &[("x-aws-proxy-auth", TOKEN), ("x-aws-proxy-port", port)],
        )
        .await;
        assert_eq!(status, StatusCode::BAD_GATEWAY, "{port}: {body:?}");
    }
}

/// A guest port that answers with garbage, or never answers.
async fn raw_app(reply: Option<Vec<u8>>) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let reply = reply.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = stream.read(&mut buf).await;
                match reply {
                    Some(reply) => {
                        let _ = stream.write_all(&reply).await;
                        let _ = stream.shutdown().await;
                    }
                    None => tokio::time::sleep(Duration::from_secs(60)).await,
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn malformed_or_silent_guests() {
    let config = ProxyConfig {
        response_timeout: Duration::from_millis(500),
        max_response_header_bytes: 16 * 1024,
        ..ProxyConfig::default()
    };
    let f = fixture(config).await;
    let huge = format!(
        "HTTP/1.1 200 OK\r\nx-big: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    )
    .into_bytes();
    for reply in [
        b"HTTP/1.1 abc\r\n\r\n".to_vec(),
        b"\x00\x01\x02garbage\r\n\r\n".to_vec(),
        b"HTTP/1.1 200 OK\r\ncontent-length: nope\r\n\r\n".to_vec(),
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n"
            .to_vec(),
        huge,
        Vec::new(),
    ] {
        f.backend.map(VM, 7002, raw_app(Some(reply.clone())).await);
        let (status, _, _) = get(
            f.proxy,
            &f.host(VM),
            "/",
            &[("x-aws-proxy-auth", TOKEN), ("x-aws-proxy-port", "7002")],
        )
        .await;
        assert_eq!(
            status,
            StatusCode::BAD_GATEWAY,
            "{:?}",
            String::from_utf8_lossy(&reply[..reply.len().min(40)])
        );
    }
    f.backend.map(VM, 7003, raw_app(None).await);
    let (status, _, _) = get(
        f.proxy,
        &f.host(VM),
        "/",
        &[("x-aws-proxy-auth", TOKEN), ("x-aws-proxy-port", "7003")],
    )
    .await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    // The proxy still serves.
    let (status, _, _) = get(f.proxy, &f.host(VM), "/", &[("x-aws-proxy-auth", TOKEN)]).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn connection_limit_answers_429() {
    let config = ProxyConfig {
        limits: VmLimits {
            max_connections: 2,
            requests_per_second: 0,
        },
        ..ProxyConfig::default()
    };
    let f = fixture(config).await;
    let host = f.host(VM);
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut client = h1(f.proxy).await;
        let response = client
            .send_request(
                request("GET", &host, "/hold", Some(TOKEN))
                    .body(empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        held.push((client, response));
    }
    let (status, _, _) = get(f.proxy, &host, "/", &[("x-aws-proxy-auth", TOKEN)]).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    // Another microVM is not affected.
    let (status, _, _) = get(
        f.proxy,
        &f.host(OTHER_VM),
        "/",
        &[("x-aws-proxy-auth", OTHER_TOKEN)],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    // Closing one held stream frees a slot.
    drop(held.pop());
    let mut freed = false;
    for _ in 0..50 {
        let (status, _, _) = get(f.proxy, &host, "/", &[("x-aws-proxy-auth", TOKEN)]).await;
        if status == StatusCode::OK {
            freed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(freed);
}

#[tokio::test]
async fn request_rate_limit_answers_429() {
    let config = ProxyConfig {
        limits: VmLimits {
            max_connections: 0,
            requests_per_second: 1,
        },
        ..ProxyConfig::default()
    };
    let f = fixture(config).await;
    let host = f.host(VM);
    let mut client = h1(f.proxy).await;
    let mut statuses = Vec::new();
    for _ in 0..12 {
        let response = client
            .send_request(
                request("GET", &host, "/", Some(TOKEN))
                    .body(empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        statuses.push(response.status());
        let _ = response.into_body().collect().await;
    }
    let limited = statuses
        .iter()
        .filter(|s| **s == StatusCode::TOO_MANY_REQUESTS)
        .count();
    assert!(limited >= 5, "{statuses:?}");
    assert_eq!(statuses[0], StatusCode::OK);
}

#[tokio::test]
async fn bad_hosts_answer_404() {
    let f = fixture(ProxyConfig::default()).await;
    let port = f.proxy.port();
    for host in [
        format!("localhost:{port}"),
        "localhost".to_owned(),
        format!("{VM}.example.com:{port}"),
        format!("x.{VM}.localhost:{port}"),
        format!("{VM}.localhost.evil.com"),
        format!("127.0.0.1:{port}"),
        format!("{VM}_x.localhost"),
        format!("{VM}.localhost:99999"),
    ] {
        let (status, _, body) = get(f.proxy, &host, "/", &[("x-aws-proxy-auth", TOKEN)]).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{host}: {body:?}");
    }
    assert_eq!(f.backend.authorizations.load(Ordering::SeqCst), 0);
    // An HTTP/1.0 request without Host.
    let mut stream = TcpStream::connect(f.proxy).await.unwrap();
    stream.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    let mut reply = Vec::new();
    timeout(T, stream.read_to_end(&mut reply))
        .await
        .unwrap()
        .unwrap();
    assert!(
        reply.starts_with(b"HTTP/1.0 404"),
        "{:?}",
        String::from_utf8_lossy(&reply)
    );
    // Two Host headers.
    let mut stream = TcpStream::connect(f.proxy).await.unwrap();
    let request = format!("GET / HTTP/1.1\r\nhost: {VM}.localhost\r\nhost: {OTHER_VM}.localhost\r\nconnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut reply = Vec::new();
    timeout(T, stream.read_to_end(&mut reply))
        .await
        .unwrap()
        .unwrap();
    assert!(
        reply.starts_with(b"HTTP/1.1 400"),
        "{:?}",
        String::from_utf8_lossy(&reply)
    );
    assert_eq!(f.backend.connects(), 0);
}

#[tokio::test]
async fn reserved_prefix_never_reaches_the_app() {
    let f = fixture(ProxyConfig::default()).await;
    for path in ["/.hearth/", "/.hearth/exec", "/.hearth"] {
        let (status, _, _) = get(f.proxy, &f.host(VM), path, &[("x-aws-proxy-auth", TOKEN)]).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
    }
    assert_eq!(f.backend.connects(), 0);
    assert_eq!(f.app.requests.load(Ordering::SeqCst), 0);
    // Lookalikes are the app's.
    let (status, _, _) = get(
        f.proxy,
        &f.host(VM),
        "/.hearthx",
        &[("x-aws-proxy-auth", TOKEN)],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
}

struct Extension;

impl ExtensionHandler for Extension {
    fn handle(&self, request: ExtensionRequest) -> BoxFuture<'_, Response<ProxyBody>> {
        Box::pin(async move {
            let text = format!(
                "{:?} {} {} {}",
                request.route,
                request.microvm_id,
                request.token.as_deref().unwrap_or("-"),
                request.request.uri().path()
            );
            let mut response = Response::new(
                Full::new(Bytes::from(text.clone()))
                    .map_err(|never| match never {})
                    .boxed_unsync(),
            );
            response
                .headers_mut()
                .insert("x-ext", text.parse().unwrap());
            response
        })
    }
}

#[tokio::test]
async fn extension_handler_serves_reserved_routes() {
    let config = ProxyConfig {
        extension: Some(Arc::new(Extension)),
        ..ProxyConfig::default()
    };
    let f = fixture(config).await;
    let (status, headers, body) = get(
        f.proxy,
        &f.host(VM),
        "/.hearth/exec",
        &[("x-aws-proxy-auth", TOKEN)],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, format!("Reserved {VM} {TOKEN} /.hearth/exec"));
    assert!(headers.contains_key("x-amzn-requestid"));

    // `/shell` WebSocket with a shell token goes to the extension; with a port token, to the app.
    let mut request = format!("ws://{}/shell", f.host(VM))
        .into_client_request()
        .unwrap();
    request.headers_mut().insert(
        "sec-websocket-protocol",
        format!("lambda-microvms, lambda-microvms.authentication.{SHELL_TOKEN}")
            .parse()
            .unwrap(),
    );
    let stream = TcpStream::connect(f.proxy).await.unwrap();
    match tokio_tungstenite::client_async(request, stream).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), StatusCode::OK);
            assert_eq!(
                response.headers()["x-ext"],
                format!("Shell {VM} {SHELL_TOKEN} /shell")
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(f.backend.connects(), 0);
}

#[tokio::test]
async fn traffic_is_counted_both_ways() {
    let f = fixture(ProxyConfig::default()).await;
    let host = f.host(VM);
    let mut client = h1(f.proxy).await;
    let size = 1024 * 1024;
    let response = client
        .send_request(
            request("POST", &host, "/upload", Some(TOKEN))
                .body(pattern_body(size))
                .unwrap(),
        )
        .await
        .unwrap();
    let _ = response.into_body().collect().await.unwrap();
    let after_upload = f.backend.traffic();
    assert!(after_upload >= size, "{after_upload}");
    let response = client
        .send_request(
            request(
                "GET",
                &host,
                &format!("/download?bytes={size}"),
                Some(TOKEN),
            )
            .body(empty())
            .unwrap(),
        )
        .await
        .unwrap();
    let _ = hash_body(response.into_body()).await;
    assert!(f.backend.traffic() >= after_upload + size);
    // A request with no body still counts as activity.
    let before = f.backend.traffic();
    let (status, _, _) = get(f.proxy, &host, "/", &[("x-aws-proxy-auth", TOKEN)]).await;
    assert_eq!(status, StatusCode::OK);
    assert!(f.backend.traffic() > before);
}

#[tokio::test]
async fn keep_alive_reuses_the_guest_connection() {
    let f = fixture(ProxyConfig::default()).await;
    let host = f.host(VM);
    let mut client = h1(f.proxy).await;
    for _ in 0..5 {
        let response = client
            .send_request(
                request("GET", &host, "/headers", Some(TOKEN))
                    .body(empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let _ = response.into_body().collect().await.unwrap();
    }
    assert_eq!(f.backend.connects(), 1);
    // A different port on the same client connection opens its own stream.
    let response = client
        .send_request(
            request("GET", &host, "/", Some(TOKEN))
                .header("x-aws-proxy-port", "8081")
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.headers()["x-app"], "8081");
    assert_eq!(f.backend.connects(), 2);
}

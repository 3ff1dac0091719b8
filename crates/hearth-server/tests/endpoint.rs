//! The endpoint proxy on real guests: tokens and ports, headers the app sees,
//! the hooks port, idle suspension, auto-resume (one resume for many waiting
//! requests, none for tokenless ones) and the suspended-duration limit.
//!
//! Idle timers run on persisted times; the test moves those times back in the
//! database instead of waiting out the 60 s minimum of the API.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hearth_server::api::ops::Caller;
use hearth_server::ServerConfig;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

mod common;
use common::{call, sh, wait_state};

const APP: &str = r#"
import http.server, json, os, threading, time
class App(http.server.BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'
    def do_GET(self):
        body = json.dumps({'path': self.path, 'headers': {k.lower(): v for k, v in self.headers.items()}}).encode()
        self.send_response(200)
        self.send_header('Content-Type', 'application/json')
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
class Hooks(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get('Content-Length') or 0))
        with open('/tmp/hooks.log', 'a') as log:
            log.write(self.path.rsplit('/', 1)[-1] + '\n')
        self.send_response(200)
        self.send_header('Content-Length', '0')
        self.end_headers()
    def do_GET(self):
        self.send_response(200)
        self.send_header('Content-Length', '5')
        self.end_headers()
        self.wfile.write(b'hooks')
    def log_message(self, *args):
        pass
threading.Thread(target=http.server.ThreadingHTTPServer(('0.0.0.0', 8080), App).serve_forever, daemon=True).start()
http.server.ThreadingHTTPServer(('0.0.0.0', 9000), Hooks).serve_forever()
"#;

/// One HTTP/1.1 request through the proxy; returns (status, body).
async fn get(
    proxy: std::net::SocketAddr,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(proxy)
        .await
        .expect("connect");
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), stream.read_to_end(&mut response))
        .await
        .expect("response in time")
        .expect("read");
    let text = String::from_utf8_lossy(&response).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

fn db(data: &Path) -> rusqlite::Connection {
    rusqlite::Connection::open(data.join("hearth.db")).expect("db")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn endpoint_tokens_idle_and_auto_resume() {
    let t0 = Instant::now();
    let work = tempfile::tempdir().expect("tempdir");
    let data = work.path().join("data");
    let rootfs = work.path().join("rootfs");
    common::make_rootfs(&rootfs, APP);
    let state = hearth_server::start(ServerConfig::new(
        data.clone(),
        ([127, 0, 0, 1], 0).into(),
        "us-east-1".into(),
    ))
    .await
    .expect("start");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let proxy = listener.local_addr().expect("addr");
    let (backend, proxy_config) = state.endpoint_proxy();
    tokio::spawn(hearth_proxy::serve(listener, backend, proxy_config));

    let owner = state.store.create_account("owner").expect("account");
    let caller = Caller {
        account_id: owner.account_id.clone(),
        region: "us-east-1".into(),
    };
    hearth_server::images::import::import_image(
        &data,
        &state.store,
        state.engine.driver(),
        &state.config.quotas,
        &hearth_server::images::import::ImportRequest {
            account_id: owner.account_id.clone(),
            image_name: "web".into(),
            region: "us-east-1".into(),
            rootfs,
            command: vec!["python3".into(), "/app/server.py".into()],
            workdir: "/".into(),
            hooks_port: Some(9000),
            ready_timeout: Duration::from_secs(60),
            microvm_hooks: vec!["run".into(), "resume".into(), "suspend".into()],
            hook_timeout_secs: 10,
            memory_mib: 256,
            environment: Vec::new(),
            description: None,
        },
        &|step: &str| eprintln!("import: {step}"),
    )
    .await
    .expect("import");

    let run = call(
        &state,
        &caller,
        "RunMicrovm",
        json!({"imageIdentifier": "web", "idlePolicy": {
            "maxIdleDurationSeconds": 60, "suspendedDurationSeconds": 600, "autoResumeEnabled": true}}),
    )
    .await;
    let id = run["microvmId"].as_str().expect("id").to_string();
    wait_state(&state, &caller, &id, "RUNNING").await;
    let host = format!("{id}.localhost:{}", proxy.port());
    let token = |ports: Value| {
        let state = state.clone();
        let caller = caller.clone();
        let id = id.clone();
        async move {
            let minted = call(
                &state,
                &caller,
                "CreateMicrovmAuthToken",
                json!({"microvmIdentifier": id, "expirationInMinutes": 5, "allowedPorts": ports}),
            )
            .await;
            minted["authToken"]["X-aws-proxy-auth"]
                .as_str()
                .expect("token")
                .to_string()
        }
    };
    let app_token = token(json!([{"port": 8080}])).await;
    let all_ports = token(json!([{"allPorts": {}}])).await;
    let hooks_token = token(json!([{"port": 9000}])).await;

    eprintln!("t={:?} The app sees the ", t0.elapsed());
    // The app sees the request without the proxy's headers, with a request id.
    let (status, body) = get(
        proxy,
        &host,
        "/hello",
        &[("X-aws-proxy-auth", &app_token), ("X-aws-proxy-trace", "x")],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let seen: Value = serde_json::from_str(&body).expect("app json");
    assert_eq!(seen["path"], "/hello");
    assert!(seen["headers"]["x-amzn-requestid"].is_string(), "{seen}");
    assert!(seen["headers"].get("x-aws-proxy-auth").is_none(), "{seen}");
    assert!(seen["headers"].get("x-aws-proxy-trace").is_none(), "{seen}");

    eprintln!("t={:?} Token matrix:", t0.elapsed());
    // Token matrix: none, another port, another VM's host, tampered.
    assert_eq!(get(proxy, &host, "/", &[]).await.0, 403);
    let other_port = [
        ("X-aws-proxy-auth", app_token.as_str()),
        ("X-aws-proxy-port", "8081"),
    ];
    assert_eq!(get(proxy, &host, "/", &other_port).await.0, 403);
    let other_host = format!(
        "microvm-00000000-0000-4000-8000-000000000000.localhost:{}",
        proxy.port()
    );
    assert_eq!(
        get(proxy, &other_host, "/", &[("X-aws-proxy-auth", &app_token)])
            .await
            .0,
        403
    );
    let mut tampered = app_token.clone();
    tampered.insert(10, 'x');
    assert_eq!(
        get(proxy, &host, "/", &[("X-aws-proxy-auth", &tampered)])
            .await
            .0,
        403
    );
    eprintln!("t={:?} The hooks port:", t0.elapsed());
    // The hooks port: not through allPorts, only when named.
    let hooks_all = [
        ("X-aws-proxy-auth", all_ports.as_str()),
        ("X-aws-proxy-port", "9000"),
    ];
    assert_eq!(get(proxy, &host, "/", &hooks_all).await.0, 403);
    let hooks_named = [
        ("X-aws-proxy-auth", hooks_token.as_str()),
        ("X-aws-proxy-port", "9000"),
    ];
    assert_eq!(
        get(proxy, &host, "/", &hooks_named).await,
        (200, "hooks".into())
    );
    eprintln!("t={:?} Nothing listens: ", t0.elapsed());
    // Nothing listens: 502.
    let closed = [
        ("X-aws-proxy-auth", all_ports.as_str()),
        ("X-aws-proxy-port", "7777"),
    ];
    assert_eq!(get(proxy, &host, "/", &closed).await.0, 502);

    eprintln!("t={:?} Idle: with its la", t0.elapsed());
    // Idle: with its last traffic moved 2 minutes back, the VM is suspended.
    // (First let the watcher write the traffic above, at most a second old.)
    tokio::time::sleep(Duration::from_millis(2500)).await;
    db(&data)
        .execute(
            "UPDATE microvms SET last_activity_at = last_activity_at - 120000 WHERE microvm_id = ?1",
            [&id],
        )
        .expect("update");
    wait_state(&state, &caller, &id, "SUSPENDED").await;
    // A request without a valid token does not wake it.
    assert_eq!(get(proxy, &host, "/", &[]).await.0, 403);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let vm = call(
        &state,
        &caller,
        "GetMicrovm",
        json!({"microvmIdentifier": id}),
    )
    .await;
    assert_eq!(vm["state"], "SUSPENDED");

    eprintln!("t={:?} Ten concurrent re", t0.elapsed());
    // Ten concurrent requests: all answered, one resume.
    let mut requests = Vec::new();
    for i in 0..10 {
        let host = host.clone();
        let token = app_token.clone();
        requests.push(tokio::spawn(async move {
            get(
                proxy,
                &host,
                &format!("/r{i}"),
                &[("X-aws-proxy-auth", &token)],
            )
            .await
        }));
    }
    for request in requests {
        let (status, body) = request.await.expect("task");
        assert_eq!(status, 200, "{body}");
    }
    let vm = call(
        &state,
        &caller,
        "GetMicrovm",
        json!({"microvmIdentifier": id}),
    )
    .await;
    assert_eq!(vm["state"], "RUNNING");
    let hooks = sh(&state, &caller, &id, "cat /tmp/hooks.log").await;
    let resumes = hooks.lines().filter(|l| *l == "resume").count();
    assert_eq!(resumes, 1, "{hooks}");
    assert_eq!(
        hooks.lines().filter(|l| *l == "suspend").count(),
        1,
        "{hooks}"
    );

    eprintln!("t={:?} Suspended past su", t0.elapsed());
    // Suspended past suspendedDurationSeconds: terminated with a reason.
    call(
        &state,
        &caller,
        "SuspendMicrovm",
        json!({"microvmIdentifier": id}),
    )
    .await;
    wait_state(&state, &caller, &id, "SUSPENDED").await;
    db(&data)
        .execute(
            "UPDATE microvms SET suspended_at = suspended_at - 700000 WHERE microvm_id = ?1",
            [&id],
        )
        .expect("update");
    let ended = wait_state(&state, &caller, &id, "TERMINATED").await;
    assert!(
        ended["stateReason"]
            .as_str()
            .is_some_and(|r| r.contains("suspended longer")),
        "{ended}"
    );
    // A token for a terminated VM opens nothing.
    assert_ne!(
        get(proxy, &host, "/", &[("X-aws-proxy-auth", &app_token)])
            .await
            .0,
        200
    );
    eprintln!("t={:?} shell", t0.elapsed());

    // The shell and the agent API, with a shell token.
    let shell_vm = call(
        &state,
        &caller,
        "RunMicrovm",
        json!({"imageIdentifier": "web", "ingressNetworkConnectors": [
            "arn:aws:lambda:us-east-1:aws:network-connector:aws-network-connector:HTTP_INGRESS",
            "arn:aws:lambda:us-east-1:aws:network-connector:aws-network-connector:SHELL_INGRESS"]}),
    )
    .await;
    let shell_id = shell_vm["microvmId"].as_str().expect("id").to_string();
    wait_state(&state, &caller, &shell_id, "RUNNING").await;
    let minted = call(
        &state,
        &caller,
        "CreateMicrovmShellAuthToken",
        json!({"microvmIdentifier": shell_id, "expirationInMinutes": 5}),
    )
    .await;
    let shell_token = minted["authToken"]["X-aws-proxy-auth"]
        .as_str()
        .expect("token")
        .to_string();
    let shell_host = format!("{shell_id}.localhost:{}", proxy.port());
    let transcript = shell_session(proxy, &shell_host, &shell_token).await;
    assert!(transcript.contains("hi-2"), "{transcript}");
    assert!(
        transcript.contains("30 100"),
        "resize not applied: {transcript}"
    );
    // An app token does not open a shell.
    let app_token = {
        let minted = call(
            &state,
            &caller,
            "CreateMicrovmAuthToken",
            json!({"microvmIdentifier": shell_id, "expirationInMinutes": 5, "allowedPorts": [{"allPorts": {}}]}),
        )
        .await;
        minted["authToken"]["X-aws-proxy-auth"]
            .as_str()
            .expect("token")
            .to_string()
    };
    assert_eq!(
        get(
            proxy,
            &shell_host,
            "/.hearth/v1/files?path=/etc/hostname",
            &[("X-aws-proxy-auth", &app_token)]
        )
        .await
        .0,
        403
    );

    // Agent API: write a file, read it back, exec with streamed output.
    let content = "line one\nline two\n";
    let (status, body) = send(
        proxy,
        &shell_host,
        "PUT",
        "/.hearth/v1/files?path=/root/api/note.txt&mode=600",
        &shell_token,
        content.as_bytes(),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = get(
        proxy,
        &shell_host,
        "/.hearth/v1/files?path=/root/api/note.txt",
        &[("X-aws-proxy-auth", &shell_token)],
    )
    .await;
    assert_eq!(status, 200);
    assert!(body.contains("line one\nline two\n"), "{body:?}");
    let (status, body) = get(
        proxy,
        &shell_host,
        "/.hearth/v1/ls?path=/root/api",
        &[("X-aws-proxy-auth", &shell_token)],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let listing: Value = serde_json::from_str(&body).expect("listing json");
    assert_eq!(listing["entries"][0]["name"], "note.txt", "{listing}");
    assert_eq!(listing["entries"][0]["type"], "file");
    assert_eq!(listing["entries"][0]["size"], content.len());
    assert_eq!(listing["entries"][0]["mode"], "600");
    let missing = get(
        proxy,
        &shell_host,
        "/.hearth/v1/files?path=/nope",
        &[("X-aws-proxy-auth", &shell_token)],
    )
    .await;
    assert_eq!(missing.0, 404, "{missing:?}");
    let exec_body =
        json!({"argv": ["sh", "-c", "stat -c %a /root/api/note.txt; echo err >&2; exit 3"]})
            .to_string();
    let (status, body) = send(
        proxy,
        &shell_host,
        "POST",
        "/.hearth/v1/exec",
        &shell_token,
        exec_body.as_bytes(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    let mut end = Value::Null;
    for line in body.lines().filter(|l| l.starts_with('{')) {
        let line: Value = serde_json::from_str(line).expect("json line");
        let decode = |v: &Value| {
            base64::Engine::decode(
                &base64::engine::general_purpose::STANDARD,
                v.as_str().unwrap_or(""),
            )
            .expect("base64")
        };
        if let Some(data) = line.get("stdout") {
            stdout.extend(decode(data));
        } else if let Some(data) = line.get("stderr") {
            stderr.extend(decode(data));
        } else {
            end = line;
        }
    }
    assert_eq!(String::from_utf8_lossy(&stdout), "600\n");
    assert_eq!(String::from_utf8_lossy(&stderr), "err\n");
    assert_eq!(end["exitCode"], 3, "{body}");
    exec_ends_with_its_client(proxy, &shell_host, &shell_token).await;
    call(
        &state,
        &caller,
        "TerminateMicrovm",
        json!({"microvmIdentifier": shell_id}),
    )
    .await;
    let _ = Arc::strong_count(&state);
}

/// A client that closes an exec's connection ends its process, even one that
/// prints nothing (the SDK's `kill()` of a background command is this).
async fn exec_ends_with_its_client(proxy: std::net::SocketAddr, host: &str, token: &str) {
    let body =
        json!({"argv": ["sh", "-c", "echo $$ > /tmp/silent.pid; exec sleep 1000"]}).to_string();
    let mut stream = tokio::net::TcpStream::connect(proxy)
        .await
        .expect("connect");
    let head = format!(
        "POST /.hearth/v1/exec HTTP/1.1\r\nHost: {host}\r\nX-aws-proxy-auth: {token}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.expect("write");
    stream.write_all(body.as_bytes()).await.expect("write body");
    let mut first = [0u8; 12];
    tokio::time::timeout(Duration::from_secs(60), stream.read_exact(&mut first))
        .await
        .expect("response in time")
        .expect("read");
    assert!(first.starts_with(b"HTTP/1.1 200"), "{first:?}");
    let probe = json!({"argv": ["sh", "-c", "if ! [ -s /tmp/silent.pid ]; then echo waiting; \
        elif kill -0 $(cat /tmp/silent.pid) 2>/dev/null; then echo alive; else echo gone; fi"]})
    .to_string();
    // The probe's answer: "waiting", "alive" or "gone".
    let state = || async {
        let (status, answer) = send(
            proxy,
            host,
            "POST",
            "/.hearth/v1/exec",
            token,
            probe.as_bytes(),
        )
        .await;
        assert_eq!(status, 200, "{answer}");
        // Base64 of "alive\n" and "gone\n" in the JSON lines.
        if answer.contains("YWxpdmUK") {
            "alive"
        } else if answer.contains("Z29uZQo=") {
            "gone"
        } else {
            "waiting"
        }
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while state().await == "waiting" {
        assert!(
            Instant::now() < deadline,
            "the silent command did not start"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(state().await, "alive");
    drop(stream);
    let deadline = Instant::now() + Duration::from_secs(15);
    while state().await != "gone" {
        assert!(
            Instant::now() < deadline,
            "the process outlived its closed exec request"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A request with a body through the proxy (chunked responses are returned raw).
async fn send(
    proxy: std::net::SocketAddr,
    host: &str,
    method: &str,
    path: &str,
    token: &str,
    body: &[u8],
) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(proxy)
        .await
        .expect("connect");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nX-aws-proxy-auth: {token}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.expect("write");
    stream.write_all(body).await.expect("write body");
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), stream.read_to_end(&mut response))
        .await
        .expect("in time")
        .expect("read");
    let text = String::from_utf8_lossy(&response).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Runs a shell session over the endpoint's `/shell` WebSocket; returns what
/// the terminal showed. Checks the protocol: session_init first, close 1000.
async fn shell_session(proxy: std::net::SocketAddr, host: &str, token: &str) -> String {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message;
    let mut request = format!("ws://{host}/shell")
        .into_client_request()
        .expect("request");
    request.headers_mut().insert(
        "sec-websocket-protocol",
        format!("lambda-microvms, lambda-microvms.authentication.{token}")
            .parse()
            .expect("header"),
    );
    let tcp = tokio::net::TcpStream::connect(proxy)
        .await
        .expect("connect");
    let (mut ws, response) = tokio_tungstenite::client_async(request, tcp)
        .await
        .expect("websocket handshake");
    assert_eq!(response.status(), 101);
    let first = ws.next().await.expect("frame").expect("frame");
    let init: Value = serde_json::from_str(first.to_text().expect("text")).expect("json");
    assert_eq!(init["type"], "session_init");
    assert!(init["session_id"].is_string());
    ws.send(Message::text(r#"{"type":"resize","cols":100,"rows":30}"#))
        .await
        .expect("resize");
    ws.send(Message::binary(
        b"stty size; echo hi-$((1+1)); exit\n".to_vec(),
    ))
    .await
    .expect("keys");
    let mut shown = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let message = tokio::time::timeout(remaining, ws.next())
            .await
            .expect("shell ended in time");
        match message {
            Some(Ok(Message::Binary(bytes))) => shown.extend_from_slice(&bytes),
            Some(Ok(Message::Close(frame))) => {
                let code = frame.map(|f| u16::from(f.code));
                assert_eq!(code, Some(1000));
                break;
            }
            Some(Ok(_)) => {}
            other => panic!("shell stream ended badly: {other:?}"),
        }
    }
    String::from_utf8_lossy(&shown).to_string()
}

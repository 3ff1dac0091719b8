//! `hearth bench endpoint`: the endpoint proxy on real guests. Figures:
//! RunMicrovm to the first HTTP 200 through the endpoint (polling the
//! endpoint, as the reference's docs advise, not GetMicrovm), requests/s and
//! latency with many concurrent keep-alive connections, the throughput of one
//! large streamed response, and auto-resume (SuspendMicrovm, then one request)
//! to the response's first byte.
//!
//! Like `hearth bench api` it runs its own server in-process (API on a
//! loopback port with SigV4, the proxy on another), with a temporary data
//! directory, and imports an image from the cached `debian-12` root
//! filesystem with a small Python app. The proxy's per-microVM limits are off:
//! the figures are what the path can carry, not what an operator allows.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use clap::Args;
use hearth_client::{Client, ClientConfig};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::measure::{ms, unpack_base, BenchServer, Stats};
use crate::progress::progress;

/// The in-guest app: `/` answers a small body, `/big?bytes=N` streams N
/// bytes in 1 MiB chunks; POSTs (the ready hook) answer 200.
pub(crate) const APP: &str = r#"
import http.server, urllib.parse
SMALL = b'hello from the guest\n'
CHUNK = b'x' * (1 << 20)
class App(http.server.BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'
    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        if url.path == '/big':
            n = int(urllib.parse.parse_qs(url.query).get('bytes', ['0'])[0])
            self.send_response(200)
            self.send_header('Content-Type', 'application/octet-stream')
            self.send_header('Content-Length', str(n))
            self.end_headers()
            view = memoryview(CHUNK)
            while n > 0:
                k = min(n, len(CHUNK))
                self.wfile.write(view[:k])
                n -= k
            return
        self.send_response(200)
        self.send_header('Content-Type', 'text/plain')
        self.send_header('Content-Length', str(len(SMALL)))
        self.end_headers()
        self.wfile.write(SMALL)
    def do_POST(self):
        self.rfile.read(int(self.headers.get('Content-Length') or 0))
        self.send_response(200)
        self.send_header('Content-Length', '0')
        self.end_headers()
    def log_message(self, *args):
        pass
class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128
Server(('0.0.0.0', 8080), App).serve_forever()
"#;

pub(crate) const APP_PORT: u16 = 8080;
const REGION: &str = "us-east-1";

#[derive(Debug, Args)]
pub struct EndpointArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// MicroVMs run (one after another) for the first-200 figures.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=500))]
    runs: u32,
    /// Concurrent keep-alive connections for the load figures.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=1000))]
    connections: u32,
    /// How long the load runs, in seconds.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=600))]
    seconds: u64,
    /// Size of the large streamed response, MiB.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=16384))]
    big_mib: u64,
    /// Suspend / auto-resume cycles measured.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=100))]
    cycles: u32,
    /// Guest memory of the imported image, MiB.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(128..=8192))]
    memory: u32,
    /// Run with the server's warm pool off: every RunMicrovm starts a QEMU.
    /// Without it each measured RunMicrovm waits until the pool has a slot.
    #[arg(long)]
    pool_empty: bool,
}

#[derive(Debug, Serialize)]
struct Load {
    connections: u32,
    seconds: f64,
    requests: usize,
    errors: usize,
    requests_per_s: f64,
    latency_ms: Stats,
}

#[derive(Debug, Serialize)]
struct Stream {
    bytes: u64,
    seconds: f64,
    mb_per_s: f64,
    first_byte_ms: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    accel: String,
    memory_mib: u32,
    /// "warm" (a slot ready before each measured RunMicrovm) or "empty".
    pool: &'static str,
    /// Of the measured RunMicrovm calls: served from a slot / started a QEMU.
    warm_launches: u64,
    cold_launches: u64,
    run_to_first_200_ms: Stats,
    first_200_breakdown: BreakdownStats,
    load: Load,
    large_body: Stream,
    suspend_to_suspended_ms: Stats,
    auto_resume_to_first_byte_ms: Stats,
    resume_to_first_200_ms: Stats,
}

/// Where RunMicrovm → first 200 goes, per run.
#[derive(Debug, Default)]
struct Breakdown {
    run_call: Vec<f64>,
    token: Vec<f64>,
    polling: Vec<f64>,
    attempts: Vec<f64>,
    second_request: Vec<f64>,
}

#[derive(Debug, Serialize)]
struct BreakdownStats {
    /// RunMicrovm answered (PENDING).
    run_call_ms: Stats,
    /// CreateMicrovmAuthToken answered.
    token_ms: Stats,
    /// The token in hand to the first 200 (every attempt, the 10 ms waits
    /// between them included).
    polling_ms: Stats,
    /// Requests sent until one answered 200.
    attempts: Stats,
    /// A second GET / on a new connection after the first 200.
    second_request_ms: Stats,
}

/// The proxy's address and how requests name a microVM.
#[derive(Debug, Clone)]
pub(crate) struct Endpoint {
    proxy: SocketAddr,
    host: String,
    token: String,
}

impl Endpoint {
    /// Requests to `host` (`<microvm-id>.<domain>:<port>`) through the proxy at `proxy`.
    pub(crate) fn new(proxy: SocketAddr, host: String, token: String) -> Self {
        Self { proxy, host, token }
    }

    /// The token requests carry.
    pub(crate) fn token(&self) -> &str {
        &self.token
    }

    pub(crate) fn request(&self, path: &str) -> Result<http::Request<Empty<Bytes>>> {
        http::Request::get(path)
            .header(http::header::HOST, &self.host)
            .header(hearth_proxy::AUTH_HEADER, &self.token)
            .body(Empty::new())
            .context("building a request")
    }

    /// A new HTTP/1.1 keep-alive connection to the proxy.
    pub(crate) async fn connect(&self) -> Result<SendRequest<Empty<Bytes>>> {
        let tcp = tokio::net::TcpStream::connect(self.proxy).await?;
        tcp.set_nodelay(true)?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(sender)
    }
}

pub async fn endpoint(args: EndpointArgs) -> Result<ExitCode> {
    let work = tempfile::tempdir().context("temporary directory")?;
    let data = work.path().join("data");
    let rootfs = work.path().join("rootfs");
    progress("unpacking the debian-12 root filesystem");
    unpack_base(&rootfs)?;
    std::fs::create_dir_all(rootfs.join("app"))?;
    std::fs::write(rootfs.join("app/bench.py"), APP)?;

    // The bench measures the endpoint, not the API's throttling.
    let server = BenchServer::start(
        &data,
        REGION,
        &[
            "RunMicrovm",
            "GetMicrovm",
            "SuspendMicrovm",
            "ResumeMicrovm",
            "TerminateMicrovm",
            "CreateMicrovmAuthToken",
        ],
    )
    .await?;
    let (state, api_address, proxy) = (server.state.clone(), server.api, server.proxy);
    state.engine.pools.set_settings(if args.pool_empty {
        hearth_server::vms::pool::PoolSettings::off()
    } else {
        hearth_server::vms::pool::PoolSettings::default()
    });
    let account = state.store.create_account("bench")?;

    progress("importing an image (boot, start the app, ready hook, snapshot)");
    let imported = hearth_server::images::import::import_image(
        &data,
        &state.store,
        state.engine.driver(),
        &state.config.quotas,
        &hearth_server::images::import::ImportRequest {
            account_id: account.account_id.clone(),
            image_name: "bench-endpoint".into(),
            region: REGION.into(),
            rootfs,
            command: vec!["python3".into(), "/app/bench.py".into()],
            workdir: "/".into(),
            hooks_port: Some(APP_PORT),
            ready_timeout: Duration::from_secs(120),
            microvm_hooks: Vec::new(),
            hook_timeout_secs: 1,
            memory_mib: args.memory,
            environment: Vec::new(),
            description: None,
        },
        &|_: &str| {},
    )
    .await?;
    let client = Client::new(ClientConfig::new(
        &format!("http://{api_address}"),
        REGION,
        &account.access_key_id,
        &account.secret_access_key,
    )?);
    let image = imported.image_arn.clone();

    if !args.pool_empty {
        // One run makes the version "in demand"; its pool fills after it.
        progress("RunMicrovm once so the version's warm pool fills");
        let run = client
            .call("RunMicrovm", json!({ "imageIdentifier": image }))
            .await?;
        let id = microvm_id(&run)?;
        poll_until_200(&endpoint_of(&client, proxy, &id).await?).await?;
        terminate(&client, &id).await?;
    }
    let launches_before = state.engine.pools.launch_counts();

    // RunMicrovm → first 200 through the endpoint, one microVM at a time.
    let mut first_200 = Vec::new();
    let mut breakdown = Breakdown::default();
    for i in 0..args.runs {
        progress(&format!("RunMicrovm to first 200, {}/{}", i + 1, args.runs));
        if !args.pool_empty {
            crate::bench_api::wait_pool(&state).await?;
        }
        let start = Instant::now();
        let run = client
            .call("RunMicrovm", json!({ "imageIdentifier": image }))
            .await?;
        breakdown.run_call.push(ms(start.elapsed()));
        let id = microvm_id(&run)?;
        let minting = Instant::now();
        let endpoint = endpoint_of(&client, proxy, &id).await?;
        breakdown.token.push(ms(minting.elapsed()));
        let polling = Instant::now();
        let attempts = poll_until_200(&endpoint).await?;
        breakdown.polling.push(ms(polling.elapsed()));
        breakdown.attempts.push(f64::from(attempts));
        first_200.push(ms(start.elapsed()));
        // The same request again on a new connection: what the path costs
        // once the guest has served one.
        let again = Instant::now();
        poll_until_200(&endpoint).await?;
        breakdown.second_request.push(ms(again.elapsed()));
        terminate(&client, &id).await?;
    }
    let launches_after = state.engine.pools.launch_counts();

    // One microVM (with auto-resume) for the rest.
    let run = client
        .call(
            "RunMicrovm",
            json!({
                "imageIdentifier": image,
                "idlePolicy": {
                    "maxIdleDurationSeconds": 600,
                    "suspendedDurationSeconds": 3600,
                    "autoResumeEnabled": true,
                },
            }),
        )
        .await?;
    let id = microvm_id(&run)?;
    let endpoint = endpoint_of(&client, proxy, &id).await?;
    poll_until_200(&endpoint).await?;

    progress(&format!(
        "{} keep-alive connections for {} s",
        args.connections, args.seconds
    ));
    let load = load(
        &endpoint,
        args.connections,
        Duration::from_secs(args.seconds),
    )
    .await?;

    progress(&format!("one {} MiB response", args.big_mib));
    let large_body = stream(&endpoint, args.big_mib * 1024 * 1024).await?;

    let mut suspends = Vec::new();
    let mut resumes = Vec::new();
    for i in 0..args.cycles {
        progress(&format!("suspend, auto-resume {}/{}", i + 1, args.cycles));
        let start = Instant::now();
        client
            .call("SuspendMicrovm", json!({ "microvmIdentifier": id }))
            .await?;
        wait_for(&client, &id, "SUSPENDED").await?;
        suspends.push(ms(start.elapsed()));
        resumes.push(first_byte(&endpoint).await?);
    }
    // ResumeMicrovm → first 200 (the endpoint polled as for RunMicrovm).
    let mut resume_200 = Vec::new();
    for i in 0..args.cycles {
        progress(&format!("suspend, ResumeMicrovm {}/{}", i + 1, args.cycles));
        client
            .call("SuspendMicrovm", json!({ "microvmIdentifier": id }))
            .await?;
        wait_for(&client, &id, "SUSPENDED").await?;
        let start = Instant::now();
        client
            .call("ResumeMicrovm", json!({ "microvmIdentifier": id }))
            .await?;
        poll_until_200(&endpoint).await?;
        resume_200.push(ms(start.elapsed()));
    }
    terminate(&client, &id).await?;
    state.engine.shutdown_pools().await;
    drop(server);

    let report = Report {
        accel: format!("{:?}", state.engine.driver().accel()).to_lowercase(),
        memory_mib: args.memory,
        pool: if args.pool_empty { "empty" } else { "warm" },
        warm_launches: launches_after.0 - launches_before.0,
        cold_launches: launches_after.1 - launches_before.1,
        run_to_first_200_ms: Stats::of(first_200),
        first_200_breakdown: BreakdownStats {
            run_call_ms: Stats::of(breakdown.run_call),
            token_ms: Stats::of(breakdown.token),
            polling_ms: Stats::of(breakdown.polling),
            attempts: Stats::of(breakdown.attempts),
            second_request_ms: Stats::of(breakdown.second_request),
        },
        load,
        large_body,
        suspend_to_suspended_ms: Stats::of(suspends),
        auto_resume_to_first_byte_ms: Stats::of(resumes),
        resume_to_first_200_ms: Stats::of(resume_200),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn microvm_id(run: &Value) -> Result<String> {
    run["microvmId"]
        .as_str()
        .map(str::to_string)
        .context("RunMicrovm answered without a microvmId")
}

/// A token for the app's port (it is also the hooks port, so named
/// explicitly) and the endpoint host.
pub(crate) async fn endpoint_of(client: &Client, proxy: SocketAddr, id: &str) -> Result<Endpoint> {
    let minted = client
        .call(
            "CreateMicrovmAuthToken",
            json!({
                "microvmIdentifier": id,
                "expirationInMinutes": 60,
                "allowedPorts": [{ "port": APP_PORT }],
            }),
        )
        .await?;
    let token = minted["authToken"]["X-aws-proxy-auth"]
        .as_str()
        .context("CreateMicrovmAuthToken answered without a token")?
        .to_string();
    Ok(Endpoint {
        proxy,
        host: format!("{id}.localhost:{}", proxy.port()),
        token,
    })
}

/// GET / until 200; 502/503/504 (not reachable yet) are retried every 10 ms.
/// Answers how many requests it sent.
pub(crate) async fn poll_until_200(endpoint: &Endpoint) -> Result<u32> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut attempts = 0;
    loop {
        attempts += 1;
        let status = match endpoint.connect().await {
            Ok(mut sender) => match sender.send_request(endpoint.request("/")?).await {
                Ok(response) => {
                    let status = response.status();
                    let _ = response.into_body().collect().await;
                    Some(status)
                }
                Err(_) => None,
            },
            Err(_) => None,
        };
        match status {
            Some(s) if s == http::StatusCode::OK => return Ok(attempts),
            Some(s) if ![502, 503, 504].contains(&s.as_u16()) => {
                bail!("the endpoint answered {s}")
            }
            _ => {}
        }
        if Instant::now() > deadline {
            bail!("no 200 from the endpoint within 120 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `connections` tasks, each on its own keep-alive connection, sending GET /
/// one after another until `duration` has passed.
async fn load(endpoint: &Endpoint, connections: u32, duration: Duration) -> Result<Load> {
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let endpoint = endpoint.clone();
        tasks.push(tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut errors = 0usize;
            let mut sender = None;
            while Instant::now() < deadline {
                let mut current = match sender.take() {
                    Some(s) => s,
                    None => match endpoint.connect().await {
                        Ok(s) => s,
                        Err(_) => {
                            errors += 1;
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                    },
                };
                if current.ready().await.is_err() {
                    errors += 1;
                    continue;
                }
                let start = Instant::now();
                let ok = match current.send_request(endpoint.request("/")?).await {
                    Ok(response) => {
                        let status = response.status();
                        let body = response.into_body().collect().await;
                        status == http::StatusCode::OK && body.is_ok()
                    }
                    Err(_) => false,
                };
                if ok {
                    samples.push(ms(start.elapsed()));
                    sender = Some(current);
                } else {
                    errors += 1;
                }
            }
            Ok::<_, anyhow::Error>((samples, errors))
        }));
    }
    let mut samples = Vec::new();
    let mut errors = 0;
    for task in tasks {
        let (s, e) = task.await??;
        samples.extend(s);
        errors += e;
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(Load {
        connections,
        seconds,
        requests: samples.len(),
        errors,
        requests_per_s: samples.len() as f64 / seconds,
        latency_ms: Stats::of(samples),
    })
}

/// One `/big?bytes=N` response read through the proxy, counted as it comes.
async fn stream(endpoint: &Endpoint, bytes: u64) -> Result<Stream> {
    let mut sender = endpoint.connect().await?;
    let start = Instant::now();
    let response = sender
        .send_request(endpoint.request(&format!("/big?bytes={bytes}"))?)
        .await?;
    let first_byte_ms = ms(start.elapsed());
    if response.status() != http::StatusCode::OK {
        bail!("/big answered {}", response.status());
    }
    let mut body = response.into_body();
    let mut received = 0u64;
    while let Some(frame) = body.frame().await {
        if let Some(data) = frame?.data_ref() {
            received += data.len() as u64;
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    if received != bytes {
        bail!("/big sent {received} bytes instead of {bytes}");
    }
    Ok(Stream {
        bytes,
        seconds,
        mb_per_s: bytes as f64 / 1e6 / seconds,
        first_byte_ms,
    })
}

/// A request on a new connection, timed to the first byte of its response;
/// the rest is read and must be a 200.
async fn first_byte(endpoint: &Endpoint) -> Result<f64> {
    let mut tcp = tokio::net::TcpStream::connect(endpoint.proxy).await?;
    tcp.set_nodelay(true)?;
    let head = format!(
        "GET / HTTP/1.1\r\nHost: {}\r\n{}: {}\r\nConnection: close\r\n\r\n",
        endpoint.host,
        hearth_proxy::AUTH_HEADER,
        endpoint.token
    );
    let start = Instant::now();
    tcp.write_all(head.as_bytes()).await?;
    let mut first = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(120), tcp.read(&mut first))
        .await
        .map_err(|_| anyhow!("no response within 120 s"))??;
    let elapsed = ms(start.elapsed());
    if read == 0 {
        bail!("the proxy closed the connection without answering");
    }
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), tcp.read_to_end(&mut rest))
        .await
        .map_err(|_| anyhow!("the response did not end within 60 s"))??;
    let mut response = first.to_vec();
    response.extend_from_slice(&rest);
    let text = String::from_utf8_lossy(&response);
    if !text.starts_with("HTTP/1.1 200") {
        let line = text.lines().next().unwrap_or_default();
        bail!("auto-resume answered {line:?}");
    }
    Ok(elapsed)
}

/// Polls GetMicrovm every 10 ms until `state`.
async fn wait_for(client: &Client, id: &str, state: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let vm = match client
            .call("GetMicrovm", json!({ "microvmIdentifier": id }))
            .await
        {
            Ok(vm) => vm,
            Err(err)
                if state == "TERMINATED" && err.code() == Some("ResourceNotFoundException") =>
            {
                return Ok(());
            }
            Err(err) => return Err(err.into()),
        };
        if vm["state"] == state {
            return Ok(());
        }
        if vm["state"] == "TERMINATED" || Instant::now() > deadline {
            bail!("{id} did not become {state}: {vm}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub(crate) async fn terminate(client: &Client, id: &str) -> Result<()> {
    client
        .call("TerminateMicrovm", json!({ "microvmIdentifier": id }))
        .await?;
    wait_for(client, id, "TERMINATED").await
}

fn print_table(r: &Report) {
    println!(
        "hearth bench endpoint ({} accel, {} MiB guest, {} pool: {} warm / {} cold launches, in-process server and proxy, proxy limits off)",
        r.accel, r.memory_mib, r.pool, r.warm_launches, r.cold_launches
    );
    println!(
        "{:<44} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7}",
        "ms", "p50", "p95", "p99", "min", "max", "n"
    );
    let row = |name: &str, s: &Stats| {
        println!(
            "{:<44} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>7}",
            name, s.p50, s.p95, s.p99, s.min, s.max, s.n
        );
    };
    row(
        "RunMicrovm -> first 200 via the endpoint",
        &r.run_to_first_200_ms,
    );
    let b = &r.first_200_breakdown;
    row("  of which RunMicrovm call", &b.run_call_ms);
    row("  of which CreateMicrovmAuthToken", &b.token_ms);
    row("  of which polling to the first 200", &b.polling_ms);
    row("  requests sent until a 200 (count)", &b.attempts);
    row("second GET / on a new connection", &b.second_request_ms);
    row(
        &format!(
            "GET / latency, {} keep-alive connections",
            r.load.connections
        ),
        &r.load.latency_ms,
    );
    row("SuspendMicrovm -> SUSPENDED", &r.suspend_to_suspended_ms);
    row(
        "auto-resume: request -> first response byte",
        &r.auto_resume_to_first_byte_ms,
    );
    row(
        "ResumeMicrovm -> first 200 via the endpoint",
        &r.resume_to_first_200_ms,
    );
    println!(
        "GET / throughput: {:.0} requests/s ({} requests, {} errors in {:.1} s)",
        r.load.requests_per_s, r.load.requests, r.load.errors, r.load.seconds
    );
    println!(
        "large body: {} MiB in {:.2} s = {:.1} MB/s (first byte {:.1} ms)",
        r.large_body.bytes / (1024 * 1024),
        r.large_body.seconds,
        r.large_body.mb_per_s,
        r.large_body.first_byte_ms
    );
}

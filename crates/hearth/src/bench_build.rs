//! `hearth bench build`: Dockerfile builds on real guests. Figures: a fresh
//! build of a small Python web app (CreateMicrovmImage to CREATED), an
//! unchanged rebuild (UpdateMicrovmImage with the same artifact, every step
//! from the cache), the snapshot's sizes, and RunMicrovm to the first HTTP 200
//! through the endpoint from the built image.
//!
//! Like the other benches it runs its own server in-process with a temporary
//! data directory (so the step cache starts empty), uploads the artifact to
//! the built-in S3 store and drives the API with SigV4.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use hearth_client::{Client, ClientConfig};
use serde::Serialize;
use serde_json::{json, Value};

use crate::bench_endpoint::{endpoint_of, microvm_id, poll_until_200, terminate};
use crate::measure::{ms, BenchServer, Stats};
use crate::progress::progress;

const REGION: &str = "us-east-1";

const DOCKERFILE: &str = r#"FROM debian-12
ENV GREETING=hello
RUN useradd -m -u 1500 app
WORKDIR /srv/app
COPY app.py ./
USER app
CMD ["python3", "app.py"]
"#;

/// Computes something at start-up (kept in the snapshot), answers on 8080 and
/// says ready on the same port.
const APP: &str = r#"
import hashlib, http.server
STATE = hashlib.sha256(b'x' * 10_000_000).hexdigest().encode()
class App(http.server.BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'
    def answer(self):
        self.send_response(200)
        self.send_header('Content-Length', str(len(STATE)))
        self.end_headers()
        self.wfile.write(STATE)
    do_GET = do_POST = answer
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(('0.0.0.0', 8080), App).serve_forever()
"#;

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// MicroVMs run (one after another) for the first-200 figures.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=500))]
    runs: u32,
    /// Memory of the image, MiB.
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u32).range(256..=8192))]
    memory: u32,
}

#[derive(Debug, Serialize)]
struct Report {
    accel: String,
    memory_mib: u32,
    fresh_build_s: f64,
    cached_rebuild_s: f64,
    rebuild_speedup: f64,
    /// The Dockerfile steps alone (the rest is fetch, app start and snapshot).
    fresh_steps_s: f64,
    cached_steps_s: f64,
    memory_snapshot_bytes: u64,
    disk_snapshot_bytes: u64,
    code_install_bytes: u64,
    run_to_first_200_ms: Stats,
}

fn zip_app() -> Result<Vec<u8>> {
    use std::io::Write;
    let mut out = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default();
    out.start_file("Dockerfile", options)?;
    out.write_all(DOCKERFILE.as_bytes())?;
    out.start_file("app.py", options)?;
    out.write_all(APP.as_bytes())?;
    Ok(out.finish()?.into_inner())
}

/// Seconds the build's Dockerfile steps took, from its log ("steps: ... in S s").
async fn steps_seconds(client: &Client, build: &Value) -> Result<f64> {
    let id = build["buildId"].as_str().context("no build id")?;
    let page = client
        .call_extension(
            http::Method::GET,
            &format!("/hearth/2025-09-09/builds/{id}/logs?offset=0"),
            json!({}),
        )
        .await?;
    let log = page["log"].as_str().unwrap_or_default();
    log.lines()
        .filter_map(|line| line.strip_prefix("steps: "))
        .filter_map(|rest| rest.rsplit_once(" in "))
        .find_map(|(_, secs)| secs.trim_end_matches(" s").parse().ok())
        .context("the build log has no steps line")
}

/// Polls GetMicrovmImage until CREATED/UPDATED; fails on *_FAILED.
async fn wait_built(client: &Client, name: &str, version: &str) -> Result<Value> {
    loop {
        let image = client
            .call("GetMicrovmImage", json!({ "imageIdentifier": name }))
            .await?;
        match image["state"].as_str() {
            Some("CREATED" | "UPDATED") => break,
            Some("CREATE_FAILED" | "UPDATE_FAILED") => {
                let builds = client
                    .call(
                        "ListMicrovmImageBuilds",
                        json!({"imageIdentifier": name, "imageVersion": version}),
                    )
                    .await?;
                bail!("the build failed: {}", builds["items"]);
            }
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    let builds = client
        .call(
            "ListMicrovmImageBuilds",
            json!({"imageIdentifier": name, "imageVersion": version}),
        )
        .await?;
    let build_id = builds["items"][0]["buildId"]
        .as_str()
        .context("no build")?
        .to_string();
    Ok(client
        .call(
            "GetMicrovmImageBuild",
            json!({"imageIdentifier": name, "imageVersion": version, "buildId": build_id}),
        )
        .await?)
}

pub async fn build(args: BuildArgs) -> Result<ExitCode> {
    let work = tempfile::tempdir().context("temporary directory")?;
    let data = work.path().join("data");
    let server = BenchServer::start(
        &data,
        REGION,
        &[
            "RunMicrovm",
            "GetMicrovm",
            "GetMicrovmImage",
            "TerminateMicrovm",
        ],
    )
    .await?;
    let (state, api_address, proxy) = (server.state.clone(), server.api, server.proxy);
    let account = state.store.create_account("bench")?;
    let client = Client::new(ClientConfig::new(
        &format!("http://{api_address}"),
        REGION,
        &account.access_key_id,
        &account.secret_access_key,
    )?);

    client.s3_create_bucket("bench").await?;
    client.s3_put_object("bench", "app.zip", zip_app()?).await?;
    let request = json!({
        "baseImageArn": format!("arn:aws:lambda:{REGION}:aws:microvm-image:debian-12"),
        "buildRoleArn": "arn:aws:iam::000000000000:role/bench",
        "codeArtifact": {"uri": "s3://bench/app.zip"},
        "resources": [{"minimumMemoryInMiB": args.memory}],
        "hooks": {"port": 8080, "microvmImageHooks": {"ready": "ENABLED", "readyTimeoutInSeconds": 300}},
    });

    progress("fresh build (CreateMicrovmImage to CREATED)");
    let start = Instant::now();
    let mut create = request.clone();
    create["name"] = json!("bench-build");
    client.call("CreateMicrovmImage", create).await?;
    let build = wait_built(&client, "bench-build", "1.0").await?;
    let fresh = start.elapsed().as_secs_f64();

    progress("unchanged rebuild (UpdateMicrovmImage to UPDATED)");
    let start = Instant::now();
    let mut update = request.clone();
    update["imageIdentifier"] = json!("bench-build");
    client.call("UpdateMicrovmImage", update).await?;
    let rebuild = wait_built(&client, "bench-build", "2.0").await?;
    let cached = start.elapsed().as_secs_f64();
    let fresh_steps = steps_seconds(&client, &build).await?;
    let cached_steps = steps_seconds(&client, &rebuild).await?;

    let mut first_200 = Vec::new();
    for i in 0..args.runs {
        progress(&format!("RunMicrovm to first 200, {}/{}", i + 1, args.runs));
        let start = Instant::now();
        let run = client
            .call("RunMicrovm", json!({ "imageIdentifier": "bench-build" }))
            .await?;
        let id = microvm_id(&run)?;
        let endpoint = endpoint_of(&client, proxy, &id).await?;
        poll_until_200(&endpoint).await?;
        first_200.push(ms(start.elapsed()));
        terminate(&client, &id).await?;
    }
    drop(server);

    let size = |name: &str| build["snapshotBuild"][name].as_u64().unwrap_or(0);
    let report = Report {
        accel: format!("{:?}", state.engine.driver().accel()).to_lowercase(),
        memory_mib: args.memory,
        fresh_build_s: fresh,
        cached_rebuild_s: cached,
        rebuild_speedup: fresh / cached,
        fresh_steps_s: fresh_steps,
        cached_steps_s: cached_steps,
        memory_snapshot_bytes: size("memorySnapshotSizeInBytes"),
        disk_snapshot_bytes: size("diskSnapshotSizeInBytes"),
        code_install_bytes: size("codeInstallSizeInBytes"),
        run_to_first_200_ms: Stats::of(first_200),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        println!(
            "hearth bench build ({} accel, {} MiB guest)",
            report.accel, report.memory_mib
        );
        println!(
            "  fresh build (CreateMicrovmImage -> CREATED)   {:8.1} s",
            report.fresh_build_s
        );
        println!(
            "  unchanged rebuild (all steps cached)          {:8.1} s  ({:.1}x faster)",
            report.cached_rebuild_s, report.rebuild_speedup
        );
        println!(
            "  Dockerfile steps alone: fresh {:.2} s, cached {:.2} s",
            report.fresh_steps_s, report.cached_steps_s
        );
        println!(
            "  snapshot stored: memory {:.1} MiB, disk overlay {:.1} MiB; code {} bytes",
            mib(report.memory_snapshot_bytes),
            mib(report.disk_snapshot_bytes),
            report.code_install_bytes
        );
        let s = &report.run_to_first_200_ms;
        println!(
            "  RunMicrovm -> first 200 via the endpoint      p50 {:.1} / p95 {:.1} ms (n={})",
            s.p50, s.p95, s.n
        );
    }
    Ok(ExitCode::SUCCESS)
}

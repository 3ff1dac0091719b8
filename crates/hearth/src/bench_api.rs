//! `hearth bench api`: the API server end to end on real guests, over HTTP
//! with SigV4 (the same path as boto3): RunMicrovm to RUNNING and to the first
//! exec result, SuspendMicrovm to SUSPENDED, ResumeMicrovm to RUNNING, and
//! GetMicrovm latency under concurrent clients.
//!
//! It starts its own server in-process on a loopback port with a temporary
//! data directory, creates an account and imports an image from the cached
//! `debian-12` root filesystem (unpacked with `debugfs rdump`).

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use hearth_client::{Client, ClientConfig};
use serde::Serialize;
use serde_json::{json, Value};

use crate::bench_endpoint::microvm_id;
use crate::measure::{ms, unpack_base, Stats};
use crate::progress::progress;

#[derive(Debug, Args)]
pub struct ApiArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// MicroVMs run (one after another) for the RunMicrovm figures.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=500))]
    runs: u32,
    /// Suspend/resume cycles measured.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100))]
    cycles: u32,
    /// Concurrent clients calling GetMicrovm.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=1000))]
    clients: u32,
    /// GetMicrovm calls per client.
    #[arg(long, default_value_t = 40, value_parser = clap::value_parser!(u32).range(1..=10000))]
    gets: u32,
    /// Idle microVMs kept running while the usage meter's own CPU is measured
    /// (and while the launches with the meter on and off are timed).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(0..=500))]
    idle_vms: u32,
    /// RunMicrovm calls to RUNNING timed among the idle microVMs, alternately
    /// with metering on (sampler and transfer records) and off.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(0..=500))]
    meter_launches: u32,
    /// Seconds the meter is measured over them (sampling every 2 s).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(4..=3600))]
    idle_seconds: u64,
    /// Guest memory of the imported image, MiB.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(128..=8192))]
    memory: u32,
    /// Run with the server's warm pool off: every RunMicrovm starts a QEMU.
    /// Without it each measured RunMicrovm waits until the pool has a slot.
    #[arg(long)]
    pool_empty: bool,
    /// RunMicrovm calls made at once for the concurrency figure (0: skip);
    /// calls the host has no room for are reported as refused, by code.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(0..=500))]
    concurrent: u32,
}

#[derive(Debug, Serialize)]
struct Report {
    accel: String,
    memory_mib: u32,
    /// "warm" (a slot ready before each measured RunMicrovm) or "empty".
    pool: &'static str,
    /// Launches served from a warm pool slot / by starting a QEMU.
    warm_launches: u64,
    cold_launches: u64,
    run_call_ms: Stats,
    run_to_running_ms: Stats,
    run_to_first_exec_ms: Stats,
    suspend_to_suspended_ms: Stats,
    resume_to_running_ms: Stats,
    resume_to_first_exec_ms: Stats,
    get_clients: u32,
    get_latency_ms: Stats,
    get_throughput_per_s: f64,
    /// The usage meter over `meter_idle_vms` idle microVMs: CPU per round,
    /// and as a share of one core at the server's default 10 s interval.
    meter_idle_vms: u32,
    meter_rounds: u64,
    meter_round_cpu_ms: f64,
    meter_cpu_percent_at_10s: f64,
    /// The same scaled to 50 idle microVMs (a round's work is per VM), for
    /// hosts that admit fewer.
    meter_cpu_percent_at_10s_for_50: f64,
    /// What one snapshot-transfer record costs committed alone: an upper
    /// bound of what metering adds to a launch (the engine puts it in the
    /// RUNNING change's own commit).
    meter_record_ms: Stats,
    /// RunMicrovm -> RUNNING among the idle microVMs, alternately with the
    /// meter on and off, and the difference of the medians.
    launch_meter_on_ms: Stats,
    launch_meter_off_ms: Stats,
    launch_meter_added_p50_ms: f64,
    concurrent_runs: u32,
    concurrent_run_to_running_ms: Stats,
    /// Of the concurrent calls, those refused at the call, by error code
    /// (InsufficientCapacityException on a host without room for all).
    concurrent_refused: BTreeMap<String, u32>,
}

/// How one of the concurrent RunMicrovm calls ended.
enum ConcurrentRun {
    Running(String, f64),
    Refused(String),
}

pub async fn api(args: ApiArgs) -> Result<ExitCode> {
    let work = tempfile::tempdir().context("temporary directory")?;
    let data = work.path().join("data");
    let rootfs = work.path().join("rootfs");
    progress("unpacking the debian-12 root filesystem");
    unpack_base(&rootfs)?;

    let mut config = hearth_server::ServerConfig::new(
        data.clone(),
        ([127, 0, 0, 1], 0).into(),
        "us-east-1".into(),
    );
    // The bench measures the server, not its throttling.
    config.rate_limits = vec![
        "RunMicrovm=1000".into(),
        "GetMicrovm=100000".into(),
        "SuspendMicrovm=1000".into(),
        "ResumeMicrovm=1000".into(),
        "TerminateMicrovm=1000".into(),
    ];
    // Sample often so the measurement window holds many rounds.
    config.usage_interval = METER_BENCH_INTERVAL;
    // `--idle-vms` (50) idle microVMs: counted at their peaks a 24 GiB host
    // admits about 15, at their baselines about 35.
    config.reserve.overcommit = true;
    config.warm_pool = if args.pool_empty {
        hearth_server::vms::pool::PoolSettings::off()
    } else {
        hearth_server::vms::pool::PoolSettings::default()
    };
    let state = hearth_server::start(config).await?;
    let outcome = run(&state, &args, &data, &rootfs).await;
    if outcome.is_err() {
        // Warm-pool slots are QEMUs of their own, which outlive the bench.
        state.engine.shutdown_pools().await;
    }
    outcome
}

async fn run(
    state: &Arc<hearth_server::AppState>,
    args: &ApiArgs,
    data: &std::path::Path,
    rootfs: &std::path::Path,
) -> Result<ExitCode> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let app = hearth_server::app(state.clone());
    let server = tokio::spawn(async move { axum_serve(listener, app).await });
    let account = state.store.create_account("bench")?;

    progress("importing an image (boot, start the app, snapshot)");
    let imported = hearth_server::images::import::import_image(
        data,
        &state.store,
        state.engine.driver(),
        &state.config.quotas,
        &hearth_server::images::import::ImportRequest {
            account_id: account.account_id.clone(),
            image_name: "bench".into(),
            region: "us-east-1".into(),
            rootfs: rootfs.to_path_buf(),
            command: vec![
                "python3".into(),
                "-m".into(),
                "http.server".into(),
                "8080".into(),
            ],
            workdir: "/".into(),
            hooks_port: None,
            ready_timeout: Duration::from_secs(60),
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
        &format!("http://{address}"),
        "us-east-1",
        &account.access_key_id,
        &account.secret_access_key,
    )?);

    if !args.pool_empty {
        // One run makes the version "in demand"; its pool fills after it.
        progress("RunMicrovm once so the version's warm pool fills");
        let run = client
            .call("RunMicrovm", json!({"imageIdentifier": imported.image_arn}))
            .await?;
        let id = microvm_id(&run)?;
        wait_for(&client, &id, "RUNNING").await?;
        terminate(&client, &id).await?;
    }
    let launches_before = state.engine.pools.launch_counts();

    // RunMicrovm to RUNNING and to the first exec result, one VM at a time.
    let mut run_call = Vec::new();
    let mut to_running = Vec::new();
    let mut to_exec = Vec::new();
    for i in 0..args.runs {
        progress(&format!("RunMicrovm {}/{}", i + 1, args.runs));
        if !args.pool_empty {
            wait_pool(state).await?;
        }
        let start = Instant::now();
        let run = client
            .call("RunMicrovm", json!({"imageIdentifier": imported.image_arn}))
            .await?;
        run_call.push(ms(start.elapsed()));
        let id = microvm_id(&run)?;
        wait_for(&client, &id, "RUNNING").await?;
        to_running.push(ms(start.elapsed()));
        exec_true(&client, &id).await?;
        to_exec.push(ms(start.elapsed()));
        terminate(&client, &id).await?;
    }

    // Suspend and resume cycles on one VM.
    let run = client
        .call("RunMicrovm", json!({"imageIdentifier": imported.image_arn}))
        .await?;
    let id = microvm_id(&run)?;
    wait_for(&client, &id, "RUNNING").await?;
    let mut suspends = Vec::new();
    let mut resumes = Vec::new();
    let mut resume_exec = Vec::new();
    for i in 0..args.cycles {
        progress(&format!("suspend/resume {}/{}", i + 1, args.cycles));
        let start = Instant::now();
        client
            .call("SuspendMicrovm", json!({"microvmIdentifier": id}))
            .await?;
        wait_for(&client, &id, "SUSPENDED").await?;
        suspends.push(ms(start.elapsed()));
        let start = Instant::now();
        client
            .call("ResumeMicrovm", json!({"microvmIdentifier": id}))
            .await?;
        wait_for(&client, &id, "RUNNING").await?;
        resumes.push(ms(start.elapsed()));
        exec_true(&client, &id).await?;
        resume_exec.push(ms(start.elapsed()));
    }

    // GetMicrovm under concurrent clients.
    progress(&format!(
        "GetMicrovm from {} concurrent clients",
        args.clients
    ));
    let client = Arc::new(client);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.clients {
        let client = client.clone();
        let id = id.clone();
        let gets = args.gets;
        tasks.push(tokio::spawn(async move {
            let mut samples = Vec::with_capacity(gets as usize);
            for _ in 0..gets {
                let start = Instant::now();
                client
                    .call("GetMicrovm", json!({"microvmIdentifier": id}))
                    .await?;
                samples.push(ms(start.elapsed()));
            }
            Ok::<_, hearth_client::ClientError>(samples)
        }));
    }
    let mut get_samples = Vec::new();
    for task in tasks {
        get_samples.extend(task.await??);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let throughput = get_samples.len() as f64 / elapsed;
    terminate(&client, &id).await?;
    let meter = measure_meter(state, &client, &imported.image_arn, args).await?;
    let launches_after = state.engine.pools.launch_counts();

    // Many RunMicrovm calls at once, each to RUNNING.
    let mut concurrent = Vec::new();
    let mut concurrent_refused = BTreeMap::new();
    if args.concurrent > 0 {
        if !args.pool_empty {
            wait_pool(state).await?;
        }
        progress(&format!("{} RunMicrovm calls at once", args.concurrent));
        let mut tasks = Vec::new();
        for _ in 0..args.concurrent {
            let client = client.clone();
            let image = imported.image_arn.clone();
            tasks.push(tokio::spawn(async move {
                let start = Instant::now();
                let run = match client
                    .call("RunMicrovm", json!({"imageIdentifier": image}))
                    .await
                {
                    Ok(run) => run,
                    // A host without room for all of them refuses some at
                    // the call: that is an answer to report, not a failure.
                    Err(hearth_client::ClientError::Api { code, .. }) => {
                        return Ok(ConcurrentRun::Refused(code))
                    }
                    Err(err) => return Err(err.into()),
                };
                let id = microvm_id(&run)?;
                wait_for(&client, &id, "RUNNING").await?;
                Ok::<_, anyhow::Error>(ConcurrentRun::Running(id, ms(start.elapsed())))
            }));
        }
        let mut ids = Vec::new();
        let mut failure = None;
        for task in tasks {
            match task.await? {
                Ok(ConcurrentRun::Running(id, took)) => {
                    ids.push(id);
                    concurrent.push(took);
                }
                Ok(ConcurrentRun::Refused(code)) => {
                    *concurrent_refused.entry(code).or_insert(0) += 1;
                }
                Err(err) => failure = Some(err),
            }
        }
        progress("terminating them");
        let mut ends = Vec::new();
        for id in ids {
            let client = client.clone();
            ends.push(tokio::spawn(async move { terminate(&client, &id).await }));
        }
        for end in ends {
            end.await??;
        }
        // An accepted call whose microVM never ran is a failure.
        if let Some(err) = failure {
            return Err(err.context("a concurrent RunMicrovm did not become RUNNING"));
        }
    }
    state.engine.shutdown_pools().await;
    server.abort();

    let report = Report {
        accel: format!("{:?}", state.engine.driver().accel()).to_lowercase(),
        memory_mib: args.memory,
        pool: if args.pool_empty { "empty" } else { "warm" },
        warm_launches: launches_after.0 - launches_before.0,
        cold_launches: launches_after.1 - launches_before.1,
        run_call_ms: Stats::of(run_call),
        run_to_running_ms: Stats::of(to_running),
        run_to_first_exec_ms: Stats::of(to_exec),
        suspend_to_suspended_ms: Stats::of(suspends),
        resume_to_running_ms: Stats::of(resumes),
        resume_to_first_exec_ms: Stats::of(resume_exec),
        get_clients: args.clients,
        get_latency_ms: Stats::of(get_samples),
        get_throughput_per_s: throughput,
        meter_idle_vms: meter.idle_vms,
        meter_rounds: meter.rounds,
        meter_round_cpu_ms: meter.round_cpu_ms,
        meter_cpu_percent_at_10s: meter.round_cpu_ms / 10_000.0 * 100.0,
        meter_cpu_percent_at_10s_for_50: meter.round_cpu_ms / f64::from(meter.idle_vms.max(1))
            * 50.0
            / 10_000.0
            * 100.0,
        launch_meter_added_p50_ms: meter.launch_on_ms.p50 - meter.launch_off_ms.p50,
        launch_meter_on_ms: meter.launch_on_ms,
        launch_meter_off_ms: meter.launch_off_ms,
        meter_record_ms: meter.record_ms,
        concurrent_runs: args.concurrent,
        concurrent_run_to_running_ms: Stats::of(concurrent),
        concurrent_refused,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    Ok(ExitCode::SUCCESS)
}

const METER_BENCH_INTERVAL: Duration = Duration::from_secs(2);

struct MeterFigures {
    /// The idle microVMs the host admitted.
    idle_vms: u32,
    rounds: u64,
    round_cpu_ms: f64,
    record_ms: Stats,
    launch_on_ms: Stats,
    launch_off_ms: Stats,
}

/// Runs `idle_vms` microVMs, lets them idle for `idle_seconds` while the meter
/// samples them, and reads the meter's own CPU counter (thread CPU time of
/// its rounds); times launches among them with metering on and off,
/// alternately (so the machine's changing load falls on both alike); then
/// times the snapshot-transfer record.
async fn measure_meter(
    state: &hearth_server::AppState,
    client: &Client,
    image_arn: &str,
    args: &ApiArgs,
) -> Result<MeterFigures> {
    let mut ids = Vec::new();
    let started = start_idle(client, image_arn, args.idle_vms, &mut ids).await;
    let measured = match started {
        Ok(()) => measure_among(state, client, image_arn, args, &ids).await,
        Err(err) => Err(err),
    };
    // The idle VMs end whatever happened (their QEMUs outlive the bench).
    for id in &ids {
        if let Err(err) = terminate(client, id).await {
            progress(&format!("cannot terminate {id}: {err:#}"));
        }
    }
    let mut measured = measured?;
    measured.record_ms = time_usage_record(state)?;
    Ok(measured)
}

/// Runs up to `count` microVMs to RUNNING, into `ids`. A shared host may not
/// admit them all: then the last two are ended again, so the launches timed
/// among them (and their warm-pool slots) are admitted, and the rest are
/// measured.
async fn start_idle(
    client: &Client,
    image_arn: &str,
    count: u32,
    ids: &mut Vec<String>,
) -> Result<()> {
    for i in 0..count {
        progress(&format!("idle microVM {}/{}", i + 1, count));
        let run = match client
            .call("RunMicrovm", json!({"imageIdentifier": image_arn}))
            .await
        {
            Ok(run) => run,
            Err(hearth_client::ClientError::Api { code, .. })
                if code == "InsufficientCapacityException" =>
            {
                for id in ids.split_off(ids.len().saturating_sub(2)) {
                    terminate(client, &id).await?;
                }
                progress(&format!(
                    "the host admitted {i} idle microVMs: measuring among {}",
                    ids.len()
                ));
                return Ok(());
            }
            Err(err) => return Err(err.into()),
        };
        let id = microvm_id(&run)?;
        if let Err(err) = wait_for(client, &id, "RUNNING").await {
            // A launch can fail on a loaded host (its agent not answering in
            // time): the VM is left out of the idle ones.
            progress(&format!("{err:#}: left out"));
            let _ = terminate(client, &id).await;
            continue;
        }
        ids.push(id);
    }
    Ok(())
}

/// The meter's CPU over the idle microVMs `ids`, and launches among them
/// with the meter on and off.
async fn measure_among(
    state: &hearth_server::AppState,
    client: &Client,
    image_arn: &str,
    args: &ApiArgs,
    ids: &[String],
) -> Result<MeterFigures> {
    progress(&format!(
        "metering {} idle microVMs for {} s",
        ids.len(),
        args.idle_seconds
    ));
    // Let every VM get its first sample, then measure whole rounds.
    tokio::time::sleep(METER_BENCH_INTERVAL * 2).await;
    let (spent_before, rounds_before) = state.meter.cost();
    tokio::time::sleep(Duration::from_secs(args.idle_seconds)).await;
    let (spent_after, rounds_after) = state.meter.cost();
    let rounds = rounds_after.saturating_sub(rounds_before);
    let round_cpu_ms = if rounds == 0 {
        0.0
    } else {
        (spent_after - spent_before) * 1000.0 / rounds as f64
    };
    let (mut launch_on, mut launch_off) = (Vec::new(), Vec::new());
    let mut failed = 0;
    for i in 0..args.meter_launches {
        let on = i % 2 == 0;
        progress(&format!(
            "RunMicrovm with the meter {} {}/{}",
            if on { "on" } else { "off" },
            i + 1,
            args.meter_launches
        ));
        if !args.pool_empty {
            wait_pool(state).await?;
        }
        state.engine.set_metering(on);
        state.meter.set_paused(!on);
        let (run, start) = run_when_admitted(client, image_arn).await?;
        let id = microvm_id(&run)?;
        let reached = wait_for(client, &id, "RUNNING").await;
        let took = ms(start.elapsed());
        state.engine.set_metering(true);
        state.meter.set_paused(false);
        let ended = terminate(client, &id).await;
        if let Err(err) = reached {
            // As for the idle VMs: a failed launch is not timed.
            failed += 1;
            progress(&format!("{err:#}: not timed"));
            if failed > args.meter_launches / 4 {
                return Err(err.context("too many launches failed"));
            }
            continue;
        }
        ended?;
        if on {
            launch_on.push(took);
        } else {
            launch_off.push(took);
        }
    }
    Ok(MeterFigures {
        idle_vms: u32::try_from(ids.len()).unwrap_or(u32::MAX),
        rounds,
        round_cpu_ms,
        record_ms: Stats::of(Vec::new()),
        launch_on_ms: Stats::of(launch_on),
        launch_off_ms: Stats::of(launch_off),
    })
}

/// RunMicrovm, tried again every 2 s for up to two minutes while the host
/// has no room (other work on a shared host comes and goes); the run's
/// answer and when the admitted call started.
async fn run_when_admitted(client: &Client, image_arn: &str) -> Result<(Value, Instant)> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let start = Instant::now();
        match client
            .call("RunMicrovm", json!({"imageIdentifier": image_arn}))
            .await
        {
            Ok(run) => return Ok((run, start)),
            Err(hearth_client::ClientError::Api { code, .. })
                if code == "InsufficientCapacityException" && Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            Err(err) => return Err(err.into()),
        }
    }
}

/// What one snapshot-transfer record costs committed on its own.
fn time_usage_record(state: &hearth_server::AppState) -> Result<Stats> {
    let mut record = Vec::new();
    for _ in 0..50 {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis() as i64;
        let started = Instant::now();
        state
            .store
            .add_usage(&[hearth_server::db::usage::Increment {
                account_id: "000000000000".into(),
                microvm_id: "microvm-bench".into(),
                image_name: "bench".into(),
                usage_type: hearth_server::pricing::UsageType::SnapshotRead,
                from_ms: now,
                to_ms: now,
                amount: 1,
            }])?;
        record.push(ms(started.elapsed()));
    }
    Ok(Stats::of(record))
}

async fn axum_serve(listener: tokio::net::TcpListener, app: axum::Router) -> std::io::Result<()> {
    axum::serve(listener, app).await
}

/// Waits until the server's warm pool holds a slot (at most two minutes).
pub(crate) async fn wait_pool(state: &hearth_server::AppState) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while state.engine.pools.ready() == 0 {
        if Instant::now() > deadline {
            bail!("the warm pool did not fill within two minutes");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Polls GetMicrovm every 5 ms until `state`.
async fn wait_for(client: &Client, id: &str, state: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let vm = client
            .call("GetMicrovm", json!({"microvmIdentifier": id}))
            .await?;
        if vm["state"] == state {
            return Ok(());
        }
        if vm["state"] == "TERMINATED" || Instant::now() > deadline {
            bail!("{id} did not become {state}: {vm}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn exec_true(client: &Client, id: &str) -> Result<()> {
    let out: Value = client
        .call_extension(
            http::Method::POST,
            &format!("/hearth/2025-09-09/microvms/{id}/exec"),
            json!({"argv": ["true"]}),
        )
        .await?;
    if out["exitCode"] != 0 {
        bail!("exec in {id} failed: {out}");
    }
    Ok(())
}

async fn terminate(client: &Client, id: &str) -> Result<()> {
    client
        .call("TerminateMicrovm", json!({"microvmIdentifier": id}))
        .await?;
    wait_for(client, id, "TERMINATED").await
}

fn print_table(r: &Report) {
    println!(
        "hearth bench api ({} accel, {} MiB guest, {} pool: {} warm / {} cold launches, real HTTP + SigV4 to an in-process server)",
        r.accel, r.memory_mib, r.pool, r.warm_launches, r.cold_launches
    );
    println!(
        "{:<40} {:>9} {:>9} {:>9} {:>9} {:>9} {:>6}",
        "ms", "p50", "p95", "p99", "min", "max", "n"
    );
    let row = |name: &str, s: &Stats| {
        println!(
            "{:<40} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>6}",
            name, s.p50, s.p95, s.p99, s.min, s.max, s.n
        );
    };
    row("RunMicrovm call (answers PENDING)", &r.run_call_ms);
    row("RunMicrovm -> RUNNING", &r.run_to_running_ms);
    row("RunMicrovm -> first exec result", &r.run_to_first_exec_ms);
    row("SuspendMicrovm -> SUSPENDED", &r.suspend_to_suspended_ms);
    row("ResumeMicrovm -> RUNNING", &r.resume_to_running_ms);
    row(
        "ResumeMicrovm -> first exec result",
        &r.resume_to_first_exec_ms,
    );
    row(
        &format!("GetMicrovm, {} concurrent clients", r.get_clients),
        &r.get_latency_ms,
    );
    println!(
        "GetMicrovm throughput: {:.0} requests/s",
        r.get_throughput_per_s
    );
    row("usage record, committed alone", &r.meter_record_ms);
    row(
        &format!(
            "RunMicrovm -> RUNNING, meter on ({} idle)",
            r.meter_idle_vms
        ),
        &r.launch_meter_on_ms,
    );
    row(
        &format!(
            "RunMicrovm -> RUNNING, meter off ({} idle)",
            r.meter_idle_vms
        ),
        &r.launch_meter_off_ms,
    );
    println!(
        "metering adds {:.1} ms to the launch p50",
        r.launch_meter_added_p50_ms
    );
    println!(
        "usage meter, {} idle microVMs: {:.2} ms CPU per round ({} rounds), {:.4} % of a core at 10 s ({:.4} % for 50)",
        r.meter_idle_vms,
        r.meter_round_cpu_ms,
        r.meter_rounds,
        r.meter_cpu_percent_at_10s,
        r.meter_cpu_percent_at_10s_for_50
    );
    if r.concurrent_runs > 0 {
        row(
            &format!("{} RunMicrovm at once -> RUNNING", r.concurrent_runs),
            &r.concurrent_run_to_running_ms,
        );
        for (code, count) in &r.concurrent_refused {
            println!("  {count} of them refused at the call: {code}");
        }
    }
}

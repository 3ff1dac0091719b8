//! `hearth bench density`: what an idle microVM costs the host, and how idle
//! microVMs slow new launches. At each idle count (`--idle 0,10,50`): that
//! many microVMs run the app and wait on its socket; their QEMU processes'
//! CPU time over `--cpu-seconds` (utime + stime from `/proc/PID/stat`), their
//! RSS and PSS (`/proc/PID/smaps_rollup`), and RunMicrovm → first 200 through
//! the endpoint while they idle.
//!
//! Like `hearth bench endpoint` it runs its own server in-process (API with
//! SigV4, the endpoint proxy) with a temporary data directory and the same
//! small Python app, imported from the cached `debian-12` root filesystem.
//! A count the host cannot reach (launch failure) ends the run: the report
//! keeps the counts measured and says where it stopped.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use hearth_client::{Client, ClientConfig};
use serde::Serialize;
use serde_json::json;

use crate::bench_endpoint::{endpoint_of, microvm_id, poll_until_200, terminate, APP, APP_PORT};
use crate::measure::{ms, unpack_base, BenchServer, Stats};
use crate::progress::progress;

const REGION: &str = "us-east-1";

#[derive(Debug, Args)]
pub struct DensityArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Idle microVM counts to measure at, in any order (measured ascending).
    #[arg(long, value_delimiter = ',', default_value = "0,10,50")]
    idle: Vec<u32>,
    /// RunMicrovm → first 200 samples at each count.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=500))]
    runs: u32,
    /// Seconds over which the idle microVMs' CPU time is measured.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
    cpu_seconds: u64,
    /// Seconds the idle microVMs are left alone before measuring.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(0..=600))]
    settle_seconds: u64,
    /// Guest memory of the imported image, MiB.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(128..=8192))]
    memory: u32,
}

#[derive(Debug, Serialize)]
struct Level {
    idle_vms: u32,
    /// Mean CPU of one idle microVM's QEMU, percent of one host core (null
    /// with no idle microVMs).
    cpu_percent_per_idle_vm: Option<f64>,
    /// The busiest idle microVM, percent of one host core.
    cpu_percent_max_idle_vm: Option<f64>,
    cpu_seconds: f64,
    rss_mib_per_idle_vm: Option<f64>,
    pss_mib_per_idle_vm: Option<f64>,
    pss_total_mib: f64,
    run_to_first_200_ms: Stats,
    /// The host's 1-minute load average after the samples.
    load_average_1m: Option<f64>,
}

#[derive(Debug, Serialize)]
struct Report {
    accel: String,
    memory_mib: u32,
    host_cores: usize,
    levels: Vec<Level>,
    /// First 200 p50 at the largest count measured over that at the
    /// smallest.
    first_200_p50_ratio_max_to_min: Option<f64>,
    /// Why the run stopped before the last count asked for, if it did.
    stopped: Option<String>,
}

/// One idle microVM: its id and its QEMU's pid.
struct Idle {
    id: String,
    pid: u32,
}

pub async fn density(args: DensityArgs) -> Result<ExitCode> {
    let mut counts = args.idle.clone();
    counts.sort_unstable();
    counts.dedup();
    anyhow::ensure!(!counts.is_empty(), "--idle needs at least one count");

    let work = tempfile::tempdir().context("temporary directory")?;
    let data = work.path().join("data");
    let rootfs = work.path().join("rootfs");
    progress("unpacking the debian-12 root filesystem");
    unpack_base(&rootfs)?;
    std::fs::create_dir_all(rootfs.join("app"))?;
    std::fs::write(rootfs.join("app/bench.py"), APP)?;

    let server = BenchServer::start(
        &data,
        REGION,
        &[
            "RunMicrovm",
            "GetMicrovm",
            "TerminateMicrovm",
            "CreateMicrovmAuthToken",
        ],
    )
    .await?;
    let state = server.state.clone();
    let account = state.store.create_account("bench")?;
    progress("importing an image (boot, start the app, ready hook, snapshot)");
    let imported = hearth_server::images::import::import_image(
        &data,
        &state.store,
        state.engine.driver(),
        &state.config.quotas,
        &hearth_server::images::import::ImportRequest {
            account_id: account.account_id.clone(),
            image_name: "bench-density".into(),
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
        &format!("http://{}", server.api),
        REGION,
        &account.access_key_id,
        &account.secret_access_key,
    )?);
    let bench = Bench {
        client: &client,
        state: &state,
        proxy: server.proxy,
        image: imported.image_arn.clone(),
    };

    // One launch unmeasured: the first after an import also pays for reading
    // the snapshot into the page cache and starting the proxy's clients.
    progress("one unmeasured RunMicrovm to first 200 (warm-up)");
    let (warm_up, _) = bench.run_to_200().await?;
    terminate(&client, &warm_up).await?;

    let mut idle: Vec<Idle> = Vec::new();
    let mut levels = Vec::new();
    let mut stopped = None;
    for &count in &counts {
        match bench.level(&args, count, &mut idle).await {
            Ok(level) => levels.push(level),
            Err(err) => {
                let why = format!("at {count} idle microVMs: {err:#}");
                progress(&format!("stopping {why}"));
                stopped = Some(why);
                break;
            }
        }
    }
    progress(&format!("terminating {} idle microVMs", idle.len()));
    for vm in &idle {
        let _ = terminate(&client, &vm.id).await;
    }
    drop(server);

    let ratio = match (levels.first(), levels.last()) {
        (Some(first), Some(last)) if levels.len() > 1 => {
            Some(last.run_to_first_200_ms.p50 / first.run_to_first_200_ms.p50)
        }
        _ => None,
    };
    let report = Report {
        accel: format!("{:?}", state.engine.driver().accel()).to_lowercase(),
        memory_mib: args.memory,
        host_cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        levels,
        first_200_p50_ratio_max_to_min: ratio,
        stopped,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    Ok(ExitCode::SUCCESS)
}

struct Bench<'a> {
    client: &'a Client,
    state: &'a hearth_server::AppState,
    proxy: std::net::SocketAddr,
    image: String,
}

impl Bench<'_> {
    /// Brings the idle microVMs up to `count`, lets them settle, and measures.
    async fn level(&self, args: &DensityArgs, count: u32, idle: &mut Vec<Idle>) -> Result<Level> {
        while idle.len() < count as usize {
            progress(&format!("starting idle microVM {}/{count}", idle.len() + 1));
            let (id, _) = self.run_to_200().await?;
            let pid = self.qemu_pid(&id)?;
            idle.push(Idle { id, pid });
        }
        if count > 0 && args.settle_seconds > 0 {
            progress(&format!(
                "{count} idle microVMs settle for {} s",
                args.settle_seconds
            ));
            tokio::time::sleep(Duration::from_secs(args.settle_seconds)).await;
        }

        let (cpu_mean, cpu_max, cpu_seconds) = if count > 0 {
            progress(&format!(
                "CPU of {count} idle microVMs over {} s",
                args.cpu_seconds
            ));
            let (mean, max, seconds) =
                idle_cpu(idle, Duration::from_secs(args.cpu_seconds)).await?;
            (Some(mean), Some(max), seconds)
        } else {
            (None, None, 0.0)
        };
        let mut rss_total = 0.0;
        let mut pss_total = 0.0;
        for vm in idle.iter() {
            rss_total += smaps_rollup_kib(vm.pid, "Rss:")? / 1024.0;
            pss_total += smaps_rollup_kib(vm.pid, "Pss:")? / 1024.0;
        }
        let per_vm = |total: f64| (count > 0).then(|| total / f64::from(count));

        let mut samples = Vec::new();
        for i in 0..args.runs {
            progress(&format!(
                "RunMicrovm to first 200 with {count} idle, {}/{}",
                i + 1,
                args.runs
            ));
            let (id, took) = self.run_to_200().await?;
            samples.push(took);
            terminate(self.client, &id).await?;
        }
        Ok(Level {
            idle_vms: count,
            cpu_percent_per_idle_vm: cpu_mean,
            cpu_percent_max_idle_vm: cpu_max,
            cpu_seconds,
            rss_mib_per_idle_vm: per_vm(rss_total),
            pss_mib_per_idle_vm: per_vm(pss_total),
            pss_total_mib: pss_total,
            run_to_first_200_ms: Stats::of(samples),
            load_average_1m: load_average(),
        })
    }

    /// RunMicrovm, then GET / through the endpoint until 200; returns the
    /// microVM's id and the time taken, ms.
    async fn run_to_200(&self) -> Result<(String, f64)> {
        let start = Instant::now();
        let run = self
            .client
            .call("RunMicrovm", json!({ "imageIdentifier": self.image }))
            .await?;
        let id = microvm_id(&run)?;
        let endpoint = endpoint_of(self.client, self.proxy, &id).await?;
        poll_until_200(&endpoint).await?;
        Ok((id, ms(start.elapsed())))
    }

    /// The pid of the QEMU process behind microVM `id`.
    fn qemu_pid(&self, id: &str) -> Result<u32> {
        let row = self
            .state
            .store
            .microvm_by_id(id)?
            .with_context(|| format!("{id} is not in the store"))?;
        let vm = self.state.engine.driver().load(&row.vm_name)?;
        vm.pid.with_context(|| format!("{id} has no QEMU process"))
    }
}

/// CPU ticks (utime + stime) of process `pid` so far.
fn cpu_ticks(pid: u32) -> Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("cannot read /proc/{pid}/stat (QEMU gone?)"))?;
    parse_cpu_ticks(&text).with_context(|| format!("unexpected /proc/{pid}/stat"))
}

/// utime + stime (fields 14 and 15) of a `/proc/PID/stat` line. The command
/// name (field 2) is in parentheses and may hold spaces, so fields are
/// counted from the last `)`.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Mean and largest CPU of the idle microVMs over `window`, in percent of one
/// core, and the seconds actually measured.
async fn idle_cpu(idle: &[Idle], window: Duration) -> Result<(f64, f64, f64)> {
    // SAFETY: sysconf only reads a configuration value.
    let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    anyhow::ensure!(ticks_per_second > 0, "sysconf(_SC_CLK_TCK) failed");
    let before: Vec<u64> = idle
        .iter()
        .map(|vm| cpu_ticks(vm.pid))
        .collect::<Result<_>>()?;
    let start = Instant::now();
    tokio::time::sleep(window).await;
    let after: Vec<u64> = idle
        .iter()
        .map(|vm| cpu_ticks(vm.pid))
        .collect::<Result<_>>()?;
    let seconds = start.elapsed().as_secs_f64();
    let percents: Vec<f64> = before
        .iter()
        .zip(&after)
        .map(|(b, a)| a.saturating_sub(*b) as f64 / ticks_per_second as f64 / seconds * 100.0)
        .collect();
    let mean = percents.iter().sum::<f64>() / percents.len().max(1) as f64;
    let max = percents.iter().copied().fold(0.0, f64::max);
    Ok((mean, max, seconds))
}

fn smaps_rollup_kib(pid: u32, field: &str) -> Result<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .with_context(|| format!("cannot read smaps_rollup of {pid}"))?;
    let line = text
        .lines()
        .find(|l| l.starts_with(field))
        .with_context(|| format!("no {field} in smaps_rollup"))?;
    line.split_whitespace()
        .nth(1)
        .and_then(|v| v.parse::<f64>().ok())
        .with_context(|| format!("bad {field} line"))
}

fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn print_table(r: &Report) {
    println!(
        "hearth bench density ({} accel, {} MiB guests, {} host cores; in-process server and proxy)",
        r.accel, r.memory_mib, r.host_cores
    );
    println!(
        "{:>5} {:>12} {:>12} {:>10} {:>10} {:>14} {:>14} {:>6}",
        "idle",
        "cpu %/vm",
        "cpu % max",
        "RSS MiB/vm",
        "PSS MiB/vm",
        "1st 200 p50",
        "1st 200 p95",
        "load"
    );
    let opt = |v: Option<f64>, digits: usize| match v {
        Some(v) => format!("{v:.digits$}"),
        None => "-".into(),
    };
    for l in &r.levels {
        println!(
            "{:>5} {:>12} {:>12} {:>10} {:>10} {:>14.1} {:>14.1} {:>6}",
            l.idle_vms,
            opt(l.cpu_percent_per_idle_vm, 2),
            opt(l.cpu_percent_max_idle_vm, 2),
            opt(l.rss_mib_per_idle_vm, 1),
            opt(l.pss_mib_per_idle_vm, 1),
            l.run_to_first_200_ms.p50,
            l.run_to_first_200_ms.p95,
            opt(l.load_average_1m, 2),
        );
    }
    if let Some(ratio) = r.first_200_p50_ratio_max_to_min {
        println!("first 200 p50, most idle over fewest: {ratio:.2}x");
    }
    if let Some(why) = &r.stopped {
        println!("stopped {why}");
    }
}

#[cfg(test)]
mod tests {
    use super::parse_cpu_ticks;

    #[test]
    fn cpu_ticks_are_utime_plus_stime_even_with_spaces_in_the_name() {
        let stat = "4242 (qemu system) S 1 4242 4242 0 -1 4194560 100 0 0 0 \
                    37 5 0 0 20 0 4 0 123 456 789";
        assert_eq!(parse_cpu_ticks(stat), Some(42));
        assert_eq!(parse_cpu_ticks("4242 (x) S 1"), None);
        assert_eq!(parse_cpu_ticks("garbage"), None);
    }
}

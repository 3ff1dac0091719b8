//! `hearth bench launch`: cold boot vs launch from snapshot vs the naive restore,
//! suspend/resume, and the memory shared by idle clones.

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use hearth_proto::ExecRequest;
use hearth_vm::pool::{LaunchPath, PoolMode, WarmPool};
use hearth_vm::{AgentClient, BootRequest, Driver, MachineShape, QemuDriver, Snapshot, VmRecord};
use serde::Serialize;

use crate::measure::{ms, Stats};
use crate::progress::progress;

#[derive(Debug, Args)]
pub struct LaunchArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Idle clones whose memory is measured.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=64))]
    clones: u32,
    /// Launches measured from the warm pool and from an empty pool (each).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=1000))]
    launches: u32,
    /// Cold boots measured.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
    boots: u32,
    /// Naive restores measured.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100))]
    naive: u32,
    /// Suspend/resume cycles measured.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    cycles: u32,
    #[arg(long, default_value = "debian-12")]
    image: String,
    /// `both`: also measure pool launches with QEMU unjailed, to show what
    /// the jail costs (`on`: jailed only, as the server runs).
    #[arg(long, value_enum, default_value_t = JailChoice::On)]
    jail: JailChoice,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum JailChoice {
    On,
    Both,
}

/// Launches with and without the jail, same snapshot, same run: each launch
/// starts its own QEMU (an empty pool), so the jail is on its path; jailed
/// and unjailed launches alternate, so a busy host slows both alike.
#[derive(Debug, Serialize)]
struct JailComparison {
    jailed_p50_ms: f64,
    unjailed_p50_ms: f64,
    /// `jailed_p50_ms - unjailed_p50_ms`.
    jail_cost_p50_ms: f64,
    /// The median of the differences of consecutive pairs.
    jail_cost_paired_median_ms: f64,
    jailed_ms: Stats,
    unjailed_ms: Stats,
    /// The jail step alone: `/usr/bin/true` started in a clone's jail (its
    /// files prepared, binds, namespaces, pivot_root, ids) vs plainly.
    jail_step_cost_p50_ms: f64,
    jail_step_ms: Stats,
    plain_start_ms: Stats,
}

#[derive(Debug, Serialize)]
struct Report {
    accel: String,
    memory_mib: u32,
    cold_boot_to_exec_ms: Stats,
    launch_warm_pool_to_exec_ms: Stats,
    launch_deferred_pool_to_exec_ms: Stats,
    launch_empty_pool_to_exec_ms: Stats,
    naive_restore_to_exec_ms: Stats,
    suspend_ms: Stats,
    resume_to_exec_ms: Stats,
    clones: u32,
    clones_pss_total_mib: f64,
    one_clone_rss_mib: f64,
    pss_ratio: f64,
    speedup_vs_cold_boot: f64,
    speedup_vs_naive: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    jail: Option<JailComparison>,
}

pub(crate) async fn first_exec(agent: &AgentClient) -> Result<()> {
    let out = agent
        .exec_output(ExecRequest {
            argv: vec!["true".into()],
            ..Default::default()
        })
        .await?;
    anyhow::ensure!(
        out.status.code == Some(0),
        "`true` failed in the guest: {:?}",
        out.status
    );
    Ok(())
}

/// Removes the VMs made by this run, whatever happens.
pub(crate) struct Cleanup<'a> {
    pub(crate) driver: &'a QemuDriver,
    pub(crate) vms: Vec<VmRecord>,
}

impl Cleanup<'_> {
    pub(crate) async fn remove_all(&mut self) {
        for vm in self.vms.drain(..) {
            let _ = self.driver.remove(&vm).await;
        }
    }
}

pub async fn launch(args: LaunchArgs, driver: QemuDriver) -> Result<ExitCode> {
    let prefix = format!("bench{}", std::process::id());
    let work = tempfile::Builder::new()
        .prefix("hearth-bench-")
        .tempdir_in(driver.assets().state_dir.as_path())
        .or_else(|_| tempfile::tempdir())
        .context("cannot create a work directory")?;
    let mut cleanup = Cleanup {
        driver: &driver,
        vms: Vec::new(),
    };
    let result = run(&driver, &args, &prefix, work.path(), &mut cleanup).await;
    cleanup.remove_all().await;
    let report = result?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    Ok(ExitCode::SUCCESS)
}

async fn run(
    driver: &QemuDriver,
    args: &LaunchArgs,
    prefix: &str,
    work: &Path,
    cleanup: &mut Cleanup<'_>,
) -> Result<Report> {
    let shape = MachineShape::default();

    // Cold boots; the first one is kept and snapshotted.
    let mut boot_samples = Vec::new();
    let mut source = None;
    for i in 0..args.boots {
        progress(&format!("cold boot {}/{}", i + 1, args.boots));
        let start = Instant::now();
        let vm = driver
            .boot(&BootRequest {
                name: format!("{prefix}-boot{i}"),
                image: args.image.clone(),
                shape,
            })
            .await?;
        cleanup.vms.push(vm.clone());
        let agent = driver.agent(&vm).await?;
        first_exec(&agent).await?;
        boot_samples.push(ms(start.elapsed()));
        if source.is_none() {
            source = Some(vm);
        } else {
            driver.remove(&vm).await?;
            cleanup.vms.retain(|v| v.name != vm.name);
        }
    }
    let source = source.context("no VM booted")?;
    progress("snapshotting");
    let snap_dir = work.join("snapshot");
    let snapshot = driver.snapshot(&source, &snap_dir).await?;

    // Warm pool, prewarmed: each launch finds a restored, paused VM.
    let warm = measure_pool(
        driver,
        &snapshot,
        PoolMode::Prewarmed,
        2,
        args.launches,
        prefix,
        "warm",
        cleanup,
    )
    .await?;
    // Warm pool, deferred: each launch finds QEMU waiting to load the state.
    let deferred = measure_pool(
        driver,
        &snapshot,
        PoolMode::Deferred,
        2,
        args.launches,
        prefix,
        "defer",
        cleanup,
    )
    .await?;
    // Empty pool: each launch starts its own QEMU first.
    let cold = measure_pool(
        driver,
        &snapshot,
        PoolMode::Deferred,
        0,
        args.launches,
        prefix,
        "cold",
        cleanup,
    )
    .await?;

    // Naive restore: the full RAM stream read by a fresh QEMU from a file.
    progress("preparing the naive full-stream restore");
    let (naive_src, naive_agent) = driver
        .launch_with_agent(&snapshot, &format!("{prefix}-nsrc"))
        .await?;
    cleanup.vms.push(naive_src.clone());
    drop(naive_agent);
    let saved = work.join("naive");
    driver.save_full_stream(&naive_src, &saved).await?;
    let mut naive_samples = Vec::new();
    for i in 0..args.naive {
        progress(&format!("naive restore {}/{}", i + 1, args.naive));
        let start = Instant::now();
        let (vm, agent) = driver
            .launch_naive(&snapshot, &saved, &format!("{prefix}-naive{i}"))
            .await?;
        cleanup.vms.push(vm.clone());
        first_exec(&agent).await?;
        naive_samples.push(ms(start.elapsed()));
        driver.remove(&vm).await?;
    }

    // Suspend and resume of a clone.
    let mut suspend_samples = Vec::new();
    let mut resume_samples = Vec::new();
    let (mut vm, agent) = driver
        .launch_with_agent(&snapshot, &format!("{prefix}-susp"))
        .await?;
    cleanup.vms.push(vm.clone());
    first_exec(&agent).await?;
    drop(agent);
    for i in 0..args.cycles {
        progress(&format!("suspend/resume {}/{}", i + 1, args.cycles));
        let start = Instant::now();
        driver.suspend(&mut vm).await?;
        suspend_samples.push(ms(start.elapsed()));
        let start = Instant::now();
        driver.resume(&mut vm).await?;
        let agent = driver.agent(&vm).await?;
        first_exec(&agent).await?;
        resume_samples.push(ms(start.elapsed()));
    }
    cleanup.vms.retain(|v| v.name != vm.name);
    cleanup.vms.push(vm);

    // Memory of idle clones.
    progress(&format!("launching {} idle clones", args.clones));
    let pool = WarmPool::new(driver.clone(), snapshot.clone(), PoolMode::Deferred, 0);
    let mut pids = Vec::new();
    for i in 0..args.clones {
        let (vm, agent, _) = pool.launch(&format!("{prefix}-idle{i}")).await?;
        cleanup.vms.push(vm.clone());
        first_exec(&agent).await?;
        pids.push(vm.pid.context("clone has no pid")?);
    }
    pool.shutdown().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut pss_total = 0.0;
    for pid in &pids {
        pss_total += smaps_rollup_kib(*pid, "Pss:")? / 1024.0;
    }
    let one_rss = smaps_rollup_kib(pids[0], "Rss:")? / 1024.0;

    let jail = if args.jail == JailChoice::Both {
        Some(compare_jail(driver, &snapshot, args.launches, prefix, cleanup).await?)
    } else {
        None
    };
    let warm_p50 = warm.p50;
    Ok(Report {
        jail,
        accel: format!("{:?}", driver.accel()).to_lowercase(),
        memory_mib: shape.memory_mib,
        speedup_vs_cold_boot: Stats::of(boot_samples.clone()).p50 / warm_p50,
        speedup_vs_naive: Stats::of(naive_samples.clone()).p50 / warm_p50,
        cold_boot_to_exec_ms: Stats::of(boot_samples),
        launch_warm_pool_to_exec_ms: warm,
        launch_deferred_pool_to_exec_ms: deferred,
        launch_empty_pool_to_exec_ms: cold,
        naive_restore_to_exec_ms: Stats::of(naive_samples),
        suspend_ms: Stats::of(suspend_samples),
        resume_to_exec_ms: Stats::of(resume_samples),
        clones: args.clones,
        clones_pss_total_mib: pss_total,
        one_clone_rss_mib: one_rss,
        pss_ratio: pss_total / one_rss,
    })
}

/// See [`JailComparison`].
async fn compare_jail(
    driver: &QemuDriver,
    snapshot: &Snapshot,
    launches: u32,
    prefix: &str,
    cleanup: &mut Cleanup<'_>,
) -> Result<JailComparison> {
    let unjailed = driver.unjailed_for_benchmark();
    let mut jailed_samples = Vec::new();
    let mut unjailed_samples = Vec::new();
    let mut differences = Vec::new();
    for i in 0..launches {
        progress(&format!(
            "launch with and without the jail {}/{launches}",
            i + 1
        ));
        let mut pair = [0.0; 2];
        for (slot, (label, driver)) in [("jail", driver), ("nojail", &unjailed)]
            .into_iter()
            .enumerate()
        {
            let pool = WarmPool::new(driver.clone(), snapshot.clone(), PoolMode::Deferred, 0);
            let start = Instant::now();
            let launched = pool.launch(&format!("{prefix}-{label}{i}")).await;
            pool.shutdown().await;
            let (vm, agent, _) = launched?;
            cleanup.vms.push(vm.clone());
            first_exec(&agent).await?;
            pair[slot] = ms(start.elapsed());
            drop(agent);
            driver.remove(&vm).await?;
            cleanup.vms.retain(|v| v.name != vm.name);
        }
        jailed_samples.push(pair[0]);
        unjailed_samples.push(pair[1]);
        differences.push(pair[0] - pair[1]);
    }
    progress("timing the jail step alone");
    let (step, plain) = driver
        .time_jail_step(snapshot, &format!("{prefix}-jailstep"), 50)
        .await?;
    let step = Stats::of(step);
    let plain = Stats::of(plain);
    let jailed = Stats::of(jailed_samples);
    let unjailed = Stats::of(unjailed_samples);
    Ok(JailComparison {
        jail_step_cost_p50_ms: step.p50 - plain.p50,
        jail_step_ms: step,
        plain_start_ms: plain,
        jailed_p50_ms: jailed.p50,
        unjailed_p50_ms: unjailed.p50,
        jail_cost_p50_ms: jailed.p50 - unjailed.p50,
        jail_cost_paired_median_ms: Stats::of(differences).p50,
        jailed_ms: jailed,
        unjailed_ms: unjailed,
    })
}

#[allow(clippy::too_many_arguments)]
pub(crate) async fn measure_pool(
    driver: &QemuDriver,
    snapshot: &Snapshot,
    mode: PoolMode,
    size: usize,
    launches: u32,
    prefix: &str,
    label: &str,
    cleanup: &mut Cleanup<'_>,
) -> Result<Stats> {
    let pool = WarmPool::new(driver.clone(), snapshot.clone(), mode, size);
    let mut samples = Vec::new();
    let result = async {
        for i in 0..launches {
            if size > 0 && !pool.wait_full(Duration::from_secs(30)).await {
                anyhow::bail!("warm pool did not refill within 30 s");
            }
            progress(&format!("launch ({label} pool) {}/{launches}", i + 1));
            let start = Instant::now();
            let (vm, agent, path) = pool.launch(&format!("{prefix}-{label}{i}")).await?;
            cleanup.vms.push(vm.clone());
            first_exec(&agent).await?;
            samples.push(ms(start.elapsed()));
            anyhow::ensure!(
                (size > 0) == (path == LaunchPath::Warm),
                "launch path {path:?} with a pool of {size}"
            );
            drop(agent);
            driver.remove(&vm).await?;
            cleanup.vms.retain(|v| v.name != vm.name);
        }
        Ok(())
    }
    .await;
    pool.shutdown().await;
    result?;
    Ok(Stats::of(samples))
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

fn print_table(r: &Report) {
    let row = |name: &str, s: &Stats| {
        println!(
            "{name:<36} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>4}",
            s.p50, s.p95, s.min, s.max, s.n
        );
    };
    println!(
        "accelerator: {}, guest memory {} MiB",
        r.accel, r.memory_mib
    );
    println!(
        "{:<36} {:>9} {:>9} {:>9} {:>9} {:>4}",
        "ms", "p50", "p95", "min", "max", "n"
    );
    row("cold boot -> first exec", &r.cold_boot_to_exec_ms);
    row(
        "launch (warm pool) -> first exec",
        &r.launch_warm_pool_to_exec_ms,
    );
    row(
        "launch (deferred pool) -> first exec",
        &r.launch_deferred_pool_to_exec_ms,
    );
    row(
        "launch (empty pool) -> first exec",
        &r.launch_empty_pool_to_exec_ms,
    );
    row(
        "naive file: restore -> first exec",
        &r.naive_restore_to_exec_ms,
    );
    row("suspend", &r.suspend_ms);
    row("resume -> first exec", &r.resume_to_exec_ms);
    println!(
        "launch p50 is {:.0}x faster than cold boot and {:.1}x faster than the naive restore",
        r.speedup_vs_cold_boot, r.speedup_vs_naive
    );
    println!(
        "{} idle clones: PSS {:.1} MiB in total; one clone's RSS {:.1} MiB; ratio {:.2}",
        r.clones, r.clones_pss_total_mib, r.one_clone_rss_mib, r.pss_ratio
    );
    if let Some(j) = &r.jail {
        row("launch (empty pool), jailed", &j.jailed_ms);
        row("launch (empty pool), no jail", &j.unjailed_ms);
        println!(
            "the jail adds {:+.1} ms to launch p50 ({:.1} vs {:.1} ms); median of paired differences {:+.1} ms",
            j.jail_cost_p50_ms, j.jailed_p50_ms, j.unjailed_p50_ms, j.jail_cost_paired_median_ms
        );
        row("start /usr/bin/true in a clone's jail", &j.jail_step_ms);
        row("start /usr/bin/true plainly", &j.plain_start_ms);
        println!(
            "the jail step alone costs {:+.2} ms (p50)",
            j.jail_step_cost_p50_ms
        );
    }
}

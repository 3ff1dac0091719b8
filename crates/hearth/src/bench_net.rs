//! `hearth bench net` (as root): what a VM network costs and gives.
//!
//! - Launch to first exec from a warm (prewarmed) pool and from an empty pool,
//!   with VM networks (namespace, tap, uplink with NAT) and without (a card
//!   with no backend): the difference is the network's cost on each path.
//! - One guest's download speed from a web server in a namespace the
//!   benchmark makes (`hbench-inet-PID`, 198.51.100.10 on a documentation
//!   range). Every packet from the benchmark's VM pool is routed there by a
//!   policy rule, so nothing leaves the machine.

use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::process::{Command, ExitCode};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use hearth_proto::ExecRequest;
use hearth_vm::net::{Ipv4Net, NetConfig, Network};
use hearth_vm::pool::PoolMode;
use hearth_vm::{BootRequest, Driver, MachineShape, QemuDriver};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::bench::{measure_pool, Cleanup};
use crate::measure::Stats;
use crate::progress::progress;

const WEB: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);

#[derive(Debug, Args)]
pub struct NetArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Launches measured on each path, with and without networks.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1000))]
    launches: u32,
    /// Size of the download, in MiB.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=4096))]
    download_mib: u32,
    #[arg(long, default_value = "debian-12")]
    image: String,
    /// The guest's bandwidth per vCPU, each way, as `hearth serve
    /// --egress-mbit-per-vcpu` (default: the server's); a large value
    /// measures the network path itself.
    #[arg(long, value_name = "MBIT", default_value_t = 100,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    egress_mbit_per_vcpu: u64,
    /// Networks kept made ahead, as `hearth serve --vm-network-spares`
    /// (measured after the fresh setups, which take none).
    #[arg(long, value_name = "N", default_value_t = 2,
          value_parser = clap::value_parser!(u16).range(0..=64))]
    spare_networks: u16,
}

#[derive(Debug, Serialize)]
struct Report {
    accel: String,
    warm_pool_with_network_ms: Stats,
    warm_pool_without_network_ms: Stats,
    warm_pool_network_cost_p50_ms: f64,
    empty_pool_with_network_ms: Stats,
    empty_pool_without_network_ms: Stats,
    empty_pool_network_cost_p50_ms: f64,
    /// Spare networks kept during the launches (`--spare-networks`).
    spare_networks: u16,
    /// Creating one VM's namespace with tap and uplink from nothing (what an
    /// empty-pool launch waits for when no spare is ready), and deleting it.
    network_setup_ms: Stats,
    network_teardown_ms: Stats,
    /// Taking a spare network instead (empty with no spares).
    network_from_spare_ms: Stats,
    download_bytes: u64,
    download_seconds: f64,
    download_mb_per_s: f64,
    /// The guest's bandwidth limit during the download.
    download_limit_mb_per_s: f64,
}

/// The benchmark's stand-in internet; removed on drop.
struct BenchInternet {
    netns: String,
    link: String,
    pool: Ipv4Net,
    route_table: String,
    config: NetConfig,
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("cannot run ip")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl BenchInternet {
    fn start(mbit_per_vcpu: u64, spares: u16) -> Result<(Self, std::net::TcpListener)> {
        let tag = std::process::id() % 100_000;
        let pool = Ipv4Net::new(Ipv4Addr::new(10, 215, (tag % 250) as u8, 0), 24)?;
        let mut config = NetConfig::new(Ipv4Addr::new(198, 51, 100, 53));
        config.pool = pool;
        config.table = format!("hb{tag}");
        config.link_prefix = format!("hb{tag}v");
        config.netns_prefix = format!("hb{tag}-");
        config.limits_per_vcpu.bytes_per_second = mbit_per_vcpu * 125_000;
        config.spares = usize::from(spares);
        let this = Self {
            netns: format!("hbench-inet-{tag}"),
            link: format!("hbi{tag}"),
            pool,
            route_table: (44_000 + tag % 10_000).to_string(),
            config,
        };
        let transit = (tag % 60) as u8 * 4;
        let (host, inner) = (
            Ipv4Addr::new(203, 0, 113, transit + 1),
            Ipv4Addr::new(203, 0, 113, transit + 2),
        );
        let (netns, link) = (this.netns.as_str(), this.link.as_str());
        ip(&["netns", "add", netns])?;
        ip(&[
            "link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", netns,
        ])?;
        ip(&["addr", "add", &format!("{host}/30"), "dev", link])?;
        ip(&["link", "set", link, "up"])?;
        ip(&["-n", netns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            netns,
            "addr",
            "add",
            &format!("{inner}/30"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", netns, "link", "set", "eth0", "up"])?;
        ip(&[
            "-n",
            netns,
            "addr",
            "add",
            &format!("{WEB}/32"),
            "dev",
            "lo",
        ])?;
        ip(&[
            "-n",
            netns,
            "route",
            "add",
            "default",
            "via",
            &host.to_string(),
        ])?;
        ip(&[
            "route",
            "add",
            "default",
            "via",
            &inner.to_string(),
            "dev",
            link,
            "table",
            &this.route_table,
        ])?;
        ip(&[
            "rule",
            "add",
            "from",
            &pool.to_string(),
            "lookup",
            &this.route_table,
            "priority",
            "102",
        ])?;
        let listener = listen_in(netns)?;
        Ok((this, listener))
    }
}

impl Drop for BenchInternet {
    fn drop(&mut self) {
        let _ = ip(&["rule", "del", "from", &self.pool.to_string()]);
        let _ = ip(&["route", "flush", "table", &self.route_table]);
        let _ = ip(&["link", "delete", &self.link]);
        let _ = ip(&["netns", "delete", &self.netns]);
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", &self.config.table])
            .output();
    }
}

/// A listener on WEB:80 inside `netns`, made from a thread that enters it.
fn listen_in(netns: &str) -> Result<std::net::TcpListener> {
    let path = format!("/run/netns/{netns}");
    std::thread::spawn(move || -> Result<std::net::TcpListener> {
        let target = std::fs::File::open(&path).context("cannot open the namespace")?;
        // SAFETY: setns(2) changes only this thread, which ends after binding.
        if unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error()).context("setns");
        }
        let listener = std::net::TcpListener::bind(SocketAddr::from((WEB, 80)))?;
        listener.set_nonblocking(true)?;
        Ok(listener)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the listener thread panicked"))?
}

/// Serves `bytes` zeros to every connection after its request head.
async fn serve(listener: std::net::TcpListener, bytes: u64) {
    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
        return;
    };
    while let Ok((mut stream, _)) = listener.accept().await {
        tokio::spawn(async move {
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let reply = format!("HTTP/1.0 200 OK\r\ncontent-length: {bytes}\r\n\r\n");
            if stream.write_all(reply.as_bytes()).await.is_err() {
                return;
            }
            let chunk = vec![0u8; 1 << 16];
            let mut left = bytes;
            while left > 0 {
                let n = left.min(chunk.len() as u64) as usize;
                if stream.write_all(&chunk[..n]).await.is_err() {
                    return;
                }
                left -= n as u64;
            }
        });
    }
}

pub async fn net(args: NetArgs, plain: QemuDriver) -> Result<ExitCode> {
    // SAFETY: geteuid(2) cannot fail and touches no memory.
    if unsafe { libc::geteuid() } != 0 {
        bail!("hearth bench net needs root (network namespaces and nftables)");
    }
    let (internet, listener) =
        BenchInternet::start(args.egress_mbit_per_vcpu, args.spare_networks)?;
    let download_bytes = u64::from(args.download_mib) << 20;
    let server = tokio::spawn(serve(listener, download_bytes));
    let network = Arc::new(
        Network::start(internet.config.clone())
            .await
            .context("cannot set up VM networks")?,
    );
    let networked = plain.clone().with_network(network);
    let work = tempfile::Builder::new()
        .prefix("hearth-bench-net-")
        .tempdir_in(plain.assets().state_dir.as_path())
        .or_else(|_| tempfile::tempdir())
        .context("cannot create a work directory")?;
    let mut cleanup = Cleanup {
        driver: &networked,
        vms: Vec::new(),
    };
    let result = run(
        &networked,
        &plain,
        &args,
        download_bytes,
        work.path(),
        &mut cleanup,
    )
    .await;
    cleanup.remove_all().await;
    server.abort();
    drop(internet);
    let report = result?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    Ok(ExitCode::SUCCESS)
}

async fn run(
    networked: &QemuDriver,
    plain: &QemuDriver,
    args: &NetArgs,
    download_bytes: u64,
    work: &std::path::Path,
    cleanup: &mut Cleanup<'_>,
) -> Result<Report> {
    let prefix = format!("bnet{}", std::process::id());
    let network = networked
        .network()
        .context("the networked driver has no network")?;
    let (mut setup, mut teardown) = (Vec::new(), Vec::new());
    for i in 0..args.launches {
        progress(&format!("network setup {}/{}", i + 1, args.launches));
        let instance = format!("{prefix}x{i}");
        setup.push(timed_create(network, &instance).await?);
        let start = std::time::Instant::now();
        network.remove(&instance);
        teardown.push(crate::measure::ms(start.elapsed()));
    }
    network.keep_spares();
    let mut from_spare = Vec::new();
    let rounds = if args.spare_networks == 0 {
        0
    } else {
        args.launches
    };
    for i in 0..rounds {
        progress(&format!("network from a spare {}/{}", i + 1, args.launches));
        let ready = std::time::Instant::now();
        while network.spares_ready() < usize::from(args.spare_networks) {
            anyhow::ensure!(
                ready.elapsed() < std::time::Duration::from_secs(30),
                "no spare network within 30 s"
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let instance = format!("{prefix}y{i}");
        from_spare.push(timed_create(network, &instance).await?);
        network.remove(&instance);
    }
    // One snapshot per driver: a card restores only onto the same backend
    // kind (a tap offers features a card without a backend does not).
    let mut snapshots = Vec::new();
    for (driver, label) in [(networked, "net"), (plain, "nonet")] {
        progress(&format!("cold boot ({label})"));
        let source = driver
            .boot(&BootRequest {
                name: format!("{prefix}-{label}src"),
                image: args.image.clone(),
                shape: MachineShape::default(),
            })
            .await?;
        let snapshot = driver
            .snapshot(&source, &work.join(format!("snapshot-{label}")))
            .await;
        driver.remove(&source).await?;
        snapshots.push(snapshot?);
    }
    let snapshot = snapshots[0].clone();

    let mut measured = Vec::new();
    for ((driver, label), snapshot) in [(networked, "net"), (plain, "nonet")]
        .into_iter()
        .zip(&snapshots)
    {
        let mut on_driver = Cleanup {
            driver,
            vms: Vec::new(),
        };
        let warm = measure_pool(
            driver,
            snapshot,
            PoolMode::Prewarmed,
            2,
            args.launches,
            &prefix,
            &format!("{label}warm"),
            &mut on_driver,
        )
        .await;
        let empty = match warm {
            Ok(_) => {
                measure_pool(
                    driver,
                    snapshot,
                    PoolMode::Deferred,
                    0,
                    args.launches,
                    &prefix,
                    &format!("{label}empty"),
                    &mut on_driver,
                )
                .await
            }
            Err(_) => Ok(Stats::of(Vec::new())),
        };
        on_driver.remove_all().await;
        measured.push((warm?, empty?));
    }
    let (warm_net, empty_net) = measured.remove(0);
    let (warm_plain, empty_plain) = measured.remove(0);

    progress("download");
    let (vm, agent) = networked
        .launch_with_egress(&snapshot, &format!("{prefix}-dl"), true)
        .await?;
    cleanup.vms.push(vm);
    // Timed in the guest: the exec round trip is not part of the transfer.
    let script = format!(
        "import time, urllib.request as u\n\
         r = u.urlopen('http://{WEB}/big', timeout=600)\n\
         t = time.monotonic(); n = 0\n\
         while True:\n\
         \x20   b = r.read(1 << 20)\n\
         \x20   if not b: break\n\
         \x20   n += len(b)\n\
         print(n, time.monotonic() - t)\n"
    );
    let out = agent
        .exec_output(ExecRequest {
            argv: vec!["python3".into(), "-c".into(), script],
            ..Default::default()
        })
        .await?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mut words = text.split_whitespace();
    let got: u64 = words.next().and_then(|w| w.parse().ok()).with_context(|| {
        format!(
            "download failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )
    })?;
    let seconds: f64 = words
        .next()
        .and_then(|w| w.parse().ok())
        .context("no download time")?;
    anyhow::ensure!(
        got == download_bytes,
        "downloaded {got} of {download_bytes} bytes"
    );
    Ok(Report {
        accel: format!("{:?}", networked.accel()).to_lowercase(),
        warm_pool_network_cost_p50_ms: warm_net.p50 - warm_plain.p50,
        empty_pool_network_cost_p50_ms: empty_net.p50 - empty_plain.p50,
        warm_pool_with_network_ms: warm_net,
        warm_pool_without_network_ms: warm_plain,
        empty_pool_with_network_ms: empty_net,
        empty_pool_without_network_ms: empty_plain,
        spare_networks: args.spare_networks,
        network_setup_ms: Stats::of(setup),
        network_teardown_ms: Stats::of(teardown),
        network_from_spare_ms: Stats::of(from_spare),
        download_bytes: got,
        download_seconds: seconds,
        download_mb_per_s: got as f64 / seconds / 1e6,
        download_limit_mb_per_s: args.egress_mbit_per_vcpu as f64 * 0.125,
    })
}

/// Milliseconds to give `instance` a default-shape network with egress
/// (from a spare when one is ready).
async fn timed_create(network: &Network, instance: &str) -> Result<f64> {
    let start = std::time::Instant::now();
    network
        .create(
            instance,
            0,
            Some(network.config().limits_for(MachineShape::default())),
        )
        .await?;
    Ok(crate::measure::ms(start.elapsed()))
}

fn print_table(r: &Report) {
    let row = |name: &str, s: &Stats| {
        println!(
            "{name:<44} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>4}",
            s.p50, s.p95, s.min, s.max, s.n
        );
    };
    println!(
        "accelerator: {}; spare networks: {}",
        r.accel, r.spare_networks
    );
    println!(
        "{:<44} {:>9} {:>9} {:>9} {:>9} {:>4}",
        "launch -> first exec, ms", "p50", "p95", "min", "max", "n"
    );
    row("warm pool, with network", &r.warm_pool_with_network_ms);
    row(
        "warm pool, without network",
        &r.warm_pool_without_network_ms,
    );
    row("empty pool, with network", &r.empty_pool_with_network_ms);
    row(
        "empty pool, without network",
        &r.empty_pool_without_network_ms,
    );
    row(
        "network setup from nothing (namespace, tap, uplink)",
        &r.network_setup_ms,
    );
    row("network teardown", &r.network_teardown_ms);
    row("network from a spare", &r.network_from_spare_ms);
    println!(
        "network cost at p50: warm pool {:+.1} ms, empty pool {:+.1} ms",
        r.warm_pool_network_cost_p50_ms, r.empty_pool_network_cost_p50_ms
    );
    println!(
        "download: {} bytes in {:.2} s: {:.1} MB/s (limit {:.1} MB/s)",
        r.download_bytes, r.download_seconds, r.download_mb_per_s, r.download_limit_mb_per_s
    );
}

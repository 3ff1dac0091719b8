//! What the benchmarks share: percentiles of samples, durations in ms, and a
//! root filesystem to import (the cached debian-12 disk, unpacked).

use std::path::Path;
use std::time::Duration;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use serde::Serialize;

/// Percentiles of a set of samples (nearest rank).
#[derive(Debug, Default, Serialize)]
pub(crate) struct Stats {
    pub n: usize,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub min: f64,
    pub max: f64,
}

impl Stats {
    pub(crate) fn of(mut samples: Vec<f64>) -> Self {
        samples.sort_by(f64::total_cmp);
        let pick = |q: f64| {
            if samples.is_empty() {
                return f64::NAN;
            }
            let idx = ((samples.len() as f64 - 1.0) * q).round() as usize;
            samples[idx.min(samples.len() - 1)]
        };
        Self {
            n: samples.len(),
            p50: pick(0.5),
            p95: pick(0.95),
            p99: pick(0.99),
            min: pick(0.0),
            max: pick(1.0),
        }
    }
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Unpacks the cached debian-12 root disk into `dir` (with `debugfs rdump`).
pub(crate) fn unpack_base(dir: &Path) -> Result<()> {
    let base = hearth_vm::Assets::from_env()
        .base_image("debian-12")
        .context("the debian-12 base image (run scripts/setup-host)")?;
    std::fs::create_dir_all(dir)?;
    let status = std::process::Command::new("debugfs")
        .arg("-R")
        .arg(format!("rdump / {}", dir.display()))
        .arg(&base)
        .stderr(std::process::Stdio::null())
        .status()
        .context("running debugfs")?;
    if !status.success() || !dir.join("usr/bin/python3").exists() {
        bail!("could not unpack {}", base.display());
    }
    Ok(())
}

/// A `hearth serve` inside the benchmark's process: the API and the endpoint
/// proxy on loopback ports, rate limits lifted for `unthrottled` operations
/// and the proxy's per-microVM limits off (the figures are what the path
/// carries, not what an operator allows). Both servers stop when it drops.
pub(crate) struct BenchServer {
    pub state: Arc<hearth_server::AppState>,
    pub api: SocketAddr,
    pub proxy: SocketAddr,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl BenchServer {
    pub(crate) async fn start(data: &Path, region: &str, unthrottled: &[&str]) -> Result<Self> {
        let mut config = hearth_server::ServerConfig::new(
            data.to_path_buf(),
            ([127, 0, 0, 1], 0).into(),
            region.into(),
        );
        config.rate_limits = unthrottled
            .iter()
            .map(|op| format!("{op}=100000"))
            .collect();
        // Benches run dozens of idle microVMs: counted at their peaks (1 GiB
        // for the 256 MiB size) a 24 GiB host admits about 15, at their
        // baselines about 35.
        config.reserve.overcommit = true;
        let state = hearth_server::start(config).await?;
        let api_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let api = api_listener.local_addr()?;
        let app = hearth_server::app(state.clone());
        let api_task = tokio::spawn(async move {
            let _ = axum::serve(api_listener, app).await;
        });
        let proxy_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let proxy = proxy_listener.local_addr()?;
        let (backend, mut proxy_config) = state.endpoint_proxy();
        proxy_config.limits = hearth_proxy::VmLimits {
            max_connections: 0,
            requests_per_second: 0,
        };
        let proxy_task = tokio::spawn(async move {
            let _ = hearth_proxy::serve(proxy_listener, backend, proxy_config).await;
        });
        Ok(Self {
            state,
            api,
            proxy,
            tasks: vec![api_task, proxy_task],
        })
    }
}

impl Drop for BenchServer {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

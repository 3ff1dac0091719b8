//! `hearth bench chaos`: crash safety under load. Each round fires a mix of
//! work at a real `hearth serve`: RunMicrovm with a clientToken,
//! SuspendMicrovm, ResumeMicrovm, TerminateMicrovm, an exec (the exec
//! extension API), HTTP requests through the endpoint proxy to a running
//! microVM's app (with a token) and, when none is in flight, a Dockerfile
//! build (CreateMicrovmImage, then UpdateMicrovmImage for a new version). It
//! kills the server with SIGKILL at a random moment while they are in flight,
//! starts it again on the same data directory and checks every call it had
//! answered: a run ends RUNNING, a suspend SUSPENDED, a resume RUNNING, a
//! terminate TERMINATED, a build SUCCESSFUL (or FAILED with a reason naming
//! the restart, never stuck), an answered exec's effect is still in the same
//! guest, and that guest answers exec and its endpoint again. Execs and
//! requests in flight at the kill were never answered: they are counted as
//! interrupted. It also counts QEMU processes no microVM owns, clientTokens
//! that made a second microVM, and measures the time from the restart until
//! every microVM (and the build) is settled.
//!
//! The server is a child process (`hearth serve`, this binary) so it can be
//! killed; the image is made with `hearth image import` from the cached
//! `debian-12` root filesystem. Everything the benchmark starts ends with it,
//! by PID (the server, every QEMU of its data directory) or by name (the VM
//! networks, under `--vm-net-name`), also on an error, SIGINT or SIGTERM.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use hearth_client::{Client, ClientConfig};
use http_body_util::BodyExt;
use rand::seq::SliceRandom;
use rand::Rng;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::bench_endpoint::{poll_until_200, Endpoint};
use crate::measure::{ms, unpack_base, Stats};
use crate::progress::progress;

const REGION: &str = "us-east-1";
/// The imported image's app (python's http.server) listens here.
const APP_PORT: u16 = 8080;
/// The image the builds make versions of.
const BUILD_IMAGE: &str = "chaos-build";
const BUILD_BUCKET: &str = "chaos";
/// Where an answered exec leaves its mark in the guest.
const MARKS: &str = "/tmp/chaos-marks";

#[derive(Debug, Args)]
pub struct ChaosArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Rounds of load, each ended by a kill -9 of the server.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=1000))]
    rounds: u32,
    /// Latest moment of the kill after the calls start, ms (uniformly random).
    #[arg(long, default_value_t = 1500, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    max_kill_ms: u64,
    /// MicroVMs kept alive between rounds (older ones are terminated).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(2..=50))]
    fleet: u32,
    /// Guest memory of the imported image, MiB.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(128..=8192))]
    memory: u32,
    /// Longest wait for the microVMs to settle after a restart, seconds.
    #[arg(long, default_value_t = 300)]
    settle_timeout: u64,
    /// Longest wait for an accepted build to end after a restart, seconds;
    /// one still PENDING or IN_PROGRESS then counts as lost.
    #[arg(long, default_value_t = 600)]
    build_timeout: u64,
    /// Leave builds out of the mix.
    #[arg(long)]
    no_builds: bool,
    /// Names of the server's VM network objects (nftables table, links
    /// NAME<n>, namespaces NAME-<id>); removed at the end. Unique per host.
    #[arg(long, default_value = "hchaos")]
    vm_net_name: String,
    /// Host-side addresses of the server's VM links (apart from other servers').
    #[arg(long, default_value = "10.209.0.0/16")]
    vm_address_pool: String,
    /// Give the microVMs no network (no namespaces at all).
    #[arg(long)]
    no_vm_network: bool,
    /// Keep the servers' log here (the data directory goes at the end).
    #[arg(long, value_name = "FILE")]
    server_log: Option<PathBuf>,
}

/// One kind of work's figures. State changes and builds count calls; exec
/// counts execs; endpoint counts rounds of traffic to one microVM (the
/// requests themselves are in [`Requests`]).
#[derive(Debug, Default, Serialize)]
struct KindFigures {
    /// Answered with success before the kill (endpoint: rounds in which a
    /// request was answered).
    accepted: usize,
    /// Accepted and carried out after the restart. State changes: the asked
    /// state reached; build: SUCCESSFUL; exec: its mark still in the same
    /// guest; endpoint: the same microVM answered through the proxy again.
    carried_out_after_restart: usize,
    /// Builds only: FAILED with a reason naming the restart (allowed).
    failed_naming_restart: usize,
    /// Not carried out (target 0). Exec and endpoint: also a round whose
    /// microVM did not answer exec or its endpoint after the restart.
    lost: usize,
    /// In flight at the kill, never answered (may fail; not a broken
    /// promise). Endpoint: rounds with a request in flight at the kill.
    interrupted: usize,
    /// Refused or failed while the server was up (not the kill's doing).
    refused: usize,
}

/// The endpoint requests of all rounds.
#[derive(Debug, Default, Serialize)]
struct Requests {
    answered: usize,
    /// In flight at the kill.
    interrupted: usize,
    /// Failed while the server was up.
    failed: usize,
}

#[derive(Debug, Default, Serialize)]
struct Report {
    rounds: u32,
    /// Calls the server answered with success before it was killed (all kinds).
    accepted_ops: usize,
    carried_out_after_restart: usize,
    /// Accepted work not carried out (target 0).
    lost_ops: usize,
    interrupted_ops: usize,
    /// Per kind: run, suspend, resume, terminate, exec, endpoint, build.
    by_kind: HashMap<&'static str, KindFigures>,
    endpoint_requests: Requests,
    /// Each loss as "round N kind target: what happened".
    lost: Vec<String>,
    /// Calls the live server refused (not losses: never accepted).
    refused: Vec<String>,
    /// QEMU processes no RUNNING microVM owns (and no live pool slot or build
    /// of the restarted server), after settling (target 0).
    orphaned_processes: usize,
    /// Network namespaces of the server no live QEMU uses, after settling
    /// (target 0).
    orphaned_netns: usize,
    /// clientTokens whose replay named another microVM (target 0).
    duplicate_microvms_per_client_token: usize,
    /// Network namespaces of the server left after every microVM was
    /// terminated and the server stopped (target 0).
    leftover_netns_at_end: usize,
    /// Rounds whose microVMs did not all settle within the timeout.
    unsettled_rounds: u32,
    /// From starting the server again to every microVM settled.
    time_to_settle_ms: Stats,
    /// From a build's acceptance to its end, over however many kills.
    build_seconds: Stats,
    /// Kills of the server that fell in the middle of an accepted build.
    builds_killed_mid_run: usize,
    kill_after_ms: Stats,
}

impl Report {
    fn kind(&mut self, kind: &'static str) -> &mut KindFigures {
        self.by_kind.entry(kind).or_default()
    }

    fn lose(&mut self, round: u32, kind: &'static str, what: String) {
        self.kind(kind).lost += 1;
        self.lost.push(format!("round {round} {kind} {what}"));
    }

    fn total(&mut self) {
        let kinds = self.by_kind.values();
        self.accepted_ops = kinds.clone().map(|k| k.accepted).sum();
        self.carried_out_after_restart = kinds
            .clone()
            .map(|k| k.carried_out_after_restart + k.failed_naming_restart)
            .sum();
        self.lost_ops = kinds.clone().map(|k| k.lost).sum();
        self.interrupted_ops = kinds.map(|k| k.interrupted).sum();
    }
}

/// One accepted state change: the microVM and the state it must end in.
#[derive(Debug, Clone)]
struct Accepted {
    kind: &'static str,
    microvm_id: String,
    expect: &'static str,
    client_token: Option<String>,
}

/// An accepted build: the version it makes.
#[derive(Debug, Clone)]
struct AcceptedBuild {
    version: String,
    round: u32,
    accepted_at: Instant,
    /// Kills of the server while it was unfinished.
    kills: usize,
}

/// What the round's exec and endpoint traffic did before and at the kill.
#[derive(Debug, Default)]
struct Interactive {
    /// The nonce the exec appended to [`MARKS`], if the exec was answered.
    exec_mark: Option<String>,
    exec_interrupted: bool,
    exec_failed: bool,
    requests_answered: usize,
    requests_interrupted: usize,
    requests_failed: usize,
    /// Why the first of them failed.
    request_failure: Option<String>,
    exec_failure: Option<String>,
}

const SETTLED: [&str; 3] = ["RUNNING", "SUSPENDED", "TERMINATED"];

pub async fn chaos(args: ChaosArgs) -> Result<ExitCode> {
    let work = tempfile::Builder::new()
        .prefix("hchaos-")
        .tempdir_in("/tmp")
        .context("temporary directory")?;
    let data = work.path().join("d");
    let hearth = std::env::current_exe().context("this executable")?;
    let mut run = Run {
        args,
        hearth,
        data,
        server: None,
    };
    // The work races SIGINT/SIGTERM; either way everything started ends.
    let outcome = tokio::select! {
        outcome = run.rounds(work.path()) => outcome,
        () = crate::signals::interrupted() => Err(anyhow::anyhow!("interrupted")),
    };
    let leftover_netns = run.clean_up().await;
    if let Some(keep) = &run.args.server_log {
        if let Err(err) = std::fs::copy(run.data.join("chaos-serve.log"), keep) {
            progress(&format!("cannot keep the server log: {err}"));
        }
    }
    let mut report = outcome?;
    report.leftover_netns_at_end = leftover_netns;
    report.total();
    if run.args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    Ok(ExitCode::SUCCESS)
}

/// The benchmark's state: what it started, to end it whatever happens.
struct Run {
    args: ChaosArgs,
    hearth: PathBuf,
    data: PathBuf,
    server: Option<Server>,
}

impl Run {
    async fn import(&self, work: &Path) -> Result<hearth_server::db::store::NewAccessKey> {
        let rootfs = work.join("rootfs");
        progress("unpacking the debian-12 root filesystem");
        unpack_base(&rootfs)?;
        hearth_vm::disk::create_private_dir_all(&self.data)?;
        let account = hearth_server::db::store::Store::open(&self.data)?.create_account("chaos")?;
        progress("importing an image (boot, start the app, snapshot)");
        let import = Command::new(&self.hearth)
            .args([
                "image",
                "import",
                "--account",
                &account.account_id,
                "--name",
                "chaos",
            ])
            .arg("--rootfs")
            .arg(&rootfs)
            .args([
                "--memory",
                &self.args.memory.to_string(),
                "--region",
                REGION,
                "--json",
            ])
            .arg("--data-dir")
            .arg(&self.data)
            .args([
                "--cmd",
                "python3",
                "-m",
                "http.server",
                &APP_PORT.to_string(),
            ])
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .context("hearth image import")?;
        if !import.status.success() {
            bail!(
                "the import failed: {}",
                String::from_utf8_lossy(&import.stderr)
            );
        }
        let _ = std::fs::remove_dir_all(&rootfs);
        Ok(account)
    }

    async fn start_server(&mut self) -> Result<()> {
        self.server = Some(Server::start(&self.hearth, &self.data, &self.args).await?);
        Ok(())
    }

    fn server(&self) -> Result<&Server> {
        self.server.as_ref().context("the server is not running")
    }

    async fn rounds(&mut self, work: &Path) -> Result<Report> {
        let account = self.import(work).await?;
        let mut report = Report {
            rounds: self.args.rounds,
            ..Report::default()
        };
        let mut settle = Vec::new();
        let mut build_seconds = Vec::new();
        // At most one build in flight; it may span rounds (and kills).
        let mut pending: Option<AcceptedBuild> = None;
        let mut kills = Vec::new();
        self.start_server().await?;
        if !self.args.no_builds {
            self.server()?
                .client(&account)?
                .s3_create_bucket(BUILD_BUCKET)
                .await?;
        }
        for round in 1..=self.args.rounds {
            progress(&format!("round {round}/{}", self.args.rounds));
            let server = self.server()?;
            let client = server.client(&account)?;
            let fleet = live(&client).await?;
            let plan = plan_round(&client, server, &fleet, round, !self.args.no_builds).await?;
            let kill_ms = rand::thread_rng().gen_range(0..self.args.max_kill_ms);
            let mut server = self.server.take().context("the server is not running")?;
            let fired = fire_and_kill(&client, plan, &mut server, kill_ms).await;
            kills.push(kill_ms as f64);
            tally_answers(&mut report, &fired);

            let restarted = Instant::now();
            self.start_server().await?;
            let server = self.server()?;
            let client = server.client(&account)?;
            let states =
                match wait_settled(&client, Duration::from_secs(self.args.settle_timeout)).await? {
                    Some(states) => {
                        settle.push(ms(restarted.elapsed()));
                        states
                    }
                    None => {
                        report.unsettled_rounds += 1;
                        list(&client).await?
                    }
                };
            check_state_changes(&mut report, &client, round, &fired.changes, &states).await?;
            if let Some(target) = &fired.target {
                check_interactive(&mut report, &client, server, round, target, &fired.io).await;
            }
            if let Some(mut build) = pending.take() {
                build.kills += 1;
                report.builds_killed_mid_run += 1;
                pending = Some(build);
            }
            if let Some(build) = &fired.build {
                pending = Some(AcceptedBuild {
                    round,
                    ..build.clone()
                });
            }
            // Ended already? (Else it runs on into the next rounds.)
            if let Some(build) = pending.take() {
                match wait_build(&client, &build.version, Duration::ZERO).await? {
                    Some(ended) => {
                        build_seconds.push(build.accepted_at.elapsed().as_secs_f64());
                        judge_build(&mut report, &build, Some(ended));
                    }
                    None => pending = Some(build),
                }
            }
            let running: HashSet<String> = states
                .iter()
                .filter(|(_, (state, _))| state == "RUNNING")
                .map(|(id, _)| vm_name(id))
                .collect();
            let orphans = orphans(&self.data, &running, server.started_ticks);
            if !orphans.is_empty() {
                report.lost.push(format!(
                    "round {round} orphaned QEMU processes: {orphans:?}"
                ));
            }
            report.orphaned_processes += orphans.len();
            if !self.args.no_vm_network {
                let netns = orphaned_netns(&self.data, &self.args.vm_net_name).await;
                if !netns.is_empty() {
                    report
                        .lost
                        .push(format!("round {round} orphaned namespaces: {netns:?}"));
                }
                report.orphaned_netns += netns.len();
            }
            trim_fleet(&client, &states, self.args.fleet as usize).await?;
        }
        if let Some(build) = pending.take() {
            progress(&format!(
                "waiting for the build of version {}",
                build.version
            ));
            let client = self.server()?.client(&account)?;
            let timeout = Duration::from_secs(self.args.build_timeout);
            let ended = wait_build(&client, &build.version, timeout).await?;
            if ended.is_some() {
                build_seconds.push(build.accepted_at.elapsed().as_secs_f64());
            }
            judge_build(&mut report, &build, ended);
        }
        report.time_to_settle_ms = Stats::of(settle);
        report.build_seconds = Stats::of(build_seconds);
        report.kill_after_ms = Stats::of(kills);
        // Terminated through the API, so the server takes down their networks.
        if let Ok(client) = self.server()?.client(&account) {
            if let Ok(states) = list(&client).await {
                for (id, (state, _)) in states {
                    if state != "TERMINATED" {
                        let _ = client
                            .call("TerminateMicrovm", json!({"microvmIdentifier": id}))
                            .await;
                    }
                }
                let _ = wait_settled(&client, Duration::from_secs(120)).await;
            }
        }
        Ok(report)
    }

    /// Ends the server, every QEMU of the data directory (by PID) and the VM
    /// networks (by name); returns how many of the server's namespaces were
    /// still there once it had stopped.
    async fn clean_up(&mut self) -> usize {
        if let Some(server) = self.server.take() {
            server.stop().await;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = qemu_processes(&self.data);
            if left.is_empty() {
                break;
            }
            for qemu in &left {
                // SAFETY: kill(2) with a pid read from /proc whose command
                // line names this run's own data directory; no memory is touched.
                unsafe {
                    libc::kill(qemu.pid as libc::pid_t, libc::SIGKILL);
                }
            }
            if Instant::now() > deadline {
                progress(&format!("{} QEMU processes would not end", left.len()));
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if self.args.no_vm_network {
            return 0;
        }
        let name = &self.args.vm_net_name;
        let namespaces = netns_named(name);
        for ns in &namespaces {
            let _ = quiet("ip", &["netns", "delete", ns]).await;
        }
        for link in links_named(name) {
            let _ = quiet("ip", &["link", "delete", &link]).await;
        }
        let _ = quiet("nft", &["delete", "table", "inet", name]).await;
        namespaces.len()
    }
}

/// Runs a command for its effect, output dropped.
async fn quiet(program: &str, args: &[&str]) -> Result<()> {
    let status = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await?;
    if !status.success() {
        bail!("{program} failed");
    }
    Ok(())
}

/// Network namespaces `NAME-*` (the server's VM networks).
fn netns_named(name: &str) -> Vec<String> {
    let prefix = format!("{name}-");
    std::fs::read_dir("/run/netns")
        .map(|dir| {
            dir.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|ns| ns.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default()
}

/// Host links `NAME<digits>` (the server's VM links).
fn links_named(name: &str) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/sys/class/net") else {
        return Vec::new();
    };
    entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|link| {
            link.strip_prefix(name)
                .is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()))
        })
        .collect()
}

/// A `hearth serve` child process on loopback ports.
#[derive(Debug)]
struct Server {
    child: Child,
    url: String,
    /// The endpoint proxy and the domain endpoint hosts end in.
    proxy: SocketAddr,
    endpoint_domain: String,
    /// When the process started (clock ticks since boot, /proc/PID/stat).
    started_ticks: u64,
}

impl Server {
    async fn start(hearth: &Path, data: &Path, args: &ChaosArgs) -> Result<Server> {
        let mut command = Command::new(hearth);
        command
            .arg("serve")
            .arg("--data-dir")
            .arg(data)
            .args([
                "--listen",
                "127.0.0.1:0",
                "--endpoint-listen",
                "127.0.0.1:0",
            ])
            .args(["--region", REGION]);
        if args.no_vm_network {
            command.arg("--no-vm-network");
        } else {
            command
                .args(["--vm-net-name", &args.vm_net_name])
                .args(["--vm-address-pool", &args.vm_address_pool]);
        }
        for op in [
            "RunMicrovm",
            "SuspendMicrovm",
            "ResumeMicrovm",
            "TerminateMicrovm",
            "GetMicrovm",
            "ListMicrovms",
            "CreateMicrovmAuthToken",
            "CreateMicrovmImage",
            "UpdateMicrovmImage",
            "GetMicrovmImage",
            "ListMicrovmImageBuilds",
            "GetMicrovmImageBuild",
        ] {
            command.args(["--rate-limit", &format!("{op}=1000")]);
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(data.join("chaos-serve.log"))
            .context("server log")?;
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("hearth serve")?;
        let started_ticks = child.id().and_then(start_ticks).unwrap_or(0);
        let stdout = child.stdout.take().context("server stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let started = tokio::time::timeout(Duration::from_secs(300), async {
            let mut url = None;
            while let Some(line) = lines.next_line().await? {
                // "hearth: listening on http://ADDR", then
                // "hearth: endpoints on http://<microvm-id>.DOMAIN:PORT".
                let Some(last) = line.trim().rsplit(' ').next() else {
                    continue;
                };
                if line.contains("listening on") {
                    url = Some(last.to_string());
                } else if let (Some(url), Some(host)) =
                    (&url, last.strip_prefix("http://<microvm-id>."))
                {
                    return Ok::<_, std::io::Error>(Some((url.clone(), host.to_string())));
                }
            }
            Ok(None)
        })
        .await;
        let (url, host) = match started {
            Ok(Ok(Some(found))) => found,
            _ => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                bail!(
                    "the server did not start (see {}/chaos-serve.log)",
                    data.display()
                );
            }
        };
        let (endpoint_domain, port) = host
            .rsplit_once(':')
            .context("the endpoint line has no port")?;
        let proxy = SocketAddr::from(([127, 0, 0, 1], port.parse().context("endpoint port")?));
        // Keep reading so the pipe never fills.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Server {
            child,
            url,
            proxy,
            endpoint_domain: endpoint_domain.to_string(),
            started_ticks,
        })
    }

    fn client(&self, account: &hearth_server::db::store::NewAccessKey) -> Result<Client> {
        Ok(Client::new(ClientConfig::new(
            &self.url,
            REGION,
            &account.access_key_id,
            &account.secret_access_key,
        )?))
    }

    fn endpoint(&self, microvm_id: &str, token: String) -> Endpoint {
        Endpoint::new(
            self.proxy,
            format!(
                "{microvm_id}.{}:{}",
                self.endpoint_domain,
                self.proxy.port()
            ),
            token,
        )
    }

    async fn kill9(&mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }

    async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            // SAFETY: kill(2) on our own child's pid; no memory is touched.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGTERM);
            }
        }
        if tokio::time::timeout(Duration::from_secs(15), self.child.wait())
            .await
            .is_err()
        {
            self.kill9().await;
        }
    }
}

/// What a round fires.
struct Plan {
    /// (kind, operation, input, expected state, clientToken)
    changes: Vec<(
        &'static str,
        &'static str,
        Value,
        &'static str,
        Option<String>,
    )>,
    /// A RUNNING microVM no change targets, with an endpoint token for it.
    target: Option<(String, Endpoint)>,
    /// CreateMicrovmImage or UpdateMicrovmImage and its input.
    build: Option<(&'static str, Value)>,
    nonce: String,
}

/// Picks the round's calls; each microVM gets at most one state change.
async fn plan_round(
    client: &Client,
    server: &Server,
    fleet: &HashMap<String, String>,
    round: u32,
    builds: bool,
) -> Result<Plan> {
    let (mut running, mut suspended, nonce) = {
        let mut rng = rand::thread_rng();
        let mut of = |want: &str| {
            let mut ids: Vec<String> = fleet
                .iter()
                .filter(|(_, s)| *s == want)
                .map(|(id, _)| id.clone())
                .collect();
            ids.shuffle(&mut rng);
            ids
        };
        let (running, suspended) = (of("RUNNING"), of("SUSPENDED"));
        (running, suspended, format!("{:016x}", rng.gen::<u64>()))
    };
    let mut changes = Vec::new();
    for k in 0..2 {
        let token = format!("chaos-{round}-{k}-{nonce}");
        changes.push((
            "run",
            "RunMicrovm",
            json!({"imageIdentifier": "chaos", "clientToken": token}),
            "RUNNING",
            Some(token),
        ));
    }
    // The exec and endpoint target is kept out of the state changes.
    let target_id = running.pop();
    if let Some(id) = running.pop() {
        changes.push((
            "suspend",
            "SuspendMicrovm",
            json!({"microvmIdentifier": id}),
            "SUSPENDED",
            None,
        ));
    }
    if let Some(id) = suspended.pop() {
        changes.push((
            "resume",
            "ResumeMicrovm",
            json!({"microvmIdentifier": id}),
            "RUNNING",
            None,
        ));
    }
    if fleet.len() > 2 {
        if let Some(id) = running.pop().or_else(|| suspended.pop()) {
            changes.push((
                "terminate",
                "TerminateMicrovm",
                json!({"microvmIdentifier": id}),
                "TERMINATED",
                None,
            ));
        }
    }
    let target = match target_id {
        Some(id) => {
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
            let endpoint = server.endpoint(&id, token);
            Some((id, endpoint))
        }
        None => None,
    };
    let build = if builds {
        plan_build(client, round).await?
    } else {
        None
    };
    Ok(Plan {
        changes,
        target,
        build,
        nonce,
    })
}

/// A build of a new version, unless one is in flight (the image busy, maybe
/// from a call whose answer the kill swallowed). Its artifact is uploaded now.
async fn plan_build(client: &Client, round: u32) -> Result<Option<(&'static str, Value)>> {
    let image = client
        .call("GetMicrovmImage", json!({"imageIdentifier": BUILD_IMAGE}))
        .await;
    let operation = match image {
        Ok(image) => {
            let busy = matches!(
                image["state"].as_str(),
                Some("CREATING" | "UPDATING" | "DELETING")
            );
            if busy {
                return Ok(None);
            }
            "UpdateMicrovmImage"
        }
        Err(err) if err.code() == Some("ResourceNotFoundException") => "CreateMicrovmImage",
        Err(err) => return Err(err.into()),
    };
    let key = format!("round-{round}.zip");
    client
        .s3_put_object(BUILD_BUCKET, &key, build_artifact(round)?)
        .await?;
    let mut input = json!({
        "baseImageArn": format!("arn:aws:lambda:{REGION}:aws:microvm-image:debian-12"),
        "buildRoleArn": "arn:aws:iam::000000000000:role/chaos",
        "codeArtifact": {"uri": format!("s3://{BUILD_BUCKET}/{key}")},
        "resources": [{"minimumMemoryInMiB": 512}],
    });
    if operation == "CreateMicrovmImage" {
        input["name"] = json!(BUILD_IMAGE);
    } else {
        input["imageIdentifier"] = json!(BUILD_IMAGE);
    }
    Ok(Some((operation, input)))
}

/// A tiny Dockerfile: the base image and one RUN step new in every round
/// (so each build really runs a step, not only the cache).
fn build_artifact(round: u32) -> Result<Vec<u8>> {
    use std::io::Write;
    let dockerfile =
        format!("FROM debian-12\nRUN echo chaos round {round}\nCMD [\"sleep\", \"infinity\"]\n");
    let mut out = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    out.start_file("Dockerfile", zip::write::SimpleFileOptions::default())?;
    out.write_all(dockerfile.as_bytes())?;
    Ok(out.finish()?.into_inner())
}

/// What came back before and at the kill.
struct Fired {
    /// State changes answered with success.
    changes: Vec<Accepted>,
    /// State-change calls that got no answer.
    /// Kinds of the state-change calls that got no answer.
    changes_interrupted: Vec<&'static str>,
    /// State-change calls the live server refused (capacity, conflicts).
    changes_refused: Vec<(&'static str, String)>,
    target: Option<(String, Endpoint)>,
    io: Interactive,
    build: Option<AcceptedBuild>,
    build_interrupted: bool,
    build_refused: Option<String>,
}

/// Fires the round's calls together and kills the server after `kill_ms`.
/// Endpoint traffic runs until the kill, so requests are in flight then.
async fn fire_and_kill(client: &Client, plan: Plan, server: &mut Server, kill_ms: u64) -> Fired {
    let killed = AtomicBool::new(false);
    let killed = &killed;
    let changes = futures::future::join_all(plan.changes.into_iter().map(
        |(kind, operation, input, expect, client_token)| async move {
            let id = input["microvmIdentifier"].as_str().map(str::to_string);
            let answer = match client.call(operation, input).await {
                Ok(out) => match id.or_else(|| out["microvmId"].as_str().map(str::to_string)) {
                    Some(microvm_id) => Answer::Accepted(Accepted {
                        kind,
                        microvm_id,
                        expect,
                        client_token,
                    }),
                    None => Answer::Refused(format!("{operation}: no microvmId in {out}")),
                },
                Err(_) if killed.load(Ordering::SeqCst) => Answer::Interrupted,
                Err(err) => Answer::Refused(format!("{operation}: {err}")),
            };
            (kind, answer)
        },
    ));
    let target = plan.target;
    let nonce = plan.nonce;
    let exec = async {
        let Some((id, _)) = &target else {
            return Answer::<String>::Skipped;
        };
        let script = format!("echo {nonce} >> {MARKS}");
        match client
            .call_extension(
                http::Method::POST,
                &format!("/hearth/2025-09-09/microvms/{id}/exec"),
                json!({"argv": ["sh", "-c", script], "timeoutInSeconds": 60}),
            )
            .await
        {
            Ok(out) if out["exitCode"] == 0 => Answer::Accepted(nonce.clone()),
            Ok(out) => Answer::Refused(format!("exit {}", out["exitCode"])),
            Err(_) if killed.load(Ordering::SeqCst) => Answer::Interrupted,
            Err(err) => Answer::Refused(err.to_string()),
        }
    };
    let requests = async {
        let mut io = Interactive::default();
        let Some((_, endpoint)) = &target else {
            return io;
        };
        while !killed.load(Ordering::SeqCst) {
            // A new connection per request: the app (python's http.server,
            // HTTP/1.0) closes each one after its response.
            let ok = async {
                let mut sender = endpoint.connect().await?;
                sender.ready().await?;
                let response = sender.send_request(endpoint.request("/")?).await?;
                let status = response.status();
                response.into_body().collect().await?;
                if status != http::StatusCode::OK {
                    bail!("answered {status}");
                }
                Ok::<(), anyhow::Error>(())
            };
            match tokio::time::timeout(Duration::from_secs(30), ok).await {
                Ok(Ok(())) => io.requests_answered += 1,
                _ if killed.load(Ordering::SeqCst) => io.requests_interrupted += 1,
                failed => {
                    io.requests_failed += 1;
                    if io.request_failure.is_none() {
                        io.request_failure = Some(match failed {
                            Ok(Err(err)) => format!("endpoint request: {err:#}"),
                            _ => "endpoint request: no answer within 30 s".into(),
                        });
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        io
    };
    let build = async {
        let Some((operation, input)) = &plan.build else {
            return Answer::Skipped;
        };
        match client.call(operation, input.clone()).await {
            Ok(out) => match out["imageVersion"].as_str() {
                Some(version) => Answer::Accepted(AcceptedBuild {
                    version: version.to_string(),
                    round: 0,
                    accepted_at: Instant::now(),
                    kills: 0,
                }),
                None => Answer::Refused(format!("{operation}: no imageVersion in {out}")),
            },
            Err(_) if killed.load(Ordering::SeqCst) => Answer::Interrupted,
            Err(err) => Answer::Refused(format!("{operation}: {err}")),
        }
    };
    // The calls race the kill: whatever the server answered before it died counts.
    let load = async { futures::join!(changes, exec, requests, build) };
    tokio::pin!(load);
    let killer = tokio::time::sleep(Duration::from_millis(kill_ms));
    tokio::pin!(killer);
    let (answers, exec, mut io, build) = tokio::select! {
        done = &mut load => {
            (&mut killer).await;
            killed.store(true, Ordering::SeqCst);
            server.kill9().await;
            done
        }
        _ = &mut killer => {
            killed.store(true, Ordering::SeqCst);
            server.kill9().await;
            load.await
        }
    };
    let mut fired = Fired {
        changes: Vec::new(),
        changes_interrupted: Vec::new(),
        changes_refused: Vec::new(),
        target: target.clone(),
        io: Interactive::default(),
        build: None,
        build_interrupted: false,
        build_refused: None,
    };
    for (kind, answer) in answers {
        match answer {
            Answer::Accepted(op) => fired.changes.push(op),
            Answer::Interrupted => fired.changes_interrupted.push(kind),
            Answer::Refused(why) => fired.changes_refused.push((kind, why)),
            Answer::Skipped => {}
        }
    }
    match exec {
        Answer::Accepted(mark) => io.exec_mark = Some(mark),
        Answer::Interrupted => io.exec_interrupted = true,
        Answer::Refused(why) => {
            io.exec_failed = true;
            io.exec_failure = Some(format!("exec: {why}"));
        }
        Answer::Skipped => {}
    }
    fired.io = io;
    match build {
        Answer::Accepted(build) => fired.build = Some(build),
        Answer::Interrupted => fired.build_interrupted = true,
        Answer::Refused(why) => fired.build_refused = Some(why),
        Answer::Skipped => {}
    }
    fired
}

enum Answer<T> {
    Accepted(T),
    Interrupted,
    Refused(String),
    Skipped,
}

/// Counts what the server answered before the kill.
fn tally_answers(report: &mut Report, fired: &Fired) {
    for op in &fired.changes {
        report.kind(op.kind).accepted += 1;
    }
    for kind in &fired.changes_interrupted {
        report.kind(kind).interrupted += 1;
    }
    for (kind, why) in &fired.changes_refused {
        report.kind(kind).refused += 1;
        report.refused.push(why.clone());
    }
    report.refused.extend(fired.build_refused.iter().cloned());
    report.refused.extend(fired.io.exec_failure.iter().cloned());
    report
        .refused
        .extend(fired.io.request_failure.iter().cloned());
    let exec = report.kind("exec");
    if fired.io.exec_mark.is_some() {
        exec.accepted += 1;
    }
    exec.interrupted += usize::from(fired.io.exec_interrupted);
    exec.refused += usize::from(fired.io.exec_failed);
    let endpoint = report.kind("endpoint");
    endpoint.accepted += usize::from(fired.io.requests_answered > 0);
    endpoint.interrupted += usize::from(fired.io.requests_interrupted > 0);
    endpoint.refused += usize::from(fired.io.requests_failed > 0);
    report.endpoint_requests.answered += fired.io.requests_answered;
    report.endpoint_requests.interrupted += fired.io.requests_interrupted;
    report.endpoint_requests.failed += fired.io.requests_failed;
    let build = report.kind("build");
    build.accepted += usize::from(fired.build.is_some());
    build.interrupted += usize::from(fired.build_interrupted);
    build.refused += usize::from(fired.build_refused.is_some());
}

/// Each accepted state change reached its state; each clientToken still
/// names its one microVM.
async fn check_state_changes(
    report: &mut Report,
    client: &Client,
    round: u32,
    accepted: &[Accepted],
    states: &HashMap<String, (String, String)>,
) -> Result<()> {
    for op in accepted {
        let (state, reason) = states
            .get(&op.microvm_id)
            .cloned()
            .unwrap_or_else(|| ("MISSING".into(), String::new()));
        if state == op.expect {
            report.kind(op.kind).carried_out_after_restart += 1;
        } else {
            report.lose(
                round,
                op.kind,
                format!("{}: ended {state} ({reason})", op.microvm_id),
            );
        }
        if let Some(token) = &op.client_token {
            let replay = client
                .call(
                    "RunMicrovm",
                    json!({"imageIdentifier": "chaos", "clientToken": token}),
                )
                .await?;
            if replay["microvmId"].as_str() != Some(op.microvm_id.as_str()) {
                report.duplicate_microvms_per_client_token += 1;
            }
        }
    }
    Ok(())
}

/// The promise for exec and endpoint traffic: after the restart the same
/// guest answers exec (with every answered exec's mark) and its endpoint.
async fn check_interactive(
    report: &mut Report,
    client: &Client,
    server: &Server,
    round: u32,
    (id, before): &(String, Endpoint),
    io: &Interactive,
) {
    let marks = client
        .call_extension(
            http::Method::POST,
            &format!("/hearth/2025-09-09/microvms/{id}/exec"),
            json!({"argv": ["sh", "-c", format!("cat {MARKS} 2>/dev/null; true")], "timeoutInSeconds": 60}),
        )
        .await;
    match marks {
        Ok(out) if out["exitCode"] == 0 => {
            let stdout = exec_stdout(&out);
            match &io.exec_mark {
                Some(mark) if !stdout.lines().any(|line| line == mark) => report.lose(
                    round,
                    "exec",
                    format!("{id}: answered, but its mark is gone (not the same guest?)"),
                ),
                Some(_) => report.kind("exec").carried_out_after_restart += 1,
                None => {}
            }
        }
        Ok(out) => report.lose(
            round,
            "exec",
            format!("{id}: exec after the restart exited {}", out["exitCode"]),
        ),
        Err(err) => report.lose(
            round,
            "exec",
            format!("{id}: no exec after the restart: {err}"),
        ),
    }
    // The token minted before the kill still opens the endpoint.
    let after = server.endpoint(id, before.token().to_string());
    match poll_until_200(&after).await {
        Ok(_) if io.requests_answered > 0 => {
            report.kind("endpoint").carried_out_after_restart += 1;
        }
        Ok(_) => {}
        Err(err) => report.lose(
            round,
            "endpoint",
            format!("{id}: no 200 through the proxy after the restart: {err}"),
        ),
    }
}

/// The exec extension's stdout (base64 in `stdout`, or text).
fn exec_stdout(out: &Value) -> String {
    use base64::Engine as _;
    let raw = out["stdout"].as_str().unwrap_or_default();
    base64::engine::general_purpose::STANDARD
        .decode(raw)
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_else(|_| raw.to_string())
}

/// A build's end: Some((state, reason)) once SUCCESSFUL or FAILED, None if
/// still PENDING or IN_PROGRESS at the deadline.
async fn wait_build(
    client: &Client,
    version: &str,
    timeout: Duration,
) -> Result<Option<(String, String)>> {
    let deadline = Instant::now() + timeout;
    loop {
        let builds = client
            .call(
                "ListMicrovmImageBuilds",
                json!({"imageIdentifier": BUILD_IMAGE, "imageVersion": version}),
            )
            .await?;
        if let Some(build_id) = builds["items"][0]["buildId"].as_str() {
            let build = client
                .call(
                    "GetMicrovmImageBuild",
                    json!({"imageIdentifier": BUILD_IMAGE, "imageVersion": version, "buildId": build_id}),
                )
                .await?;
            let state = build["buildState"].as_str().unwrap_or_default();
            if matches!(state, "SUCCESSFUL" | "FAILED") {
                let reason = build["stateReason"].to_string();
                return Ok(Some((state.to_string(), reason)));
            }
        }
        if Instant::now() > deadline {
            return Ok(None);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn judge_build(report: &mut Report, build: &AcceptedBuild, ended: Option<(String, String)>) {
    let round = build.round;
    match ended {
        Some((state, _)) if state == "SUCCESSFUL" => {
            report.kind("build").carried_out_after_restart += 1;
        }
        Some((_, reason)) if reason.to_lowercase().contains("restart") => {
            report.kind("build").failed_naming_restart += 1;
        }
        Some((state, reason)) => report.lose(
            round,
            "build",
            format!(
                "version {}: ended {state} ({reason}) after {} kills",
                build.version, build.kills
            ),
        ),
        None => report.lose(
            round,
            "build",
            format!("version {}: still not finished (stuck)", build.version),
        ),
    }
}

/// Every microVM of the account: id -> (state, stateReason).
async fn list(client: &Client) -> Result<HashMap<String, (String, String)>> {
    let mut out = HashMap::new();
    let mut token: Option<String> = None;
    loop {
        let mut input = json!({"maxResults": 50});
        if let Some(token) = &token {
            input["nextToken"] = json!(token);
        }
        let page = client.call("ListMicrovms", input).await?;
        for item in page["items"].as_array().into_iter().flatten() {
            let id = item["microvmId"].as_str().unwrap_or_default().to_string();
            out.insert(
                id,
                (
                    item["state"].as_str().unwrap_or("?").to_string(),
                    String::new(),
                ),
            );
        }
        match page["nextToken"].as_str() {
            Some(next) => token = Some(next.to_string()),
            None => break,
        }
    }
    // The reason of each non-running one, for the report.
    for (id, (state, reason)) in out.iter_mut() {
        if state == "TERMINATED" {
            if let Ok(vm) = client
                .call("GetMicrovm", json!({"microvmIdentifier": id}))
                .await
            {
                *reason = vm["stateReason"].as_str().unwrap_or_default().to_string();
            }
        }
    }
    Ok(out)
}

/// Live microVMs: id -> state.
async fn live(client: &Client) -> Result<HashMap<String, String>> {
    Ok(list(client)
        .await?
        .into_iter()
        .filter(|(_, (state, _))| state != "TERMINATED")
        .map(|(id, (state, _))| (id, state))
        .collect())
}

/// Waits until no microVM is PENDING, SUSPENDING or TERMINATING; None on timeout.
async fn wait_settled(
    client: &Client,
    timeout: Duration,
) -> Result<Option<HashMap<String, (String, String)>>> {
    let deadline = Instant::now() + timeout;
    loop {
        let states = list(client).await?;
        if states
            .values()
            .all(|(state, _)| SETTLED.contains(&state.as_str()))
        {
            return Ok(Some(states));
        }
        if Instant::now() > deadline {
            return Ok(None);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Terminates live microVMs beyond `keep` (any beyond it), and waits for them.
async fn trim_fleet(
    client: &Client,
    states: &HashMap<String, (String, String)>,
    keep: usize,
) -> Result<()> {
    let mut live: Vec<&String> = states
        .iter()
        .filter(|(_, (state, _))| state != "TERMINATED")
        .map(|(id, _)| id)
        .collect();
    live.sort();
    if live.len() <= keep {
        return Ok(());
    }
    for id in &live[keep..] {
        client
            .call("TerminateMicrovm", json!({"microvmIdentifier": id}))
            .await?;
    }
    wait_settled(client, Duration::from_secs(120)).await?;
    Ok(())
}

/// The engine's VM directory name of a microVM id.
fn vm_name(microvm_id: &str) -> String {
    hearth_server::layout::microvm_vm_name(microvm_id.trim_start_matches("microvm-"))
}

/// A live QEMU process of the data directory.
#[derive(Debug)]
struct Qemu {
    pid: u32,
    /// The directory its command line names under `engine/vms/` (a VM name,
    /// or a warm pool slot's `.pool-ID`).
    dir: String,
    /// Its instance id (`-name hearth-<instance>`), which names its namespace.
    instance: String,
    started_ticks: u64,
}

/// When a process started, in clock ticks since boot (field 22 of its stat).
fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Live QEMU processes running VMs of `data`.
fn qemu_processes(data: &Path) -> Vec<Qemu> {
    let vms = format!("{}/", data.join("engine").join("vms").display());
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let zombie = std::fs::read_to_string(entry.path().join("stat"))
            .ok()
            .and_then(|stat| {
                stat.rsplit_once(')')
                    .map(|(_, rest)| rest.trim_start().starts_with('Z'))
            })
            .unwrap_or(true);
        let argv: Vec<String> = raw
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if zombie || !argv.first().is_some_and(|a| a.contains("qemu-system")) {
            continue;
        }
        if let Some(dir) = argv.iter().find_map(|arg| {
            let (_, rest) = arg.split_once(&vms)?;
            Some(rest.split('/').next().unwrap_or_default().to_string())
        }) {
            let instance = argv
                .iter()
                .skip_while(|a| *a != "-name")
                .nth(1)
                .and_then(|n| n.strip_prefix("hearth-"))
                .unwrap_or_default()
                .to_string();
            found.push(Qemu {
                pid,
                dir,
                instance,
                started_ticks: start_ticks(pid).unwrap_or(0),
            });
        }
    }
    found
}

/// The VM name each launched warm pool slot directory carries (`vms/NAME`
/// is a symlink to `.pool-ID`).
fn slot_names(data: &Path) -> HashMap<String, String> {
    let vms = data.join("engine").join("vms");
    let mut names = HashMap::new();
    for entry in std::fs::read_dir(&vms).into_iter().flatten().flatten() {
        if let Ok(target) = std::fs::read_link(entry.path()) {
            if let Some(slot) = target.file_name() {
                names.insert(
                    slot.to_string_lossy().into_owned(),
                    entry.file_name().to_string_lossy().into_owned(),
                );
            }
        }
    }
    names
}

/// QEMU processes nothing owns: a microVM's that is not RUNNING, a second
/// process of one VM, or any other (unlaunched pool slot, build VM) started
/// before the current server, which cannot own it. Returns their VM names.
fn orphans(data: &Path, running: &HashSet<String>, server_started: u64) -> Vec<String> {
    let slots = slot_names(data);
    let mut seen = HashSet::new();
    let mut found = Vec::new();
    for qemu in qemu_processes(data) {
        let name = slots.get(&qemu.dir).cloned().unwrap_or(qemu.dir);
        let orphan = if name.starts_with("mv-") {
            !running.contains(&name) || !seen.insert(name.clone())
        } else {
            qemu.started_ticks < server_started
        };
        if orphan {
            found.push(name);
        }
    }
    found
}

/// The server's network namespaces no live QEMU uses, seen twice 2 s apart
/// (one being made for a VM about to start is not counted).
async fn orphaned_netns(data: &Path, name: &str) -> Vec<String> {
    let unused = || {
        let live: HashSet<String> = qemu_processes(data)
            .into_iter()
            .map(|q| format!("{name}-{}", q.instance))
            .collect();
        let spare = format!("{name}-spare-");
        netns_named(name)
            .into_iter()
            // Spares are the running server's, made ahead for launches.
            .filter(|ns| !live.contains(ns) && !ns.starts_with(&spare))
            .collect::<HashSet<String>>()
    };
    let first = unused();
    if first.is_empty() {
        return Vec::new();
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let second = unused();
    first.intersection(&second).cloned().collect()
}

fn print_table(r: &Report) {
    println!(
        "hearth bench chaos: {} rounds, kill -9 of the server in each",
        r.rounds
    );
    println!(
        "{:<22} {:>9} {:>11} {:>6} {:>12} {:>12}",
        "kind", "accepted", "carried out", "lost", "interrupted", "refused"
    );
    let mut kinds: Vec<_> = r.by_kind.iter().collect();
    kinds.sort_by_key(|(kind, _)| *kind);
    for (kind, k) in kinds {
        let carried = if k.failed_naming_restart > 0 {
            format!(
                "{}+{}f",
                k.carried_out_after_restart, k.failed_naming_restart
            )
        } else {
            k.carried_out_after_restart.to_string()
        };
        println!(
            "{:<22} {:>9} {:>11} {:>6} {:>12} {:>12}",
            kind, k.accepted, carried, k.lost, k.interrupted, k.refused
        );
    }
    println!("accepted operations            {:>8}", r.accepted_ops);
    println!(
        "carried out after the restart  {:>8}",
        r.carried_out_after_restart
    );
    println!("lost                           {:>8}", r.lost_ops);
    println!("interrupted (never answered)   {:>8}", r.interrupted_ops);
    let q = &r.endpoint_requests;
    println!(
        "endpoint requests              {:>8} answered, {} interrupted, {} failed live",
        q.answered, q.interrupted, q.failed
    );
    println!("orphaned QEMU processes        {:>8}", r.orphaned_processes);
    println!(
        "duplicate microVMs per token   {:>8}",
        r.duplicate_microvms_per_client_token
    );
    println!("orphaned namespaces            {:>8}", r.orphaned_netns);
    println!(
        "kills in the middle of a build {:>8}",
        r.builds_killed_mid_run
    );
    println!(
        "namespaces left at the end     {:>8}",
        r.leftover_netns_at_end
    );
    println!("rounds not settled in time     {:>8}", r.unsettled_rounds);
    for (name, s) in [
        ("time to settle, ms", &r.time_to_settle_ms),
        ("build accepted to ended, s", &r.build_seconds),
        ("kill after the calls, ms", &r.kill_after_ms),
    ] {
        println!(
            "{name:<30} p50 {:.0}  p95 {:.0}  max {:.0}  (n {})",
            s.p50, s.p95, s.max, s.n
        );
    }
    for lost in &r.lost {
        println!("lost: {lost}");
    }
}

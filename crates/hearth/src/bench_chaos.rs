//! `hearth bench chaos`: crash safety under load. Each round fires a mix of
//! API calls at a real `hearth serve` (RunMicrovm with a clientToken,
//! SuspendMicrovm, ResumeMicrovm, TerminateMicrovm, an exec), kills the
//! server with SIGKILL at a random moment while they are in flight, starts it
//! again on the same data directory and checks that every call it had
//! answered was carried out: a run ends RUNNING, a suspend SUSPENDED, a resume
//! RUNNING, a terminate TERMINATED. It also counts QEMU processes no RUNNING
//! microVM owns and clientTokens that made a second microVM, and measures the
//! time from the restart until every microVM is settled.
//!
//! The server is a child process (`hearth serve`, this binary) so it can be
//! killed; the image is made with `hearth image import` from the cached
//! `debian-12` root filesystem. Builds are not part of the mix (one takes
//! minutes under TCG); the build restart is tested in tests/python.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use hearth_client::{Client, ClientConfig};
use rand::seq::SliceRandom;
use rand::Rng;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::measure::{ms, unpack_base, Stats};
use crate::progress::progress;

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
}

#[derive(Debug, Default, Serialize)]
struct Report {
    rounds: u32,
    /// Calls the server answered with success before it was killed.
    accepted_ops: usize,
    /// Accepted state changes whose microVM reached the asked state.
    carried_out_after_restart: usize,
    /// Accepted state changes whose microVM did not (target 0).
    lost_ops: usize,
    /// Of the accepted calls, how many of each operation.
    accepted_by_operation: HashMap<String, usize>,
    /// Lost changes, each as "operation microvm-id: ended STATE (reason)".
    lost: Vec<String>,
    /// QEMU processes no RUNNING microVM owns, after settling (target 0).
    orphaned_processes: usize,
    /// clientTokens whose replay named another microVM (target 0).
    duplicate_microvms_per_client_token: usize,
    /// Exec calls answered (not a state change; not carried over a restart).
    execs_answered: usize,
    /// Rounds whose microVMs did not all settle within the timeout.
    unsettled_rounds: u32,
    /// From starting the server again to every microVM settled.
    time_to_settle_ms: Stats,
    kill_after_ms: Stats,
}

/// One accepted state change: the microVM and the state it must end in.
#[derive(Debug, Clone)]
struct Accepted {
    operation: &'static str,
    microvm_id: String,
    expect: &'static str,
    client_token: Option<String>,
}

const SETTLED: [&str; 3] = ["RUNNING", "SUSPENDED", "TERMINATED"];

pub async fn chaos(args: ChaosArgs) -> Result<ExitCode> {
    let work = tempfile::Builder::new()
        .prefix("hc")
        .tempdir_in("/tmp")
        .context("temporary directory")?;
    let data = work.path().join("d");
    let rootfs = work.path().join("rootfs");
    let hearth = std::env::current_exe().context("this executable")?;
    progress("unpacking the debian-12 root filesystem");
    unpack_base(&rootfs)?;
    hearth_vm::disk::create_private_dir_all(&data)?;
    let account = hearth_server::db::store::Store::open(&data)?.create_account("chaos")?;
    progress("importing an image (boot, start the app, snapshot)");
    let import = Command::new(&hearth)
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
            &args.memory.to_string(),
            "--region",
            "us-east-1",
            "--json",
        ])
        .arg("--data-dir")
        .arg(&data)
        .args(["--cmd", "python3", "-m", "http.server", "8080"])
        .stdin(Stdio::null())
        .output()
        .await
        .context("hearth image import")?;
    if !import.status.success() {
        bail!(
            "the import failed: {}",
            String::from_utf8_lossy(&import.stderr)
        );
    }

    let mut report = Report {
        rounds: args.rounds,
        ..Report::default()
    };
    let mut settle = Vec::new();
    let mut kills = Vec::new();
    let mut server = Server::start(&hearth, &data).await?;
    let outcome = async {
        for round in 0..args.rounds {
            progress(&format!("round {}/{}", round + 1, args.rounds));
            let client = server.client(&account)?;
            let fleet = live(&client).await?;
            let (accepted, execs, kill_ms) =
                fire_and_kill(&client, &fleet, round, &mut server, args.max_kill_ms).await?;
            kills.push(kill_ms as f64);
            report.execs_answered += execs;
            report.accepted_ops += accepted.len();
            for op in &accepted {
                *report
                    .accepted_by_operation
                    .entry(op.operation.to_string())
                    .or_default() += 1;
            }
            let restarted = Instant::now();
            server = Server::start(&hearth, &data).await?;
            let client = server.client(&account)?;
            let states =
                match wait_settled(&client, Duration::from_secs(args.settle_timeout)).await? {
                    Some(states) => {
                        settle.push(ms(restarted.elapsed()));
                        states
                    }
                    None => {
                        report.unsettled_rounds += 1;
                        list(&client).await?
                    }
                };
            for op in &accepted {
                let (state, reason) = states
                    .get(&op.microvm_id)
                    .cloned()
                    .unwrap_or_else(|| ("MISSING".into(), String::new()));
                if state == op.expect {
                    report.carried_out_after_restart += 1;
                } else {
                    report.lost_ops += 1;
                    report.lost.push(format!(
                        "round {} {} {}: ended {state} ({reason})",
                        round + 1,
                        op.operation,
                        op.microvm_id
                    ));
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
            let running: HashSet<String> = states
                .iter()
                .filter(|(_, (state, _))| state == "RUNNING")
                .map(|(id, _)| vm_name(id))
                .collect();
            report.orphaned_processes += orphans(&data, &running);
            trim_fleet(&client, &states, args.fleet as usize).await?;
        }
        Ok::<(), anyhow::Error>(())
    }
    .await;
    // Whatever happened: the server stops and no guest of this run stays.
    if let Ok(client) = server.client(&account) {
        if let Ok(states) = list(&client).await {
            for (id, (state, _)) in states {
                if state != "TERMINATED" {
                    let _ = client
                        .call("TerminateMicrovm", json!({"microvmIdentifier": id}))
                        .await;
                }
            }
            let _ = wait_settled(&client, Duration::from_secs(60)).await;
        }
    }
    server.stop().await;
    for (pid, _) in qemu_processes(&data) {
        // SAFETY: kill(2) with a pid read from /proc whose command line names
        // this run's own data directory; no memory is touched.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGKILL);
        }
    }
    outcome?;
    report.time_to_settle_ms = Stats::of(settle);
    report.kill_after_ms = Stats::of(kills);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    Ok(ExitCode::SUCCESS)
}

/// A `hearth serve` child process on loopback ports.
#[derive(Debug)]
struct Server {
    child: Child,
    url: String,
}

impl Server {
    async fn start(hearth: &Path, data: &Path) -> Result<Server> {
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
            .args(["--region", "us-east-1"]);
        for op in [
            "RunMicrovm",
            "SuspendMicrovm",
            "ResumeMicrovm",
            "TerminateMicrovm",
            "GetMicrovm",
            "ListMicrovms",
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
        let stdout = child.stdout.take().context("server stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let url = tokio::time::timeout(Duration::from_secs(300), async {
            while let Some(line) = lines.next_line().await? {
                if line.contains("listening on") {
                    if let Some(url) = line.trim().rsplit(' ').next() {
                        return Ok::<_, std::io::Error>(Some(url.to_string()));
                    }
                }
            }
            Ok(None)
        })
        .await
        .context("the server did not start in 300 s")??
        .context("the server exited before listening")?;
        // Keep reading so the pipe never fills.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Server { child, url })
    }

    fn client(&self, account: &hearth_server::db::store::NewAccessKey) -> Result<Client> {
        Ok(Client::new(ClientConfig::new(
            &self.url,
            "us-east-1",
            &account.access_key_id,
            &account.secret_access_key,
        )?))
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
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .is_err()
        {
            self.kill9().await;
        }
    }
}

/// Fires the round's calls together and kills the server after a random
/// delay; returns the state changes it answered, the execs answered and the delay.
async fn fire_and_kill(
    client: &Client,
    fleet: &HashMap<String, String>,
    round: u32,
    server: &mut Server,
    max_kill_ms: u64,
) -> Result<(Vec<Accepted>, usize, u64)> {
    let mut rng = rand::thread_rng();
    let mut running: Vec<&String> = fleet
        .iter()
        .filter(|(_, s)| *s == "RUNNING")
        .map(|(id, _)| id)
        .collect();
    let mut suspended: Vec<&String> = fleet
        .iter()
        .filter(|(_, s)| *s == "SUSPENDED")
        .map(|(id, _)| id)
        .collect();
    running.shuffle(&mut rng);
    suspended.shuffle(&mut rng);
    // Each microVM gets at most one call per round.
    let mut calls: Vec<(&'static str, Value, &'static str, Option<String>)> = Vec::new();
    for k in 0..2 {
        let token = format!("chaos-{round}-{k}-{:08x}", rng.gen::<u32>());
        calls.push((
            "RunMicrovm",
            json!({"imageIdentifier": "chaos", "clientToken": token}),
            "RUNNING",
            Some(token),
        ));
    }
    if let Some(id) = running.pop() {
        calls.push((
            "SuspendMicrovm",
            json!({"microvmIdentifier": id}),
            "SUSPENDED",
            None,
        ));
    }
    if let Some(id) = suspended.pop() {
        calls.push((
            "ResumeMicrovm",
            json!({"microvmIdentifier": id}),
            "RUNNING",
            None,
        ));
    }
    if fleet.len() > 2 {
        if let Some(id) = running.pop().or_else(|| suspended.pop()) {
            calls.push((
                "TerminateMicrovm",
                json!({"microvmIdentifier": id}),
                "TERMINATED",
                None,
            ));
        }
    }
    let exec_target = running.pop().cloned();
    let kill_ms = rng.gen_range(0..max_kill_ms);

    let changes = futures::future::join_all(calls.into_iter().map(
        |(operation, input, expect, client_token)| async move {
            let id = input["microvmIdentifier"].as_str().map(str::to_string);
            match client.call(operation, input).await {
                Ok(out) => id
                    .or_else(|| out["microvmId"].as_str().map(str::to_string))
                    .map(|microvm_id| Accepted {
                        operation,
                        microvm_id,
                        expect,
                        client_token,
                    }),
                Err(_) => None,
            }
        },
    ));
    let exec = async {
        let Some(id) = exec_target else { return 0 };
        let answered = client
            .call_extension(
                http::Method::POST,
                &format!("/hearth/2025-09-09/microvms/{id}/exec"),
                json!({"argv": ["true"]}),
            )
            .await
            .is_ok_and(|out| out["exitCode"] == 0);
        usize::from(answered)
    };
    // The calls race the kill: whatever the server answered before it died counts.
    let load = async { futures::join!(changes, exec) };
    tokio::pin!(load);
    let killer = tokio::time::sleep(Duration::from_millis(kill_ms));
    tokio::pin!(killer);
    let (answers, execs) = tokio::select! {
        done = &mut load => {
            (&mut killer).await;
            server.kill9().await;
            done
        }
        _ = &mut killer => {
            server.kill9().await;
            load.await
        }
    };
    Ok((answers.into_iter().flatten().collect(), execs, kill_ms))
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

/// Terminates the oldest live microVMs beyond `keep` (ids sort by time only
/// by chance, so: any beyond `keep`), and waits for them.
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

/// (pid, VM directory name) of live QEMU processes running VMs of `data`.
fn qemu_processes(data: &Path) -> Vec<(u32, String)> {
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
        if let Some(name) = argv.iter().find_map(|arg| {
            let (_, rest) = arg.split_once(&vms)?;
            Some(rest.split('/').next().unwrap_or_default().to_string())
        }) {
            found.push((pid, name));
        }
    }
    found
}

/// QEMU processes no RUNNING microVM owns, plus any second process of one VM.
fn orphans(data: &Path, running: &HashSet<String>) -> usize {
    let mut seen = HashSet::new();
    qemu_processes(data)
        .into_iter()
        .filter(|(_, name)| !running.contains(name) || !seen.insert(name.clone()))
        .count()
}

fn print_table(r: &Report) {
    println!(
        "hearth bench chaos: {} rounds, kill -9 of the server in each",
        r.rounds
    );
    println!("accepted operations            {:>8}", r.accepted_ops);
    for (op, n) in &r.accepted_by_operation {
        println!("  {op:<28} {n:>8}");
    }
    println!(
        "carried out after the restart  {:>8}",
        r.carried_out_after_restart
    );
    println!("lost                           {:>8}", r.lost_ops);
    println!("orphaned QEMU processes        {:>8}", r.orphaned_processes);
    println!(
        "duplicate microVMs per token   {:>8}",
        r.duplicate_microvms_per_client_token
    );
    println!("execs answered                 {:>8}", r.execs_answered);
    println!("rounds not settled in time     {:>8}", r.unsettled_rounds);
    let s = &r.time_to_settle_ms;
    println!(
        "time to settle, ms             p50 {:.0}  p95 {:.0}  max {:.0}  (n {})",
        s.p50, s.p95, s.max, s.n
    );
    for lost in &r.lost {
        println!("lost: {lost}");
    }
}

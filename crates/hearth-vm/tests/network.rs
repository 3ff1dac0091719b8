//! VM networks end to end, with real guests and a stand-in internet made of
//! network namespaces (`common/internet.rs`): nothing leaves the machine.
//! Needs root and `scripts/setup-host` (as `scripts/test` runs).
//!
//! One cold boot, one snapshot and a few clones cover: egress by IP and by
//! name, a VM without egress, no way to the host (10.0.2.2, the VM's own
//! gateway, the host's addresses) or to another VM, the forbidden ranges
//! (their listeners record nothing), the egress counter, suspend/resume and
//! the operator's allow and deny ranges. Two more guests: the domain allow
//! list, and the limits (bandwidth each way, concurrent connections). The
//! tests run one at a time ([`SERIAL`]): each boots a guest, and the stand-in
//! internet's names are the process's.

mod common;
#[path = "common/internet.rs"]
mod internet;

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Instant;

use common::sh;
use hearth_proto::ExecRequest;
use hearth_vm::net::{parse_cidr, EgressLimits, NetConfig, Network};
use hearth_vm::{
    AgentClient, Assets, BootRequest, ColdBoot, Driver, MachineShape, QemuDriver, VmRecord,
};
use internet::{TestInternet, FORBIDDEN, GREETING, PRIVATE_NAME, UNNAMED_WEB, WEB, WEB_NAME};

/// Held by every test here for its whole run.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A Python one-liner: GET http://HOST:PORT/PATH within 4 s, print the body.
fn fetch_script(host: &str, port: u16, path: &str) -> String {
    format!(
        "python3 -c \"import urllib.request as u; print(u.urlopen('http://{host}:{port}{path}', timeout=4).read().decode())\""
    )
}

/// Runs `sh -c script`; its stdout when it exits 0, else `None`.
async fn try_sh(agent: &AgentClient, script: &str) -> Option<String> {
    let out = agent
        .exec_output(ExecRequest {
            argv: vec!["sh".into(), "-c".into(), script.into()],
            ..Default::default()
        })
        .await
        .expect("exec");
    (out.status.code == Some(0)).then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Whether a TCP connection from the guest to `host:port` opens within 3 s.
async fn connects(agent: &AgentClient, host: &str, port: u16) -> bool {
    try_sh(
        agent,
        &format!(
            "python3 -c \"import socket; socket.create_connection(('{host}', {port}), timeout=3)\""
        ),
    )
    .await
    .is_some()
}

/// The host's own IPv4 addresses (every interface but loopback).
fn host_addresses() -> Vec<Ipv4Addr> {
    let out = std::process::Command::new("ip")
        .args(["-4", "-o", "addr", "show"])
        .output()
        .expect("ip addr");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let cidr = line.split_whitespace().nth(3)?;
            cidr.split('/').next()?.parse::<Ipv4Addr>().ok()
        })
        .filter(|a| !a.is_loopback())
        .collect()
}

/// The host end of a VM namespace's uplink: its default gateway.
fn uplink_gateway(netns: &str) -> Option<Ipv4Addr> {
    let out = std::process::Command::new("ip")
        .args(["-n", netns, "-4", "route", "show", "default"])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mut words = text.split_whitespace();
    words.find(|w| *w == "via")?;
    words.next()?.parse().ok()
}

/// Ends every QEMU process of the test's driver (and with it the VM's
/// namespace) however the test ends.
struct KillOnDrop(QemuDriver);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for process in self.0.processes() {
            self.0.kill_process(&process);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_networks_reach_the_internet_and_nothing_else() {
    let _serial = SERIAL.lock().await;
    assert_eq!(
        // SAFETY: geteuid(2) cannot fail.
        unsafe { libc::geteuid() },
        0,
        "VM network tests need root"
    );
    let internet = TestInternet::start().await;
    let config = internet.net_config();
    let network = Arc::new(Network::start(config.clone()).await.expect("network"));
    let state = tempfile::Builder::new()
        .prefix("hnet")
        .tempdir_in("/tmp")
        .expect("state dir");
    let assets = Assets {
        state_dir: state.path().to_path_buf(),
        ..Assets::from_env()
    };
    let driver = QemuDriver::new(assets.clone())
        .expect("driver")
        .with_network(network.clone());
    let _cleanup = KillOnDrop(driver.clone());
    // A host service a guest must never reach (as hearth's API and proxy).
    let host_listener = tokio::net::TcpListener::bind("0.0.0.0:0")
        .await
        .expect("host listener");
    let host_port = host_listener.local_addr().expect("addr").port();
    let host_hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let hits = host_hits.clone();
    let host_task = tokio::spawn(async move {
        while host_listener.accept().await.is_ok() {
            hits.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });

    // A cold boot with egress, as a build step with INTERNET_EGRESS has.
    let base = assets.base_image("debian-12").expect("base image");
    let source = driver
        .boot_with(
            &BootRequest {
                name: "src".into(),
                image: "debian-12".into(),
                shape: MachineShape::default(),
            },
            &ColdBoot {
                base,
                base_format: hearth_vm::disk::BackingFormat::Raw,
                overlay: None,
                egress: true,
                disk_size: None,
                free_page_reporting: false,
            },
        )
        .await
        .expect("boot");
    let agent = driver.agent(&source).await.expect("agent");
    assert_eq!(
        sh(&agent, &fetch_script(&WEB.to_string(), 80, "/")).await,
        GREETING
    );
    drop(agent);
    let snapshot = driver
        .snapshot(&source, &state.path().join("snap"))
        .await
        .expect("snapshot");
    assert!(snapshot.manifest.nic, "the snapshot has no network card");

    let started = Instant::now();
    let (mut open, open_agent) = driver
        .launch_with_egress(&snapshot, "open", true)
        .await
        .expect("launch with egress");
    let launch_egress = started.elapsed();
    let started = Instant::now();
    let (closed, closed_agent) = driver
        .launch_with_egress(&snapshot, "closed", false)
        .await
        .expect("launch without egress");
    let launch_closed = started.elapsed();
    println!(
        "launch with egress {:.1} ms, without {:.1} ms",
        launch_egress.as_secs_f64() * 1e3,
        launch_closed.as_secs_f64() * 1e3
    );

    // Egress by address and by a name the test's DNS answers.
    assert_eq!(
        sh(&open_agent, &fetch_script(&WEB.to_string(), 80, "/")).await,
        GREETING
    );
    assert_eq!(
        sh(&open_agent, &fetch_script(WEB_NAME, 80, "/")).await,
        GREETING
    );
    // No egress: neither.
    assert_eq!(
        try_sh(&closed_agent, &fetch_script(&WEB.to_string(), 80, "/")).await,
        None
    );
    assert_eq!(
        try_sh(&closed_agent, &fetch_script(WEB_NAME, 80, "/")).await,
        None
    );

    // Nothing of the host: 10.0.2.2, the uplink's host end, every host address.
    let open_netns = network.netns_name(&open.instance);
    let gateway = uplink_gateway(&open_netns).expect("uplink gateway");
    let mut host_targets = vec![Ipv4Addr::new(10, 0, 2, 2), gateway, internet.host_address];
    host_targets.extend(host_addresses());
    for target in &host_targets {
        for agent in [&open_agent, &closed_agent] {
            assert!(
                !connects(agent, &target.to_string(), host_port).await,
                "a guest reached the host at {target}:{host_port}"
            );
        }
    }
    // Not another VM: the source's uplink address.
    let source_netns = network.netns_name(&source.instance);
    let source_gateway = uplink_gateway(&source_netns).expect("source uplink");
    let source_inner = Ipv4Addr::from(u32::from(source_gateway) + 1);
    assert!(!connects(&open_agent, &source_inner.to_string(), 80).await);
    // Forbidden ranges: their listeners record nothing.
    for target in FORBIDDEN {
        assert!(!connects(&open_agent, &target.to_string(), 80).await);
        assert_eq!(internet.connections_to(target), 0, "{target} was reached");
    }
    assert_eq!(
        host_hits.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the host listener was reached"
    );

    // The egress counter counts, and a download's speed.
    let before = driver.egress_bytes(&open).await.expect("egress bytes");
    assert!(before > 0, "no egress bytes counted");
    let started = Instant::now();
    let size = sh(
        &open_agent,
        &format!(
            "python3 -c \"import urllib.request as u; print(len(u.urlopen('http://{WEB}/big', timeout=60).read()))\""
        ),
    )
    .await;
    let seconds = started.elapsed().as_secs_f64();
    assert_eq!(size, internet::BIG_BYTES.to_string());
    println!(
        "download: {:.1} MB/s ({} bytes in {seconds:.2} s)",
        internet::BIG_BYTES as f64 / seconds / 1e6,
        internet::BIG_BYTES
    );
    assert!(driver.egress_bytes(&open).await.expect("egress bytes") > before);

    // A connection open at the suspend is reset when the guest next uses it.
    let held = sh(
        &open_agent,
        &format!(
            "cat > /tmp/held.py <<'EOF'\n\
import os, socket, time\n\
s = socket.create_connection(('{WEB}', 80), timeout=5)\n\
open('/tmp/held', 'w').write('open')\n\
while not os.path.exists('/tmp/go'):\n\
\x20\x20\x20\x20time.sleep(0.1)\n\
try:\n\
\x20\x20\x20\x20s.settimeout(10)\n\
\x20\x20\x20\x20s.sendall(b'GET / HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n')\n\
\x20\x20\x20\x20r = 'data' if s.recv(100) else 'closed'\n\
except ConnectionResetError:\n\
\x20\x20\x20\x20r = 'reset'\n\
except OSError as e:\n\
\x20\x20\x20\x20r = 'error ' + str(e)\n\
open('/tmp/held', 'w').write(r)\n\
EOF\n\
nohup python3 /tmp/held.py > /dev/null 2>&1 < /dev/null &\n\
for i in $(seq 100); do [ \"$(cat /tmp/held 2>/dev/null)\" = open ] && break; sleep 0.1; done\n\
cat /tmp/held"
        ),
    )
    .await;
    assert_eq!(held, "open");
    // Egress survives suspend and resume.
    drop(open_agent);
    driver.suspend(&mut open).await.expect("suspend");
    // A clone's suspend is made lean; the conversion's second QEMU needs a
    // tap of its own, or the card's state (a tap's offloads) would not load.
    assert_eq!(open.suspended_memory, Some(open.memory_file()));
    driver.resume(&mut open).await.expect("resume");
    let open_agent = driver.agent(&open).await.expect("agent");
    assert_eq!(
        sh(&open_agent, &fetch_script(&WEB.to_string(), 80, "/")).await,
        GREETING
    );
    let held = sh(
        &open_agent,
        "touch /tmp/go; for i in $(seq 150); do [ \"$(cat /tmp/held)\" != open ] && break; sleep 0.1; done; cat /tmp/held",
    )
    .await;
    assert_eq!(held, "reset", "a connection from before the suspend");

    // The operator's ranges: allow opens a forbidden one, deny closes an
    // allowed one, and deny wins over allow.
    let mut ranges = config.clone();
    ranges.allow = vec![parse_cidr("10.99.0.0/24").expect("cidr")];
    ranges.deny = vec![parse_cidr("198.51.100.10").expect("cidr")];
    Network::start(ranges.clone()).await.expect("new ranges");
    assert!(connects(&open_agent, "10.99.0.10", 80).await);
    assert_eq!(internet.connections_to(FORBIDDEN[0]), 1);
    assert!(!connects(&open_agent, &WEB.to_string(), 80).await);
    ranges.deny.push(parse_cidr("10.99.0.10/32").expect("cidr"));
    Network::start(ranges).await.expect("deny wins");
    assert!(!connects(&open_agent, "10.99.0.10", 80).await);
    assert_eq!(internet.connections_to(FORBIDDEN[0]), 1);

    // Egress can be given later (and is taken away on removal).
    let mut closed = closed;
    driver
        .set_egress(&mut closed, true)
        .await
        .expect("give egress");
    Network::start(config.clone())
        .await
        .expect("default ranges");
    assert_eq!(
        sh(&closed_agent, &fetch_script(&WEB.to_string(), 80, "/")).await,
        GREETING
    );

    drop((open_agent, closed_agent));
    for vm in [&open, &closed, &source] {
        driver.remove(vm).await.expect("remove");
        assert!(
            !std::path::Path::new("/run/netns")
                .join(network.netns_name(&vm.instance))
                .exists(),
            "{}'s namespace is left",
            vm.name
        );
    }
    host_task.abort();
}

fn assert_root() {
    assert_eq!(
        // SAFETY: geteuid(2) cannot fail.
        unsafe { libc::geteuid() },
        0,
        "VM network tests need root"
    );
}

/// A driver on `network` and its state directory (removed on drop).
fn driver_on(network: Arc<Network>) -> (QemuDriver, Assets, tempfile::TempDir) {
    let state = tempfile::Builder::new()
        .prefix("hnet")
        .tempdir_in("/tmp")
        .expect("state dir");
    let assets = Assets {
        state_dir: state.path().to_path_buf(),
        ..Assets::from_env()
    };
    let driver = QemuDriver::new(assets.clone())
        .expect("driver")
        .with_network(network);
    (driver, assets, state)
}

/// A cold-booted guest with egress.
async fn boot_with_egress(driver: &QemuDriver, assets: &Assets, name: &str) -> VmRecord {
    let base = assets.base_image("debian-12").expect("base image");
    driver
        .boot_with(
            &BootRequest {
                name: name.into(),
                image: "debian-12".into(),
                shape: MachineShape::default(),
            },
            &ColdBoot {
                base,
                base_format: hearth_vm::disk::BackingFormat::Raw,
                overlay: None,
                egress: true,
                disk_size: None,
                free_page_reporting: false,
            },
        )
        .await
        .expect("boot")
}

/// The addresses in the host table's set of allowed domains' addresses.
fn domain_set(config: &NetConfig) -> String {
    let out = std::process::Command::new("nft")
        .args(["list", "set", "inet", &config.table, "domains4"])
        .output()
        .expect("nft");
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_domains_open_what_their_names_resolve_to_and_nothing_more() {
    let _serial = SERIAL.lock().await;
    assert_root();
    let internet = TestInternet::start().await;
    let base = internet.net_config();
    // Everything denied but the names: the operator's "only these domains".
    let mut config = base.clone();
    config.deny = vec![parse_cidr("0.0.0.0/0").expect("cidr")];
    config.allow_domains = vec![WEB_NAME.to_string(), PRIVATE_NAME.to_string()];
    let network = Arc::new(Network::start(config.clone()).await.expect("network"));
    let set = domain_set(&config);
    assert!(set.contains(&WEB.to_string()), "{set}");
    let (driver, assets, _state) = driver_on(network.clone());
    let _cleanup = KillOnDrop(driver.clone());
    let vm = boot_with_egress(&driver, &assets, "domains").await;
    let agent = driver.agent(&vm).await.expect("agent");

    // The allowed name's address, by name and by address.
    assert_eq!(sh(&agent, &fetch_script(WEB_NAME, 80, "/")).await, GREETING);
    assert_eq!(
        sh(&agent, &fetch_script(&WEB.to_string(), 80, "/")).await,
        GREETING
    );
    // A web server no allowed name points to stays denied: nothing arrives.
    assert!(!connects(&agent, &UNNAMED_WEB.to_string(), 80).await);
    assert_eq!(
        internet.connections_to(UNNAMED_WEB),
        0,
        "reached {UNNAMED_WEB}"
    );
    // A name that resolves into a forbidden range does not open it...
    assert!(!connects(&agent, PRIVATE_NAME, 80).await);
    assert_eq!(internet.connections_to(FORBIDDEN[0]), 0);
    // ... unless the operator's allow range opens that range too (the deny
    // of everything still in place: the domain is what lets it through).
    let mut opened = config.clone();
    opened.allow = vec![parse_cidr("10.99.0.0/24").expect("cidr")];
    let opened_network = Network::start(opened).await.expect("allow range");
    assert!(connects(&agent, PRIVATE_NAME, 80).await);
    assert_eq!(internet.connections_to(FORBIDDEN[0]), 1);
    drop(opened_network);
    // Without the domain list the deny holds for the web server too: the
    // list was what opened it.
    let mut without = config.clone();
    without.allow_domains.clear();
    Network::start(without).await.expect("no domains");
    let before = internet.connections_to(WEB);
    assert!(!connects(&agent, &WEB.to_string(), 80).await);
    assert_eq!(internet.connections_to(WEB), before);

    drop(agent);
    driver.remove(&vm).await.expect("remove");
}

/// Runs `python3 -c`-style `code` in the guest and returns its stdout.
async fn python(agent: &AgentClient, code: &str) -> String {
    sh(
        agent,
        &format!("cat > /tmp/t.py <<'EOF'\n{code}\nEOF\npython3 /tmp/t.py"),
    )
    .await
}

/// Bytes per second of a download of `bytes` from the web server, timed in
/// the guest.
async fn download_rate(agent: &AgentClient, bytes: usize) -> f64 {
    let out = python(
        agent,
        &format!(
            "import time, urllib.request as u\n\
             t = time.monotonic()\n\
             n = len(u.urlopen('http://{WEB}/bytes/{bytes}', timeout=120).read())\n\
             print(n, time.monotonic() - t)"
        ),
    )
    .await;
    rate_of(&out, bytes)
}

/// Bytes per second of an upload of `bytes` to the web server, timed in the
/// guest (until the server says it has them all).
async fn upload_rate(agent: &AgentClient, bytes: usize) -> f64 {
    let out = python(
        agent,
        &format!(
            "import time, urllib.request as u\n\
             body = b'y' * {bytes}\n\
             t = time.monotonic()\n\
             n = int(u.urlopen(u.Request('http://{WEB}/sink', data=body), timeout=120).read())\n\
             print(n, time.monotonic() - t)"
        ),
    )
    .await;
    rate_of(&out, bytes)
}

fn rate_of(out: &str, bytes: usize) -> f64 {
    let mut words = out.split_whitespace();
    let moved: usize = words.next().and_then(|w| w.parse().ok()).expect(out);
    let seconds: f64 = words.next().and_then(|w| w.parse().ok()).expect(out);
    assert_eq!(moved, bytes, "{out}");
    bytes as f64 / seconds
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_is_held_to_its_bandwidth_and_connection_limits() {
    let _serial = SERIAL.lock().await;
    assert_root();
    let internet = TestInternet::start().await;
    let mut config = internet.net_config();
    // First no practical limit, to measure what this host does without one.
    config.limits_per_vcpu = EgressLimits {
        bytes_per_second: 10_000_000_000,
        connections: 512,
    };
    let network = Arc::new(Network::start(config).await.expect("network"));
    let (driver, assets, _state) = driver_on(network.clone());
    let _cleanup = KillOnDrop(driver.clone());
    let vm = boot_with_egress(&driver, &assets, "limits").await;
    let agent = driver.agent(&vm).await.expect("agent");

    let free_down = download_rate(&agent, 16 << 20).await;
    let free_up = upload_rate(&agent, 16 << 20).await;
    // The limit: a fifth of the slower direction's free rate (so the free
    // rate is well above it), within 100 KB/s..2 MB/s (a few seconds each).
    let limit = (free_down.min(free_up) / 5.0).clamp(100e3, 2e6);
    let connections = 4;
    network
        .set_limits(
            &vm.instance,
            EgressLimits {
                bytes_per_second: limit as u64,
                connections,
            },
        )
        .await
        .expect("set limits");
    let bytes = (limit * 4.0) as usize;
    let down = download_rate(&agent, bytes).await;
    let up = upload_rate(&agent, bytes).await;
    println!(
        "free: down {:.2} MB/s, up {:.2} MB/s; limit {:.2} MB/s: down {:.2} MB/s, up {:.2} MB/s",
        free_down / 1e6,
        free_up / 1e6,
        limit / 1e6,
        down / 1e6,
        up / 1e6
    );
    assert!(
        free_down > 2.0 * limit && free_up > 2.0 * limit,
        "the free rates are too close to the limit to tell"
    );
    for (direction, rate) in [("download", down), ("upload", up)] {
        assert!(
            rate < 2.0 * limit,
            "{direction} at {rate:.0} B/s over a limit of {limit:.0}"
        );
        assert!(
            rate > limit / 4.0,
            "{direction} at {rate:.0} B/s starved by a limit of {limit:.0}"
        );
    }

    // Connections: the first `connections` open, the rest are dropped; once
    // they close, new ones open again.
    let before = internet.connections_to(WEB);
    let opened = python(
        &agent,
        &format!(
            "import socket\n\
             held, results = [], []\n\
             for i in range({}):\n\
             \x20   try:\n\
             \x20       held.append(socket.create_connection(('{WEB}', 80), timeout=3))\n\
             \x20       results.append('ok')\n\
             \x20   except OSError:\n\
             \x20       results.append('no')\n\
             print(' '.join(results))",
            connections + 2
        ),
    )
    .await;
    assert_eq!(opened, "ok ok ok ok no no");
    assert_eq!(internet.connections_to(WEB), before + connections as usize);
    // The script has ended: its sockets are closed.
    assert!(connects(&agent, &WEB.to_string(), 80).await);

    drop(agent);
    driver.remove(&vm).await.expect("remove");
}

/// Whether `/run/netns/NAME` exists.
fn netns_exists(name: &str) -> bool {
    std::path::Path::new("/run/netns").join(name).exists()
}

/// Waits up to 30 s until `network` has `count` spares ready.
async fn wait_for_spares(network: &Network, count: usize) {
    let start = Instant::now();
    while network.spares_ready() < count {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(30),
            "no spare network within 30 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// `nft list chain inet hearthvm forward` inside namespace `netns`.
fn vm_forward_chain(netns: &str) -> String {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", netns, "nft", "list", "chain", "inet"])
        .args(["hearthvm", "forward"])
        .output()
        .expect("nft");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_launch_with_egress_takes_a_spare_network_that_works_like_a_new_one() {
    let _serial = SERIAL.lock().await;
    assert_root();
    let internet = TestInternet::start().await;
    let mut config = internet.net_config();
    config.spares = 1;
    // At start, spares of a process that is gone are deleted; another live
    // server's (pid 1 stands in for one) are kept.
    let gone = format!("{}spare-4000000000-0", config.netns_prefix);
    let other = format!("{}spare-1-0", config.netns_prefix);
    for name in [&gone, &other] {
        let made = std::process::Command::new("ip")
            .args(["netns", "add", name])
            .status()
            .expect("ip");
        assert!(made.success());
    }
    let network = Arc::new(Network::start(config.clone()).await.expect("network"));
    assert!(!netns_exists(&gone), "a dead server's spare is left");
    assert!(netns_exists(&other), "a live server's spare was deleted");
    let _ = std::process::Command::new("ip")
        .args(["netns", "delete", &other])
        .status();
    network.keep_spares();
    wait_for_spares(&network, 1).await;
    let first = format!("{}spare-{}-0", config.netns_prefix, std::process::id());
    assert!(netns_exists(&first), "{first} missing");
    let (driver, assets, _state) = driver_on(network.clone());
    let cleanup = KillOnDrop(driver.clone());

    let vm = boot_with_egress(&driver, &assets, "spare").await;
    // The spare became the VM's namespace, and the next one is made.
    assert!(!netns_exists(&first), "the spare was not taken");
    assert!(netns_exists(&network.netns_name(&vm.instance)));
    wait_for_spares(&network, 1).await;
    assert!(netns_exists(&format!(
        "{}spare-{}-1",
        config.netns_prefix,
        std::process::id()
    )));
    // It works as a new one would: NAT, DNS, the filter, the counter.
    let agent = driver.agent(&vm).await.expect("agent");
    assert_eq!(sh(&agent, &fetch_script(WEB_NAME, 80, "/")).await, GREETING);
    assert!(!connects(&agent, &FORBIDDEN[0].to_string(), 80).await);
    assert_eq!(internet.connections_to(FORBIDDEN[0]), 0);
    assert!(network.egress_bytes(&vm.instance).await.expect("counter") > 0);

    // A larger shape's limits replace the spare's: the same rules as a
    // namespace made for that shape from nothing (another network, no spares).
    let shape = MachineShape {
        vcpus: 4,
        ..MachineShape::default()
    };
    network
        .create("sparebig", 0, Some(config.limits_for(shape)))
        .await
        .expect("from a spare");
    let mut fresh_config = config.clone();
    fresh_config.spares = 0;
    fresh_config.netns_prefix = format!("{}fresh-", config.netns_prefix);
    let fresh = Network::start(fresh_config.clone())
        .await
        .expect("fresh network");
    fresh
        .create("big", 0, Some(fresh_config.limits_for(shape)))
        .await
        .expect("from nothing");
    let taken = vm_forward_chain(&network.netns_name("sparebig"));
    assert_eq!(taken, vm_forward_chain(&fresh.netns_name("big")));
    assert_ne!(taken, vm_forward_chain(&network.netns_name(&vm.instance)));
    fresh.remove("big");
    network.remove("sparebig");

    drop(agent);
    driver.remove(&vm).await.expect("remove");
    // Dropping the network deletes its spares (once its keeper is idle, it
    // holds no reference).
    wait_for_spares(&network, 1).await;
    drop(driver);
    drop(cleanup);
    let spare = format!("{}spare-", config.netns_prefix);
    drop(network);
    assert!(
        !std::fs::read_dir("/run/netns")
            .expect("/run/netns")
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with(&spare)),
        "spares left after the network ended"
    );
}

//! A stand-in internet for VM network tests, made of network namespaces so no
//! packet ever leaves the machine (as root; names start with `hn`, or with
//! `$HEARTH_TEST_NET_PREFIX` when several people test on one host).
//!
//! - Namespace `hn-inet-PID` reached from the host through the veth
//!   `hniPID` on a transit /30 of 203.0.113.0/24 (documentation addresses).
//!   The host routes [`DNS`] there too, for the server's own lookups of
//!   allowed domains.
//!   Every packet from the test's VM address pool is routed there by a policy
//!   rule, whatever its destination: a filter that fails sends a forbidden
//!   packet into this namespace, never onto the host's real network.
//! - In it, on its loopback: the "internet" web servers 198.51.100.10 and
//!   198.51.100.20 (which no name points to), a DNS server 198.51.100.53 that
//!   answers `web.hn.test` and `private.hn.test` (a forbidden address), and
//!   forbidden
//!   destinations 10.99.0.10, 192.168.77.10 and 169.254.169.254. One TCP
//!   listener on port 80 serves them all and records the address every
//!   connection was made to.

#![allow(dead_code)]

use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::{Arc, Mutex};

use hearth_vm::net::{Ipv4Net, NetConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const WEB: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
pub const DNS: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 53);
pub const WEB_NAME: &str = "web.hn.test";
/// A second web server that no DNS name points to.
pub const UNNAMED_WEB: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 20);
/// A name the test DNS answers with a forbidden address ([`FORBIDDEN`]`[0]`).
pub const PRIVATE_NAME: &str = "private.hn.test";
/// Forbidden by default: a private address of each RFC 1918 kind used, and
/// the cloud metadata address.
pub const FORBIDDEN: [Ipv4Addr; 3] = [
    Ipv4Addr::new(10, 99, 0, 10),
    Ipv4Addr::new(192, 168, 77, 10),
    Ipv4Addr::new(169, 254, 169, 254),
];
/// What the web server answers on `/`.
pub const GREETING: &str = "hello-from-the-test-internet";
/// Size of `/big`, for throughput (`/bytes/N` serves N bytes; `POST /sink`
/// reads its body and answers with its length).
pub const BIG_BYTES: usize = 32 << 20;

/// The stand-in internet; removed on drop.
#[derive(Debug)]
pub struct TestInternet {
    pub netns: String,
    pub host_link: String,
    /// The host's address on the transit link.
    pub host_address: Ipv4Addr,
    pub pool: Ipv4Net,
    route_table: u32,
    inner: Ipv4Addr,
    /// Local address of every TCP connection the namespace accepted.
    pub connections: Arc<Mutex<Vec<Ipv4Addr>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn ip_quiet(args: &[&str]) {
    let _ = Command::new("ip").args(args).output();
}

impl TestInternet {
    pub async fn start() -> Self {
        let pid = std::process::id();
        let tag = pid % 100_000;
        let p = prefix();
        let netns = format!("{p}-inet-{tag}");
        let host_link = format!("{p}i{tag}");
        let transit = (pid % 60) as u8 * 4;
        let host_address = Ipv4Addr::new(203, 0, 113, transit + 1);
        let inner = Ipv4Addr::new(203, 0, 113, transit + 2);
        let pool = Ipv4Net::new(Ipv4Addr::new(10, 213, (pid % 250) as u8, 0), 24).expect("pool");
        let route_table = 42_000 + tag % 10_000;
        // Leftovers of an earlier run with this pid.
        ip_quiet(&["netns", "delete", &netns]);
        ip_quiet(&["link", "delete", &host_link]);
        ip_quiet(&["rule", "del", "from", &pool.to_string()]);
        ip_quiet(&["route", "del", &format!("{DNS}/32"), "dev", &host_link]);
        ip(&["netns", "add", &netns]);
        ip(&[
            "link", "add", &host_link, "type", "veth", "peer", "name", "eth0", "netns", &netns,
        ]);
        ip(&[
            "addr",
            "add",
            &format!("{host_address}/30"),
            "dev",
            &host_link,
        ]);
        ip(&["link", "set", &host_link, "up"]);
        ip(&["-n", &netns, "link", "set", "lo", "up"]);
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{inner}/30"),
            "dev",
            "eth0",
        ]);
        ip(&["-n", &netns, "link", "set", "eth0", "up"]);
        ip(&[
            "-n",
            &netns,
            "route",
            "add",
            "default",
            "via",
            &host_address.to_string(),
        ]);
        for address in [WEB, UNNAMED_WEB, DNS].iter().chain(FORBIDDEN.iter()) {
            ip(&[
                "-n",
                &netns,
                "addr",
                "add",
                &format!("{address}/32"),
                "dev",
                "lo",
            ]);
        }
        ip(&[
            "route",
            "add",
            "default",
            "via",
            &inner.to_string(),
            "dev",
            &host_link,
            "table",
            &route_table.to_string(),
        ]);
        ip(&[
            "rule",
            "add",
            "from",
            &pool.to_string(),
            "lookup",
            &route_table.to_string(),
            "priority",
            "100",
        ]);
        // The server resolves allowed domains itself, from the host.
        ip(&[
            "route",
            "add",
            &format!("{DNS}/32"),
            "via",
            &inner.to_string(),
            "dev",
            &host_link,
        ]);
        let (tcp, udp) = bind_in(&netns);
        let connections = Arc::new(Mutex::new(Vec::new()));
        let tasks = vec![
            tokio::spawn(serve_web(tcp, connections.clone())),
            tokio::spawn(serve_dns(udp)),
        ];
        Self {
            netns,
            host_link,
            host_address,
            pool,
            route_table,
            inner,
            connections,
            tasks,
        }
    }

    /// VM network settings whose every name is this test's (`hn` prefixes)
    /// and whose VMs' packets all go to this stand-in internet.
    pub fn net_config(&self) -> NetConfig {
        let tag = std::process::id() % 10_000;
        let p = prefix();
        let mut config = NetConfig::new(DNS);
        config.pool = self.pool;
        config.table = format!("{p}_test_{tag}");
        config.link_prefix = format!("{p}{tag}v");
        config.netns_prefix = format!("{p}-{tag}-");
        config
    }

    /// Connections accepted so far, by the address they were made to.
    pub fn connections_to(&self, address: Ipv4Addr) -> usize {
        self.connections
            .lock()
            .expect("lock")
            .iter()
            .filter(|a| **a == address)
            .count()
    }
}

impl Drop for TestInternet {
    fn drop(&mut self) {
        remove_table(&self.net_config());
        for task in &self.tasks {
            task.abort();
        }
        ip_quiet(&["rule", "del", "from", &self.pool.to_string()]);
        ip_quiet(&["route", "flush", "table", &self.route_table.to_string()]);
        ip_quiet(&[
            "route",
            "del",
            &format!("{DNS}/32"),
            "via",
            &self.inner.to_string(),
        ]);
        ip_quiet(&["link", "delete", &self.host_link]);
        ip_quiet(&["netns", "delete", &self.netns]);
    }
}

/// The first letters of every name the test makes: `hn`, or
/// `$HEARTH_TEST_NET_PREFIX` (at most 4 of a-z and 0-9).
fn prefix() -> String {
    match std::env::var("HEARTH_TEST_NET_PREFIX") {
        Ok(p)
            if (1..=4).contains(&p.len())
                && p.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()) =>
        {
            p
        }
        _ => "hn".to_string(),
    }
}

/// Removes a test's host table (`Network` leaves it, as a server does).
pub fn remove_table(config: &NetConfig) {
    let _ = Command::new("nft")
        .args(["delete", "table", "inet", &config.table])
        .output();
}

/// Binds the namespace's listeners from a thread that enters it (sockets stay
/// in the namespace they were made in).
fn bind_in(netns: &str) -> (std::net::TcpListener, std::net::UdpSocket) {
    let path = format!("/run/netns/{netns}");
    std::thread::spawn(move || {
        let target = std::fs::File::open(&path).expect("open netns");
        // SAFETY: setns(2) on this thread only; it ends after binding.
        let entered = unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(entered, 0, "setns: {}", std::io::Error::last_os_error());
        let tcp = std::net::TcpListener::bind("0.0.0.0:80").expect("bind 80");
        tcp.set_nonblocking(true).expect("nonblocking");
        let udp = std::net::UdpSocket::bind(SocketAddr::from((DNS, 53))).expect("bind 53");
        udp.set_nonblocking(true).expect("nonblocking");
        (tcp, udp)
    })
    .join()
    .expect("bind thread")
}

async fn serve_web(listener: std::net::TcpListener, connections: Arc<Mutex<Vec<Ipv4Addr>>>) {
    let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let local = match stream.local_addr() {
            Ok(SocketAddr::V4(a)) => *a.ip(),
            _ => Ipv4Addr::UNSPECIFIED,
        };
        connections.lock().expect("lock").push(local);
        tokio::spawn(async move {
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let head_end = request
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
                .map_or(request.len(), |at| at + 4);
            let head = String::from_utf8_lossy(&request[..head_end]).to_lowercase();
            let body: Vec<u8> = if head.starts_with("get /big") {
                vec![b'x'; BIG_BYTES]
            } else if let Some(size) = head
                .strip_prefix("get /bytes/")
                .and_then(|rest| rest.split_whitespace().next()?.parse::<usize>().ok())
            {
                vec![b'x'; size.min(256 << 20)]
            } else if head.starts_with("post /sink") {
                let length: usize = head
                    .lines()
                    .find_map(|line| line.strip_prefix("content-length:")?.trim().parse().ok())
                    .unwrap_or(0);
                let mut received = request.len() - head_end;
                while received < length {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => received += n,
                    }
                }
                received.to_string().into_bytes()
            } else {
                GREETING.as_bytes().to_vec()
            };
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes()).await;
            let _ = stream.write_all(&body).await;
            let _ = stream.shutdown().await;
        });
    }
}

/// Answers A queries for [`WEB_NAME`] with [`WEB`] and for [`PRIVATE_NAME`]
/// with a forbidden address, anything else NXDOMAIN.
async fn serve_dns(socket: std::net::UdpSocket) {
    let socket = tokio::net::UdpSocket::from_std(socket).expect("tokio udp");
    let mut buf = [0u8; 512];
    loop {
        let Ok((n, peer)) = socket.recv_from(&mut buf).await else {
            continue;
        };
        if let Some(reply) = dns_answer(&buf[..n]) {
            let _ = socket.send_to(&reply, peer).await;
        }
    }
}

fn dns_answer(query: &[u8]) -> Option<Vec<u8>> {
    if query.len() < 12 {
        return None;
    }
    // The question: labels up to the zero byte, then type and class.
    let mut at = 12;
    let mut labels = Vec::new();
    loop {
        let len = *query.get(at)? as usize;
        at += 1;
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(query.get(at..at + len)?).to_lowercase());
        at += len;
    }
    let qtype = u16::from_be_bytes([*query.get(at)?, *query.get(at + 1)?]);
    let question = query.get(12..at + 4)?;
    let name = labels.join(".");
    let address = if name == WEB_NAME {
        Some(WEB)
    } else if name == PRIVATE_NAME {
        Some(FORBIDDEN[0])
    } else {
        None
    };
    let found = address.is_some();
    let mut reply = Vec::new();
    reply.extend_from_slice(&query[0..2]);
    // Response, recursion desired/available; NXDOMAIN unless found.
    reply.extend_from_slice(if found { &[0x81, 0x80] } else { &[0x81, 0x83] });
    reply.extend_from_slice(&[0, 1]);
    let answers: u16 = if found && qtype == 1 { 1 } else { 0 };
    reply.extend_from_slice(&answers.to_be_bytes());
    reply.extend_from_slice(&[0, 0, 0, 0]);
    reply.extend_from_slice(question);
    if let (1, Some(address)) = (answers, address) {
        reply.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
        reply.extend_from_slice(&address.octets());
    }
    Some(reply)
}

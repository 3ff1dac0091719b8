//! Per-VM networks: tap + network namespace + veth + nftables NAT.
//!
//! Every QEMU process with a network runs in its own network namespace
//! (`/run/netns/<prefix><instance>`) that holds:
//!
//! - `tap0`, the backend of the guest's virtio-net card (owned by QEMU's uid),
//!   with the gateway address 10.0.2.2/24 and the resolver's 10.0.2.3 (so the
//!   guest's ARP for them is answered) and a fixed MAC, so every guest is
//!   configured the same (10.0.2.15, gateway 10.0.2.2, DNS 10.0.2.3, as QEMU's
//!   user network had it) and a clone's ARP cache stays valid after a restore;
//! - with egress, `up0`: one end of a veth pair whose other end (`<link
//!   prefix><slot>`) is in the host namespace, each end with an address of the
//!   slot's /30 from the operator's pool. The namespace masquerades the guest
//!   onto `up0`, rewrites DNS to 10.0.2.3 to the operator's resolver, resets
//!   TCP connections it never saw open (the guest's connections from before a
//!   snapshot or suspend: the namespace is new, so they fail fast), counts
//!   and limits egress (bytes per second, concurrent connections) and drops
//!   every packet addressed to itself.
//!
//! In the host namespace the table `inet <table>` drops everything from the
//! veths to the host itself (input), between veths (other VMs) and to the
//! forbidden ranges (loopback, link-local, RFC 1918, shared, ULA, multicast,
//! broadcast) unless an operator's allow range covers it, with the operator's
//! deny ranges first; then masquerades the pool out of the host.
//!
//! Why tap + nftables (not passt or slirp4netns): the kernel does the NAT and
//! the filtering at full speed, the rules are one table an operator can read
//! with `nft list table inet hearth`, and the namespace holds no process of its
//! own (nothing to restart after a crash; the namespace outlives the server
//! like QEMU does). Why the `ip` and `nft` binaries rather than netlink
//! crates: one batched `ip` call and one `nft -f` per VM set everything up,
//! and both are what an operator uses to inspect the result.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::process::Stdio;
use std::str::FromStr;
use std::sync::atomic::{AtomicU32, Ordering};

pub use ipnet::{IpNet, Ipv4Net};
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use crate::record::MachineShape;

/// The guest's side of every VM network (set by the agent at boot).
pub const GUEST_ADDRESS: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
/// The tap's address in the VM namespace: the guest's default gateway.
pub const GUEST_GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// The guest's resolver, rewritten to the operator's in the VM namespace.
pub const GUEST_DNS: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);
/// QEMU's tap device inside a VM namespace.
pub const TAP: &str = "tap0";
/// The VM namespace's end of the veth pair.
const UPLINK: &str = "up0";
/// Fixed MAC of every tap: the guest's ARP entry for its gateway survives a
/// restore into a new namespace.
const TAP_MAC: &str = "02:68:72:74:68:01";
/// The nftables table in each VM namespace.
const VM_TABLE: &str = "hearthvm";

/// Ranges no VM reaches unless an operator's `--egress-allow` covers them.
pub const FORBIDDEN: &[&str] = &[
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "224.0.0.0/4",
    "240.0.0.0/4",
    "::/127",
    "::ffff:0:0/96",
    "fc00::/7",
    "fe80::/10",
    "ff00::/8",
];

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("{0:?} is not a CIDR range (e.g. 203.0.113.0/24) or address")]
    BadCidr(String),
    #[error("the VM address pool {0} must be IPv4 and hold at least one /30")]
    BadPool(Ipv4Net),
    #[error("DNS server {0} must be a non-loopback IPv4 address")]
    BadDns(IpAddr),
    #[error("no DNS server: pass one, or list one in /etc/resolv.conf")]
    NoDns,
    #[error("could not run {0}")]
    Run(&'static str, #[source] std::io::Error),
    #[error("{command} failed: {stderr}")]
    Failed {
        command: &'static str,
        stderr: String,
    },
    #[error("every address slot of the pool {0} is taken")]
    PoolFull(Ipv4Net),
    #[error("cannot enable IP forwarding")]
    Forwarding(#[source] std::io::Error),
    #[error("unreadable nft counter")]
    Counter,
}

/// Parses an operator's CIDR range; a bare address is a /32 or /128.
pub fn parse_cidr(text: &str) -> Result<IpNet, NetError> {
    let text = text.trim();
    IpNet::from_str(text)
        .or_else(|_| IpAddr::from_str(text).map(IpNet::from))
        .map(|net| net.trunc())
        .map_err(|_| NetError::BadCidr(text.to_string()))
}

/// The operator's network settings.
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// Addresses for the veth pairs: one /30 per VM with egress.
    pub pool: Ipv4Net,
    /// Ranges VMs may reach although the defaults forbid them.
    pub allow: Vec<IpNet>,
    /// Ranges VMs never reach; wins over `allow`.
    pub deny: Vec<IpNet>,
    /// The resolver the guests' DNS (10.0.2.3) is sent to.
    pub dns: Ipv4Addr,
    /// Name of the host's nftables table (`inet`).
    pub table: String,
    /// Prefix of the host's veth names (`<prefix><slot>`, at most 15 bytes).
    pub link_prefix: String,
    /// Prefix of the VM namespaces' names (`<prefix><instance>`).
    pub netns_prefix: String,
}

impl NetConfig {
    /// The defaults: pool 10.201.0.0/16, table `hearth`, veths
    /// `hearth<slot>`, namespaces `hearth-<instance>`.
    pub fn new(dns: Ipv4Addr) -> Self {
        Self {
            pool: Ipv4Net::new(Ipv4Addr::new(10, 201, 0, 0), 16).expect("valid prefix length"),
            allow: Vec::new(),
            deny: Vec::new(),
            dns,
            table: "hearth".into(),
            link_prefix: "hearth".into(),
            netns_prefix: "hearth-".into(),
        }
    }

    /// The first `nameserver` of a resolv.conf that a VM can be sent to
    /// (IPv4, not loopback): systemd-resolved's stub (127.0.0.53) is skipped
    /// in favour of its upstream list.
    pub fn system_dns() -> Result<Ipv4Addr, NetError> {
        for file in ["/etc/resolv.conf", "/run/systemd/resolve/resolv.conf"] {
            let Ok(text) = std::fs::read_to_string(file) else {
                continue;
            };
            let found = text.lines().find_map(|line| {
                let mut words = line.split_whitespace();
                (words.next() == Some("nameserver"))
                    .then(|| words.next()?.parse::<Ipv4Addr>().ok())
                    .flatten()
                    .filter(|a| !a.is_loopback() && !a.is_unspecified())
            });
            if let Some(address) = found {
                return Ok(address);
            }
        }
        Err(NetError::NoDns)
    }

    fn check(&self) -> Result<(), NetError> {
        if self.pool.prefix_len() > 30 {
            return Err(NetError::BadPool(self.pool));
        }
        if self.dns.is_loopback() || self.dns.is_unspecified() {
            return Err(NetError::BadDns(self.dns.into()));
        }
        Ok(())
    }

    fn slots(&self) -> u32 {
        1u32 << (30 - u32::from(self.pool.prefix_len()))
    }

    /// The host's and the namespace's address of slot `slot`.
    fn slot_addresses(&self, slot: u32) -> (Ipv4Addr, Ipv4Addr) {
        let base = u32::from(self.pool.network()) + slot * 4;
        (Ipv4Addr::from(base + 1), Ipv4Addr::from(base + 2))
    }

    /// The host table, replaced atomically.
    fn host_ruleset(&self) -> String {
        let table = &self.table;
        let veths = format!("\"{}*\"", self.link_prefix);
        let (forbidden4, forbidden6) = split(FORBIDDEN.iter().filter_map(|c| parse_cidr(c).ok()));
        let (allow4, allow6) = split(self.allow.iter().copied());
        let (deny4, deny6) = split(self.deny.iter().copied());
        let dns = self.dns;
        let pool = self.pool;
        format!(
            "table inet {table} {{}}\n\
             delete table inet {table}\n\
             table inet {table} {{\n\
             {sets}\
             \tchain input {{\n\
             \t\ttype filter hook input priority filter - 10; policy accept;\n\
             \t\tiifname {veths} ip daddr {dns} meta l4proto {{ tcp, udp }} th dport 53 accept\n\
             \t\tiifname {veths} drop\n\
             \t}}\n\
             \tchain forward {{\n\
             \t\ttype filter hook forward priority filter - 10; policy accept;\n\
             \t\tiifname {veths} oifname {veths} drop\n\
             \t\toifname {veths} ct state established,related accept\n\
             \t\toifname {veths} drop\n\
             \t\tiifname {veths} ip daddr {dns} meta l4proto {{ tcp, udp }} th dport 53 accept\n\
             \t\tiifname {veths} ip daddr @deny4 drop\n\
             \t\tiifname {veths} ip6 daddr @deny6 drop\n\
             \t\tiifname {veths} ip daddr @allow4 accept\n\
             \t\tiifname {veths} ip6 daddr @allow6 accept\n\
             \t\tiifname {veths} ip daddr @forbidden4 drop\n\
             \t\tiifname {veths} ip6 daddr @forbidden6 drop\n\
             \t\tiifname {veths} fib daddr type {{ local, broadcast, multicast, anycast }} drop\n\
             \t}}\n\
             \tchain postrouting {{\n\
             \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
             \t\tip saddr {pool} oifname != {veths} masquerade\n\
             \t}}\n\
             }}\n",
            sets = [
                set("forbidden4", "ipv4_addr", &forbidden4),
                set("forbidden6", "ipv6_addr", &forbidden6),
                set("allow4", "ipv4_addr", &allow4),
                set("allow6", "ipv6_addr", &allow6),
                set("deny4", "ipv4_addr", &deny4),
                set("deny6", "ipv6_addr", &deny6),
            ]
            .concat(),
        )
    }
}

fn split(nets: impl Iterator<Item = IpNet>) -> (Vec<IpNet>, Vec<IpNet>) {
    nets.partition(|n| matches!(n, IpNet::V4(_)))
}

fn set(name: &str, kind: &str, elements: &[IpNet]) -> String {
    let mut text = format!("\tset {name} {{\n\t\ttype {kind}; flags interval; auto-merge;\n");
    if !elements.is_empty() {
        let list: Vec<String> = elements.iter().map(|e| e.to_string()).collect();
        text.push_str(&format!("\t\telements = {{ {} }}\n", list.join(", ")));
    }
    text.push_str("\t}\n");
    text
}

/// A VM's egress limits, from its shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EgressLimits {
    pub bytes_per_second: u64,
    pub connections: u32,
}

impl EgressLimits {
    /// 100 Mbit/s and 512 concurrent connections per vCPU.
    pub fn for_shape(shape: MachineShape) -> Self {
        let vcpus = u64::from(shape.vcpus.max(1));
        Self {
            bytes_per_second: 12_500_000 * vcpus,
            connections: 512 * u32::from(shape.vcpus.max(1)),
        }
    }
}

/// Sets up and tears down VM networks on this host (see the module docs).
#[derive(Debug)]
pub struct Network {
    config: NetConfig,
    /// Where the next slot search starts (slots are claimed by creating the
    /// host's veth: the kernel refuses a name that exists).
    next_slot: AtomicU32,
}

impl Network {
    /// Checks the configuration, turns on IPv4 forwarding and installs the
    /// host table. Needs root (CAP_NET_ADMIN).
    pub async fn start(config: NetConfig) -> Result<Self, NetError> {
        config.check()?;
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").map_err(NetError::Forwarding)?;
        run_with_input("nft", &["-f", "-"], &config.host_ruleset()).await?;
        let next_slot = AtomicU32::new(rand::random::<u32>() % config.slots());
        Ok(Self { config, next_slot })
    }

    pub fn config(&self) -> &NetConfig {
        &self.config
    }

    /// The namespace of QEMU instance `instance`.
    pub fn netns_name(&self, instance: &str) -> String {
        format!("{}{instance}", self.config.netns_prefix)
    }

    /// The instances that have a namespace of this network's prefix.
    pub fn instances(&self) -> Vec<String> {
        std::fs::read_dir("/run/netns")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| {
                let name = entry.file_name();
                let instance = name
                    .to_str()?
                    .strip_prefix(&self.config.netns_prefix)?
                    .to_string();
                (!instance.is_empty() && instance.chars().all(|c| c.is_ascii_alphanumeric()))
                    .then_some(instance)
            })
            .collect()
    }

    /// The namespace's file, which QEMU `setns`es into.
    pub fn netns_path(&self, instance: &str) -> PathBuf {
        PathBuf::from("/run/netns").join(self.netns_name(instance))
    }

    /// Creates instance `instance`'s namespace with its tap (owned by `uid`)
    /// and, when `egress` is given, its uplink. Four programs run: `ip netns
    /// add`, one `ip -batch` on each side, `nft` in the namespace.
    pub async fn create(
        &self,
        instance: &str,
        uid: u32,
        egress: Option<EgressLimits>,
    ) -> Result<(), NetError> {
        let netns = self.netns_name(instance);
        run("ip", &["netns", "add", &netns]).await?;
        let tap = format!(
            "link set lo up\n\
             tuntap add dev {TAP} mode tap user {uid}\n\
             link set {TAP} address {TAP_MAC}\n\
             addr add {GUEST_GATEWAY}/24 dev {TAP}\n\
             addr add {GUEST_DNS}/24 dev {TAP}\n\
             link set {TAP} up\n"
        );
        let made = match egress {
            Some(limits) => self.uplink(instance, limits, &tap).await,
            None => run_with_input("ip", &["-n", &netns, "-batch", "-"], &tap)
                .await
                .map(drop),
        };
        if made.is_err() {
            self.remove(instance);
        }
        made
    }

    /// Gives instance `instance`'s namespace its uplink: a veth pair on a
    /// free slot of the pool, NAT, DNS and limits.
    pub async fn connect(&self, instance: &str, limits: EgressLimits) -> Result<(), NetError> {
        self.uplink(instance, limits, "").await
    }

    /// [`Self::connect`], running `first` in the namespace's `ip` batch too.
    async fn uplink(
        &self,
        instance: &str,
        limits: EgressLimits,
        first: &str,
    ) -> Result<(), NetError> {
        let netns = self.netns_name(instance);
        let slots = self.config.slots();
        let mut claimed = None;
        for _ in 0..slots {
            let slot = self.next_slot.fetch_add(1, Ordering::Relaxed) % slots;
            let link = format!("{}{slot}", self.config.link_prefix);
            let (host, _) = self.config.slot_addresses(slot);
            // The kernel refuses a link name that exists: that claims the slot.
            let script = format!(
                "link add {link} type veth peer name {UPLINK} netns {netns}\n\
                 addr add {host}/30 dev {link}\n\
                 link set {link} up\n"
            );
            match run_with_input("ip", &["-batch", "-"], &script).await {
                Ok(_) => {
                    claimed = Some(slot);
                    break;
                }
                Err(NetError::Failed { stderr, .. }) if stderr.contains("exists") => continue,
                Err(err) => return Err(err),
            }
        }
        let Some(slot) = claimed else {
            return Err(NetError::PoolFull(self.config.pool));
        };
        let (host, inner) = self.config.slot_addresses(slot);
        run_with_input(
            "ip",
            &["-n", &netns, "-batch", "-"],
            &format!(
                "{first}\
                 addr add {inner}/30 dev {UPLINK}\n\
                 link set {UPLINK} up\n\
                 route add default via {host}\n"
            ),
        )
        .await?;
        let dns = self.config.dns;
        let EgressLimits {
            bytes_per_second,
            connections,
        } = limits;
        // Replaced whole: a namespace given egress again gets no duplicates.
        // `inet`: the input and forward policies drop IPv6 as well.
        let rules = format!(
            "table inet {VM_TABLE} {{}}\n\
             delete table inet {VM_TABLE}\n\
             table inet {VM_TABLE} {{\n\
             \tcounter egress {{}}\n\
             \tchain prerouting {{\n\
             \t\ttype nat hook prerouting priority dstnat; policy accept;\n\
             \t\tiifname {TAP} ip daddr {GUEST_DNS} meta l4proto {{ tcp, udp }} th dport 53 dnat ip to {dns}\n\
             \t}}\n\
             \tchain input {{\n\
             \t\ttype filter hook input priority filter; policy drop;\n\
             \t\tiifname lo accept\n\
             \t}}\n\
             \tchain forward {{\n\
             \t\ttype filter hook forward priority filter; policy drop;\n\
             \t\tiifname {UPLINK} oifname {TAP} ct state established,related accept\n\
             \t\tiifname {TAP} oifname {UPLINK} meta l4proto tcp ct state new tcp flags & (syn | ack) != syn reject with tcp reset\n\
             \t\tiifname {TAP} oifname {UPLINK} ct state new ct count over {connections} drop\n\
             \t\tiifname {TAP} oifname {UPLINK} limit rate over {bytes_per_second} bytes/second drop\n\
             \t\tiifname {TAP} oifname {UPLINK} counter name egress accept\n\
             \t}}\n\
             \tchain postrouting {{\n\
             \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
             \t\toifname {UPLINK} masquerade\n\
             \t}}\n\
             }}\n"
        );
        nft_in(&self.netns_path(instance), &["-f", "-"], Some(&rules), true)
            .await
            .map(drop)
    }

    /// Takes instance `instance`'s uplink away (deleting one end of a veth
    /// pair deletes both): the guest keeps a card with nowhere to send to.
    pub async fn disconnect(&self, instance: &str) -> Result<(), NetError> {
        let netns = self.netns_name(instance);
        match run("ip", &["-n", &netns, "link", "del", UPLINK]).await {
            Err(NetError::Failed { stderr, .. }) if stderr.contains("Cannot find device") => Ok(()),
            other => other,
        }
    }

    /// Bytes the guest has sent out of its namespace since it was made.
    pub async fn egress_bytes(&self, instance: &str) -> Result<u64, NetError> {
        let out = nft_in(
            &self.netns_path(instance),
            &["-j", "list", "counter", "inet", VM_TABLE, "egress"],
            None,
            false,
        )
        .await?;
        let json: serde_json::Value =
            serde_json::from_slice(&out).map_err(|_| NetError::Counter)?;
        json["nftables"]
            .as_array()
            .into_iter()
            .flatten()
            .find_map(|item| item["counter"]["bytes"].as_u64())
            .ok_or(NetError::Counter)
    }

    /// Deletes instance `instance`'s namespace with everything in it (its
    /// veth pair, its connection tracking); missing is fine. Synchronous:
    /// callers include drop guards.
    pub fn remove(&self, instance: &str) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "delete", &self.netns_name(instance)])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

impl fmt::Display for NetConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "pool {}, DNS {}, allow [{}], deny [{}]",
            self.pool,
            self.dns,
            join(&self.allow),
            join(&self.deny)
        )
    }
}

fn join(nets: &[IpNet]) -> String {
    nets.iter()
        .map(|n| n.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

async fn run(command: &'static str, args: &[&str]) -> Result<(), NetError> {
    output(command, args).await.map(drop)
}

async fn output(command: &'static str, args: &[&str]) -> Result<Vec<u8>, NetError> {
    let out = Command::new(command)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| NetError::Run(command, e))?;
    if !out.status.success() {
        return Err(NetError::Failed {
            command,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(out.stdout)
}

/// Runs `nft args` inside the namespace at `netns` (entered with setns(2)
/// before exec: cheaper than `ip netns exec`, which also remounts /sys), with
/// IPv4 forwarding turned on there first when `forward`.
async fn nft_in(
    netns: &std::path::Path,
    args: &[&str],
    input: Option<&str>,
    forward: bool,
) -> Result<Vec<u8>, NetError> {
    use std::os::fd::AsRawFd;
    let namespace = std::fs::File::open(netns).map_err(|e| NetError::Run("nft", e))?;
    let fd = namespace.as_raw_fd();
    let mut command = Command::new("nft");
    command.args(args);
    // SAFETY: the closure runs in the forked child before exec and calls only
    // setns(2), open(2), write(2) and close(2), which are async-signal-safe;
    // `fd` stays open until the spawn returns (`namespace` lives past it).
    // /proc/sys/net is the namespace of the task that opens it.
    unsafe {
        command.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if forward {
                let file = libc::open(
                    c"/proc/sys/net/ipv4/ip_forward".as_ptr(),
                    libc::O_WRONLY | libc::O_CLOEXEC,
                );
                if file < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let written = libc::write(file, b"1".as_ptr().cast(), 1);
                libc::close(file);
                if written != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let out = spawn_with_input(command, "nft", input.unwrap_or("")).await;
    drop(namespace);
    out
}

async fn run_with_input(
    command: &'static str,
    args: &[&str],
    input: &str,
) -> Result<Vec<u8>, NetError> {
    let mut program = Command::new(command);
    program.args(args);
    spawn_with_input(program, command, input).await
}

async fn spawn_with_input(
    mut program: Command,
    command: &'static str,
    input: &str,
) -> Result<Vec<u8>, NetError> {
    let mut child = program
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| NetError::Run(command, e))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input.as_bytes())
            .await
            .map_err(|e| NetError::Run(command, e))?;
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(|e| NetError::Run(command, e))?;
    if !out.status.success() {
        return Err(NetError::Failed {
            command,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(out.stdout)
}

/// Opens the tap of a VM namespace for QEMU (`-netdev tap,fd=N`). The server
/// opens it, not QEMU: a jailed QEMU has dropped root, and hosts differ in
/// whether `/dev/net/tun` is open to other users. A tap is found by name in
/// the opener's network namespace, so a short-lived thread enters `netns`
/// (setns changes only the calling thread) and leaves with the descriptor,
/// which keeps pointing at the tap wherever QEMU then runs.
pub fn open_tap(netns: &std::fs::File) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let netns = netns.as_raw_fd();
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                // SAFETY: setns(2) on a descriptor the caller keeps open; it
                // moves only this thread, which ends right after.
                if unsafe { libc::setns(netns, libc::CLONE_NEWNET) } != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // SAFETY: open(2) of a constant NUL-terminated path.
                let fd =
                    unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // SAFETY: `fd` was just opened and is owned by nothing else.
                let tun = unsafe { OwnedFd::from_raw_fd(fd) };
                // SAFETY: an all-zero ifreq is a valid value of the C struct.
                let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
                for (slot, byte) in request.ifr_name.iter_mut().zip(TAP.bytes()) {
                    *slot = byte as libc::c_char;
                }
                request.ifr_ifru.ifru_flags =
                    (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
                // SAFETY: TUNSETIFF reads and writes the ifreq passed by pointer,
                // which lives across the call.
                if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut request) } != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(tun)
            })
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("tap thread panicked")))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_parse_and_bad_ones_are_named() {
        assert_eq!(
            parse_cidr("203.0.113.7/24").expect("valid").to_string(),
            "203.0.113.0/24"
        );
        assert_eq!(
            parse_cidr("10.1.2.3").expect("valid").to_string(),
            "10.1.2.3/32"
        );
        assert_eq!(
            parse_cidr("fd00::/8").expect("valid").to_string(),
            "fd00::/8"
        );
        let err = parse_cidr("10.0.0.0/33").expect_err("refused");
        assert!(err.to_string().contains("10.0.0.0/33"), "{err}");
        assert!(parse_cidr("example.com").is_err());
    }

    #[test]
    fn slots_are_disjoint_thirties() {
        let config = NetConfig::new(Ipv4Addr::new(192, 0, 2, 53));
        assert_eq!(config.slots(), 16384);
        assert_eq!(
            config.slot_addresses(0),
            (Ipv4Addr::new(10, 201, 0, 1), Ipv4Addr::new(10, 201, 0, 2))
        );
        assert_eq!(
            config.slot_addresses(16383),
            (
                Ipv4Addr::new(10, 201, 255, 253),
                Ipv4Addr::new(10, 201, 255, 254)
            )
        );
    }

    #[test]
    fn the_host_table_denies_before_it_allows_and_forbids_the_defaults() {
        let mut config = NetConfig::new(Ipv4Addr::new(192, 0, 2, 53));
        config.allow = vec![parse_cidr("10.9.0.0/16").expect("valid")];
        config.deny = vec![parse_cidr("198.51.100.7").expect("valid")];
        let rules = config.host_ruleset();
        let deny = rules.find("@deny4 drop").expect("valid");
        let allow = rules.find("@allow4 accept").expect("valid");
        let forbidden = rules.find("@forbidden4 drop").expect("valid");
        assert!(deny < allow && allow < forbidden, "{rules}");
        assert!(rules.contains("169.254.0.0/16"));
        assert!(rules.contains("elements = { 10.9.0.0/16 }"));
        assert!(rules.contains("elements = { 198.51.100.7/32 }"));
        assert!(rules.contains("iifname \"hearth*\" drop"));
    }

    #[test]
    fn loopback_dns_and_tiny_pools_are_refused() {
        let mut config = NetConfig::new(Ipv4Addr::LOCALHOST);
        assert!(matches!(config.check(), Err(NetError::BadDns(_))));
        config.dns = Ipv4Addr::new(192, 0, 2, 53);
        config.pool = Ipv4Net::new(Ipv4Addr::new(10, 0, 0, 0), 31).expect("valid");
        assert!(matches!(config.check(), Err(NetError::BadPool(_))));
    }
}

//! Per-VM networks: tap + network namespace + veth + nftables NAT.
//!
//! Every QEMU process with a network runs in its own network namespace
//! (`/run/netns/<prefix><instance>`) that holds:
//!
//! - `tap0`, the backend of the guest's virtio-net card (owned by QEMU's uid,
//!   or by nobody in a namespace made ahead; the server opens it either way),
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
//! Spares (`--vm-network-spares`): a few namespaces with egress are kept
//! made ahead, and a launch with egress takes one by mounting its namespace
//! file at the instance's name ([`Network::keep_spares`]).
//!
//! Domain allows (`--egress-allow-domain`): the server resolves each name
//! through the VMs' own resolver and keeps the answers in the host table's
//! set `domains4`, each element with a timeout from the answer's TTL,
//! refreshed before it runs out ([`DomainAllow`]). The forward chain accepts
//! those addresses before the operator's deny ranges but never when they are
//! in a forbidden range no allow range opens.
//!
//! Why tap + nftables (not passt or slirp4netns): the kernel does the NAT and
//! the filtering at full speed, the rules are one table an operator can read
//! with `nft list table inet hearth`, and the namespace holds no process of its
//! own (nothing to restart after a crash; the namespace outlives the server
//! like QEMU does). Why the `ip` and `nft` binaries rather than netlink
//! crates: one batched `ip` call and one `nft -f` per VM set everything up,
//! and both are what an operator uses to inspect the result.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::str::FromStr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub use ipnet::{IpNet, Ipv4Net};
use tokio::io::AsyncWriteExt;
use tokio::process::Command;
use tokio::time::Instant;

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

/// Marks spare namespaces' names (`<prefix>spare-<pid>-<n>`): never an instance
/// name, which is alphanumeric, so [`Network::instances`] leaves them out.
const SPARE_TAG: &str = "spare-";
/// How long the spare keeper waits after a spare could not be made.
const SPARE_RETRY: Duration = Duration::from_secs(10);

/// The host table's set of the allowed domains' addresses (IPv4 only: guests
/// have no IPv6 route).
const DOMAIN_SET: &str = "domains4";

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
    #[error("unreadable egress counter")]
    Counter,
    #[error("{name:?} is not a domain name to allow: {why}")]
    BadDomain { name: String, why: &'static str },
    #[error("cannot make a resolver for the allowed domains")]
    Resolver(#[source] hickory_resolver::net::NetError),
}

/// Checks and normalises (lower case, no final dot) an operator's domain
/// name to allow. Wildcards are refused: the server resolves each name
/// itself and cannot list a domain's subdomains.
pub fn parse_domain(text: &str) -> Result<String, NetError> {
    let bad = |why| NetError::BadDomain {
        name: text.to_string(),
        why,
    };
    let name = text.trim().trim_end_matches('.').to_ascii_lowercase();
    if name.starts_with("*.") {
        return Err(bad("wildcards are not supported, list each name"));
    }
    if name.parse::<IpAddr>().is_ok() {
        return Err(bad("an address, use --egress-allow"));
    }
    if name.is_empty() || name.len() > 253 {
        return Err(bad("it must have 1 to 253 characters"));
    }
    let labels: Vec<&str> = name.split('.').collect();
    if labels.len() < 2 {
        return Err(bad("it needs at least two labels (example.com)"));
    }
    for label in &labels {
        let valid = (1..=63).contains(&label.len())
            && label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !valid {
            return Err(bad(
                "each label is 1 to 63 of a-z 0-9 - _ and does not start or end with -",
            ));
        }
    }
    if labels
        .last()
        .is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(bad("its last label is all digits"));
    }
    Ok(name)
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
    /// Names ([`parse_domain`]) whose addresses, as the VMs' resolver
    /// answers, VMs reach even inside a deny range (never a forbidden one
    /// that `allow` does not open).
    pub allow_domains: Vec<String>,
    /// Egress limits per vCPU of a VM's shape ([`Self::limits_for`]).
    pub limits_per_vcpu: EgressLimits,
    /// The resolver the guests' DNS (10.0.2.3) is sent to.
    pub dns: Ipv4Addr,
    /// Name of the host's nftables table (`inet`).
    pub table: String,
    /// Prefix of the host's veth names (`<prefix><slot>`, at most 15 bytes).
    pub link_prefix: String,
    /// Prefix of the VM namespaces' names (`<prefix><instance>`).
    pub netns_prefix: String,
    /// Namespaces with egress kept made ahead ([`Network::keep_spares`]), so a
    /// launch with egress takes one instead of waiting for four programs.
    pub spares: usize,
}

impl NetConfig {
    /// The defaults: pool 10.201.0.0/16, table `hearth`, veths
    /// `hearth<slot>`, namespaces `hearth-<instance>`.
    pub fn new(dns: Ipv4Addr) -> Self {
        Self {
            pool: Ipv4Net::new(Ipv4Addr::new(10, 201, 0, 0), 16).expect("valid prefix length"),
            allow: Vec::new(),
            deny: Vec::new(),
            allow_domains: Vec::new(),
            limits_per_vcpu: EgressLimits::DEFAULT_PER_VCPU,
            dns,
            table: "hearth".into(),
            link_prefix: "hearth".into(),
            netns_prefix: "hearth-".into(),
            spares: 0,
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

    /// The egress limits of a VM of shape `shape`.
    pub fn limits_for(&self, shape: MachineShape) -> EgressLimits {
        let vcpus = shape.vcpus.max(1);
        EgressLimits {
            bytes_per_second: self
                .limits_per_vcpu
                .bytes_per_second
                .saturating_mul(u64::from(vcpus)),
            connections: self
                .limits_per_vcpu
                .connections
                .saturating_mul(u32::from(vcpus)),
        }
    }

    fn check(&self) -> Result<(), NetError> {
        for name in &self.allow_domains {
            parse_domain(name)?;
        }
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
             \t\tiifname {veths} ip daddr @{DOMAIN_SET} ip daddr != @forbidden4 fib daddr type unicast accept\n\
             \t\tiifname {veths} ip daddr @{DOMAIN_SET} ip daddr @allow4 fib daddr type unicast accept\n\
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
                format!("\tset {DOMAIN_SET} {{\n\t\ttype ipv4_addr; flags timeout;\n\t}}\n"),
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
    /// Per vCPU unless the operator says otherwise: 100 Mbit/s each way and
    /// 512 concurrent connections.
    pub const DEFAULT_PER_VCPU: Self = Self {
        bytes_per_second: 12_500_000,
        connections: 512,
    };
}

/// Sets up and tears down VM networks on this host (see the module docs).
#[derive(Debug)]
pub struct Network {
    config: NetConfig,
    /// Where the next slot search starts (slots are claimed by creating the
    /// host's veth: the kernel refuses a name that exists).
    next_slot: AtomicU32,
    /// The task keeping the allowed domains' addresses fresh (ends with this).
    domains: Option<tokio::task::AbortHandle>,
    /// Namespaces made ahead, with their uplink and these limits.
    spares: std::sync::Mutex<VecDeque<Spare>>,
    /// Numbers the spares' names.
    next_spare: AtomicU32,
    /// Wakes the task that keeps the spares ([`Self::keep_spares`]).
    spare_taken: Arc<tokio::sync::Notify>,
    spare_keeper: std::sync::OnceLock<tokio::task::AbortHandle>,
}

/// A namespace made ahead of its VM ([`Network::keep_spares`]).
#[derive(Debug)]
struct Spare {
    netns: String,
    limits: EgressLimits,
}

impl Drop for Network {
    fn drop(&mut self) {
        if let Some(task) = &self.domains {
            task.abort();
        }
        if let Some(task) = self.spare_keeper.get() {
            task.abort();
        }
        let spares = std::mem::take(&mut *lock(&self.spares));
        for spare in spares {
            delete_netns(&spare.netns);
        }
    }
}

/// The spares' queue; a panic elsewhere cannot leave it inconsistent (every
/// change is one push or pop), so a poisoned lock is taken as it is.
fn lock(spares: &std::sync::Mutex<VecDeque<Spare>>) -> std::sync::MutexGuard<'_, VecDeque<Spare>> {
    spares
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Network {
    /// Checks the configuration, turns on IPv4 forwarding and installs the
    /// host table. Needs root (CAP_NET_ADMIN).
    pub async fn start(config: NetConfig) -> Result<Self, NetError> {
        config.check()?;
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").map_err(NetError::Forwarding)?;
        run_with_input("nft", &["-f", "-"], &config.host_ruleset()).await?;
        let next_slot = AtomicU32::new(rand::random::<u32>() % config.slots());
        let domains = if config.allow_domains.is_empty() {
            None
        } else {
            let mut allow = DomainAllow::new(&config)?;
            // Once before any VM starts, then in the background.
            allow.refresh_due().await;
            Some(tokio::spawn(allow.run()).abort_handle())
        };
        let this = Self {
            config,
            next_slot,
            domains,
            spares: std::sync::Mutex::new(VecDeque::new()),
            next_spare: AtomicU32::new(0),
            spare_taken: Arc::new(tokio::sync::Notify::new()),
            spare_keeper: std::sync::OnceLock::new(),
        };
        this.remove_stale_spares();
        Ok(this)
    }

    /// Keeps `config.spares` namespaces with egress made ahead, in a task that
    /// ends when this network does: a launch with egress then takes one
    /// ([`Self::create`]) and costs two mounts instead of the ~30 ms of `ip`
    /// and `nft` runs (the same idea as E2B's network slot pool). A spare
    /// carries the default shape's limits; another shape's are set when it is
    /// taken. Its tap has no owner: only the server (CAP_NET_ADMIN) attaches
    /// to it, and the jailed QEMU gets the descriptor.
    pub fn keep_spares(self: &Arc<Self>) {
        if self.config.spares == 0 {
            return;
        }
        let network = Arc::downgrade(self);
        let task = tokio::spawn(async move {
            loop {
                let Some(this) = network.upgrade() else {
                    return;
                };
                let wanted = this.config.spares.saturating_sub(lock(&this.spares).len());
                if wanted == 0 {
                    // A take before this wait leaves a permit: no wake-up is lost.
                    let taken = this.spare_taken.clone();
                    drop(this);
                    taken.notified().await;
                    continue;
                }
                if let Err(err) = this.make_spare().await {
                    // Launches go on without spares; try again later.
                    tracing::warn!(error = %err, "cannot make a spare VM network");
                    drop(this);
                    tokio::time::sleep(SPARE_RETRY).await;
                }
            }
        });
        let _ = self.spare_keeper.set(task.abort_handle());
    }

    /// Spare namespaces ready now.
    pub fn spares_ready(&self) -> usize {
        lock(&self.spares).len()
    }

    async fn make_spare(&self) -> Result<(), NetError> {
        let n = self.next_spare.fetch_add(1, Ordering::Relaxed);
        let netns = format!(
            "{}{SPARE_TAG}{}-{n}",
            self.config.netns_prefix,
            std::process::id()
        );
        let limits = self.config.limits_for(MachineShape::default());
        self.create_named(&netns, None, Some(limits)).await?;
        lock(&self.spares).push_back(Spare { netns, limits });
        Ok(())
    }

    /// Spares a killed server left: those of a process that is gone (the
    /// name carries its pid, so servers that share a prefix, as test suites
    /// do, keep each other's).
    fn remove_stale_spares(&self) {
        let prefix = format!("{}{SPARE_TAG}", self.config.netns_prefix);
        for entry in std::fs::read_dir("/run/netns")
            .into_iter()
            .flatten()
            .flatten()
        {
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                continue;
            };
            let Some(rest) = name.strip_prefix(&prefix) else {
                continue;
            };
            let owner = rest
                .split('-')
                .next()
                .and_then(|pid| pid.parse::<u32>().ok());
            let alive = owner.is_some_and(|pid| {
                pid != std::process::id() && Path::new("/proc").join(pid.to_string()).exists()
            });
            if !alive {
                delete_netns(&name);
            }
        }
    }

    /// Gives spare `spare`'s namespace instance `instance`'s name: the
    /// namespace file is bind-mounted at the new name (as `ip netns add`
    /// mounts it) and the old name unmounted. A namespace lives while a
    /// mount of it does, so nothing in it changes.
    fn rename_spare(&self, spare: &str, instance: &str) -> Result<(), NetError> {
        use std::os::unix::fs::OpenOptionsExt;
        let from = PathBuf::from("/run/netns").join(spare);
        let to = self.netns_path(instance);
        let failed = |e: std::io::Error| NetError::Run("mount", e);
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o000)
            .open(&to)
            .map_err(failed)?;
        if let Err(err) = rustix::mount::mount_bind(&from, &to) {
            let _ = std::fs::remove_file(&to);
            return Err(failed(err.into()));
        }
        delete_netns(spare);
        Ok(())
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
        if let Some(limits) = egress {
            if self.take_spare(instance, limits).await? {
                return Ok(());
            }
        }
        self.create_named(&self.netns_name(instance), Some(uid), egress)
            .await
    }

    /// Gives instance `instance` a spare namespace with `limits`, if there is
    /// one; false when there is none (or the one taken could not be renamed).
    async fn take_spare(&self, instance: &str, limits: EgressLimits) -> Result<bool, NetError> {
        let Some(spare) = lock(&self.spares).pop_front() else {
            return Ok(false);
        };
        self.spare_taken.notify_one();
        if let Err(err) = self.rename_spare(&spare.netns, instance) {
            tracing::warn!(error = %err, "cannot use a spare VM network");
            delete_netns(&spare.netns);
            return Ok(false);
        }
        if spare.limits != limits {
            if let Err(err) = self.set_limits(instance, limits).await {
                self.remove(instance);
                return Err(err);
            }
        }
        Ok(true)
    }

    /// Creates namespace `netns` with its tap (owned by `uid`, else by
    /// nobody: only CAP_NET_ADMIN attaches) and, when `egress` is given, its
    /// uplink.
    async fn create_named(
        &self,
        netns: &str,
        uid: Option<u32>,
        egress: Option<EgressLimits>,
    ) -> Result<(), NetError> {
        run("ip", &["netns", "add", netns]).await?;
        let owner = uid.map(|uid| format!(" user {uid}")).unwrap_or_default();
        let tap = format!(
            "link set lo up\n\
             tuntap add dev {TAP} mode tap{owner}\n\
             link set {TAP} address {TAP_MAC}\n\
             addr add {GUEST_GATEWAY}/24 dev {TAP}\n\
             addr add {GUEST_DNS}/24 dev {TAP}\n\
             link set {TAP} up\n"
        );
        let made = match egress {
            Some(limits) => self.uplink(netns, limits, &tap).await,
            None => run_with_input("ip", &["-n", netns, "-batch", "-"], &tap)
                .await
                .map(drop),
        };
        if made.is_err() {
            delete_netns(netns);
        }
        made
    }

    /// Gives instance `instance`'s namespace its uplink: a veth pair on a
    /// free slot of the pool, NAT, DNS and limits.
    pub async fn connect(&self, instance: &str, limits: EgressLimits) -> Result<(), NetError> {
        self.uplink(&self.netns_name(instance), limits, "").await
    }

    /// [`Self::connect`] for namespace `netns`, running `first` in the
    /// namespace's `ip` batch too.
    async fn uplink(&self, netns: &str, limits: EgressLimits, first: &str) -> Result<(), NetError> {
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
            &["-n", netns, "-batch", "-"],
            &format!(
                "{first}\
                 addr add {inner}/30 dev {UPLINK}\n\
                 link set {UPLINK} up\n\
                 route add default via {host}\n"
            ),
        )
        .await?;
        let rules = vm_ruleset(self.config.dns, limits);
        nft_in(
            &PathBuf::from("/run/netns").join(netns),
            &["-f", "-"],
            Some(&rules),
            true,
        )
        .await
        .map(drop)
    }

    /// Gives instance `instance`'s uplink new limits (its forward chain is
    /// replaced; the egress counter carries on). Connections over a new,
    /// lower connection limit stay open: only new ones are counted.
    pub async fn set_limits(&self, instance: &str, limits: EgressLimits) -> Result<(), NetError> {
        let mut script = format!("flush chain inet {VM_TABLE} forward\n");
        for rule in forward_rules(limits) {
            script.push_str(&format!("add rule inet {VM_TABLE} forward {rule}\n"));
        }
        nft_in(
            &self.netns_path(instance),
            &["-f", "-"],
            Some(&script),
            false,
        )
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

    /// Bytes the guest has sent out of its namespace since it was made: what
    /// its uplink transmitted, after the namespace's own filter and limits.
    /// Read from the kernel's interface counters by a thread that enters the
    /// namespace, not by an `nft` process: the meter asks for every VM each
    /// round, and a process per VM would cost more than the rest of metering.
    pub async fn egress_bytes(&self, instance: &str) -> Result<u64, NetError> {
        let path = self.netns_path(instance);
        tokio::task::spawn_blocking(move || {
            let netns = std::fs::File::open(&path).map_err(|_| NetError::Counter)?;
            let table = read_net_dev(&netns).map_err(|_| NetError::Counter)?;
            transmitted_bytes(&table, UPLINK).ok_or(NetError::Counter)
        })
        .await
        .map_err(|_| NetError::Counter)?
    }

    /// Deletes instance `instance`'s namespace with everything in it (its
    /// veth pair, its connection tracking); missing is fine. Synchronous:
    /// callers include drop guards.
    pub fn remove(&self, instance: &str) {
        delete_netns(&self.netns_name(instance));
    }
}

/// Deletes namespace `netns`; missing is fine. Synchronous (drop guards).
fn delete_netns(netns: &str) {
    let _ = std::process::Command::new("ip")
        .args(["netns", "delete", netns])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Keeps the host set [`DOMAIN_SET`] holding the addresses the operator's
/// allowed domains resolve to, asking the VMs' own resolver (so the server
/// sees the answers a guest gets, as far as that resolver answers alike).
///
/// Each answer is kept for its TTL, clamped to [`TTL_FLOOR`, `TTL_CEILING`],
/// plus [`GRACE`] (a guest may still hold an answer the server has seen
/// expire); a name is asked again at half its TTL. A name that does not
/// resolve is logged and asked again after [`RETRY`]; its earlier addresses
/// stay until they expire. Why a resolver crate and not the guest's own
/// queries: the kernel sees DNS answers only as packets, and the set must be
/// filled before the guest connects; hickory-resolver is the well-kept
/// Rust stub resolver.
struct DomainAllow {
    names: Vec<String>,
    resolver: hickory_resolver::TokioResolver,
    table: String,
    /// When each name is due to be asked again (same order as `names`).
    due: Vec<Instant>,
    /// Every address kept, with when it expires.
    addresses: HashMap<Ipv4Addr, Instant>,
}

const TTL_FLOOR: Duration = Duration::from_secs(30);
const TTL_CEILING: Duration = Duration::from_secs(3600);
const GRACE: Duration = Duration::from_secs(30);
const RETRY: Duration = Duration::from_secs(15);

impl DomainAllow {
    fn new(config: &NetConfig) -> Result<Self, NetError> {
        use hickory_resolver::config::{NameServerConfig, ResolverConfig};
        let servers = vec![NameServerConfig::udp_and_tcp(IpAddr::V4(config.dns))];
        let mut builder = hickory_resolver::Resolver::builder_with_config(
            ResolverConfig::from_parts(None, Vec::new(), servers),
            hickory_resolver::net::runtime::TokioRuntimeProvider::default(),
        );
        let options = builder.options_mut();
        // Every refresh asks the server: a cached answer's shrinking TTL
        // would make the refreshes ever more frequent.
        options.cache_size = 0;
        options.timeout = Duration::from_secs(2);
        options.attempts = 2;
        let resolver = builder.build().map_err(NetError::Resolver)?;
        let now = Instant::now();
        Ok(Self {
            names: config.allow_domains.clone(),
            resolver,
            table: config.table.clone(),
            due: vec![now; config.allow_domains.len()],
            addresses: HashMap::new(),
        })
    }

    async fn run(mut self) {
        loop {
            let next = self.due.iter().min().copied().unwrap_or_else(Instant::now);
            tokio::time::sleep_until(next.max(Instant::now() + Duration::from_secs(1))).await;
            self.refresh_due().await;
        }
    }

    /// Asks again every name that is due, then rewrites the set.
    async fn refresh_due(&mut self) {
        let now = Instant::now();
        let due: Vec<usize> = (0..self.names.len())
            .filter(|&i| self.due[i] <= now)
            .collect();
        let answers = futures::future::join_all(
            due.iter()
                .map(|&i| resolve_ipv4(&self.resolver, &self.names[i])),
        )
        .await;
        for (i, answer) in due.into_iter().zip(answers) {
            let name = &self.names[i];
            match answer {
                Ok((found, ttl)) => {
                    let ttl = ttl.clamp(TTL_FLOOR, TTL_CEILING);
                    tracing::debug!(%name, ?found, ttl_s = ttl.as_secs(), "allowed domain resolved");
                    for address in found {
                        let expires = now + ttl + GRACE;
                        let kept = self.addresses.entry(address).or_insert(expires);
                        *kept = (*kept).max(expires);
                    }
                    self.due[i] = now + ttl / 2;
                }
                Err(error) => {
                    let error = crate::errors::error_chain(&error);
                    tracing::warn!(%name, %error, "an allowed domain did not resolve; asking again soon");
                    self.due[i] = now + RETRY;
                }
            }
        }
        self.addresses.retain(|_, expires| *expires > now);
        let script = domain_set_script(&self.table, &self.addresses, now);
        if let Err(error) = run_with_input("nft", &["-f", "-"], &script).await {
            let error = crate::errors::error_chain(&error);
            tracing::warn!(%error, "cannot update the allowed domains' addresses");
        }
    }
}

impl fmt::Debug for DomainAllow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DomainAllow")
            .field("names", &self.names)
            .field("addresses", &self.addresses.len())
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
enum ResolveError {
    #[error("lookup failed")]
    Lookup(#[source] hickory_resolver::net::NetError),
    #[error("no IPv4 address")]
    NoAddress,
}

/// The IPv4 addresses `name` resolves to and how long the answer holds.
async fn resolve_ipv4(
    resolver: &hickory_resolver::TokioResolver,
    name: &str,
) -> Result<(Vec<Ipv4Addr>, Duration), ResolveError> {
    // A final dot: the name is complete, no search domains.
    let lookup = resolver
        .ipv4_lookup(format!("{name}."))
        .await
        .map_err(ResolveError::Lookup)?;
    let found: Vec<Ipv4Addr> = lookup
        .answers()
        .iter()
        .filter_map(|record| match &record.data {
            hickory_resolver::proto::rr::RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect();
    if found.is_empty() {
        return Err(ResolveError::NoAddress);
    }
    let ttl = lookup
        .valid_until()
        .saturating_duration_since(std::time::Instant::now());
    Ok((found, ttl))
}

/// One atomic nft transaction that replaces the set's elements, each with
/// the time it has left.
fn domain_set_script(table: &str, addresses: &HashMap<Ipv4Addr, Instant>, now: Instant) -> String {
    let mut script = format!("flush set inet {table} {DOMAIN_SET}\n");
    if !addresses.is_empty() {
        let mut elements: Vec<(Ipv4Addr, u64)> = addresses
            .iter()
            .map(|(address, expires)| {
                (
                    *address,
                    expires.saturating_duration_since(now).as_secs().max(1),
                )
            })
            .collect();
        elements.sort();
        let list: Vec<String> = elements
            .iter()
            .map(|(address, seconds)| format!("{address} timeout {seconds}s"))
            .collect();
        script.push_str(&format!(
            "add element inet {table} {DOMAIN_SET} {{ {} }}\n",
            list.join(", ")
        ));
    }
    script
}

/// A VM namespace's table, replaced whole (a namespace given egress again
/// gets no duplicates). `inet`: the input and forward policies drop IPv6 as
/// well.
fn vm_ruleset(dns: Ipv4Addr, limits: EgressLimits) -> String {
    let forward: String = forward_rules(limits)
        .iter()
        .map(|rule| format!("\t\t{rule}\n"))
        .collect();
    format!(
        "table inet {VM_TABLE} {{}}\n\
         delete table inet {VM_TABLE}\n\
         table inet {VM_TABLE} {{\n\
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
         {forward}\
         \t}}\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\toifname {UPLINK} masquerade\n\
         \t}}\n\
         }}\n"
    )
}

/// The VM namespace's forward chain: replies in, the guest's new connections
/// out (a TCP segment of a connection the namespace never saw open is reset),
/// within its limits. The bandwidth limit polices each direction on its own,
/// with a tenth of a second's bytes as burst so TCP settles near the rate
/// rather than far below it.
fn forward_rules(limits: EgressLimits) -> Vec<String> {
    let EgressLimits {
        bytes_per_second,
        connections,
    } = limits;
    let burst = (bytes_per_second / 10).max(16 * 1024);
    let rate = format!("limit rate over {bytes_per_second} bytes/second burst {burst} bytes drop");
    vec![
        format!("iifname {UPLINK} oifname {TAP} {rate}"),
        format!("iifname {UPLINK} oifname {TAP} ct state established,related accept"),
        format!("iifname {TAP} oifname {UPLINK} meta l4proto tcp ct state new tcp flags & (syn | ack) != syn reject with tcp reset"),
        format!("iifname {TAP} oifname {UPLINK} ct state new ct count over {connections} drop"),
        format!("iifname {TAP} oifname {UPLINK} {rate}"),
        format!("iifname {TAP} oifname {UPLINK} accept"),
    ]
}

impl fmt::Display for NetConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "pool {}, DNS {}, allow [{}], deny [{}], allow domains [{}], per vCPU {} bytes/s and {} connections",
            self.pool,
            self.dns,
            join(&self.allow),
            join(&self.deny),
            self.allow_domains.join(", "),
            self.limits_per_vcpu.bytes_per_second,
            self.limits_per_vcpu.connections,
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

/// Runs `work` on a short-lived thread inside the network namespace
/// `netns` (setns(2) moves only the calling thread, which ends right after),
/// for what the kernel resolves in the caller's namespace: a tap by name,
/// `/proc/thread-self/net`.
fn in_netns<T: Send>(
    netns: &std::fs::File,
    work: impl FnOnce() -> std::io::Result<T> + Send,
) -> std::io::Result<T> {
    use std::os::fd::AsRawFd;
    let netns = netns.as_raw_fd();
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                // SAFETY: setns(2) on a descriptor the caller keeps open; it
                // moves only this thread, which ends right after.
                if unsafe { libc::setns(netns, libc::CLONE_NEWNET) } != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                work()
            })
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("namespace thread panicked")))
    })
}

/// `/proc/net/dev` as seen from inside `netns`.
fn read_net_dev(netns: &std::fs::File) -> std::io::Result<String> {
    in_netns(netns, || {
        std::fs::read_to_string("/proc/thread-self/net/dev")
    })
}

/// The transmitted bytes of `link` in a `/proc/net/dev` table (per line:
/// `name: rx_bytes packets errs drop fifo frame compressed multicast
/// tx_bytes ...`).
fn transmitted_bytes(table: &str, link: &str) -> Option<u64> {
    table.lines().find_map(|line| {
        let (name, counters) = line.split_once(':')?;
        if name.trim() != link {
            return None;
        }
        counters.split_whitespace().nth(8)?.parse().ok()
    })
}

/// Opens the tap of a VM namespace for QEMU (`-netdev tap,fd=N`). The server
/// opens it, not QEMU: a jailed QEMU has dropped root, and hosts differ in
/// whether `/dev/net/tun` is open to other users. A tap is found by name in
/// the opener's network namespace, so a short-lived thread enters `netns`
/// (setns changes only the calling thread) and leaves with the descriptor,
/// which keeps pointing at the tap wherever QEMU then runs.
pub fn open_tap(netns: &std::fs::File) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    in_netns(netns, || {
        // SAFETY: open(2) of a constant NUL-terminated path.
        let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transmitted_bytes_come_from_the_links_own_line() {
        let table = "Inter-|   Receive                                                |  Transmit\n \
             face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    \
             lo:     120       2    0    0    0     0          0         0      120       2    0    0    0     0       0          0\n   \
             up0: 9876543   12000    0    0    0     0          0         0 55555555   40000    0    0    0     0       0          0\n";
        assert_eq!(transmitted_bytes(table, "up0"), Some(55_555_555));
        assert_eq!(transmitted_bytes(table, "lo"), Some(120));
        assert_eq!(transmitted_bytes(table, "tap0"), None);
        assert_eq!(transmitted_bytes("up0: 1 2 3", "up0"), None);
    }

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

    #[test]
    fn domain_names_are_checked_and_normalised() {
        assert_eq!(parse_domain("Web.HN.test.").expect("valid"), "web.hn.test");
        assert_eq!(
            parse_domain("pypi.org").expect("valid"),
            "pypi.org",
            "a plain name"
        );
        assert_eq!(
            parse_domain("_srv.a-b.example").expect("valid"),
            "_srv.a-b.example"
        );
        for (bad, says) in [
            ("*.example.com", "wildcards"),
            ("198.51.100.10", "--egress-allow"),
            ("localhost", "two labels"),
            ("", "1 to 253"),
            ("a..example.com", "each label"),
            ("-a.example.com", "each label"),
            ("a b.example.com", "each label"),
            ("example.123", "all digits"),
        ] {
            let err = parse_domain(bad).expect_err(bad);
            let text = err.to_string();
            assert!(text.contains(says), "{bad}: {text}");
            assert!(text.contains(&format!("{bad:?}")), "{bad}: {text}");
        }
        let long = format!("{}.com", "a".repeat(64));
        assert!(parse_domain(&long).is_err());
        let mut config = NetConfig::new(Ipv4Addr::new(192, 0, 2, 53));
        config.allow_domains = vec!["*.example.com".into()];
        assert!(matches!(config.check(), Err(NetError::BadDomain { .. })));
    }

    #[test]
    fn domain_addresses_pass_before_deny_but_not_into_forbidden_ranges() {
        let mut config = NetConfig::new(Ipv4Addr::new(192, 0, 2, 53));
        config.deny = vec![parse_cidr("0.0.0.0/0").expect("valid")];
        config.allow_domains = vec!["web.example.com".into()];
        let rules = config.host_ruleset();
        let dns = rules.find("th dport 53 accept").expect("dns");
        let domains = rules
            .find("ip daddr @domains4 ip daddr != @forbidden4 fib daddr type unicast accept")
            .expect("domain rule");
        let opened = rules
            .find("ip daddr @domains4 ip daddr @allow4 fib daddr type unicast accept")
            .expect("domain rule in an allowed range");
        let deny = rules.find("@deny4 drop").expect("deny");
        assert!(
            dns < domains && domains < opened && opened < deny,
            "{rules}"
        );
        assert!(rules.contains("set domains4 {\n\t\ttype ipv4_addr; flags timeout;"));
    }

    #[test]
    fn the_domain_set_is_replaced_with_the_time_each_address_has_left() {
        let now = Instant::now();
        let mut addresses = HashMap::new();
        assert_eq!(
            domain_set_script("t", &addresses, now),
            "flush set inet t domains4\n"
        );
        addresses.insert(
            Ipv4Addr::new(198, 51, 100, 20),
            now + Duration::from_secs(90),
        );
        addresses.insert(Ipv4Addr::new(198, 51, 100, 10), now);
        assert_eq!(
            domain_set_script("t", &addresses, now),
            "flush set inet t domains4\n\
             add element inet t domains4 { 198.51.100.10 timeout 1s, 198.51.100.20 timeout 90s }\n"
        );
    }

    #[test]
    fn limits_scale_with_vcpus_and_police_both_ways() {
        let mut config = NetConfig::new(Ipv4Addr::new(192, 0, 2, 53));
        assert_eq!(
            config.limits_for(MachineShape::fixed(1024, 2)),
            EgressLimits {
                bytes_per_second: 25_000_000,
                connections: 1024
            }
        );
        config.limits_per_vcpu = EgressLimits {
            bytes_per_second: 1_000_000,
            connections: 4,
        };
        let limits = config.limits_for(MachineShape::default());
        assert_eq!(limits.connections, 4);
        let rules = vm_ruleset(config.dns, limits);
        assert!(rules.contains(
            "iifname up0 oifname tap0 limit rate over 1000000 bytes/second burst 100000 bytes drop"
        ));
        assert!(rules.contains(
            "iifname tap0 oifname up0 limit rate over 1000000 bytes/second burst 100000 bytes drop"
        ));
        assert!(rules.contains("ct state new ct count over 4 drop"));
        // The download limit comes before established traffic is accepted.
        let download = rules.find("iifname up0 oifname tap0 limit").expect("limit");
        let established = rules
            .find("ct state established,related accept")
            .expect("accept");
        assert!(download < established, "{rules}");
    }
}

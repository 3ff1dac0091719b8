//! The `hearth` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use hearth_proto::{ExecRequest, WriteFileRequest};
use hearth_vm::snapshot::Verify;
use hearth_vm::{Assets, BootRequest, Driver, MachineShape, QemuDriver, Snapshot, VmState};

mod app_logs_cli;
mod bench;
mod bench_api;
mod bench_build;
mod bench_chaos;
mod bench_density;
mod bench_endpoint;
mod bench_net;
mod client_cli;
mod connect;
mod cp_cli;
mod endpoint_cli;
mod exec_cli;
mod guest_cli;
mod guest_endpoint;
mod image_build;
mod measure;
mod operator;
mod port_forward;
mod progress;
mod shell;
mod signals;
mod terminal;
mod usage_cli;

#[derive(Debug, Parser)]
#[command(name = "hearth", version, about = "Run untrusted code in microVMs")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Engine-level VM control (boot, exec, snapshot, launch, suspend, resume).
    #[command(subcommand)]
    Vm(VmCommand),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Serve the Lambda MicroVMs API.
    Serve(Box<ServeArgs>),
    /// Manage tenant accounts (works while the server runs).
    #[command(subcommand)]
    Account(AccountCommand),
    /// Endpoint token signing keys (operator; restart the server afterwards).
    #[command(subcommand)]
    TokenKeys(TokenKeysCommand),
    /// MicroVM images.
    #[command(subcommand)]
    Image(operator::ImageCommand),
    /// An interactive root shell in a microVM through its endpoint (needs SHELL_INGRESS).
    Shell(shell::ShellArgs),
    /// Mint an endpoint token for one port of a microVM (CreateMicrovmAuthToken).
    Token(endpoint_cli::TokenArgs),
    /// Print a URL for a microVM's endpoint and how to send its token.
    Open(endpoint_cli::OpenArgs),
    /// run, ls, get, suspend, resume, terminate, configure: through the API.
    #[command(flatten)]
    Client(client_cli::ClientCommand),
    /// exec, cp, port-forward: into a running microVM through its endpoint.
    #[command(flatten)]
    Guest(guest_cli::GuestCommand),
    /// Metered usage and its cost (operator: reads the data directory).
    Usage(usage_cli::UsageArgs),
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Holds the database, master key, images, snapshots and VM state.
    #[arg(long, env = "HEARTH_DATA_DIR")]
    data_dir: Option<PathBuf>,
    #[arg(long, default_value = "127.0.0.1:9070")]
    listen: std::net::SocketAddr,
    #[arg(long, default_value = "us-east-1", value_parser = parse_region)]
    region: String,
    /// Override a per-account rate limit, e.g. `--rate-limit RunMicrovm=20` (repeatable).
    #[arg(long = "rate-limit", value_name = "OPERATION=PER_SECOND")]
    rate_limits: Vec<String>,
    /// Override a per-account quota: memory-mib, images, versions-per-image or
    /// concurrent-builds, e.g. `--quota memory-mib=8192` (repeatable).
    #[arg(long = "quota", value_name = "NAME=NUMBER")]
    quotas: Vec<String>,
    /// MicroVM endpoints are `<microvm-id>.<DOMAIN>`.
    #[arg(long, default_value = "localhost")]
    endpoint_domain: String,
    /// Where the endpoint proxy listens (HTTP/1.1 and h2c).
    #[arg(long, default_value = "127.0.0.1:9080")]
    endpoint_listen: std::net::SocketAddr,
    /// Also serve endpoints over TLS here (certificate in DATA/tls, generated
    /// at first start for *.DOMAIN unless one is put there).
    #[arg(long)]
    endpoint_tls_listen: Option<std::net::SocketAddr>,
    /// Serve no endpoints.
    #[arg(long)]
    no_endpoints: bool,
    /// Concurrent requests and WebSockets per microVM through its endpoint (0: no limit).
    #[arg(long, default_value_t = 64)]
    endpoint_max_connections: usize,
    /// Requests per second per microVM through its endpoint (0: no limit).
    #[arg(long, default_value_t = 160)]
    endpoint_rps: u32,
    /// Longest lifetime a microVM may ask for (maximumDurationInSeconds), in seconds.
    #[arg(long, default_value_t = 28_800, value_parser = clap::value_parser!(u64).range(1..=31_536_000))]
    max_lifetime: u64,
    /// Accept `file:///path` code artifacts (files on this host) in image builds.
    #[arg(long)]
    allow_file_artifacts: bool,
    /// Fetch `s3://` code artifacts from this S3-compatible store instead of the
    /// built-in one, with the keys in HEARTH_ARTIFACT_S3_ACCESS_KEY_ID and
    /// HEARTH_ARTIFACT_S3_SECRET_ACCESS_KEY (account isolation is then that store's).
    #[arg(long, value_name = "URL")]
    artifact_s3_endpoint: Option<String>,
    /// Region the external artifact store signs for (default: --region).
    #[arg(long, value_parser = parse_region)]
    artifact_s3_region: Option<String>,
    /// Address the external artifact store as URL/bucket/key (else bucket.host/key).
    #[arg(long)]
    artifact_s3_path_style: bool,
    /// Largest code artifact, and largest object the built-in S3 store accepts.
    #[arg(long, default_value_t = 5 << 30, value_parser = clap::value_parser!(u64).range(1..))]
    max_artifact_bytes: u64,
    /// OCI registry (HOST:PORT) that Dockerfile FROM lines may pull from;
    /// credentials from HEARTH_REGISTRY_USERNAME / HEARTH_REGISTRY_PASSWORD.
    #[arg(long, value_name = "HOST:PORT")]
    registry: Option<String>,
    /// Talk to --registry over plain HTTP (a registry on loopback).
    #[arg(long)]
    registry_insecure: bool,
    /// Warm pool: VMs restored ahead of time for recently run image versions,
    /// all versions together (0: no pool, every RunMicrovm starts a QEMU).
    #[arg(long, default_value_t = 4)]
    warm_pool_max: usize,
    /// Warm pool slots each recently run image version keeps.
    #[arg(long, default_value_t = 1)]
    warm_pool_per_version: usize,
    /// A version keeps its warm pool this many seconds after its last RunMicrovm.
    #[arg(long, default_value_t = 300)]
    warm_pool_window: u64,
    /// Drop build-cache entries unused for this many days (at start).
    #[arg(long, default_value_t = 14, value_parser = clap::value_parser!(u64).range(1..=3650))]
    build_cache_days: u64,
    /// The uids jailed QEMUs run as (root server): one per microVM from
    /// BASE+1..BASE+COUNT; BASE is the group that reads shared read-only assets.
    #[arg(long, value_name = "BASE:COUNT", value_parser = parse_jail_uids)]
    jail_uids: Option<hearth_vm::JailMode>,
    /// Run QEMU without its jail (development only; refused as root).
    #[arg(long, conflicts_with = "jail_uids")]
    no_jail: bool,
    /// Give microVMs and build steps no network at all (without root this is
    /// the only mode: VM networks need network namespaces and nftables).
    #[arg(long)]
    no_vm_network: bool,
    /// Egress of a microVM that names no egress connector: `internet` (as the
    /// reference) or `none`.
    #[arg(long, value_enum, default_value = "internet")]
    default_egress: DefaultEgress,
    /// Let VMs reach this range although the defaults forbid it (private,
    /// link-local, ...), e.g. `--egress-allow 10.20.0.0/16` (repeatable).
    #[arg(long = "egress-allow", value_name = "CIDR", value_parser = parse_cidr)]
    egress_allow: Vec<hearth_vm::net::IpNet>,
    /// Never let VMs reach this range; wins over --egress-allow (repeatable).
    #[arg(long = "egress-deny", value_name = "CIDR", value_parser = parse_cidr)]
    egress_deny: Vec<hearth_vm::net::IpNet>,
    /// Let VMs reach the addresses NAME resolves to through the VMs' resolver
    /// (--dns), even inside an --egress-deny range; never a forbidden default
    /// range that --egress-allow does not open (repeatable; no wildcards).
    #[arg(long = "egress-allow-domain", value_name = "NAME", value_parser = parse_domain)]
    egress_allow_domain: Vec<String>,
    /// Each VM's bandwidth, each way, per vCPU of its shape (Mbit/s).
    #[arg(long, value_name = "MBIT", default_value_t = 100,
          value_parser = clap::value_parser!(u64).range(1..=100_000))]
    egress_mbit_per_vcpu: u64,
    /// Each VM's concurrent outbound connections per vCPU of its shape.
    #[arg(long, value_name = "N", default_value_t = 512,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    egress_connections_per_vcpu: u32,
    /// The resolver VMs' DNS goes to (IPv4; default: the first usable
    /// nameserver of /etc/resolv.conf).
    #[arg(long, value_name = "ADDR")]
    dns: Option<std::net::Ipv4Addr>,
    /// Host-side addresses of the VMs' links, one /30 per VM.
    #[arg(long, value_name = "CIDR", default_value = "10.201.0.0/16")]
    vm_address_pool: hearth_vm::net::Ipv4Net,
    /// Names of this server's network objects: nftables table NAME, links
    /// NAME<slot>, namespaces NAME-<instance> (two servers on one host need
    /// different names and pools).
    #[arg(long, value_name = "NAME", default_value = "hearth", value_parser = parse_net_name)]
    vm_net_name: String,
    /// VM networks (namespace, tap, uplink) kept made ahead, so a launch
    /// with egress does not wait for one to be set up (0: none).
    #[arg(long, value_name = "N", default_value_t = 2,
          value_parser = clap::value_parser!(u16).range(0..=64))]
    vm_network_spares: u16,
    /// Host memory (MiB) kept free: RunMicrovm, ResumeMicrovm and image builds
    /// are refused when the VM, at its full size, would eat into it.
    #[arg(long, default_value_t = 1024)]
    reserve_memory_mib: u64,
    /// Disk space (MiB) of the data directory kept free, as --reserve-memory-mib.
    #[arg(long, default_value_t = 2048)]
    reserve_disk_mib: u64,
    /// Admit new work counting running microVMs at their baseline memory, not
    /// their peak, and QEMU without its TCG translation cache: more fit (a
    /// 256 MiB size bursts to 1 GiB), and bursts and caches share what is
    /// left, so many at once can run the host short (QEMUs die first, never
    /// the server).
    #[arg(long)]
    overcommit_memory: bool,
    /// Machine sizes to accept besides the reference's (JSON, see README).
    #[arg(long, value_name = "FILE")]
    shapes: Option<PathBuf>,
    /// Prices per usage type overriding the reference's us-east-1 rates (JSON, see README).
    #[arg(long, value_name = "FILE")]
    price_sheet: Option<PathBuf>,
    /// Seconds between two samples of the usage meter.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    usage_interval: u64,
}

fn parse_jail_uids(text: &str) -> Result<hearth_vm::JailMode, String> {
    hearth_vm::JailConfig::parse_uid_range(text).map_err(|e| e.to_string())
}

fn parse_net_name(text: &str) -> Result<String, String> {
    let valid = !text.is_empty()
        && text.len() <= 8
        && text.starts_with(|c: char| c.is_ascii_lowercase())
        && text
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if valid {
        Ok(text.to_string())
    } else {
        Err("use 1-8 of a-z 0-9 _, starting with a letter".into())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum DefaultEgress {
    Internet,
    None,
}

fn parse_domain(text: &str) -> Result<String, String> {
    hearth_vm::net::parse_domain(text).map_err(|e| e.to_string())
}

fn parse_cidr(text: &str) -> Result<hearth_vm::net::IpNet, String> {
    hearth_vm::net::parse_cidr(text).map_err(|e| e.to_string())
}

/// The VM network settings of `hearth serve`; `None` when off or not root.
fn vm_network(args: &ServeArgs) -> Result<Option<hearth_vm::net::NetConfig>> {
    if args.no_vm_network {
        return Ok(None);
    }
    // SAFETY: geteuid(2) cannot fail and touches no memory.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("hearth: not root: microVMs and build steps get no network");
        return Ok(None);
    }
    let dns = match args.dns {
        Some(dns) => dns,
        None => hearth_vm::net::NetConfig::system_dns()?,
    };
    let mut net = hearth_vm::net::NetConfig::new(dns);
    net.pool = args.vm_address_pool;
    net.allow = args.egress_allow.clone();
    net.deny = args.egress_deny.clone();
    net.allow_domains = args.egress_allow_domain.clone();
    net.limits_per_vcpu = hearth_vm::net::EgressLimits {
        bytes_per_second: args.egress_mbit_per_vcpu * 125_000,
        connections: args.egress_connections_per_vcpu,
    };
    net.table = args.vm_net_name.clone();
    net.link_prefix = args.vm_net_name.clone();
    net.netns_prefix = format!("{}-", args.vm_net_name);
    net.spares = usize::from(args.vm_network_spares);
    Ok(Some(net))
}

#[derive(Debug, Subcommand)]
enum TokenKeysCommand {
    /// Add a new signing key; tokens already handed out stay valid (the two
    /// previous keys are kept). The server reads the keys when it starts.
    Rotate {
        #[arg(long, env = "HEARTH_DATA_DIR")]
        data_dir: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum AccountCommand {
    /// Create an account and its first access key.
    Create {
        #[arg(long)]
        name: String,
        #[arg(long, env = "HEARTH_DATA_DIR")]
        data_dir: Option<PathBuf>,
        /// Print {"accountId","accessKeyId","secretAccessKey"}.
        #[arg(long)]
        json: bool,
    },
    /// List accounts.
    Ls {
        #[arg(long, env = "HEARTH_DATA_DIR")]
        data_dir: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

fn parse_region(value: &str) -> Result<String, String> {
    let valid = !value.is_empty()
        && value.len() <= 32
        && value
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if valid {
        Ok(value.to_string())
    } else {
        Err("a region looks like us-east-1".into())
    }
}

/// `--data-dir`, else `$HEARTH_HOME/server`.
fn data_dir(flag: Option<PathBuf>) -> PathBuf {
    flag.unwrap_or_else(|| Assets::from_env().state_dir.join("server"))
}

#[derive(Debug, Subcommand)]
enum VmCommand {
    /// Boot a VM from a base image and wait until its agent answers.
    Boot {
        #[arg(long, default_value = "debian-12")]
        image: String,
        #[arg(long)]
        name: String,
        #[command(flatten)]
        shape: ShapeArgs,
    },
    /// Run a command in a VM, streaming its output; exits with its status.
    Exec(ExecArgs),
    /// Copy a file into or out of a VM: `hearth vm cp LOCAL NAME:/path` or
    /// `hearth vm cp NAME:/path LOCAL`.
    Cp {
        src: String,
        dst: String,
        /// Mode of the file written in the guest (octal), default: the local file's.
        #[arg(long)]
        mode: Option<String>,
    },
    /// Snapshot a running VM into a directory; the VM keeps running.
    Snapshot {
        name: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// Start a new VM from a snapshot.
    Launch {
        #[arg(long)]
        snapshot: PathBuf,
        #[arg(long)]
        name: String,
    },
    /// Write a VM's memory and state to disk and end its process.
    Suspend { name: String },
    /// Resume a suspended VM.
    Resume { name: String },
    /// Power a VM off cleanly (the guest syncs its disks first).
    Stop { name: String },
    /// List VMs.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Stop a VM and remove all it left on disk.
    Rm { names: Vec<String> },
}

#[derive(Debug, Args)]
struct ShapeArgs {
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(64..=65536))]
    memory_mib: u32,
    /// Virtual CPUs.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=64))]
    vcpus: u8,
}

#[derive(Debug, Args)]
struct ExecArgs {
    name: String,
    /// Environment variable for the command (repeatable).
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Working directory in the guest.
    #[arg(long)]
    cwd: Option<String>,
    /// Run as UID[:GID].
    #[arg(long)]
    user: Option<String>,
    /// Kill the command after this many seconds.
    #[arg(long)]
    timeout: Option<u64>,
    /// Forward this process's standard input.
    #[arg(long, short = 'i')]
    interactive: bool,
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Launch-from-snapshot benchmark (see README).
    Launch(bench::LaunchArgs),
    /// The API server on real guests: RunMicrovm/Suspend/Resume latencies and
    /// GetMicrovm under concurrent clients (see README).
    Api(bench_api::ApiArgs),
    /// The endpoint proxy on real guests: first 200 after RunMicrovm, requests/s
    /// and latency, a large streamed body, auto-resume to first byte.
    Endpoint(bench_endpoint::EndpointArgs),
    /// Dockerfile builds on real guests: fresh build, cached rebuild,
    /// snapshot sizes, first 200 from the built image.
    Build(bench_build::BuildArgs),
    /// VM networks (as root): launch to first exec with and without a
    /// network, and one guest's download speed from a namespace "internet".
    Net(bench_net::NetArgs),
    /// Idle microVMs on real guests: CPU, RSS and PSS per idle microVM, and
    /// RunMicrovm -> first 200 with 0, 10, 50 (--idle) microVMs idling.
    Density(bench_density::DensityArgs),
    /// Crash safety under load: rounds of mixed calls, the server killed
    /// (-9) in each and restarted; accepted calls carried out, orphans,
    /// duplicate microVMs, time to settle.
    Chaos(bench_chaos::ChaosArgs),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HEARTH_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        // A log that cannot be written (stderr on a full disk) is dropped:
        // reporting it would eprintln!, which panics the request's task.
        .log_internal_errors(false)
        .init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => return usage_error(err),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("hearth: cannot start the runtime: {err}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("hearth: {err:#}");
            ExitCode::from(1)
        }
    }
}

/// A command line that does not parse: clap's message and status 2, or with
/// `--json` anywhere on it `{"error": {"code": "UsageError", ...}}` on stderr.
fn usage_error(err: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    let informational = matches!(
        err.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    );
    if informational || !std::env::args().any(|a| a == "--json") {
        err.exit();
    }
    // clap's text up to its usage line, on one line.
    let text = err.to_string();
    let message = text
        .lines()
        .take_while(|line| !line.starts_with("Usage:"))
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    let message = message.trim_start_matches("error: ").to_string();
    let error = serde_json::json!({ "error": { "code": "UsageError", "message": message } });
    eprintln!("{error}");
    ExitCode::from(connect::EXIT_USAGE)
}

async fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Vm(command) => vm(command).await,
        Command::Bench(BenchCommand::Launch(args)) => bench::launch(args, driver()?).await,
        Command::Bench(BenchCommand::Api(args)) => bench_api::api(args).await,
        Command::Bench(BenchCommand::Net(args)) => bench_net::net(args, driver()?).await,
        Command::Bench(BenchCommand::Endpoint(args)) => bench_endpoint::endpoint(args).await,
        Command::Bench(BenchCommand::Build(args)) => bench_build::build(args).await,
        Command::Bench(BenchCommand::Density(args)) => bench_density::density(args).await,
        Command::Bench(BenchCommand::Chaos(args)) => bench_chaos::chaos(args).await,
        Command::Shell(args) => Ok(shell::main(args).await),
        Command::Token(args) => Ok(endpoint_cli::token(args).await),
        Command::Open(args) => Ok(endpoint_cli::open(args).await),
        Command::Serve(args) => {
            let args = *args;
            let network = vm_network(&args)?;
            let mut config =
                hearth_server::ServerConfig::new(data_dir(args.data_dir), args.listen, args.region);
            config.rate_limits = args.rate_limits;
            config.quotas = hearth_server::parse_quotas(&args.quotas)?;
            config.endpoint_domain = args.endpoint_domain;
            config.endpoint_limits = hearth_proxy::VmLimits {
                max_connections: args.endpoint_max_connections,
                requests_per_second: args.endpoint_rps,
            };
            if !args.no_endpoints {
                config.endpoint_listen = Some(args.endpoint_listen);
                config.endpoint_tls_listen = args.endpoint_tls_listen;
            }
            config.max_lifetime_secs = args.max_lifetime;
            config.artifacts.allow_file_uris = args.allow_file_artifacts;
            config.build_cache_days = args.build_cache_days;
            if let Some(mode) = args.jail_uids {
                config.jail = hearth_vm::JailConfig { mode };
            } else if args.no_jail {
                config.jail = hearth_vm::JailConfig {
                    mode: hearth_vm::JailMode::Disabled,
                };
            }
            // Refused before anything starts: QEMU unjailed as root, a uid range without root.
            config.jail.check()?;
            config.reserve = hearth_server::vms::capacity::Reserve {
                memory_mib: args.reserve_memory_mib,
                disk_mib: args.reserve_disk_mib,
                overcommit: args.overcommit_memory,
            };
            if let Some(file) = &args.shapes {
                config.sizes = hearth_server::sizes::Sizes::load(file)?;
            }
            if let Some(file) = &args.price_sheet {
                config.prices = hearth_server::pricing::PriceSheet::load(file)?;
            }
            config.usage_interval = std::time::Duration::from_secs(args.usage_interval);
            config.warm_pool = hearth_server::vms::pool::PoolSettings {
                max_total: args.warm_pool_max,
                per_version: args.warm_pool_per_version,
                demand_window: std::time::Duration::from_secs(args.warm_pool_window),
                ..config.warm_pool
            };
            config.registry = args.registry.map(|registry| hearth_oci::RegistryConfig {
                registry,
                insecure_http: args.registry_insecure,
                username: std::env::var("HEARTH_REGISTRY_USERNAME").ok(),
                password: std::env::var("HEARTH_REGISTRY_PASSWORD").ok(),
            });
            config.artifacts.max_artifact_bytes = args.max_artifact_bytes;
            config.network = network;
            config.default_egress = args.default_egress == DefaultEgress::Internet;
            if let Some(endpoint) = args.artifact_s3_endpoint {
                if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
                    anyhow::bail!("--artifact-s3-endpoint must be an http:// or https:// URL");
                }
                let key = |name: &str| {
                    std::env::var(name).map_err(|_| {
                        anyhow::anyhow!("--artifact-s3-endpoint needs {name} in the environment")
                    })
                };
                config.artifacts.external = Some(hearth_server::api::s3::ExternalS3 {
                    endpoint,
                    region: args
                        .artifact_s3_region
                        .unwrap_or_else(|| config.region.clone()),
                    access_key_id: key("HEARTH_ARTIFACT_S3_ACCESS_KEY_ID")?,
                    secret_access_key: key("HEARTH_ARTIFACT_S3_SECRET_ACCESS_KEY")?,
                    path_style: args.artifact_s3_path_style,
                });
            }
            hearth_server::serve(config).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Account(command) => account(command),
        Command::TokenKeys(TokenKeysCommand::Rotate { data_dir: dir }) => {
            let keys = hearth_server::endpoint::tokens::TokenKeys::rotate(&data_dir(dir))?;
            println!("rotated: {keys:?}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Image(operator::ImageCommand::Import(args)) => {
            let dir = data_dir(args.data_dir.clone());
            operator::import(args, dir).await
        }
        Command::Image(operator::ImageCommand::Api(command)) => {
            Ok(client_cli::image(command).await)
        }
        Command::Client(command) => Ok(client_cli::main(command).await),
        Command::Guest(command) => Ok(guest_cli::main(command).await),
        Command::Usage(args) => {
            let dir = data_dir(args.data_dir.clone());
            usage_cli::usage(args, &dir)
        }
    }
}

fn account(command: AccountCommand) -> Result<ExitCode> {
    match command {
        AccountCommand::Create {
            name,
            data_dir: dir,
            json,
        } => {
            let dir = data_dir(dir);
            hearth_vm::disk::create_private_dir_all(&dir)?;
            let store = hearth_server::Store::open(&dir)?;
            let key = store.create_account(&name)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&key)?);
            } else {
                println!("account:    {}", key.account_id);
                println!("access key: {}", key.access_key_id);
                println!("secret:     {}  (shown once)", key.secret_access_key);
            }
        }
        AccountCommand::Ls {
            data_dir: dir,
            json,
        } => {
            let store = hearth_server::Store::open(&data_dir(dir))?;
            let accounts = store.accounts()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&accounts)?);
            } else {
                println!("{:<14} NAME", "ACCOUNT");
                for a in accounts {
                    println!("{:<14} {}", a.account_id, a.name);
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn driver() -> Result<QemuDriver> {
    Ok(QemuDriver::new(Assets::from_env())?)
}

async fn vm(command: VmCommand) -> Result<ExitCode> {
    let driver = driver()?;
    match command {
        VmCommand::Boot { image, name, shape } => {
            eprintln!("hearth: booting {name} from {image} (waiting for the guest agent)");
            let request = BootRequest {
                name,
                image,
                shape: MachineShape::fixed(shape.memory_mib, shape.vcpus),
            };
            // An interrupted boot drops the boot future, which ends its QEMU and
            // removes the VM's files: nothing is left behind half-booted.
            let vm = tokio::select! {
                vm = driver.boot(&request) => vm?,
                _ = signals::interrupted() => {
                    eprintln!("hearth: interrupted; {} removed", request.name);
                    return Ok(ExitCode::from(130));
                }
            };
            println!("{}", vm.name);
        }
        VmCommand::Exec(args) => return exec(&driver, args).await,
        VmCommand::Cp { src, dst, mode } => copy(&driver, &src, &dst, mode.as_deref()).await?,
        VmCommand::Snapshot { name, out } => {
            let vm = driver.load(&name)?;
            let snapshot = driver.snapshot(&vm, &out).await?;
            println!("{}", snapshot.dir.display());
        }
        VmCommand::Launch { snapshot, name } => {
            let snapshot = Snapshot::open(&snapshot, Verify::Full)?;
            let vm = driver.launch(&snapshot, &name).await?;
            println!("{}", vm.name);
        }
        VmCommand::Suspend { name } => {
            let mut vm = driver.load(&name)?;
            driver.suspend(&mut vm).await?;
        }
        VmCommand::Resume { name } => {
            let mut vm = driver.load(&name)?;
            driver.resume(&mut vm).await?;
        }
        VmCommand::Stop { name } => {
            let mut vm = driver.load(&name)?;
            driver.shutdown(&mut vm).await?;
        }
        VmCommand::Ls { json } => {
            let vms = driver.list()?;
            if json {
                let rows: Vec<_> = vms
                    .iter()
                    .map(|vm| {
                        serde_json::json!({
                            "name": vm.name,
                            "state": status(&driver, vm),
                            "pid": vm.pid,
                            "memoryMiB": vm.shape.memory_mib,
                            "vcpus": vm.shape.vcpus,
                            "origin": vm.origin,
                            "dir": vm.dir,
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!(
                    "{:<24} {:<10} {:>8} {:>7}  ORIGIN",
                    "NAME", "STATE", "PID", "MEM"
                );
                for vm in &vms {
                    let origin = match &vm.origin {
                        hearth_vm::Origin::Boot { image } => format!("image {image}"),
                        hearth_vm::Origin::Snapshot { dir } => {
                            format!("snapshot {}", dir.display())
                        }
                    };
                    println!(
                        "{:<24} {:<10} {:>8} {:>6}M  {}",
                        vm.name,
                        status(&driver, vm),
                        vm.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
                        vm.shape.memory_mib,
                        origin
                    );
                }
            }
        }
        VmCommand::Rm { names } => {
            let mut failed = false;
            for name in names {
                match driver.load(&name) {
                    Ok(vm) => driver.remove(&vm).await?,
                    Err(err) => {
                        eprintln!("hearth: {err}");
                        failed = true;
                    }
                }
            }
            if failed {
                return Ok(ExitCode::from(1));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn status(driver: &QemuDriver, vm: &hearth_vm::VmRecord) -> &'static str {
    match vm.state {
        VmState::Suspended => "suspended",
        VmState::Stopped => "stopped",
        VmState::Running if driver.is_alive(vm) => "running",
        VmState::Running => "dead",
    }
}

async fn exec(driver: &QemuDriver, args: ExecArgs) -> Result<ExitCode> {
    let vm = driver.load(&args.name)?;
    let agent = driver.agent(&vm).await?;
    let mut env = Vec::new();
    for pair in &args.env {
        let Some((key, value)) = pair.split_once('=') else {
            bail!("--env wants KEY=VALUE, got {pair:?}");
        };
        env.push((key.to_string(), value.to_string()));
    }
    let (uid, gid) = match &args.user {
        None => (None, None),
        Some(user) => {
            let (uid, gid) = user.split_once(':').unwrap_or((user, user));
            (
                Some(uid.parse().context("--user wants UID[:GID]")?),
                Some(gid.parse().context("--user wants UID[:GID]")?),
            )
        }
    };
    let request = ExecRequest {
        argv: args.command,
        env,
        cwd: args.cwd,
        uid,
        gid,
        timeout_ms: args.timeout.map(|s| s.saturating_mul(1000)),
        ..Default::default()
    };
    let stdin = args.interactive.then(tokio::io::stdin);
    let status = agent
        .exec(
            request,
            stdin,
            &mut tokio::io::stdout(),
            &mut tokio::io::stderr(),
        )
        .await?;
    if status.timed_out {
        eprintln!("hearth: command timed out");
    }
    Ok(match (status.code, status.signal) {
        (Some(code), _) => ExitCode::from(code.clamp(0, 255) as u8),
        (None, Some(signal)) => ExitCode::from((128 + signal).clamp(0, 255) as u8),
        _ => ExitCode::from(255),
    })
}

/// `NAME:/path` → (NAME, /path).
fn guest_path(spec: &str) -> Option<(&str, &str)> {
    let (name, path) = spec.split_once(':')?;
    (hearth_vm::validate_name(name) && path.starts_with('/')).then_some((name, path))
}

async fn copy(driver: &QemuDriver, src: &str, dst: &str, mode: Option<&str>) -> Result<()> {
    match (guest_path(src), guest_path(dst)) {
        (None, Some((name, path))) => {
            let file = tokio::fs::File::open(src)
                .await
                .with_context(|| format!("cannot open {src}"))?;
            let local_mode =
                std::os::unix::fs::PermissionsExt::mode(&file.metadata().await?.permissions());
            let mode = match mode {
                Some(m) => u32::from_str_radix(m, 8).context("--mode wants an octal mode")?,
                None => local_mode & 0o7777,
            };
            let vm = driver.load(name)?;
            let agent = driver.agent(&vm).await?;
            agent
                .write_file(
                    WriteFileRequest {
                        path: path.to_string(),
                        mode: Some(mode),
                        uid: None,
                        gid: None,
                        create_parents: false,
                    },
                    file,
                )
                .await?;
        }
        (Some((name, path)), None) => {
            let vm = driver.load(name)?;
            let agent = driver.agent(&vm).await?;
            let tmp = format!("{dst}.hearth-partial");
            let mut file = tokio::fs::File::create(&tmp)
                .await
                .with_context(|| format!("cannot create {dst}"))?;
            let result = agent.read_file(path, &mut file).await;
            drop(file);
            match result {
                Ok(_) => tokio::fs::rename(&tmp, dst).await?,
                Err(err) => {
                    let _ = tokio::fs::remove_file(&tmp).await;
                    return Err(err.into());
                }
            }
        }
        _ => bail!("exactly one of SRC and DST must be NAME:/absolute/path"),
    }
    Ok(())
}

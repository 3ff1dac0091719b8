//! Operator commands that work on the server's data directory directly (they
//! need no credentials and work while `hearth serve` runs): image import.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};

/// `hearth image ...`. Import works on the data directory (an operator
/// command); the other subcommands talk to a server.
#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Make an image version from a prepared root filesystem (operator; works
    /// on the data directory while the server runs).
    Import(ImportArgs),
    // ls, get, rm: through the API (client_cli.rs).
    #[command(flatten)]
    Api(crate::client_cli::ImageCommand),
}

/// `hearth image import`: make an image version from a prepared root filesystem.
#[derive(Debug, Args)]
pub struct ImportArgs {
    /// The account (12 digits) that will own the image.
    #[arg(long)]
    pub account: String,
    /// Image name (1-64 of A-Z a-z 0-9 - _); a new version when it exists.
    #[arg(long)]
    pub name: String,
    /// A directory or a tar archive holding the root filesystem (with /bin/sh
    /// when --cmd is given).
    #[arg(long)]
    pub rootfs: PathBuf,
    /// Port of the app's lifecycle hooks: the import waits for its `ready` hook.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub hooks_port: Option<u16>,
    /// How long the ready hook may take to answer 200, in seconds.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub ready_timeout: u64,
    /// Runtime lifecycle hooks to enable, comma-separated: run, resume,
    /// suspend, terminate (needs --hooks-port).
    #[arg(long, value_delimiter = ',')]
    pub microvm_hooks: Vec<String>,
    /// Timeout of each runtime hook, in seconds (the reference's default is 1).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=60))]
    pub hook_timeout: u64,
    /// Guest memory in MiB (the version's resources.minimumMemoryInMiB).
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u32).range(128..=16384))]
    pub memory: u32,
    /// Environment of the app, `KEY=VALUE` (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE")]
    pub environment: Vec<String>,
    /// Working directory of the command.
    #[arg(long, default_value = "/")]
    pub workdir: String,
    #[arg(long)]
    pub description: Option<String>,
    #[arg(long, env = "HEARTH_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// The server's region (for the ARNs shown).
    #[arg(long, default_value = "us-east-1")]
    pub region: String,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
    /// The app's command and arguments; must come last (e.g. `--cmd python3 -m http.server`).
    #[arg(long, num_args = 1.., allow_hyphen_values = true)]
    pub cmd: Vec<String>,
}

pub async fn import(args: ImportArgs, data_dir: PathBuf) -> Result<ExitCode> {
    let mut environment = Vec::new();
    for entry in &args.environment {
        let Some((key, value)) = entry.split_once('=') else {
            bail!("--env {entry:?} must look like KEY=VALUE");
        };
        if key.is_empty() || key.len() > 256 || value.len() > 4096 {
            bail!("--env {key:?}: keys are 1-256 characters, values at most 4096");
        }
        environment.push((key.to_string(), value.to_string()));
    }
    if environment.len() > 50 {
        bail!("at most 50 environment variables");
    }
    let store = hearth_server::Store::open(&data_dir)
        .with_context(|| format!("opening the server's data in {}", data_dir.display()))?;
    let assets = hearth_server::engine_assets(&data_dir);
    hearth_server::check_socket_room(&assets)?;
    hearth_vm::disk::create_private_dir_all(&assets.vms_dir())
        .with_context(|| format!("creating {}", assets.vms_dir().display()))?;
    let driver = hearth_vm::QemuDriver::new(assets)?;
    let request = hearth_server::images::import::ImportRequest {
        account_id: args.account,
        image_name: args.name,
        region: args.region,
        rootfs: args.rootfs,
        command: args.cmd,
        workdir: args.workdir,
        hooks_port: args.hooks_port,
        ready_timeout: Duration::from_secs(args.ready_timeout),
        microvm_hooks: args.microvm_hooks,
        hook_timeout_secs: args.hook_timeout,
        memory_mib: args.memory,
        environment,
        description: args.description,
    };
    let progress = |step: &str| eprintln!("hearth: {step}");
    let imported = hearth_server::images::import::import_image(
        &data_dir,
        &store,
        &driver,
        &hearth_server::Quotas::default(),
        &request,
        &progress,
    )
    .await?;
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "imageArn": imported.image_arn,
                "imageVersion": format!("{}.0", imported.version),
                "buildId": imported.build_id,
                "snapshotBuild": imported.snapshot_build,
            })
        );
    } else {
        println!(
            "imported {} version {}.0 (build {}): memory snapshot {} bytes, disk snapshot {} bytes",
            imported.image_arn,
            imported.version,
            imported.build_id,
            imported.snapshot_build.memory_snapshot_size_in_bytes,
            imported.snapshot_build.disk_snapshot_size_in_bytes,
        );
    }
    Ok(ExitCode::SUCCESS)
}

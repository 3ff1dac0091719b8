//! The client commands: images and microVMs through the API (SigV4 against
//! `hearth serve` or any endpoint that speaks Lambda MicroVMs 2025-09-09),
//! and `hearth configure` to keep the endpoint and keys in the config file.

use std::io::{BufRead, IsTerminal};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use hearth_client::{Client, ClientConfig, ConfigError, ConfigFile};
use serde_json::{json, Map, Value};

use crate::connect::{report, ConnectArgs};
use crate::image_build::{self, BuildArgs, LogsArgs};
use crate::progress::Spinner;
use crate::shell;

const POLL_INTERVAL: Duration = Duration::from_millis(500);

#[derive(Debug, Args)]
pub struct WaitArgs {
    /// Wait until the microVM reaches the state asked for.
    #[arg(long)]
    wait: bool,
    /// Give up waiting after this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = 300)]
    wait_timeout: u64,
}

/// `hearth image ...` through the API.
#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// List your microVM images.
    Ls {
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Show an image and its versions.
    Get {
        /// Image name or ARN.
        image: String,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Build an image from a Dockerfile: zip and upload the context, create
    /// or update the image, follow the build's log until it ends.
    Build(BuildArgs),
    /// Print the log of an image version's build.
    Logs(LogsArgs),
    /// Delete an image, or one version of it.
    Rm {
        /// Image name or ARN.
        image: String,
        /// Delete only this version (e.g. 2.0).
        #[arg(long)]
        version: Option<String>,
        #[command(flatten)]
        connect: ConnectArgs,
    },
}

/// The top-level client commands.
#[derive(Debug, Subcommand)]
pub enum ClientCommand {
    /// Start a microVM from an image.
    Run(RunArgs),
    /// List microVMs (terminated ones only with --all).
    Ls(LsArgs),
    /// Show a microVM.
    Get(IdArgs),
    /// Suspend a microVM: its memory goes to disk, its state is kept.
    Suspend(ChangeArgs),
    /// Resume a suspended microVM.
    Resume(ChangeArgs),
    /// Terminate a microVM.
    Terminate(ChangeArgs),
    /// Print a microVM's app output (stdout and stderr).
    Logs(crate::app_logs_cli::AppLogsArgs),
    /// Save the endpoint and keys the client commands use.
    ///
    /// Writes $XDG_CONFIG_HOME/hearth/config.json (or ~/.config/hearth/config.json,
    /// or $HEARTH_CONFIG) with mode 0600, replacing what was there.
    Configure(ConfigureArgs),
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Image name or ARN.
    image: String,
    /// Image version (default: the latest active one).
    #[arg(long)]
    version: Option<String>,
    /// Terminate the microVM after this many seconds, suspended time included.
    #[arg(long, value_name = "SECS")]
    max_duration: Option<u32>,
    /// Suspend after this many seconds without traffic (idle policy).
    #[arg(long, value_name = "SECS", requires = "suspended_terminate_after")]
    idle_suspend_after: Option<u32>,
    /// Terminate after this many seconds suspended (0: at once).
    #[arg(long, value_name = "SECS", requires = "idle_suspend_after")]
    suspended_terminate_after: Option<u32>,
    /// Resume a suspended microVM when traffic arrives.
    #[arg(long, requires = "idle_suspend_after")]
    auto_resume: bool,
    /// Passed to the image's run hook.
    #[arg(long, value_name = "STRING")]
    run_hook_payload: Option<String>,
    /// Idempotency key: a retry with the same token returns the same microVM.
    #[arg(long, value_name = "TOKEN")]
    client_token: Option<String>,
    /// Ingress network connector: HTTP_INGRESS, SHELL_INGRESS, ALL_INGRESS,
    /// NO_INGRESS or an ARN (repeatable; default HTTP_INGRESS).
    #[arg(long, value_name = "CONNECTOR")]
    ingress: Vec<String>,
    /// Allow `hearth shell`: adds SHELL_INGRESS and HTTP_INGRESS.
    #[arg(long)]
    shell: bool,
    #[command(flatten)]
    wait: WaitArgs,
    #[command(flatten)]
    connect: ConnectArgs,
}

#[derive(Debug, Args)]
pub struct LsArgs {
    /// Only microVMs of this image (name or ARN).
    #[arg(long)]
    image: Option<String>,
    /// Include terminated microVMs.
    #[arg(long)]
    all: bool,
    #[command(flatten)]
    connect: ConnectArgs,
}

#[derive(Debug, Args)]
pub struct IdArgs {
    /// MicroVM ID.
    id: String,
    #[command(flatten)]
    connect: ConnectArgs,
}

#[derive(Debug, Args)]
pub struct ChangeArgs {
    /// MicroVM ID.
    id: String,
    #[command(flatten)]
    wait: WaitArgs,
    #[command(flatten)]
    connect: ConnectArgs,
}

#[derive(Args)]
pub struct ConfigureArgs {
    /// API endpoint, e.g. http://127.0.0.1:9070.
    #[arg(long, value_name = "URL")]
    endpoint_url: String,
    #[arg(long)]
    access_key_id: String,
    /// The secret; read from standard input when not given, which keeps it
    /// out of the process list and shell history.
    #[arg(long)]
    secret_access_key: Option<String>,
    #[arg(long)]
    region: Option<String>,
}

impl std::fmt::Debug for ConfigureArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigureArgs")
            .field("endpoint_url", &self.endpoint_url)
            .field("access_key_id", &self.access_key_id)
            .field(
                "secret_access_key",
                &self.secret_access_key.as_ref().map(|_| "<redacted>"),
            )
            .field("region", &self.region)
            .finish()
    }
}

/// Runs a client command; errors go to stderr (see [`connect::report`]), exit code 1.
pub async fn main(command: ClientCommand) -> ExitCode {
    let json = command.json();
    report(
        match command {
            ClientCommand::Run(args) => run(args).await,
            ClientCommand::Ls(args) => ls(args).await,
            ClientCommand::Get(args) => get(args).await,
            ClientCommand::Suspend(args) => change(args, "SuspendMicrovm", "SUSPENDED").await,
            ClientCommand::Resume(args) => change(args, "ResumeMicrovm", "RUNNING").await,
            ClientCommand::Terminate(args) => change(args, "TerminateMicrovm", "TERMINATED").await,
            ClientCommand::Configure(args) => configure(args),
            ClientCommand::Logs(args) => crate::app_logs_cli::logs(args).await,
        },
        json,
    )
}

impl ClientCommand {
    /// Whether `--json` was given (errors are then printed as JSON too).
    fn json(&self) -> bool {
        match self {
            ClientCommand::Run(args) => args.connect.json,
            ClientCommand::Ls(args) => args.connect.json,
            ClientCommand::Get(args) => args.connect.json,
            ClientCommand::Suspend(args)
            | ClientCommand::Resume(args)
            | ClientCommand::Terminate(args) => args.connect.json,
            ClientCommand::Configure(_) => false,
            ClientCommand::Logs(args) => args.connect.json,
        }
    }
}

impl ImageCommand {
    fn json(&self) -> bool {
        match self {
            ImageCommand::Ls { connect }
            | ImageCommand::Get { connect, .. }
            | ImageCommand::Rm { connect, .. } => connect.json,
            ImageCommand::Build(args) => args.connect.json,
            ImageCommand::Logs(args) => args.connect.json,
        }
    }
}

/// Runs an image command (see [`main`] for errors).
pub async fn image(command: ImageCommand) -> ExitCode {
    let json = command.json();
    report(
        match command {
            ImageCommand::Ls { connect } => image_ls(connect).await,
            ImageCommand::Get { image, connect } => image_get(image, connect).await,
            ImageCommand::Rm {
                image,
                version,
                connect,
            } => image_rm(image, version, connect).await,
            ImageCommand::Build(args) => image_build::build(args).await,
            ImageCommand::Logs(args) => image_build::logs(args).await,
        },
        json,
    )
}

async fn image_ls(connect: ConnectArgs) -> Result<()> {
    let client = connect.client()?;
    let items = client.paginate("ListMicrovmImages", json!({})).await?;
    if connect.json {
        return print_json(&json!({ "items": items }));
    }
    table(
        &["NAME", "STATE", "LATEST", "CREATED", "ARN"],
        items.iter().map(|i| {
            vec![
                text(i, "name"),
                text(i, "state"),
                text(i, "latestActiveImageVersion"),
                time(i, "createdAt"),
                text(i, "imageArn"),
            ]
        }),
    );
    Ok(())
}

async fn image_get(image: String, connect: ConnectArgs) -> Result<()> {
    let client = connect.client()?;
    let input = json!({ "imageIdentifier": image });
    let details = client.call("GetMicrovmImage", input.clone()).await?;
    let versions = client.paginate("ListMicrovmImageVersions", input).await?;
    if connect.json {
        return print_json(&json!({ "image": details, "versions": versions }));
    }
    print_details(&details);
    println!();
    table(
        &["VERSION", "STATE", "STATUS", "CREATED", "REASON"],
        versions.iter().map(|v| {
            vec![
                text(v, "imageVersion"),
                text(v, "state"),
                text(v, "status"),
                time(v, "createdAt"),
                text(v, "stateReason"),
            ]
        }),
    );
    Ok(())
}

async fn image_rm(image: String, version: Option<String>, connect: ConnectArgs) -> Result<()> {
    let client = connect.client()?;
    let response = match &version {
        Some(v) => {
            let input = json!({ "imageIdentifier": image, "imageVersion": v });
            client.call("DeleteMicrovmImageVersion", input).await?
        }
        None => {
            let input = json!({ "imageIdentifier": image });
            client.call("DeleteMicrovmImage", input).await?
        }
    };
    if connect.json {
        return print_json(&response);
    }
    let what = match &version {
        Some(v) => format!("{image} version {v}"),
        None => image,
    };
    println!("{what}: {}", text(&response, "state"));
    Ok(())
}

async fn run(args: RunArgs) -> Result<()> {
    let client = args.connect.client()?;
    let mut input = Map::new();
    input.insert("imageIdentifier".into(), args.image.into());
    let optional = [
        ("imageVersion", args.version.map(Value::from)),
        (
            "maximumDurationInSeconds",
            args.max_duration.map(Value::from),
        ),
        ("runHookPayload", args.run_hook_payload.map(Value::from)),
        ("clientToken", args.client_token.map(Value::from)),
    ];
    for (key, value) in optional {
        if let Some(value) = value {
            input.insert(key.into(), value);
        }
    }
    // clap makes the two durations come together (the API needs all three fields).
    if let (Some(idle), Some(suspended)) = (args.idle_suspend_after, args.suspended_terminate_after)
    {
        input.insert(
            "idlePolicy".into(),
            json!({
                "maxIdleDurationSeconds": idle,
                "suspendedDurationSeconds": suspended,
                "autoResumeEnabled": args.auto_resume,
            }),
        );
    }
    let ingress = shell::ingress_connectors(&args.ingress, args.shell, client.config().region());
    if !ingress.is_empty() {
        input.insert("ingressNetworkConnectors".into(), json!(ingress));
    }
    let mut vm = client.call("RunMicrovm", Value::Object(input)).await?;
    if args.wait.wait {
        let id = vm
            .get("microvmId")
            .and_then(Value::as_str)
            .context("RunMicrovm answered without a microvmId")?
            .to_string();
        vm = wait_for(&client, &id, "RUNNING", &args.wait).await?;
    }
    if args.connect.json {
        return print_json(&vm);
    }
    print_details(&vm);
    Ok(())
}

async fn ls(args: LsArgs) -> Result<()> {
    let client = args.connect.client()?;
    let input = match args.image {
        Some(image) => json!({ "imageIdentifier": image }),
        None => json!({}),
    };
    let mut items = client.paginate("ListMicrovms", input).await?;
    if !args.all {
        items.retain(|vm| vm.get("state").and_then(Value::as_str) != Some("TERMINATED"));
    }
    if args.connect.json {
        return print_json(&json!({ "items": items }));
    }
    // The API has no order; oldest first reads best.
    items.sort_by(|a, b| {
        let started = |v: &Value| v.get("startedAt").and_then(Value::as_f64).unwrap_or(0.0);
        started(a).total_cmp(&started(b))
    });
    table(
        &["ID", "STATE", "IMAGE", "VERSION", "STARTED"],
        items.iter().map(|vm| {
            vec![
                text(vm, "microvmId"),
                text(vm, "state"),
                image_name(&text(vm, "imageArn")),
                text(vm, "imageVersion"),
                time(vm, "startedAt"),
            ]
        }),
    );
    Ok(())
}

async fn get(args: IdArgs) -> Result<()> {
    let client = args.connect.client()?;
    let vm = client
        .call("GetMicrovm", json!({ "microvmIdentifier": args.id }))
        .await?;
    if args.connect.json {
        return print_json(&vm);
    }
    print_details(&vm);
    Ok(())
}

/// Suspend, resume or terminate; with `--wait`, until the microVM is `target`.
async fn change(args: ChangeArgs, operation: &str, target: &str) -> Result<()> {
    let client = args.connect.client()?;
    let response = client
        .call(operation, json!({ "microvmIdentifier": args.id }))
        .await?;
    if !args.wait.wait {
        if args.connect.json {
            return print_json(&response);
        }
        println!("{}: {} requested", args.id, target.to_lowercase());
        return Ok(());
    }
    let vm = wait_for(&client, &args.id, target, &args.wait).await?;
    if args.connect.json {
        return print_json(&vm);
    }
    println!("{}: {target}", args.id);
    Ok(())
}

/// Polls GetMicrovm until the microVM is `target`; fails early when it ends
/// up terminated instead, and after `--wait-timeout`.
async fn wait_for(client: &Client, id: &str, target: &str, wait: &WaitArgs) -> Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(wait.wait_timeout);
    let spinner = Spinner::start(format!("waiting for {id} to be {target}"));
    loop {
        let vm = match client
            .call("GetMicrovm", json!({ "microvmIdentifier": id }))
            .await
        {
            Ok(vm) => vm,
            // A terminated microVM may be forgotten before we look.
            Err(err)
                if target == "TERMINATED" && err.code() == Some("ResourceNotFoundException") =>
            {
                return Ok(json!({ "microvmId": id, "state": "TERMINATED" }));
            }
            Err(err) => return Err(err.into()),
        };
        let state = vm.get("state").and_then(Value::as_str).unwrap_or("UNKNOWN");
        if state == target {
            return Ok(vm);
        }
        if target != "TERMINATED" && matches!(state, "TERMINATING" | "TERMINATED") {
            let reason = vm
                .get("stateReason")
                .and_then(Value::as_str)
                .map(|r| format!(" ({r})"))
                .unwrap_or_default();
            bail!("{id} is {state} instead of {target}{reason}");
        }
        if Instant::now() >= deadline {
            bail!(
                "{id} is still {state} after {} s (see --wait-timeout)",
                wait.wait_timeout
            );
        }
        spinner.set_message(format!("waiting for {id} to be {target} (state {state})"));
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

fn configure(args: ConfigureArgs) -> Result<()> {
    let secret = match args.secret_access_key {
        Some(secret) => secret,
        None => {
            let stdin = std::io::stdin();
            if stdin.is_terminal() {
                eprint!("secret access key: ");
            }
            let mut line = String::new();
            stdin
                .lock()
                .read_line(&mut line)
                .context("cannot read the secret access key from standard input")?;
            line.trim().to_string()
        }
    };
    if args.access_key_id.is_empty() || secret.is_empty() {
        bail!("the access key id and the secret access key must not be empty");
    }
    // Refuse what the client commands would refuse later.
    let region = args
        .region
        .as_deref()
        .unwrap_or(hearth_client::DEFAULT_REGION);
    ClientConfig::new(&args.endpoint_url, region, &args.access_key_id, &secret)?;
    let path = hearth_client::config_path(&|key| std::env::var(key).ok())
        .ok_or(ConfigError::NoConfigPath)?;
    hearth_client::write_config_file(
        &path,
        &ConfigFile {
            endpoint_url: Some(args.endpoint_url),
            region: args.region,
            access_key_id: Some(args.access_key_id),
            secret_access_key: Some(secret),
        },
    )?;
    println!("wrote {}", path.display());
    Ok(())
}

fn print_json(value: &Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// A string field as shown in tables: `-` when absent.
fn text(value: &Value, key: &str) -> String {
    match value.get(key) {
        None | Some(Value::Null) => "-".into(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

/// A timestamp field (epoch seconds on the wire) as RFC 3339 UTC.
fn time(value: &Value, key: &str) -> String {
    match value.get(key) {
        Some(Value::Number(n)) => n
            .as_f64()
            .and_then(hearth_client::rfc3339)
            .unwrap_or_else(|| n.to_string()),
        _ => text(value, key),
    }
}

/// `arn:...:microvm-image:web` → `web`; anything else as it is.
fn image_name(arn: &str) -> String {
    arn.rsplit_once(":microvm-image:")
        .map_or(arn, |(_, name)| name)
        .to_string()
}

/// `key: value` lines, identity and state first, timestamps readable.
fn print_details(value: &Value) {
    const FIRST: [&str; 6] = [
        "microvmId",
        "name",
        "imageArn",
        "state",
        "stateReason",
        "endpoint",
    ];
    let Some(fields) = value.as_object() else {
        println!("{value}");
        return;
    };
    let mut shown: Vec<(&String, &Value)> = fields.iter().filter(|(_, v)| !v.is_null()).collect();
    shown.sort_by_key(|(k, _)| FIRST.iter().position(|f| f == k).unwrap_or(FIRST.len()));
    let width = shown.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    for (key, field) in shown {
        let rendered = match field {
            Value::Number(_) if key.ends_with("At") => time(value, key),
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        println!("{:<width$} {rendered}", format!("{key}:"));
    }
}

/// Prints aligned columns (two spaces apart) under a header row.
fn table(headers: &[&str], rows: impl Iterator<Item = Vec<String>>) {
    let rows: Vec<Vec<String>> = rows.collect();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let padded: Vec<String> = cells
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(&mut headers.iter().copied());
    for row in &rows {
        line(&mut row.iter().map(String::as_str));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_names_from_arns() {
        assert_eq!(
            image_name("arn:aws:lambda:us-east-1:123456789012:microvm-image:web"),
            "web"
        );
        assert_eq!(image_name("web"), "web");
    }

    #[test]
    fn timestamps_and_missing_fields() {
        let v = json!({ "startedAt": 1_772_366_400.5, "name": "x", "n": 3, "gone": null });
        assert_eq!(time(&v, "startedAt"), "2026-03-01T12:00:00Z");
        assert_eq!(time(&v, "missing"), "-");
        assert_eq!(text(&v, "name"), "x");
        assert_eq!(text(&v, "n"), "3");
        assert_eq!(text(&v, "gone"), "-");
    }
}

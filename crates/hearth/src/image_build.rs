//! `hearth image build` and `hearth image logs`: zip a build context, upload
//! it to the endpoint's S3-compatible store, create or update the image, and
//! follow the build's log until it ends.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use hearth_client::{Client, ClientError};
use serde_json::{json, Value};

use crate::connect::ConnectArgs;
use crate::progress::Spinner;

const POLL: Duration = Duration::from_millis(500);
/// Largest context `image build` zips (the server's artifact limit is 1 GiB).
const MAX_CONTEXT_BYTES: u64 = 1 << 30;

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// The build context: a directory whose files COPY and ADD can use.
    context: PathBuf,
    /// The Dockerfile [default: CONTEXT/Dockerfile].
    #[arg(short = 'f', long = "file")]
    dockerfile: Option<PathBuf>,
    /// Image name; a new version when it exists.
    #[arg(long)]
    name: String,
    /// Managed base image (its ARN is the request's baseImageArn).
    #[arg(long, default_value = "debian-12")]
    base: String,
    /// Memory of the image's microVMs, MiB.
    #[arg(long, default_value_t = 512)]
    memory: u32,
    /// Port of the app's hooks; with --ready the build waits for its ready hook.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    hooks_port: Option<u16>,
    /// Enable the ready hook (needs --hooks-port).
    #[arg(long)]
    ready: bool,
    /// Enable the validate hook (needs --hooks-port).
    #[arg(long)]
    validate: bool,
    /// Runtime hooks to enable, comma-separated: run, resume, suspend, terminate.
    #[arg(long, value_delimiter = ',')]
    microvm_hooks: Vec<String>,
    /// Timeout of each runtime hook, seconds.
    #[arg(long, value_name = "SECS", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=60))]
    hook_timeout: u32,
    /// The app's environment, KEY=VALUE (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// A build argument, NAME=VALUE (repeatable): ARG values for this build
    /// only, sent in an extension header, masked in the build log.
    #[arg(long = "build-arg", value_name = "NAME=VALUE")]
    build_args: Vec<String>,
    /// Outbound network for RUN steps (INTERNET_EGRESS).
    #[arg(long)]
    egress: bool,
    /// Bucket for the context zip [default: hearth-artifacts-<access key id>].
    #[arg(long)]
    bucket: Option<String>,
    /// The build role ARN recorded with the version.
    #[arg(long, default_value = "arn:aws:iam::000000000000:role/hearth-build")]
    build_role: String,
    /// Return once the build started instead of following it.
    #[arg(long)]
    no_follow: bool,
    #[command(flatten)]
    pub(crate) connect: ConnectArgs,
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// Image name or ARN.
    image: String,
    /// Image version [default: the latest].
    #[arg(long)]
    version: Option<String>,
    /// Keep printing until the build ends.
    #[arg(long)]
    follow: bool,
    #[command(flatten)]
    pub(crate) connect: ConnectArgs,
}

/// Zips `context` (minus what .dockerignore excludes) with `dockerfile` as
/// `Dockerfile` at the root.
pub fn zip_context(context: &Path, dockerfile: &Path) -> Result<Vec<u8>> {
    let ignore: Vec<String> = std::fs::read_to_string(context.join(".dockerignore"))
        .map(|t| t.lines().map(str::to_string).collect())
        .unwrap_or_default();
    let mut out = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated)
        .unix_permissions(0o644);
    let dockerfile_text = std::fs::read(dockerfile)
        .with_context(|| format!("cannot read {}", dockerfile.display()))?;
    out.start_file("Dockerfile", options)?;
    out.write_all(&dockerfile_text)?;
    let mut total = dockerfile_text.len() as u64;
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = context.join(&rel);
        let mut entries: Vec<_> = std::fs::read_dir(&dir)
            .with_context(|| format!("cannot read {}", dir.display()))?
            .collect::<Result<_, _>>()?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let rel_path = rel.join(entry.file_name());
            let name = rel_path.to_string_lossy().replace('\\', "/");
            if name == "Dockerfile" || hearth_builder::archive::ignored(&name, &ignore) {
                continue;
            }
            let meta = entry.path().symlink_metadata()?;
            if meta.is_dir() {
                out.add_directory(format!("{name}/"), options.unix_permissions(0o755))?;
                stack.push(rel_path);
            } else if meta.is_file() {
                use std::os::unix::fs::PermissionsExt;
                total += meta.len();
                if total > MAX_CONTEXT_BYTES {
                    bail!("the build context is larger than {MAX_CONTEXT_BYTES} bytes");
                }
                out.start_file(
                    name,
                    options.unix_permissions(meta.permissions().mode() & 0o777),
                )?;
                let mut file = std::fs::File::open(entry.path())?;
                std::io::copy(&mut file, &mut out)?;
            } else {
                eprintln!("skipping {name}: only files and directories go into the context");
            }
        }
    }
    Ok(out.finish()?.into_inner())
}

pub async fn build(args: BuildArgs) -> Result<()> {
    let client = args.connect.client()?;
    let dockerfile = args
        .dockerfile
        .clone()
        .unwrap_or_else(|| args.context.join("Dockerfile"));
    let zipped = zip_context(&args.context, &dockerfile)?;
    let bucket = args.bucket.clone().unwrap_or_else(|| {
        format!(
            "hearth-artifacts-{}",
            client.config().access_key_id().to_ascii_lowercase()
        )
    });
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let key = format!("{}/{stamp}.zip", args.name);
    eprintln!(
        "uploading the context ({} bytes) to s3://{bucket}/{key}",
        zipped.len()
    );
    let spinner = Spinner::start(format!("uploading {} bytes", zipped.len()));
    client.s3_create_bucket(&bucket).await?;
    client.s3_put_object(&bucket, &key, zipped).await?;
    drop(spinner);

    let region = client.config().region().to_string();
    let mut input = json!({
        "baseImageArn": format!("arn:aws:lambda:{region}:aws:microvm-image:{}", args.base),
        "buildRoleArn": args.build_role,
        "codeArtifact": {"uri": format!("s3://{bucket}/{key}")},
        "resources": [{"minimumMemoryInMiB": args.memory}],
    });
    if let Some(port) = args.hooks_port {
        let mut image_hooks = json!({});
        if args.ready {
            image_hooks["ready"] = json!("ENABLED");
        }
        if args.validate {
            image_hooks["validate"] = json!("ENABLED");
        }
        let mut hooks = json!({"port": port, "microvmImageHooks": image_hooks});
        if !args.microvm_hooks.is_empty() {
            let mut runtime = json!({});
            for name in &args.microvm_hooks {
                runtime[name.as_str()] = json!("ENABLED");
                runtime[format!("{name}TimeoutInSeconds")] = json!(args.hook_timeout);
            }
            hooks["microvmHooks"] = runtime;
        }
        input["hooks"] = hooks;
    } else if args.ready || args.validate || !args.microvm_hooks.is_empty() {
        bail!("hooks need --hooks-port");
    }
    if !args.env.is_empty() {
        let mut vars = serde_json::Map::new();
        for pair in &args.env {
            let (k, v) = pair
                .split_once('=')
                .with_context(|| format!("--env {pair:?} must be KEY=VALUE"))?;
            vars.insert(k.to_string(), json!(v));
        }
        input["environmentVariables"] = json!(vars);
    }
    if args.egress {
        input["egressNetworkConnectors"] = json!([format!(
            "arn:aws:lambda:{region}:aws:network-connector:aws-network-connector:INTERNET_EGRESS"
        )]);
    }
    let exists = match client
        .call("GetMicrovmImage", json!({"imageIdentifier": args.name}))
        .await
    {
        Ok(_) => true,
        Err(ClientError::Api { status: 404, .. }) => false,
        Err(err) => return Err(err.into()),
    };
    let mut headers = Vec::new();
    if !args.build_args.is_empty() {
        use base64::Engine as _;
        let mut map = serde_json::Map::new();
        for pair in &args.build_args {
            let (k, v) = pair
                .split_once('=')
                .with_context(|| format!("--build-arg {:?} must be NAME=VALUE", redact(pair)))?;
            map.insert(k.to_string(), json!(v));
        }
        headers.push((
            "x-hearth-build-args".to_string(),
            base64::engine::general_purpose::STANDARD.encode(Value::Object(map).to_string()),
        ));
    }
    let response = if exists {
        input["imageIdentifier"] = json!(args.name);
        client
            .call_with_headers("UpdateMicrovmImage", input, &headers)
            .await?
    } else {
        input["name"] = json!(args.name);
        client
            .call_with_headers("CreateMicrovmImage", input, &headers)
            .await?
    };
    let version = response
        .get("imageVersion")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    eprintln!(
        "{} {} version {version}",
        if exists { "updating" } else { "creating" },
        args.name
    );
    if args.no_follow {
        println!("{version}");
        return Ok(());
    }
    let build_id = build_of(&client, &args.name, &version).await?;
    follow(&client, &build_id, true).await?;
    finish(&client, &args.name, &version, &build_id).await
}

/// A NAME=VALUE argument with its value hidden (for error messages).
fn redact(pair: &str) -> String {
    match pair.split_once('=') {
        Some((name, _)) => format!("{name}=***"),
        None => pair.chars().take(40).collect(),
    }
}

async fn build_of(client: &Client, image: &str, version: &str) -> Result<String> {
    let builds = client
        .paginate(
            "ListMicrovmImageBuilds",
            json!({"imageIdentifier": image, "imageVersion": version}),
        )
        .await?;
    builds
        .first()
        .and_then(|b| b.get("buildId"))
        .and_then(Value::as_str)
        .map(str::to_string)
        .with_context(|| format!("version {version} of {image} has no build"))
}

/// Prints the build's log from the start; with `follow`, until it ends.
async fn follow(client: &Client, build_id: &str, follow: bool) -> Result<()> {
    let mut offset = 0u64;
    loop {
        let page = client
            .call_extension(
                http::Method::GET,
                &format!("/hearth/2025-09-09/builds/{build_id}/logs?offset={offset}"),
                json!({}),
            )
            .await?;
        if let Some(text) = page.get("log").and_then(Value::as_str) {
            print!("{text}");
            let _ = std::io::stdout().flush();
        }
        let next = page
            .get("nextOffset")
            .and_then(Value::as_u64)
            .unwrap_or(offset);
        let complete = page
            .get("complete")
            .and_then(Value::as_bool)
            .unwrap_or(true);
        if complete || (!follow && next == offset) {
            return Ok(());
        }
        if next == offset {
            tokio::time::sleep(POLL).await;
        }
        offset = next;
    }
}

async fn finish(client: &Client, image: &str, version: &str, build_id: &str) -> Result<()> {
    let build = client
        .call(
            "GetMicrovmImageBuild",
            json!({"imageIdentifier": image, "imageVersion": version, "buildId": build_id}),
        )
        .await?;
    match build.get("buildState").and_then(Value::as_str) {
        Some("SUCCESSFUL") => {
            eprintln!("{image} version {version}: SUCCESSFUL");
            Ok(())
        }
        state => bail!(
            "{image} version {version}: {} ({})",
            state.unwrap_or("unknown"),
            build
                .get("stateReason")
                .and_then(Value::as_str)
                .unwrap_or("no reason given")
        ),
    }
}

pub async fn logs(args: LogsArgs) -> Result<()> {
    let client = args.connect.client()?;
    let version = match &args.version {
        Some(v) => v.clone(),
        None => {
            let versions = client
                .paginate(
                    "ListMicrovmImageVersions",
                    json!({"imageIdentifier": args.image}),
                )
                .await?;
            versions
                .iter()
                .filter_map(|v| v.get("imageVersion").and_then(Value::as_str))
                .max_by_key(|v| v.split('.').next().and_then(|n| n.parse::<u32>().ok()))
                .map(str::to_string)
                .with_context(|| format!("{} has no versions", args.image))?
        }
    };
    let build_id = build_of(&client, &args.image, &version).await?;
    follow(&client, &build_id, args.follow).await
}

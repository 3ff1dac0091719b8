//! Where a client command connects, and how it prints (`--endpoint-url`,
//! `--region`, `--profile`, `--ca-bundle`, `--json`), and how it fails:
//! `error: ...` on stderr, or with `--json` `{"error": {"code", "message"}}`
//! there (the AWS error code when the API answered with one).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::Args;
use hearth_client::{Client, ClientConfig, ClientError, ConfigError, ConfigFlags};
use serde_json::json;

/// Exit status of a command that failed (API, configuration, connection).
pub(crate) const EXIT_FAILURE: u8 = 1;
/// Exit status of a command line that does not parse (as clap's own).
pub(crate) const EXIT_USAGE: u8 = 2;

/// Where to connect (without `--json`, for commands whose output is a terminal).
#[derive(Debug, Args)]
pub struct ServerArgs {
    /// API endpoint [default: $HEARTH_ENDPOINT_URL, $AWS_ENDPOINT_URL_LAMBDA_MICROVMS,
    /// $AWS_ENDPOINT_URL, the AWS profile, the config file, http://127.0.0.1:9070].
    #[arg(long, value_name = "URL")]
    endpoint_url: Option<String>,
    /// Region to sign for [default: $HEARTH_REGION, $AWS_REGION, $AWS_DEFAULT_REGION,
    /// the AWS profile, the config file, us-east-1].
    #[arg(long)]
    region: Option<String>,
    /// AWS profile in ~/.aws/credentials and ~/.aws/config [default: $AWS_PROFILE].
    #[arg(long)]
    profile: Option<String>,
    /// PEM file of CAs to trust for an https endpoint, besides the system's
    /// [default: $AWS_CA_BUNDLE, the profile's ca_bundle].
    #[arg(long, value_name = "PEM")]
    ca_bundle: Option<PathBuf>,
}

impl ServerArgs {
    pub(crate) fn client(&self) -> Result<Client> {
        let resolved = ClientConfig::resolve(&ConfigFlags {
            endpoint_url: self.endpoint_url.clone(),
            region: self.region.clone(),
            profile: self.profile.clone(),
            ca_bundle: self.ca_bundle.clone(),
            ..Default::default()
        })?;
        for warning in &resolved.warnings {
            eprintln!("warning: {warning}");
        }
        Ok(Client::new(resolved.config))
    }
}

/// Where to connect and how to print; on every client command.
#[derive(Debug, Args)]
pub struct ConnectArgs {
    #[command(flatten)]
    pub(crate) server: ServerArgs,
    /// Print JSON instead of a table (errors too, on stderr).
    #[arg(long)]
    pub(crate) json: bool,
}

impl ConnectArgs {
    pub(crate) fn client(&self) -> Result<Client> {
        self.server.client()
    }
}

/// The `code` of a JSON error: the API's error code, else what kind of failure.
pub(crate) fn error_code(err: &anyhow::Error) -> String {
    for cause in err.chain() {
        if let Some(client) = cause.downcast_ref::<ClientError>() {
            return match client {
                ClientError::Api { code, .. } => code.clone(),
                ClientError::Config(_) => "ConfigError".into(),
                ClientError::Input(_) => "InvalidInput".into(),
                ClientError::Transport { .. } | ClientError::Timeout { .. } => {
                    "ConnectionError".into()
                }
                _ => "ClientError".into(),
            };
        }
        if cause.downcast_ref::<ConfigError>().is_some() {
            return "ConfigError".into();
        }
        if cause.downcast_ref::<std::io::Error>().is_some() {
            return "IoError".into();
        }
    }
    "Error".into()
}

/// Prints a failure as text or JSON on stderr.
pub(crate) fn print_error(err: &anyhow::Error, json: bool) {
    if json {
        let error = json!({ "error": { "code": error_code(err), "message": format!("{err:#}") } });
        eprintln!("{error}");
    } else {
        eprintln!("error: {err:#}");
    }
}

/// 0 on success; else the error printed (see [`print_error`]) and 1.
pub(crate) fn report(result: Result<()>, json: bool) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            print_error(&err, json);
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

//! Where a client command connects, and how it prints (`--endpoint-url`,
//! `--region`, `--json`).

use anyhow::Result;
use clap::Args;
use hearth_client::{Client, ClientConfig, ConfigFlags};

/// Where to connect and how to print; on every client command.
#[derive(Debug, Args)]
pub struct ConnectArgs {
    /// API endpoint [default: $HEARTH_ENDPOINT_URL, the config file, http://127.0.0.1:9070].
    #[arg(long, value_name = "URL")]
    endpoint_url: Option<String>,
    /// Region to sign for [default: $HEARTH_REGION, $AWS_REGION, the config file, us-east-1].
    #[arg(long)]
    region: Option<String>,
    /// Print the response JSON instead of a table.
    #[arg(long)]
    pub(crate) json: bool,
}

impl ConnectArgs {
    pub(crate) fn client(&self) -> Result<Client> {
        let resolved = ClientConfig::resolve(&ConfigFlags {
            endpoint_url: self.endpoint_url.clone(),
            region: self.region.clone(),
            ..Default::default()
        })?;
        for warning in &resolved.warnings {
            eprintln!("warning: {warning}");
        }
        Ok(Client::new(resolved.config))
    }
}

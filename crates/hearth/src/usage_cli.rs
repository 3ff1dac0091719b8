//! `hearth usage`: the operator's cost report, read from the data directory
//! (works while the server runs): metered usage per microVM, image or usage
//! type, priced by the reference's rates or the operator's price sheet.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Args;
use hearth_server::api::usage::{report, GroupBy};
use hearth_server::pricing::PriceSheet;

#[derive(Debug, Args)]
pub struct UsageArgs {
    /// Only this account (12 digits); all accounts by default.
    #[arg(long)]
    account: Option<String>,
    /// From this time: RFC 3339 (`2026-12-07T00:00:00Z`) or epoch seconds.
    /// Usage is kept per hour: an hour counts when it starts in the range.
    #[arg(long)]
    since: Option<String>,
    /// Until this time (exclusive), as --since.
    #[arg(long)]
    until: Option<String>,
    /// Group by microvm, image or usage-type.
    #[arg(long, default_value = "microvm", value_parser = parse_group)]
    by: GroupChoice,
    /// Print {"items": [...], "totalCostUsd"} (items carry accountId).
    #[arg(long)]
    json: bool,
    /// The price sheet the server uses (default: the reference's rates).
    #[arg(long, value_name = "FILE")]
    price_sheet: Option<PathBuf>,
    /// The region image ARNs name.
    #[arg(long, default_value = "us-east-1")]
    region: String,
    #[arg(long, env = "HEARTH_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy)]
pub struct GroupChoice(GroupBy);

fn parse_group(text: &str) -> Result<GroupChoice, String> {
    GroupBy::parse(text)
        .map(GroupChoice)
        .ok_or_else(|| "must be microvm, image or usage-type".to_string())
}

/// Epoch seconds from RFC 3339 or a number of seconds.
fn parse_time(text: &str) -> Result<i64> {
    if let Ok(seconds) = text.parse::<i64>() {
        return Ok(seconds);
    }
    crate::app_logs_cli::parse_rfc3339_ms(text)
        .and_then(|ms| i64::try_from(ms / 1000).ok())
        .with_context(|| format!("{text:?} is not RFC 3339 or epoch seconds"))
}

pub fn usage(args: UsageArgs, data_dir: &Path) -> Result<ExitCode> {
    if !data_dir.join("hearth.db").is_file() {
        bail!("no hearth database in {}", data_dir.display());
    }
    let store = hearth_server::Store::open(data_dir)?;
    let prices = match &args.price_sheet {
        Some(file) => PriceSheet::load(file)?,
        None => PriceSheet::default(),
    };
    let since = args
        .since
        .as_deref()
        .map(parse_time)
        .transpose()?
        .unwrap_or(0);
    let until = args
        .until
        .as_deref()
        .map(parse_time)
        .transpose()?
        .unwrap_or(i64::MAX / 2);
    let report = report(
        &store,
        &prices,
        &args.region,
        args.account.as_deref(),
        since,
        until,
        args.by.0,
    )?;
    if args.json {
        let items: Vec<serde_json::Value> = report
            .items
            .iter()
            .map(|item| {
                let mut value = serde_json::json!(item);
                value["accountId"] = serde_json::json!(item.account_id);
                value
            })
            .collect();
        let out = serde_json::json!({"items": items, "totalCostUsd": report.total_cost_usd});
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<13} {:<44} {:<40} {:>16} {:<13} {:>12}",
        "ACCOUNT", "MICROVM / IMAGE", "USAGE TYPE", "QUANTITY", "UNIT", "COST USD"
    );
    for item in &report.items {
        let subject = item
            .microvm_id
            .clone()
            .or_else(|| {
                item.image_arn
                    .as_deref()
                    .map(|arn| arn.rsplit(':').next().unwrap_or(arn).to_string())
            })
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<13} {:<44} {:<40} {:>16.6} {:<13} {:>12.6}",
            item.account_id, subject, item.usage_type, item.quantity, item.unit, item.cost_usd
        );
    }
    println!("total: ${:.6}", report.total_cost_usd);
    Ok(ExitCode::SUCCESS)
}

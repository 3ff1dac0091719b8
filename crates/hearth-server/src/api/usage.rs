//! The cost report: metered usage (`db/usage.rs`) summed per microVM, image or
//! usage type and priced by the server's price sheet. Served to tenants as
//! `GET /hearth/2025-09-09/usage[?since=&until=]` (their own account only;
//! times in epoch seconds, like the API's timestamps) and to the operator by
//! `hearth usage`.

use std::collections::BTreeMap;

use axum::response::{IntoResponse, Response};
use hearth_api::ApiError;
use serde::Serialize;
use serde_json::json;

use crate::api::ops::input::{internal, Caller};
use crate::api::state::AppState;
use crate::arn::Arn;
use crate::db::store::{Store, StoreError};
use crate::pricing::{PriceSheet, UsageType};

/// How a report groups usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GroupBy {
    /// One item per microVM (or image, for usage of no microVM) and type.
    #[default]
    Microvm,
    /// One item per image and type.
    Image,
    /// One item per usage type.
    UsageType,
}

impl GroupBy {
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "microvm" => Some(GroupBy::Microvm),
            "image" => Some(GroupBy::Image),
            "usage-type" => Some(GroupBy::UsageType),
            _ => None,
        }
    }
}

/// One line of a report.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReportItem {
    /// Shown to the operator only (a tenant's report is its own account).
    #[serde(skip)]
    pub account_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub microvm_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_arn: Option<String>,
    pub usage_type: String,
    pub quantity: f64,
    pub unit: &'static str,
    pub cost_usd: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub items: Vec<ReportItem>,
    pub total_cost_usd: f64,
}

/// The report of usage in the hours starting in `[since, until)` (epoch
/// seconds), of one account or all.
pub fn report(
    store: &Store,
    prices: &PriceSheet,
    region: &str,
    account: Option<&str>,
    since: i64,
    until: i64,
    by: GroupBy,
) -> Result<Report, StoreError> {
    // Hourly buckets: an hour is in the report when it starts in the range.
    let since_hour = since.div_euclid(3600) * 3600;
    let mut grouped: BTreeMap<(String, String, String, UsageType), i64> = BTreeMap::new();
    for sum in store.usage_sums(account, since_hour, until)? {
        let (microvm, image) = match by {
            GroupBy::Microvm => (sum.microvm_id, sum.image_name),
            GroupBy::Image => (String::new(), sum.image_name),
            GroupBy::UsageType => (String::new(), String::new()),
        };
        *grouped
            .entry((sum.account_id, microvm, image, sum.usage_type))
            .or_default() += sum.amount;
    }
    let items: Vec<ReportItem> = grouped
        .into_iter()
        .map(
            |((account_id, microvm, image, usage_type), amount)| ReportItem {
                microvm_id: (!microvm.is_empty()).then_some(microvm),
                image_arn: (!image.is_empty())
                    .then(|| Arn::image(region, &account_id, &image).to_string()),
                account_id,
                usage_type: usage_type.wire_name(),
                quantity: usage_type.quantity(amount),
                unit: usage_type.unit(),
                cost_usd: prices.cost(usage_type, amount),
            },
        )
        .collect();
    let total_cost_usd = items.iter().map(|i| i.cost_usd).sum();
    Ok(Report {
        items,
        total_cost_usd,
    })
}

/// `since`/`until` as epoch seconds (fractions allowed).
fn epoch_param(query: &str, name: &str, default: i64) -> Result<i64, ApiError> {
    match form_urlencoded::parse(query.as_bytes()).find(|(k, _)| k == name) {
        None => Ok(default),
        Some((_, value)) => value
            .parse::<f64>()
            .ok()
            .filter(|v| v.is_finite() && *v >= 0.0 && *v < 1e12)
            .map(|v| v.floor() as i64)
            .ok_or_else(|| ApiError::validation(format!("{name} must be a time in epoch seconds"))),
    }
}

/// `GET /hearth/2025-09-09/usage`: the caller's own account, by microVM.
pub fn handle(state: &AppState, caller: &Caller, query: &str) -> Result<Response, ApiError> {
    let since = epoch_param(query, "since", 0)?;
    let until = epoch_param(query, "until", i64::MAX / 2)?;
    if until < since {
        return Err(ApiError::validation("until must not be before since"));
    }
    let report = report(
        &state.store,
        &state.config.prices,
        &caller.region,
        Some(&caller.account_id),
        since,
        until,
        GroupBy::Microvm,
    )
    .map_err(internal)?;
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        json!(report).to_string(),
    )
        .into_response())
}

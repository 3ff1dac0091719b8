//! `hearth usage` (the real binary) over a data directory whose usage the
//! test writes through the store: one account's report never shows another's,
//! the groupings add up, prices come from the price sheet, times filter hours.
//! No VM and no server.

use std::process::Command;

use hearth_server::db::usage::Increment;
use hearth_server::pricing::{UsageType, MICRO};
use serde_json::Value;

const HOUR_MS: i64 = 3_600_000;

fn usage(data: &std::path::Path, args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_hearth"))
        .arg("usage")
        .arg("--json")
        .arg("--data-dir")
        .arg(data)
        .args(args)
        .env_remove("HEARTH_DATA_DIR")
        .output()
        .expect("run hearth usage");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON report")
}

fn inc(account: &str, vm: &str, usage_type: UsageType, hour: i64, amount: i64) -> Increment {
    Increment {
        account_id: account.into(),
        microvm_id: vm.into(),
        image_name: "web".into(),
        usage_type,
        from_ms: hour * HOUR_MS,
        to_ms: hour * HOUR_MS + 1000,
        amount,
    }
}

#[test]
fn reports_by_account_grouping_price_and_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = hearth_server::Store::open(dir.path()).expect("store");
    let a = store.create_account("a").expect("account").account_id;
    let b = store.create_account("b").expect("account").account_id;
    let hour = 500_000; // an hour in 2027
    store
        .add_usage(&[
            inc(&a, "microvm-1", UsageType::VcpuSeconds, hour, 3600 * MICRO),
            inc(
                &a,
                "microvm-2",
                UsageType::VcpuSeconds,
                hour + 1,
                1800 * MICRO,
            ),
            inc(&a, "microvm-1", UsageType::SnapshotRead, hour, 1 << 30),
            inc(
                &b,
                "microvm-9",
                UsageType::MemoryGbSeconds,
                hour,
                7200 * MICRO,
            ),
        ])
        .expect("usage");
    let data = dir.path();

    let mine = usage(data, &["--account", &a]);
    let items = mine["items"].as_array().expect("items");
    assert_eq!(items.len(), 3, "{mine}");
    assert!(items.iter().all(|i| i["accountId"] == a.as_str()), "{mine}");
    assert!(items.iter().all(|i| i["microvmId"] != "microvm-9"));
    let vcpu_1 = items
        .iter()
        .find(|i| i["microvmId"] == "microvm-1" && i["unit"] == "vCPU-Seconds")
        .expect("microvm-1 vCPU");
    assert_eq!(vcpu_1["quantity"], 3600.0);
    assert!(vcpu_1["usageType"]
        .as_str()
        .expect("type")
        .starts_with("Lambda-MicroVM-vCPU-Second-"));
    assert!((vcpu_1["costUsd"].as_f64().expect("cost") - 3600.0 * 0.0000276944).abs() < 1e-9);
    let total = 5400.0 * 0.0000276944 + 0.00155;
    assert!(
        (mine["totalCostUsd"].as_f64().expect("total") - total).abs() < 1e-9,
        "{mine}"
    );

    let theirs = usage(data, &["--account", &b]);
    assert_eq!(
        theirs["items"].as_array().expect("items").len(),
        1,
        "{theirs}"
    );
    assert_eq!(theirs["items"][0]["microvmId"], "microvm-9");

    // By usage type: one vCPU line for both microVMs.
    let by_type = usage(data, &["--account", &a, "--by", "usage-type"]);
    let items = by_type["items"].as_array().expect("items");
    assert_eq!(items.len(), 2, "{by_type}");
    assert!(items.iter().all(|i| i.get("microvmId").is_none()));
    assert!(items.iter().any(|i| i["quantity"] == 5400.0));

    // Only the second hour.
    let since = ((hour + 1) * 3600).to_string();
    let later = usage(data, &["--account", &a, "--since", &since]);
    let items = later["items"].as_array().expect("items");
    assert_eq!(items.len(), 1, "{later}");
    assert_eq!(items[0]["microvmId"], "microvm-2");

    // A price sheet: reads now cost $1 per GB.
    let sheet = dir.path().join("prices.json");
    std::fs::write(&sheet, r#"{"Lambda-MicroVM-Snapshot-Read-GB": 1.0}"#).expect("sheet");
    let priced = usage(
        data,
        &[
            "--account",
            &a,
            "--by",
            "usage-type",
            "--price-sheet",
            sheet.to_str().expect("path"),
        ],
    );
    let read = priced["items"]
        .as_array()
        .expect("items")
        .iter()
        .find(|i| i["usageType"] == "Lambda-MicroVM-Snapshot-Read-GB")
        .expect("read line")
        .clone();
    assert_eq!(read["costUsd"], 1.0);
}

//! 100 MiB each way through the proxy at once, checked by hash, with the
//! process's peak memory staying far below the data's size (nothing buffers a
//! whole body). Alone in its test binary so the peak is this test's own.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use hearth_proxy::ProxyConfig;
use http::StatusCode;

const SIZE: u64 = 100 * 1024 * 1024;

/// Peak resident memory of this process, in bytes.
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_mib_echo_streams_without_buffering() {
    let f = fixture(ProxyConfig::default()).await;
    let expected = pattern_sha256(SIZE);
    let before = peak_rss();
    let started = Instant::now();

    let mut client = h1(f.proxy).await;
    let request = request("POST", &f.host(VM), "/echo", Some(TOKEN))
        .body(pattern_body(SIZE))
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(30), client.send_request(request))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let (len, sha) =
        tokio::time::timeout(Duration::from_secs(300), hash_body(response.into_body()))
            .await
            .unwrap();
    assert_eq!(len, SIZE);
    assert_eq!(sha, expected);

    let grown = peak_rss().saturating_sub(before);
    eprintln!(
        "200 MiB through the proxy in {:.1?}; peak RSS grew by {} KiB; traffic counted {} bytes",
        started.elapsed(),
        grown / 1024,
        f.backend.traffic()
    );
    assert!(grown < 48 * 1024 * 1024, "peak RSS grew by {grown} bytes");
    assert!(f.backend.traffic() >= 2 * SIZE);
}

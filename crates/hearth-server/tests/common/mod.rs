//! Helpers shared by the server's end-to-end tests on real guests.
#![allow(dead_code)]

use std::path::Path;
use std::time::{Duration, Instant};

use hearth_proto::ExecRequest;
use hearth_server::api::ops::{dispatch, Caller};
use hearth_server::AppState;
use serde_json::{json, Value};

/// Unpacks the cached debian-12 root disk into `dir` and adds `app` as
/// `/app/server.py`.
pub fn make_rootfs(dir: &Path, app: &str) {
    let assets = hearth_vm::Assets::from_env();
    let base = assets
        .base_image("debian-12")
        .expect("debian-12 base image");
    std::fs::create_dir_all(dir).expect("mkdir rootfs");
    let status = std::process::Command::new("debugfs")
        .arg("-R")
        .arg(format!("rdump / {}", dir.display()))
        .arg(&base)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("debugfs");
    assert!(status.success());
    assert!(dir.join("usr/bin/python3").exists(), "rdump made no tree");
    std::fs::create_dir_all(dir.join("app")).expect("mkdir app");
    std::fs::write(dir.join("app/server.py"), app).expect("write app");
}

/// Runs an operation through the handlers; its output must match the model.
pub async fn call(state: &AppState, caller: &Caller, op: &str, input: Value) -> Value {
    let output = dispatch(state, caller, op, input)
        .await
        .unwrap_or_else(|e| panic!("{op}: {e:?}"));
    let model = hearth_api::model();
    let operation = model.operation(op).expect("operation");
    model
        .check_output(operation, &output)
        .unwrap_or_else(|e| panic!("{op} output does not match the model: {e}\n{output}"));
    output
}

/// Polls GetMicrovm until `want` (at most two minutes).
pub async fn wait_state(state: &AppState, caller: &Caller, id: &str, want: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let vm = call(
            state,
            caller,
            "GetMicrovm",
            json!({"microvmIdentifier": id}),
        )
        .await;
        if vm["state"] == want {
            return vm;
        }
        assert!(
            Instant::now() < deadline && vm["state"] != "TERMINATED",
            "waiting for {want}: {vm}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs a shell command in the guest through the engine's agent.
pub async fn sh(state: &AppState, caller: &Caller, id: &str, script: &str) -> String {
    let row = state
        .store
        .microvm(&caller.account_id, id)
        .expect("store")
        .expect("row");
    let agent = state.engine.agent(&row).await.expect("agent");
    let out = agent
        .exec_output(ExecRequest {
            argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
            ..Default::default()
        })
        .await
        .expect("exec");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

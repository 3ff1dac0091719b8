//! End to end through the server's handlers on real guests: import an image
//! from a root filesystem (with a ready hook), run a microVM from it, check
//! state inside the guest across suspend/resume, terminate it; outputs are
//! checked against the model and another account sees only 404s.
//!
//! Needs the host set-up (scripts/setup-host).

use std::time::{Duration, Instant};

use hearth_server::api::ops::{dispatch, Caller};
use hearth_server::ServerConfig;
use serde_json::{json, Value};

mod common;
use common::{call, sh, wait_state};

const APP: &str = r#"
import http.server, os, time
started = time.time()
open('/tmp/app-started', 'w').write(str(os.getpid()))
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get('Content-Length') or 0)).decode()
        hook = self.path.rsplit('/', 1)[-1]
        # Not ready for the first second: exercises the 503 retry.
        code = 200 if time.time() - started > 1 else 503
        if hook == 'run' and '"fail"' in body:
            code = 500
        if code == 200:
            with open('/tmp/hooks.log', 'a') as log:
                log.write(hook + ' ' + body + '\n')
        self.send_response(code)
        self.send_header('Content-Length', '0')
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(('0.0.0.0', 9000), H).serve_forever()
"#;

fn server_is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    // `/proc/self` belongs to this process's effective uid.
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// Every QEMU running from `data` is jailed: not the server's uid (not
/// root), no_new_privs, seccomp on, its own mount namespace. Returns how many.
fn assert_qemus_jailed(data: &std::path::Path) -> usize {
    let data = data.display().to_string();
    let own_mnt = std::fs::read_link("/proc/self/ns/mnt").expect("ns");
    let mut found = 0;
    for entry in std::fs::read_dir("/proc").expect("proc").flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline);
        if !cmdline.starts_with("qemu-system") || !cmdline.contains(&data) {
            continue;
        }
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else {
            continue;
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .unwrap_or_default()
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string()
        };
        let uid: u32 = field("Uid:").parse().expect("uid");
        assert_ne!(uid, 0, "QEMU {:?} runs as root", entry.file_name());
        assert_eq!(field("NoNewPrivs:"), "1");
        assert_eq!(field("Seccomp:"), "2");
        assert_ne!(
            std::fs::read_link(entry.path().join("ns/mnt")).expect("ns"),
            own_mnt
        );
        found += 1;
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_run_suspend_resume_terminate() {
    let work = tempfile::tempdir().expect("tempdir");
    let data = work.path().join("data");
    let rootfs = work.path().join("rootfs");
    common::make_rootfs(&rootfs, APP);

    let mut config =
        ServerConfig::new(data.clone(), ([127, 0, 0, 1], 0).into(), "us-east-1".into());
    config.quotas.memory_mib = 600;
    let state = hearth_server::start(config).await.expect("start");
    let owner = state.store.create_account("owner").expect("account");
    let other = state.store.create_account("other").expect("account");
    let caller = Caller {
        account_id: owner.account_id.clone(),
        region: "us-east-1".into(),
    };
    let stranger = Caller {
        account_id: other.account_id.clone(),
        region: "us-east-1".into(),
    };

    // Import: boot, start the app, wait for its ready hook, snapshot.
    let request = hearth_server::images::import::ImportRequest {
        account_id: owner.account_id.clone(),
        image_name: "web".into(),
        region: "us-east-1".into(),
        rootfs: rootfs.clone(),
        command: vec!["python3".into(), "/app/server.py".into()],
        workdir: "/".into(),
        hooks_port: Some(9000),
        ready_timeout: Duration::from_secs(60),
        microvm_hooks: vec![
            "run".into(),
            "suspend".into(),
            "resume".into(),
            "terminate".into(),
        ],
        hook_timeout_secs: 5,
        memory_mib: 256,
        environment: vec![("GREETING".into(), "hello".into())],
        description: Some("test app".into()),
    };
    let imported = hearth_server::images::import::import_image(
        &data,
        &state.store,
        state.engine.driver(),
        &state.config.quotas,
        &request,
        &|step: &str| eprintln!("import: {step}"),
    )
    .await
    .expect("import");
    assert_eq!(imported.version, 1);
    assert!(imported.snapshot_build.memory_snapshot_size_in_bytes > 0);

    let image = call(
        &state,
        &caller,
        "GetMicrovmImage",
        json!({"imageIdentifier": "web"}),
    )
    .await;
    assert_eq!(image["state"], "CREATED");
    assert_eq!(image["latestActiveImageVersion"], "1.0");
    let arn = image["imageArn"].as_str().expect("arn").to_string();
    let version = call(
        &state,
        &caller,
        "GetMicrovmImageVersion",
        json!({"imageIdentifier": arn, "imageVersion": "1.0"}),
    )
    .await;
    assert_eq!(version["state"], "SUCCESSFUL");
    assert_eq!(version["environmentVariables"]["GREETING"], "hello");
    let builds = call(
        &state,
        &caller,
        "ListMicrovmImageBuilds",
        json!({"imageIdentifier": "web", "imageVersion": "1.0"}),
    )
    .await;
    let build_id = builds["items"][0]["buildId"]
        .as_str()
        .expect("build")
        .to_string();
    let build = call(
        &state,
        &caller,
        "GetMicrovmImageBuild",
        json!({"imageIdentifier": "web", "imageVersion": "1.0", "buildId": build_id}),
    )
    .await;
    assert_eq!(build["buildState"], "SUCCESSFUL");
    assert!(build["snapshotBuild"]["diskSnapshotSizeInBytes"].as_u64() > Some(0));

    // Another account: the same 404 as a missing image.
    let theirs = dispatch(
        &state,
        &stranger,
        "GetMicrovmImage",
        json!({"imageIdentifier": arn}),
    )
    .await
    .expect_err("other account");
    let missing = dispatch(
        &state,
        &caller,
        "GetMicrovmImage",
        json!({"imageIdentifier": arn.replace(":web", ":nope")}),
    )
    .await
    .expect_err("missing");
    assert_eq!(theirs.status(), 404);
    assert_eq!(missing.status(), 404);

    // Run: PENDING at once, then RUNNING; the app's state came with the snapshot.
    let run = call(
        &state,
        &caller,
        "RunMicrovm",
        json!({"imageIdentifier": "web", "clientToken": "run-1", "maximumDurationInSeconds": 600,
               "runHookPayload": "hello-vm"}),
    )
    .await;
    let id = run["microvmId"].as_str().expect("id").to_string();
    assert_eq!(run["state"], "PENDING");
    // The same clientToken replays: same microVM.
    let again = call(
        &state,
        &caller,
        "RunMicrovm",
        json!({"imageIdentifier": "web", "clientToken": "run-1", "maximumDurationInSeconds": 600,
               "runHookPayload": "hello-vm"}),
    )
    .await;
    assert_eq!(again["microvmId"], run["microvmId"]);
    // The same token with other parameters is a conflict.
    let mismatch = dispatch(
        &state,
        &caller,
        "RunMicrovm",
        json!({"imageIdentifier": "web", "clientToken": "run-1", "maximumDurationInSeconds": 60}),
    )
    .await
    .expect_err("mismatch");
    assert_eq!(mismatch.status(), 409);
    // 256 MiB in use of a 600 MiB quota: a third 256 MiB VM would exceed it.
    let second = call(
        &state,
        &caller,
        "RunMicrovm",
        json!({"imageIdentifier": "web"}),
    )
    .await;
    let over = dispatch(
        &state,
        &caller,
        "RunMicrovm",
        json!({"imageIdentifier": "web"}),
    )
    .await
    .expect_err("quota");
    assert_eq!(over.status(), 402, "{over:?}");

    wait_state(&state, &caller, &id, "RUNNING").await;

    // Endpoint tokens: signed, scoped to this VM and its ports, expiring.
    let minted = call(
        &state,
        &caller,
        "CreateMicrovmAuthToken",
        json!({"microvmIdentifier": id, "expirationInMinutes": 5,
               "allowedPorts": [{"port": 8080}, {"range": {"startPort": 3000, "endPort": 3001}}]}),
    )
    .await;
    let token = minted["authToken"]["X-aws-proxy-auth"]
        .as_str()
        .expect("token");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let claims = state.tokens.verify(token, now).expect("verifies");
    assert_eq!(claims.microvm, id);
    assert!(claims.allows_port(8080) && claims.allows_port(3001) && !claims.allows_port(9000));
    assert!(state.tokens.verify(token, now + 301).is_err());
    for bad in [
        json!({"microvmIdentifier": id, "expirationInMinutes": 61, "allowedPorts": [{"port": 1}]}),
        json!({"microvmIdentifier": id, "expirationInMinutes": 5,
               "allowedPorts": [{"range": {"startPort": 9, "endPort": 8}}]}),
    ] {
        let err = dispatch(&state, &caller, "CreateMicrovmAuthToken", bad)
            .await
            .expect_err("invalid");
        assert_eq!(err.status(), 400);
    }
    let theirs = dispatch(
        &state,
        &stranger,
        "CreateMicrovmAuthToken",
        json!({"microvmIdentifier": id, "expirationInMinutes": 5, "allowedPorts": [{"allPorts": {}}]}),
    )
    .await
    .expect_err("other account");
    assert_eq!(theirs.status(), 404);
    // No SHELL_INGRESS at run: no shell token.
    let shell = dispatch(
        &state,
        &caller,
        "CreateMicrovmShellAuthToken",
        json!({"microvmIdentifier": id, "expirationInMinutes": 5}),
    )
    .await
    .expect_err("no shell connector");
    assert_eq!(shell.status(), 400);
    assert!(!sh(&state, &caller, &id, "cat /tmp/app-started")
        .await
        .is_empty());
    // Hooks: `ready` during the import, then `/run` with the id and payload.
    let hooks = sh(&state, &caller, &id, "cat /tmp/hooks.log").await;
    let lines: Vec<&str> = hooks.lines().collect();
    assert_eq!(lines.first().copied(), Some("ready "), "{hooks}");
    let run_line = lines.get(1).copied().unwrap_or_default();
    assert!(run_line.starts_with("run {"), "{hooks}");
    let run_body: Value = serde_json::from_str(&run_line[4..]).expect("run body");
    assert_eq!(
        run_body,
        json!({"microvmId": id, "runHookPayload": "hello-vm"})
    );
    sh(&state, &caller, &id, "echo kept > /tmp/marker").await;
    let pid_before = sh(&state, &caller, &id, "cat /tmp/app-started").await;
    // `hearth serve`'s QEMUs are jailed (the server runs as root in CI).
    if server_is_root() {
        assert!(assert_qemus_jailed(&data) >= 1, "no QEMU found");
    }

    // Suspend: SUSPENDING then SUSPENDED, no process; suspending again is a 200.
    call(
        &state,
        &caller,
        "SuspendMicrovm",
        json!({"microvmIdentifier": id}),
    )
    .await;
    wait_state(&state, &caller, &id, "SUSPENDED").await;
    call(
        &state,
        &caller,
        "SuspendMicrovm",
        json!({"microvmIdentifier": id}),
    )
    .await;
    let theirs = dispatch(
        &state,
        &stranger,
        "SuspendMicrovm",
        json!({"microvmIdentifier": id}),
    )
    .await
    .expect_err("other account");
    assert_eq!(theirs.status(), 404);

    // Resume: same processes and files.
    call(
        &state,
        &caller,
        "ResumeMicrovm",
        json!({"microvmIdentifier": id}),
    )
    .await;
    wait_state(&state, &caller, &id, "RUNNING").await;
    call(
        &state,
        &caller,
        "ResumeMicrovm",
        json!({"microvmIdentifier": id}),
    )
    .await;
    assert_eq!(sh(&state, &caller, &id, "cat /tmp/marker").await, "kept");
    if server_is_root() {
        assert!(assert_qemus_jailed(&data) >= 1, "no resumed QEMU found");
    }
    let hooks = sh(
        &state,
        &caller,
        &id,
        "cut -d' ' -f1 /tmp/hooks.log | tr '\\n' ,",
    )
    .await;
    assert_eq!(hooks, "ready,run,suspend,resume,", "hook order");
    let alive = sh(
        &state,
        &caller,
        &id,
        &format!("kill -0 {pid_before} && echo alive"),
    )
    .await;
    assert_eq!(alive, "alive");

    // List shows both; filters by image.
    let list = call(
        &state,
        &caller,
        "ListMicrovms",
        json!({"imageIdentifier": "web"}),
    )
    .await;
    assert_eq!(list["items"].as_array().map(Vec::len), Some(2));
    let list = call(&state, &stranger, "ListMicrovms", json!({})).await;
    assert_eq!(list["items"].as_array().map(Vec::len), Some(0));

    // An image in use cannot be deleted.
    let busy = dispatch(
        &state,
        &caller,
        "DeleteMicrovmImage",
        json!({"imageIdentifier": "web"}),
    )
    .await
    .expect_err("in use");
    assert_eq!(busy.status(), 409);

    // Terminate both; terminating again is a 200; nothing is left behind.
    for vm in [&id, second["microvmId"].as_str().expect("id")] {
        call(
            &state,
            &caller,
            "TerminateMicrovm",
            json!({"microvmIdentifier": vm}),
        )
        .await;
        let done = wait_state(&state, &caller, vm, "TERMINATED").await;
        assert_eq!(done["stateReason"], "Success.");
        assert!(done["terminatedAt"].is_number());
        call(
            &state,
            &caller,
            "TerminateMicrovm",
            json!({"microvmIdentifier": vm}),
        )
        .await;
    }
    // A failing `/run` ends the microVM with the reason.
    let failing = call(
        &state,
        &caller,
        "RunMicrovm",
        json!({"imageIdentifier": "web", "runHookPayload": "fail"}),
    )
    .await;
    let failing = failing["microvmId"].as_str().expect("id").to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    let ended = loop {
        let vm = call(
            &state,
            &caller,
            "GetMicrovm",
            json!({"microvmIdentifier": failing}),
        )
        .await;
        if vm["state"] == "TERMINATED" {
            break vm;
        }
        assert!(Instant::now() < deadline, "{vm}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        ended["stateReason"],
        "Run lifecycle hook returned HTTP status 500."
    );

    let left: Vec<_> = std::fs::read_dir(data.join("engine/vms"))
        .expect("vms dir")
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");

    // Tags, then delete the image (idempotent).
    call(
        &state,
        &caller,
        "TagResource",
        json!({"Resource": arn, "Tags": {"team": "a"}}),
    )
    .await;
    let tags = call(&state, &caller, "ListTags", json!({"Resource": arn})).await;
    assert_eq!(tags["Tags"], json!({"team": "a"}));
    let deleted = call(
        &state,
        &caller,
        "DeleteMicrovmImage",
        json!({"imageIdentifier": "web"}),
    )
    .await;
    assert_eq!(deleted["state"], "DELETED");
    call(
        &state,
        &caller,
        "DeleteMicrovmImage",
        json!({"imageIdentifier": "web"}),
    )
    .await;
    assert!(!data
        .join("images")
        .join(&owner.account_id)
        .join("web/1")
        .exists());
    let gone = dispatch(
        &state,
        &caller,
        "GetMicrovmImage",
        json!({"imageIdentifier": "web"}),
    )
    .await
    .expect_err("deleted");
    assert_eq!(gone.status(), 404);
}

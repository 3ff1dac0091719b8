//! The client commands of the real `hearth` binary against a real `hearth serve`
//! (no VM is started: these need neither KVM nor guest images).

use std::io::{BufRead, BufReader};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Variables that would let the user's own setup leak into a test.
const CLEARED: &[&str] = &[
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_REGION",
    "HEARTH_ENDPOINT_URL",
    "HEARTH_REGION",
    "HEARTH_CONFIG",
    "HEARTH_DATA_DIR",
];

/// A private directory tree for one test: state, cache, config and home.
struct Sandbox {
    dir: tempfile::TempDir,
}

impl Sandbox {
    fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("hcli")
            .tempdir_in("/tmp")
            .expect("temp dir");
        Self { dir }
    }

    fn path(&self, sub: &str) -> PathBuf {
        self.dir.path().join(sub)
    }

    fn hearth(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_hearth"));
        cmd.args(args)
            .env("HEARTH_HOME", self.path("home"))
            .env("HEARTH_CACHE", self.path("cache"))
            .env("HEARTH_RAM_DIR", self.path("ram"))
            .env("XDG_CONFIG_HOME", self.path("config"))
            .env("HOME", self.path("user"))
            .stdin(Stdio::null());
        for var in CLEARED {
            cmd.env_remove(var);
        }
        cmd
    }

    fn run(&self, args: &[&str]) -> Output {
        self.hearth(args).output().expect("run hearth")
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "hearth {args:?} failed ({:?}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// Starts `hearth serve` on a free port; it is killed when dropped.
    fn serve(&self) -> Server {
        let data = self.path("data");
        let mut child = self
            .hearth(&[
                "serve",
                "--data-dir",
                data.to_str().expect("utf-8"),
                "--listen",
                "127.0.0.1:0",
                "--endpoint-listen",
                "127.0.0.1:0",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start hearth serve");
        let stdout = child.stdout.take().expect("stdout");
        let mut server = Server {
            child,
            endpoint: String::new(),
        };
        // The server prints its real address once it listens.
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("hearth: listening on ") {
                    let _ = tx.send(url.to_string());
                }
            }
        });
        server.endpoint = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("hearth serve did not start listening");
        server
    }

    /// Creates an account in the server's data directory; (key id, secret).
    fn account(&self) -> (String, String) {
        let data = self.path("data");
        let out = self.ok(&[
            "account",
            "create",
            "--name",
            "t",
            "--json",
            "--data-dir",
            data.to_str().expect("utf-8"),
        ]);
        let key: serde_json::Value = serde_json::from_str(&out).expect("account json");
        (
            key["accessKeyId"].as_str().expect("key id").to_string(),
            key["secretAccessKey"].as_str().expect("secret").to_string(),
        )
    }
}

struct Server {
    child: Child,
    endpoint: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        // Also on a failed assertion: never leave a server behind.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).expect("stat").mode() & 0o777
}

#[test]
fn configure_then_list_images() {
    let sandbox = Sandbox::new();
    let server = sandbox.serve();
    let (key_id, secret) = sandbox.account();

    let out = sandbox.run(&[
        "configure",
        "--endpoint-url",
        &server.endpoint,
        "--access-key-id",
        &key_id,
        "--secret-access-key",
        &secret,
    ]);
    assert!(out.status.success(), "{out:?}");
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!printed.contains(&secret), "the secret was printed");
    let file = sandbox.path("config/hearth/config.json");
    assert_eq!(mode(&file), 0o600);
    assert_eq!(mode(&sandbox.path("config/hearth")), 0o700);
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&file).expect("read")).expect("json");
    assert_eq!(saved["endpointUrl"], server.endpoint.as_str());
    assert_eq!(saved["accessKeyId"], key_id.as_str());

    let listed: serde_json::Value =
        serde_json::from_str(&sandbox.ok(&["image", "ls", "--json"])).expect("json");
    assert!(listed["items"].is_array(), "{listed}");
    let listed: serde_json::Value =
        serde_json::from_str(&sandbox.ok(&["ls", "--json", "--all"])).expect("json");
    assert!(listed["items"].is_array(), "{listed}");
    // The human form is a table with its header even when empty.
    assert!(sandbox.ok(&["ls"]).starts_with("ID "));
}

#[test]
fn missing_credentials_are_explained() {
    let sandbox = Sandbox::new();
    let out = sandbox.run(&["image", "ls"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.starts_with("error: no credentials"), "{stderr}");
    for way in ["AWS_ACCESS_KEY_ID", "hearth configure", "config.json"] {
        assert!(stderr.contains(way), "{stderr}");
    }
}

#[test]
fn token_and_open_need_a_microvm_of_the_caller_and_a_valid_lifetime() {
    let sandbox = Sandbox::new();
    let server = sandbox.serve();
    let (key_id, secret) = sandbox.account();
    let run = |args: &[&str]| {
        sandbox
            .hearth(args)
            .env("HEARTH_ENDPOINT_URL", &server.endpoint)
            .env("AWS_ACCESS_KEY_ID", &key_id)
            .env("AWS_SECRET_ACCESS_KEY", &secret)
            .output()
            .expect("run")
    };
    for args in [
        &["token", "microvm-nope", "--port", "8080"][..],
        &["token", "microvm-nope", "--port", "8080", "--json"][..],
        &["open", "microvm-nope"][..],
    ] {
        let out = run(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.starts_with("error: "), "{stderr}");
        assert!(stderr.contains("ResourceNotFoundException"), "{stderr}");
        assert!(out.stdout.is_empty(), "{args:?}: {out:?}");
    }
    // Over the reference's 60 minutes, port 0 or no port: refused before any request.
    for args in [
        &["token", "microvm-nope", "--port", "8080", "--expires", "61"][..],
        &["token", "microvm-nope", "--port", "0"][..],
        &["token", "microvm-nope"][..],
    ] {
        let out = run(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
    }
}

#[test]
fn api_errors_exit_1_with_an_error_line() {
    let sandbox = Sandbox::new();
    let server = sandbox.serve();
    let (key_id, secret) = sandbox.account();

    let out = sandbox
        .hearth(&["get", "microvm-nope"])
        .env("HEARTH_ENDPOINT_URL", &server.endpoint)
        .env("AWS_ACCESS_KEY_ID", &key_id)
        .env("AWS_SECRET_ACCESS_KEY", &secret)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(out.stdout.is_empty());

    // A wrong secret: the server refuses the signature.
    let out = sandbox
        .hearth(&["ls", "--endpoint-url", &server.endpoint])
        .env("AWS_ACCESS_KEY_ID", &key_id)
        .env("AWS_SECRET_ACCESS_KEY", "wrong")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(!stderr.contains("wrong"), "{stderr}");
}

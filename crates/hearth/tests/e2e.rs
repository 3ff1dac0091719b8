//! End-to-end: the real `hearth` binary boots real guests (Debian's kernel, the
//! static agent, the debian-12 root filesystem) under QEMU. Needs what
//! `scripts/setup-host` installs (the agent is built into hearth-vm).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{SystemTime, UNIX_EPOCH};

struct Hearth {
    home: tempfile::TempDir,
}

impl Hearth {
    fn new() -> Self {
        // Short path: VM directories hold Unix sockets (108-byte path limit).
        let home = tempfile::Builder::new()
            .prefix("he2e")
            .tempdir_in("/tmp")
            .expect("temp home");
        Self { home }
    }

    fn path(&self) -> &Path {
        self.home.path()
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_hearth"))
            .args(args)
            .env("HEARTH_HOME", self.home.path())
            .output()
            .expect("run hearth")
    }

    /// Runs and requires success; returns stdout.
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

    fn sh(&self, vm: &str, script: &str) -> String {
        self.ok(&["vm", "exec", vm, "--", "sh", "-c", script])
    }

    fn pid_of(&self, vm: &str) -> Option<u32> {
        let list: serde_json::Value =
            serde_json::from_str(&self.ok(&["vm", "ls", "--json"])).expect("ls json");
        list.as_array()?
            .iter()
            .find(|row| row["name"] == vm)?
            .get("pid")?
            .as_u64()
            .map(|p| p as u32)
    }
}

impl Drop for Hearth {
    fn drop(&mut self) {
        // Leave no QEMU behind even when an assertion failed.
        if let Ok(entries) = std::fs::read_dir(self.home.path().join("vms")) {
            let names: Vec<String> = entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .filter(|n| !n.starts_with('.'))
                .collect();
            if !names.is_empty() {
                let mut args = vec!["vm", "rm"];
                args.extend(names.iter().map(String::as_str));
                let _ = self.run(&args);
            }
        }
    }
}

fn counter(h: &Hearth, vm: &str) -> u64 {
    h.sh(vm, "cat /tmp/counter")
        .trim()
        .parse()
        .expect("counter value")
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn engine_end_to_end() {
    let h = Hearth::new();

    // Boot and look around.
    h.ok(&["vm", "boot", "--image", "debian-12", "--name", "src"]);
    let kernel_version = std::fs::read_to_string(hearth_cache().join("kernel/current/version"))
        .expect("kernel version in cache");
    assert_eq!(
        h.ok(&["vm", "exec", "src", "--", "uname", "-r"]).trim(),
        kernel_version.trim()
    );
    let os_release = h.ok(&["vm", "exec", "src", "--", "cat", "/etc/os-release"]);
    assert!(os_release.contains("bookworm"), "{os_release}");

    // Exec of a missing binary is an error, and the agent lives on.
    let missing = h.run(&["vm", "exec", "src", "--", "/no/such/binary"]);
    assert!(!missing.status.success());
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("not found"),
        "{}",
        String::from_utf8_lossy(&missing.stderr)
    );
    assert_eq!(h.sh("src", "echo alive").trim(), "alive");
    // Exit codes come through.
    let status = h.run(&["vm", "exec", "src", "--", "sh", "-c", "exit 7"]);
    assert_eq!(status.status.code(), Some(7));

    // State to carry into the snapshot: a file and a running counter.
    h.sh("src", "echo before-snapshot > /root/note");
    h.sh(
        "src",
        "(i=0; while true; do i=$((i+1)); echo $i > /tmp/counter; sleep 0.2; done) >/dev/null 2>&1 &",
    );
    std::thread::sleep(std::time::Duration::from_millis(800));
    let snap = h.path().join("snap");
    h.ok(&[
        "vm",
        "snapshot",
        "src",
        "--out",
        snap.to_str().expect("path"),
    ]);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(snap.join("manifest.json")).expect("manifest"))
            .expect("manifest json");
    assert_eq!(manifest["format_version"], 1);

    // Three clones: each sees the file and a counter that keeps going.
    for name in ["c1", "c2", "c3"] {
        h.ok(&[
            "vm",
            "launch",
            "--snapshot",
            snap.to_str().expect("path"),
            "--name",
            name,
        ]);
    }
    for name in ["c1", "c2", "c3"] {
        assert_eq!(h.sh(name, "cat /root/note").trim(), "before-snapshot");
        let first = counter(&h, name);
        std::thread::sleep(std::time::Duration::from_millis(1500));
        let second = counter(&h, name);
        assert!(
            second > first,
            "{name}: counter stuck at {first} -> {second}"
        );
    }
    // A write in one clone is absent from the others (and from the source).
    h.sh("c1", "echo only-c1 > /root/mine; sync");
    for name in ["c2", "c3", "src"] {
        let out = h.run(&["vm", "exec", name, "--", "cat", "/root/mine"]);
        assert!(!out.status.success(), "{name} sees c1's file");
    }

    // Suspend and resume a clone: processes, files and /tmp survive; the clock
    // is moved forward by `restored`.
    h.sh("c2", "echo in-tmp > /tmp/kept");
    let before = counter(&h, "c2");
    let c2_pid = h.pid_of("c2").expect("c2 pid");
    h.ok(&["vm", "suspend", "c2"]);
    assert!(process_gone(c2_pid), "QEMU still runs after suspend");
    std::thread::sleep(std::time::Duration::from_secs(4));
    let host_before_resume = unix_now();
    h.ok(&["vm", "resume", "c2"]);
    let guest_now: u64 = h.sh("c2", "date +%s").trim().parse().expect("date");
    assert!(
        guest_now >= host_before_resume,
        "guest clock {guest_now} behind host {host_before_resume}: not moved forward"
    );
    assert_eq!(h.sh("c2", "cat /tmp/kept").trim(), "in-tmp");
    assert_eq!(h.sh("c2", "cat /root/note").trim(), "before-snapshot");
    std::thread::sleep(std::time::Duration::from_millis(1000));
    let after = counter(&h, "c2");
    assert!(
        after > before,
        "counter did not continue: {before} -> {after}"
    );

    // A resumed clone can itself be snapshotted and launched.
    let snap2 = h.path().join("snap2");
    h.ok(&[
        "vm",
        "snapshot",
        "c2",
        "--out",
        snap2.to_str().expect("path"),
    ]);
    h.ok(&[
        "vm",
        "launch",
        "--snapshot",
        snap2.to_str().expect("path"),
        "--name",
        "c4",
    ]);
    assert_eq!(h.sh("c4", "cat /tmp/kept").trim(), "in-tmp");

    // 100 MiB through the file API, both ways, same checksum.
    let big = h.path().join("big.bin");
    let status = Command::new("head")
        .args(["-c", "104857600", "/dev/urandom"])
        .stdout(std::fs::File::create(&big).expect("create big"))
        .status()
        .expect("head");
    assert!(status.success());
    let want = sha256(&big);
    h.ok(&["vm", "cp", big.to_str().expect("path"), "c1:/root/big.bin"]);
    let in_guest = h.sh("c1", "sha256sum /root/big.bin | cut -d' ' -f1");
    assert_eq!(in_guest.trim(), want);
    let back = h.path().join("back.bin");
    h.ok(&["vm", "cp", "c1:/root/big.bin", back.to_str().expect("path")]);
    assert_eq!(sha256(&back), want);

    // A truncated snapshot file is refused with a clear error.
    let broken = h.path().join("broken");
    copy_dir(&snap, &broken);
    let mem = broken.join("mem");
    let len = std::fs::metadata(&mem).expect("mem").len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&mem)
        .expect("open mem")
        .set_len(len / 2)
        .expect("truncate");
    let refused = h.run(&[
        "vm",
        "launch",
        "--snapshot",
        broken.to_str().expect("path"),
        "--name",
        "bad",
    ]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("truncated"), "{stderr}");
    assert!(!h.path().join("vms/bad").exists());

    // A clean power-off: the guest syncs and QEMU ends by itself.
    let c3_pid = h.pid_of("c3").expect("c3 pid");
    h.ok(&["vm", "stop", "c3"]);
    assert!(process_gone(c3_pid), "QEMU still runs after stop");
    let console = std::fs::read_to_string(h.path().join("vms/c3/console.log")).expect("console");
    assert!(console.contains("reboot: Power down"), "{console}");
    assert!(h.ok(&["vm", "ls"]).contains("stopped"));
    let refused = h.run(&["vm", "exec", "c3", "--", "true"]);
    assert!(!refused.status.success());

    // rm leaves no process, socket or file behind.
    let pids: Vec<u32> = ["src", "c1", "c2", "c4"]
        .iter()
        .map(|n| h.pid_of(n).expect("pid"))
        .collect();
    let ram_files: Vec<PathBuf> = ["src", "c2"]
        .iter()
        .map(|n| {
            let record: serde_json::Value = serde_json::from_slice(
                &std::fs::read(h.path().join("vms").join(n).join("vm.json")).expect("record"),
            )
            .expect("record json");
            assert_eq!(record["memory"]["kind"], "shared_file", "{n}");
            PathBuf::from(record["memory"]["path"].as_str().expect("ram path"))
        })
        .collect();
    assert!(ram_files.iter().all(|p| p.exists()));
    h.ok(&["vm", "rm", "src", "c1", "c2", "c3", "c4"]);
    for ram in &ram_files {
        assert!(!ram.exists(), "RAM file {} left behind", ram.display());
    }
    for pid in pids {
        assert!(process_gone(pid), "QEMU {pid} survived rm");
    }
    let left: Vec<PathBuf> = std::fs::read_dir(h.path().join("vms"))
        .expect("vms dir")
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// True once `pid` has exited (gone, or a zombie waiting for init to reap it),
/// allowing a moment for the exit to finish.
fn process_gone(pid: u32) -> bool {
    for _ in 0..100 {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => return true,
            Ok(stat) => {
                let state = stat.rsplit_once(") ").map(|(_, rest)| rest.chars().next());
                if matches!(state, Some(Some('Z' | 'X'))) {
                    return true;
                }
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    false
}

fn hearth_cache() -> PathBuf {
    if let Some(dir) = std::env::var_os("HEARTH_CACHE") {
        return dir.into();
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache"));
    base.join("hearth")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read_dir").flatten() {
        let dst = to.join(entry.file_name());
        std::fs::copy(entry.path(), &dst).expect("copy");
        let mut perms = std::fs::metadata(&dst).expect("meta").permissions();
        #[allow(clippy::permissions_set_readonly_false)]
        perms.set_readonly(false);
        std::fs::set_permissions(&dst, perms).expect("chmod");
    }
}

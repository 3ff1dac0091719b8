//! `hearth shell` end to end: the real binary against a real `hearth serve`
//! with a real guest (an image imported from the cached debian-12 root
//! filesystem). Standard input from a pipe (streamed as is), then from a
//! pseudo-terminal (raw mode, window size, SIGWINCH, settings restored).
//! Needs what `scripts/setup-host` installs.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Variables that would let the user's own setup leak into the test.
const CLEARED: &[&str] = &[
    "AWS_REGION",
    "HEARTH_REGION",
    "HEARTH_CONFIG",
    "HEARTH_DATA_DIR",
    "HEARTH_HOME",
];

struct Sandbox {
    dir: tempfile::TempDir,
    ram: tempfile::TempDir,
    /// (endpoint URL, access key id, secret) once the server runs.
    api: Option<(String, String, String)>,
    account: String,
    server: Option<Child>,
}

impl Sandbox {
    fn new() -> Self {
        // Short paths: VM directories hold Unix sockets (108-byte limit).
        let dir = tempfile::Builder::new()
            .prefix("hsh")
            .tempdir_in("/tmp")
            .expect("temp dir");
        let shm = Path::new("/dev/shm");
        let ram = tempfile::Builder::new()
            .prefix("hsh-ram")
            .tempdir_in(if shm.is_dir() { shm } else { dir.path() })
            .expect("ram dir");
        Self {
            dir,
            ram,
            api: None,
            account: String::new(),
            server: None,
        }
    }

    fn path(&self, sub: &str) -> PathBuf {
        self.dir.path().join(sub)
    }

    fn data(&self) -> String {
        self.path("data").to_str().expect("utf-8").to_string()
    }

    fn hearth(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_hearth"));
        cmd.args(args)
            .env("HEARTH_HOME", self.path("home"))
            .env("HEARTH_RAM_DIR", self.ram.path())
            .env("XDG_CONFIG_HOME", self.path("config"))
            .stdin(Stdio::null());
        for var in CLEARED {
            cmd.env_remove(var);
        }
        if let Some((url, key, secret)) = &self.api {
            cmd.env("HEARTH_ENDPOINT_URL", url)
                .env("AWS_ACCESS_KEY_ID", key)
                .env("AWS_SECRET_ACCESS_KEY", secret);
        } else {
            cmd.env_remove("AWS_ACCESS_KEY_ID")
                .env_remove("AWS_SECRET_ACCESS_KEY")
                .env_remove("HEARTH_ENDPOINT_URL");
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

    /// Starts `hearth serve` (API and endpoints on free ports) and an account.
    fn serve(&mut self) {
        let data = self.data();
        let mut child = self
            .hearth(&[
                "serve",
                "--data-dir",
                &data,
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
        self.server = Some(child);
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut url = None;
        while url.is_none() {
            let line = rx
                .recv_timeout(Duration::from_secs(60))
                .expect("hearth serve did not start listening");
            if let Some(u) = line.strip_prefix("hearth: listening on ") {
                url = Some(u.to_string());
            }
        }
        let out = self.ok(&[
            "account",
            "create",
            "--name",
            "t",
            "--json",
            "--data-dir",
            &data,
        ]);
        let key: serde_json::Value = serde_json::from_str(&out).expect("account json");
        self.api = Some((
            url.expect("url"),
            key["accessKeyId"].as_str().expect("key id").to_string(),
            key["secretAccessKey"].as_str().expect("secret").to_string(),
        ));
        self.account = key["accountId"].as_str().expect("account").to_string();
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if let Some(mut server) = self.server.take() {
            let _ = server.kill();
            let _ = server.wait();
        }
        // The server leaves microVMs running when it stops: end every QEMU of this sandbox.
        kill_qemu_under(&self.dir.path().to_string_lossy());
    }
}

/// SIGKILLs live QEMU processes whose command line mentions `marker`.
fn kill_qemu_under(marker: &str) {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let text = String::from_utf8_lossy(&raw);
        if text.contains("qemu-system") && text.contains(marker) {
            // SAFETY: kill has no memory effects; the pid was just read.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// Runs `cmd` with `input` on its stdin (a pipe); kills it after `timeout`.
fn run_piped(mut cmd: Command, input: &[u8], timeout: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(input).expect("write stdin");
    drop(stdin);
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(output) => output.expect("wait"),
        Err(_) => {
            // SAFETY: kill has no memory effects.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            panic!("{cmd:?} did not finish within {timeout:?}");
        }
    }
}

fn unpack_rootfs(dir: &Path) {
    let cache = std::env::var_os("HEARTH_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/hearth")
        });
    let base = cache.join("images/debian-12/current/rootfs.ext4");
    assert!(
        base.exists(),
        "{} is missing (run scripts/setup-host)",
        base.display()
    );
    std::fs::create_dir_all(dir).expect("mkdir rootfs");
    let status = Command::new("debugfs")
        .arg("-R")
        .arg(format!("rdump / {}", dir.display()))
        .arg(&base)
        .stderr(Stdio::null())
        .status()
        .expect("debugfs");
    assert!(status.success() && dir.join("bin/sh").exists());
}

/// A pseudo-terminal: (master, slave) with the slave sized `cols`x`rows`.
fn pty(cols: u16, rows: u16) -> (OwnedFd, std::fs::File) {
    // SAFETY: libc calls on a fd this function owns.
    let master = unsafe {
        let fd = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY);
        assert!(fd >= 0, "posix_openpt");
        assert_eq!(libc::grantpt(fd), 0);
        assert_eq!(libc::unlockpt(fd), 0);
        OwnedFd::from_raw_fd(fd)
    };
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: `name` is writable for the length given.
    let rc = unsafe { libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr(), name.len()) };
    assert_eq!(rc, 0);
    // SAFETY: ptsname_r wrote a NUL-terminated string.
    let path = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) };
    let slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(path.to_str().expect("pts path"))
        .expect("open pts");
    set_size(&slave, cols, rows);
    (master, slave)
}

fn set_size(tty: &std::fs::File, cols: u16, rows: u16) {
    let size = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: the fd is open and `size` is a valid winsize.
    let rc = unsafe { libc::ioctl(tty.as_raw_fd(), libc::TIOCSWINSZ, &size) };
    assert_eq!(rc, 0);
}

fn local_flags(tty: &std::fs::File) -> libc::tcflag_t {
    let mut attr = std::mem::MaybeUninit::<libc::termios>::uninit();
    // SAFETY: tcgetattr fills `attr` when it returns 0; only then is it read.
    unsafe {
        assert_eq!(libc::tcgetattr(tty.as_raw_fd(), attr.as_mut_ptr()), 0);
        attr.assume_init().c_lflag
    }
}

/// Collects what the master side of a pty receives, on a thread.
fn read_master(master: &OwnedFd) -> mpsc::Receiver<Vec<u8>> {
    let mut file = std::fs::File::from(master.try_clone().expect("dup master"));
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = file.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    rx
}

/// Reads from `rx` into `seen` until `want` shows up or `timeout` passes.
fn wait_for_text(rx: &mpsc::Receiver<Vec<u8>>, seen: &mut Vec<u8>, want: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !String::from_utf8_lossy(seen).contains(want) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(chunk) => seen.extend(chunk),
            Err(_) => panic!(
                "{want:?} did not show within {timeout:?}; terminal so far:\n{}",
                String::from_utf8_lossy(seen)
            ),
        }
    }
}

/// What a build VM's console showed when its boot hung (TCG's PIT calibration
/// of the TSC failing on a busy host; fixed with `tsc_early_khz=`): the message
/// at time zero (later in a boot it is normal). A regression fails fast.
const HANG_SIGN: &str = "[    0.000000] Unable to read current time from RTC";

/// Runs the import; a build VM whose boot hangs is killed at once, so the
/// import (and the test) fails fast instead of after the 180 s boot timeout.
fn import_image(sandbox: &Sandbox, args: &[&str], data: &str) {
    let mut last = String::new();
    for attempt in 1..=1 {
        let mut child = sandbox
            .hearth(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn import");
        let mut stderr = child.stderr.take().expect("stderr");
        let collected = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text);
            text
        });
        let deadline = Instant::now() + Duration::from_secs(300);
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait import") {
                break status;
            }
            assert!(Instant::now() < deadline, "import did not finish");
            let vms = Path::new(data).join("engine/vms");
            for entry in std::fs::read_dir(&vms).into_iter().flatten().flatten() {
                let name = entry.file_name().to_string_lossy().to_string();
                let console = std::fs::read_to_string(entry.path().join("console.log"));
                if name.starts_with("build-") && console.is_ok_and(|c| c.contains(HANG_SIGN)) {
                    kill_qemu_under(&format!("{}/", entry.path().display()));
                }
            }
            std::thread::sleep(Duration::from_millis(500));
        };
        last = collected.join().expect("stderr thread");
        if status.success() {
            return;
        }
        eprintln!("import attempt {attempt} failed:\n{last}");
    }
    panic!("import failed:\n{last}");
}

fn id_of(run_json: &str) -> String {
    let vm: serde_json::Value = serde_json::from_str(run_json).expect("run json");
    vm["microvmId"].as_str().expect("microvmId").to_string()
}

#[test]
fn shell_through_the_endpoint() {
    let t0 = Instant::now();
    let mut sandbox = Sandbox::new();
    let rootfs = sandbox.path("rootfs");
    unpack_rootfs(&rootfs);
    sandbox.serve();
    let data = sandbox.data();
    let account = sandbox.account.clone();
    let import = [
        "image",
        "import",
        "--data-dir",
        &data,
        "--account",
        &account,
        "--name",
        "sh",
        "--rootfs",
        rootfs.to_str().expect("utf-8"),
        "--memory",
        "256",
        "--cmd",
        "sleep",
        "infinity",
    ];
    import_image(&sandbox, &import, &data);
    eprintln!("t={:?} imported", t0.elapsed());

    // Without SHELL_INGRESS there is no shell token: an error line, exit 1.
    let plain = id_of(&sandbox.ok(&["run", "sh", "--json"]));
    let out = sandbox.run(&["shell", &plain]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("error: ") && stderr.contains("SHELL_INGRESS"),
        "{stderr}"
    );
    sandbox.ok(&["terminate", &plain]);

    let run = sandbox.ok(&["run", "sh", "--shell", "--wait", "--json"]);
    let id = id_of(&run);
    let vm: serde_json::Value = serde_json::from_str(&run).expect("json");
    let ingress = vm["ingressNetworkConnectors"].to_string();
    assert!(
        ingress.contains(":SHELL_INGRESS") && ingress.contains(":HTTP_INGRESS"),
        "{vm}"
    );
    eprintln!("t={:?} running {id}", t0.elapsed());

    // From a pipe: the bytes as they are; the shell's own `exit` ends it.
    let out = run_piped(
        sandbox.hearth(&["shell", &id]),
        b"echo shell-$((40+2))\nexit\n",
        Duration::from_secs(90),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{:?}\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("shell-42"), "{stdout}");
    eprintln!("t={:?} piped shell done", t0.elapsed());

    // End of piped input ends the shell too (sent as ^D).
    let out = run_piped(
        sandbox.hearth(&["shell", &id]),
        b"echo eof-$((1+1))\n",
        Duration::from_secs(90),
    );
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("eof-2"),
        "{out:?}"
    );

    // From a terminal: raw mode, the window size (also after SIGWINCH), the
    // terminal's settings back afterwards.
    let (master, slave) = pty(100, 30);
    let canonical = local_flags(&slave);
    assert_ne!(canonical & libc::ICANON, 0);
    let output = read_master(&master);
    let mut writer = std::fs::File::from(master.try_clone().expect("dup master"));
    let mut child = sandbox
        .hearth(&["shell", &id])
        .stdin(slave.try_clone().expect("dup slave"))
        .stdout(slave.try_clone().expect("dup slave"))
        .stderr(slave.try_clone().expect("dup slave"))
        .spawn()
        .expect("spawn shell");
    let mut seen = Vec::new();
    wait_for_text(&output, &mut seen, "#", Duration::from_secs(90));
    assert_eq!(
        local_flags(&slave) & (libc::ICANON | libc::ECHO),
        0,
        "raw mode"
    );
    writer.write_all(b"stty size\r").expect("type");
    wait_for_text(&output, &mut seen, "30 100", Duration::from_secs(30));
    set_size(&slave, 120, 40);
    // SAFETY: kill has no memory effects.
    unsafe { libc::kill(child.id() as i32, libc::SIGWINCH) };
    std::thread::sleep(Duration::from_millis(500));
    writer
        .write_all(b"stty size; echo tty-$((6*7))\r")
        .expect("type");
    wait_for_text(&output, &mut seen, "40 120", Duration::from_secs(30));
    wait_for_text(&output, &mut seen, "tty-42", Duration::from_secs(30));
    writer.write_all(b"exit\r").expect("type");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "hearth shell did not end");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        status.success(),
        "{status:?}; terminal:\n{}",
        String::from_utf8_lossy(&seen)
    );
    assert_eq!(local_flags(&slave), canonical, "terminal settings restored");
    eprintln!("t={:?} tty shell done", t0.elapsed());

    sandbox.ok(&["terminate", &id, "--wait"]);
}

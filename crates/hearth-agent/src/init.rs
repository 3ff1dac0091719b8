//! PID 1 boot: pseudo filesystems, kernel modules, switch to the real root, then
//! the bits of system set-up a guest needs (devpts, tmpfs, loopback, hostname).
//! Every step logs its failure and carries on: PID 1 must never exit.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::{log, sys};

/// Module list written by the host into the initramfs.
const MODULE_LIST: &str = "/etc/hearth/modules";
const MODULE_DIR: &str = "/lib/modules";
const NEW_ROOT: &str = "/newroot";
const ROOT_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("mount {target}: {source}")]
    Mount { target: String, source: io::Error },
    #[error("root device {0} did not appear")]
    NoRootDevice(String),
    #[error("{step}: {source}")]
    Step {
        step: &'static str,
        source: io::Error,
    },
}

/// Settings read from the kernel command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootConfig {
    pub root: String,
    pub root_fstype: String,
    pub hostname: Option<String>,
    /// `hearth.net=user`: eth0 is on QEMU's user-mode network.
    pub user_network: bool,
}

impl BootConfig {
    pub fn from_cmdline(cmdline: &str) -> Self {
        let mut config = Self {
            root: "/dev/vda".to_owned(),
            root_fstype: "ext4".to_owned(),
            hostname: None,
            user_network: false,
        };
        for word in cmdline.split_whitespace() {
            let Some((key, value)) = word.split_once('=') else {
                continue;
            };
            match key {
                "hearth.root" if !value.is_empty() => config.root = value.to_owned(),
                "hearth.rootfstype" if !value.is_empty() => config.root_fstype = value.to_owned(),
                "hearth.hostname" if !value.is_empty() => config.hostname = Some(value.to_owned()),
                "hearth.net" => config.user_network = value == "user",
                _ => {}
            }
        }
        config
    }
}

/// The whole boot sequence. Returns once the system is ready for the agent.
pub fn boot() {
    mount_pseudo_filesystems();
    attach_console();
    log!("booting (version {})", env!("CARGO_PKG_VERSION"));
    let cmdline = fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let config = BootConfig::from_cmdline(&cmdline);

    if Path::new(MODULE_LIST).exists() {
        load_modules();
        match switch_root(&config) {
            Ok(()) => log!("switched to root {}", config.root),
            // Staying in the initramfs keeps the agent reachable for diagnosis.
            Err(err) => log!("staying in the initramfs: {err}"),
        }
    }
    set_up_system(&config);
}

fn mount_pseudo_filesystems() {
    let mounts: [(&str, &str, &str, libc::c_ulong); 3] = [
        ("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID),
        (
            "proc",
            "/proc",
            "proc",
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        ),
        (
            "sysfs",
            "/sys",
            "sysfs",
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        ),
    ];
    for (source, target, fstype, flags) in mounts {
        if let Err(err) = mount_fresh(source, target, fstype, flags, None) {
            log!("{err}");
        }
    }
}

/// Mounts a filesystem on `target` (created if missing); "already mounted" is fine.
fn mount_fresh(
    source: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), InitError> {
    let mount_error = |source| InitError::Mount {
        target: target.to_owned(),
        source,
    };
    if let Err(err) = fs::create_dir_all(target) {
        return Err(mount_error(err));
    }
    match sys::mount(source, Path::new(target), Some(fstype), flags, data) {
        Ok(()) => Ok(()),
        Err(err) if err.raw_os_error() == Some(libc::EBUSY) => Ok(()),
        Err(err) => Err(mount_error(err)),
    }
}

/// Sends logs to `/dev/console` and makes sure descriptors 0-2 are open, so that
/// later descriptors (pipes, the port) never land on them by accident.
fn attach_console() {
    let console = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open("/dev/console");
    match console {
        Ok(console) => {
            for fd in 0..=2 {
                if !sys::fd_is_open(fd) {
                    let _ = sys::dup_onto(&console, fd);
                }
            }
            crate::log::use_console(console);
        }
        Err(err) => log!("cannot open /dev/console: {err}"),
    }
}

fn load_modules() {
    let list = match fs::read_to_string(MODULE_LIST) {
        Ok(list) => list,
        Err(err) => {
            log!("cannot read {MODULE_LIST}: {err}");
            return;
        }
    };
    for name in list.lines().map(str::trim) {
        if name.is_empty() || name.starts_with('#') {
            continue;
        }
        let path = Path::new(MODULE_DIR).join(name);
        let result = File::open(&path).and_then(sys::finit_module);
        match result {
            Ok(()) => {}
            Err(err) if err.raw_os_error() == Some(libc::EEXIST) => {}
            Err(err) => log!("loading module {}: {err}", path.display()),
        }
    }
}

fn wait_for_device(device: &str) -> Result<(), InitError> {
    let started = Instant::now();
    while !Path::new(device).exists() {
        if started.elapsed() > ROOT_WAIT {
            return Err(InitError::NoRootDevice(device.to_owned()));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Mounts the real root and makes it `/`, carrying /dev, /proc and /sys along.
fn switch_root(config: &BootConfig) -> Result<(), InitError> {
    wait_for_device(&config.root)?;
    mount_fresh(&config.root, NEW_ROOT, &config.root_fstype, 0, None)?;
    for dir in ["/dev", "/proc", "/sys"] {
        let target = PathBuf::from(format!("{NEW_ROOT}{dir}"));
        let moved = fs::create_dir_all(&target)
            .and_then(|()| sys::mount(dir, &target, None, libc::MS_MOVE, None));
        if let Err(err) = moved {
            log!("moving {dir} into the new root: {err}");
        }
    }
    let step = |step: &'static str| move |source| InitError::Step { step, source };
    std::env::set_current_dir(NEW_ROOT).map_err(step("chdir to the new root"))?;
    sys::mount(".", Path::new("/"), None, libc::MS_MOVE, None)
        .map_err(step("move the new root onto /"))?;
    std::os::unix::fs::chroot(".").map_err(step("chroot"))?;
    std::env::set_current_dir("/").map_err(step("chdir /"))?;
    Ok(())
}

fn set_up_system(config: &BootConfig) {
    let nosuid_nodev = libc::MS_NOSUID | libc::MS_NODEV;
    let mounts: [(&str, &str, &str, libc::c_ulong, &str); 3] = [
        (
            "devpts",
            "/dev/pts",
            "devpts",
            libc::MS_NOSUID | libc::MS_NOEXEC,
            "gid=5,mode=620,ptmxmode=666",
        ),
        ("tmpfs", "/dev/shm", "tmpfs", nosuid_nodev, "mode=1777"),
        ("tmpfs", "/run", "tmpfs", nosuid_nodev, "mode=755"),
    ];
    for (source, target, fstype, flags, data) in mounts {
        if let Err(err) = mount_fresh(source, target, fstype, flags, Some(data)) {
            log!("{err}");
        }
    }
    // The TCP stream feature connects to 127.0.0.1, which needs `lo` up.
    if let Err(err) = sys::interface_up("lo") {
        log!("bringing up lo: {err}");
    }
    if let Some(name) = &config.hostname {
        if let Err(err) = sys::set_hostname(name) {
            log!("setting hostname {name}: {err}");
        }
    }
    if config.user_network {
        if let Err(err) = set_up_user_network() {
            log!("network: {err}");
        }
    }
}

/// QEMU's user-mode network: the guest is 10.0.2.15/24, the gateway (NAT to
/// the host's network) 10.0.2.2, the DNS forwarder 10.0.2.3. The resolver
/// file is a bind mount from /run, so it never lands in the root disk.
fn set_up_user_network() -> Result<(), String> {
    use std::net::Ipv4Addr;
    sys::interface_up("eth0").map_err(|e| format!("eth0 up: {e}"))?;
    sys::set_ipv4(
        "eth0",
        Ipv4Addr::new(10, 0, 2, 15),
        Ipv4Addr::new(255, 255, 255, 0),
    )
    .map_err(|e| format!("eth0 address: {e}"))?;
    sys::add_default_route(Ipv4Addr::new(10, 0, 2, 2))
        .map_err(|e| format!("default route: {e}"))?;
    let resolv = Path::new("/run/hearth-resolv.conf");
    fs::write(resolv, "nameserver 10.0.2.3\n").map_err(|e| format!("{}: {e}", resolv.display()))?;
    let target = Path::new("/etc/resolv.conf");
    let is_symlink = target
        .symlink_metadata()
        .is_ok_and(|m| m.file_type().is_symlink());
    if is_symlink {
        return Err("/etc/resolv.conf is a symlink; DNS left as the image has it".into());
    }
    if !target.exists() {
        let _ = fs::create_dir_all("/etc");
        fs::write(target, "").map_err(|e| format!("{}: {e}", target.display()))?;
    }
    sys::mount(
        &resolv.display().to_string(),
        target,
        None,
        libc::MS_BIND,
        None,
    )
    .map_err(|e| format!("bind {}: {e}", target.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_defaults() {
        let config = BootConfig::from_cmdline("console=ttyS0 quiet");
        assert_eq!(config.root, "/dev/vda");
        assert_eq!(config.root_fstype, "ext4");
        assert_eq!(config.hostname, None);
    }

    #[test]
    fn cmdline_overrides() {
        let config = BootConfig::from_cmdline(
            "console=ttyS0 hearth.root=/dev/vdb hearth.rootfstype=xfs hearth.hostname=box1\n",
        );
        assert_eq!(config.root, "/dev/vdb");
        assert_eq!(config.root_fstype, "xfs");
        assert_eq!(config.hostname.as_deref(), Some("box1"));
    }
}

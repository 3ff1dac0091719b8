//! Where hearth finds what a guest is made of: the kernel and its modules, base
//! root filesystems, the agent binary, and where it keeps per-VM state.
//!
//! `scripts/setup-host` fills the cache; this module only reads it.

use std::path::{Path, PathBuf};

use crate::initramfs::{self, InitramfsError, InitramfsSpec};
use crate::pins::{HostPins, UntestedHost};

#[derive(Debug, thiserror::Error)]
pub enum AssetError {
    #[error("guest kernel not found at {0}; run scripts/setup-host")]
    MissingKernel(PathBuf),
    #[error("base image {name:?} not found at {path}; run scripts/setup-host")]
    MissingImage { name: String, path: PathBuf },
    #[error("image name {0:?} is invalid")]
    BadImageName(String),
    #[error("hearth-agent binary not found (looked in {0}); build it with scripts/build-agent or set HEARTH_AGENT")]
    MissingAgent(String),
    #[error("cannot write the guest agent to {0}")]
    WriteAgent(PathBuf, #[source] std::io::Error),
    #[error(transparent)]
    UntestedHost(#[from] UntestedHost),
    #[error("cannot build the initramfs")]
    Initramfs(#[from] InitramfsError),
}

/// The guest kernel and initramfs for a boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestKernel {
    pub vmlinuz: PathBuf,
    pub initrd: PathBuf,
    pub version: String,
    /// Its initramfs loads `virtio_balloon`: guests can hand memory they
    /// free back to the host (free page reporting).
    pub free_page_reporting: bool,
}

/// The guest module behind free page reporting (see `scripts/setup-host`).
const BALLOON_MODULE: &str = "virtio_balloon.ko";

/// Locations of hearth's cache (downloads, base images) and state (VMs).
#[derive(Debug, Clone)]
pub struct Assets {
    pub cache_dir: PathBuf,
    pub state_dir: PathBuf,
    /// Where running VMs keep their RAM files. A tmpfs (the default,
    /// `/dev/shm/hearth-UID`) holds them like anonymous memory: no page is ever
    /// written back to a disk, and deleting the file frees the memory. On a disk
    /// filesystem every guest write would dirty a page for writeback.
    pub ram_dir: PathBuf,
}

impl Assets {
    /// From the environment: `HEARTH_CACHE` (default `$XDG_CACHE_HOME/hearth` or
    /// `~/.cache/hearth`) and `HEARTH_HOME` (default `$XDG_DATA_HOME/hearth` or
    /// `~/.local/share/hearth`), `HEARTH_RAM_DIR` (default `/dev/shm/hearth-UID`).
    pub fn from_env() -> Self {
        let home = std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| "/tmp".into());
        let env_dir = |var: &str| {
            std::env::var_os(var)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        let cache_dir = env_dir("HEARTH_CACHE").unwrap_or_else(|| {
            env_dir("XDG_CACHE_HOME")
                .unwrap_or_else(|| home.join(".cache"))
                .join("hearth")
        });
        let state_dir = env_dir("HEARTH_HOME").unwrap_or_else(|| {
            env_dir("XDG_DATA_HOME")
                .unwrap_or_else(|| home.join(".local/share"))
                .join("hearth")
        });
        let ram_dir = env_dir("HEARTH_RAM_DIR").unwrap_or_else(|| {
            let shm = Path::new("/dev/shm");
            if shm.is_dir() {
                // Per user: the directory is private to its owner (mode 0700).
                shm.join(format!("hearth-{}", rustix::process::getuid().as_raw()))
            } else {
                state_dir.join("ram")
            }
        });
        Self {
            cache_dir,
            state_dir,
            ram_dir,
        }
    }

    pub fn vms_dir(&self) -> PathBuf {
        self.state_dir.join("vms")
    }

    /// The immutable ext4 root disk of base image `name` (e.g. `debian-12`).
    pub fn base_image(&self, name: &str) -> Result<PathBuf, AssetError> {
        let valid = !name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
            && !name.starts_with('.');
        if !valid {
            return Err(AssetError::BadImageName(name.to_string()));
        }
        let link = self.cache_dir.join("images").join(name).join("current");
        let path = link.join("rootfs.ext4");
        if !path.is_file() {
            return Err(AssetError::MissingImage {
                name: name.to_string(),
                path,
            });
        }
        // Resolve the `current` link so VMs keep pointing at the exact content
        // they booted from even after a newer build replaces it.
        Ok(std::fs::canonicalize(&path).unwrap_or(path))
    }

    /// The guest kernel, with an initramfs for the agent found by [`Self::agent_binary`].
    pub fn guest_kernel(&self) -> Result<GuestKernel, AssetError> {
        let dir = self.cache_dir.join("kernel").join("current");
        let vmlinuz = dir.join("vmlinuz");
        if !vmlinuz.is_file() {
            return Err(AssetError::MissingKernel(vmlinuz));
        }
        let dir = std::fs::canonicalize(&dir).unwrap_or(dir);
        let version = std::fs::read_to_string(dir.join("version"))
            .map(|v| v.trim().to_string())
            .unwrap_or_default();
        HostPins::tested().check_kernel(&version)?;
        let initrd = initramfs::ensure(
            &InitramfsSpec {
                agent: self.agent_binary()?,
                modules_dir: dir.join("modules"),
            },
            &self.cache_dir.join("initramfs"),
        )?;
        let free_page_reporting = std::fs::read_to_string(dir.join("modules").join("order"))
            .is_ok_and(|order| order.lines().any(|m| m.trim() == BALLOON_MODULE));
        Ok(GuestKernel {
            vmlinuz: dir.join("vmlinuz"),
            initrd,
            version,
            free_page_reporting,
        })
    }

    /// The static agent binary: `$HEARTH_AGENT`, else the copy built into this
    /// executable (see `build.rs`), written once into the cache under its hash;
    /// else (a build without it) beside the running executable or where
    /// `scripts/build-agent` puts it in the target dir.
    pub fn agent_binary(&self) -> Result<PathBuf, AssetError> {
        if let Some(path) = std::env::var_os("HEARTH_AGENT").filter(|v| !v.is_empty()) {
            let path = PathBuf::from(path);
            return if path.is_file() {
                Ok(path)
            } else {
                Err(AssetError::MissingAgent(path.display().to_string()))
            };
        }
        #[cfg(hearth_embedded_agent)]
        {
            self.embedded_agent()
        }
        #[cfg(not(hearth_embedded_agent))]
        {
            self.agent_beside_executable()
        }
    }

    /// Writes the embedded agent to `cache/agent/hearth-agent-<hash>` (once;
    /// atomically, so concurrent first runs agree) and returns that path.
    #[cfg(hearth_embedded_agent)]
    fn embedded_agent(&self) -> Result<PathBuf, AssetError> {
        static AGENT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/hearth-agent"));
        let hash = blake3::hash(AGENT).to_hex();
        let dir = self.cache_dir.join("agent");
        let path = dir.join(format!("hearth-agent-{}", &hash[..16]));
        if path.is_file() {
            return Ok(path);
        }
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::create_dir_all(&dir)?;
            let tmp = dir.join(format!(".hearth-agent.{}", std::process::id()));
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o755)
                .open(&tmp)?;
            file.write_all(AGENT)?;
            file.sync_all()?;
            std::fs::rename(&tmp, &path)
        };
        write().map_err(|err| AssetError::WriteAgent(path.clone(), err))?;
        Ok(path)
    }

    /// Without an embedded agent: beside the executable, or in a target dir.
    #[cfg(not(hearth_embedded_agent))]
    fn agent_beside_executable(&self) -> Result<PathBuf, AssetError> {
        // The static build (scripts/build-agent) lives in the target-triple
        // directory of a cargo target dir: the CLI runs from target/{debug,release}/
        // and test binaries from target/debug/deps/. Installed, it sits beside the CLI.
        let mut candidates = Vec::new();
        if let Ok(exe) = std::env::current_exe() {
            let mut dir: Option<&Path> = exe.parent();
            for _ in 0..3 {
                let Some(d) = dir else { break };
                candidates.push(d.join("x86_64-unknown-linux-gnu/release/hearth-agent"));
                dir = d.parent();
            }
            if let Some(d) = exe.parent() {
                candidates.push(d.join("hearth-agent"));
            }
        }
        candidates
            .iter()
            .find(|p| p.is_file())
            .cloned()
            .ok_or_else(|| {
                AssetError::MissingAgent(
                    candidates
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", "),
                )
            })
    }
}

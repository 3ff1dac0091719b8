//! FROM images pulled from an OCI registry ([`hearth_oci`]) become ext4 base
//! disks: the flattened layers go into `mkfs.ext4 -d`, owners the unpacking
//! could not apply (not running as root) are set with `debugfs`, and the disk
//! is kept per manifest digest so a second build reuses it.

use std::path::{Path, PathBuf};

use hearth_oci::{Limits, RegistryConfig};
use hearth_vm::disk::BackingFormat;

pub use crate::base::BaseError;

use crate::base::{Base, Disk};
use crate::config::ImageConfig;
use crate::dockerfile::CommandForm;
use crate::log::BuildLog;

/// Room left on a pulled image's disk for the build's own writes.
const HEADROOM_MIB: u64 = 1024;

/// Pulls `image` from the configured registry and returns it as a base.
pub async fn registry_base(
    registry: &RegistryConfig,
    image: &str,
    cache_dir: &Path,
    log: &dyn BuildLog,
) -> Result<Base, BaseError> {
    let reference =
        hearth_oci::parse_reference(image).map_err(|e| BaseError::Reference(image.into(), e))?;
    let oci_dir = cache_dir.join("oci");
    let disks = oci_dir.join("disks");
    hearth_vm::disk::create_private_dir_all(&disks).map_err(BaseError::CacheDir)?;
    let work = tempfile_dir(&oci_dir)?;
    let root = work.join("root");
    std::fs::create_dir(&root).map_err(BaseError::UnpackDir)?;
    let progress = |text: &str| log.line(&format!(" ---> {text}"));
    let pulled = hearth_oci::pull(
        registry,
        &reference,
        &oci_dir,
        &root,
        &Limits::default(),
        &progress,
    )
    .await;
    let result = async {
        let pulled = pulled.map_err(|e| BaseError::Pull(image.into(), e))?;
        let hex = pulled
            .manifest_digest
            .strip_prefix("sha256:")
            .unwrap_or(&pulled.manifest_digest)
            .to_string();
        let disk = disks.join(format!("{hex}.ext4"));
        if !disk.exists() {
            log.line(&format!(
                " ---> making a disk of {}",
                pulled.manifest_digest
            ));
            make_disk(&root, &work, &disk, &pulled.owners).await?;
        }
        Ok(Base {
            disk: Disk {
                path: disk,
                format: BackingFormat::Raw,
            },
            identity: format!("oci:{}@{}", reference, pulled.manifest_digest),
            config: image_config(&pulled.config),
        })
    }
    .await;
    let _ = std::fs::remove_dir_all(&work);
    result
}

fn tempfile_dir(parent: &Path) -> Result<PathBuf, BaseError> {
    let mut random = [0u8; 8];
    let _ = rustix::rand::getrandom(&mut random, rustix::rand::GetRandomFlags::empty());
    let dir = parent.join(format!(".pull-{}", hex::encode(random)));
    hearth_vm::disk::create_private_dir_all(&dir).map_err(BaseError::PullDir)?;
    Ok(dir)
}

/// `mkfs.ext4 -d root` into `disk` (via a temporary file), then the owners.
async fn make_disk(
    root: &Path,
    work: &Path,
    disk: &Path,
    owners: &[hearth_oci::Ownership],
) -> Result<(), BaseError> {
    let size_mib = crate::context::tree_bytes(root) / (1 << 20) * 2 + HEADROOM_MIB;
    let tmp = work.join("disk.ext4");
    let output = tokio::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "hearth-root", "-d"])
        .arg(root)
        .arg(&tmp)
        .arg(format!("{size_mib}M"))
        .output()
        .await
        .map_err(BaseError::RunMkfs)?;
    if !output.status.success() {
        return Err(BaseError::Mkfs(
            String::from_utf8_lossy(&output.stderr).trim().to_string(),
        ));
    }
    // Unpacking as a user cannot chown; debugfs writes the owners into the disk.
    let mut script = String::new();
    for owner in owners.iter().filter(|o| !o.applied) {
        let path = owner.path.to_string_lossy();
        if path.contains(['"', '\n', '\\']) {
            continue;
        }
        script.push_str(&format!(
            "sif \"/{path}\" uid {}\nsif \"/{path}\" gid {}\n",
            owner.uid, owner.gid
        ));
    }
    if !script.is_empty() {
        let commands = work.join("owners.debugfs");
        std::fs::write(&commands, script).map_err(BaseError::DebugfsCommands)?;
        let status = tokio::process::Command::new("debugfs")
            .arg("-w")
            .arg("-f")
            .arg(&commands)
            .arg(&tmp)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .await
            .map_err(BaseError::RunDebugfs)?;
        if !status.success() {
            return Err(BaseError::Debugfs);
        }
    }
    let _ = std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o400));
    std::fs::rename(&tmp, disk).map_err(BaseError::PlaceDisk)
}

/// The image's config as the Dockerfile's starting point.
pub fn image_config(config: &hearth_oci::ImageConfig) -> ImageConfig {
    let mut out = ImageConfig::default();
    for pair in &config.env {
        if let Some((k, v)) = pair.split_once('=') {
            out.set_env(k, v);
        }
    }
    out.cmd = config.cmd.clone().map(CommandForm::Exec);
    out.entrypoint = config.entrypoint.clone().map(CommandForm::Exec);
    out.workdir = config.working_dir.clone().filter(|w| !w.is_empty());
    out.user = config.user.clone().filter(|u| !u.is_empty());
    out.exposed = config.exposed_ports.clone();
    out.labels = config.labels.clone();
    out.stop_signal = config.stop_signal.clone();
    out
}

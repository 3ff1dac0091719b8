//! Where the server keeps things: every path under the data directory and
//! every VM name the server makes comes from here.
//!
//! ```text
//! DATA/hearth.db            the database (store)          DATA/master.key   sealing key
//! DATA/token-keys           endpoint token keys           DATA/tls/         endpoint certificate
//! DATA/s3/                  the built-in artifact store   DATA/build-cache/ the builder's step cache
//! DATA/builds/<build id>/   a build's work files and log
//! DATA/images/<account>/<image>/<version>/{rootfs.ext4,snapshot/}
//! DATA/engine/vms/<vm name>/  the VM layer's state (hearth-vm)
//! DATA/logs/<microvm id>/   a microVM's app output (segments, metadata)
//! ```

use std::path::{Path, PathBuf};

use hearth_vm::Assets;

/// Import VMs (`hearth image import`, another process) are named
/// `build-<build id hex>`; reconciliation leaves them to their own process.
const IMPORT_VM_PREFIX: &str = "build-";
/// A microVM's VM is `mv-<uuid hex>`.
const MICROVM_VM_PREFIX: &str = "mv-";
/// Longest VM name the server makes (`mv-` + 32 hex digits fits).
const MAX_VM_NAME: usize = 40;
/// A UNIX socket path holds at most this many bytes.
const MAX_SOCKET_PATH: usize = 107;

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("the data directory path {0} is too long: VM sockets beneath it would exceed the 107-byte limit of UNIX socket paths")]
    DataDirTooLong(PathBuf),
}

pub fn database(data_dir: &Path) -> PathBuf {
    data_dir.join("hearth.db")
}

/// The key that seals access-key secrets.
pub fn master_key(data_dir: &Path) -> PathBuf {
    data_dir.join("master.key")
}

pub fn token_keys(data_dir: &Path) -> PathBuf {
    data_dir.join("token-keys")
}

/// The endpoint's TLS certificate and key.
pub fn tls_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("tls")
}

/// The built-in S3-compatible store's objects.
pub fn s3_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("s3")
}

/// The builder's step cache; image versions chain to its layers.
pub fn build_cache(data_dir: &Path) -> PathBuf {
    data_dir.join("build-cache")
}

/// A build's work directory: its fetched artifact, build context and log.
pub fn build_dir(data_dir: &Path, build_id: &str) -> PathBuf {
    data_dir.join("builds").join(build_id)
}

pub fn build_log(data_dir: &Path, build_id: &str) -> PathBuf {
    build_dir(data_dir, build_id).join("build.log")
}

/// Every microVM's stored app output.
pub fn app_logs_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("logs")
}

/// A build's fetched code artifact (removed when the build ends).
pub fn build_artifact(data_dir: &Path, build_id: &str) -> PathBuf {
    build_dir(data_dir, build_id).join("artifact.zip")
}

/// A build's extracted build context (removed when the build ends).
pub fn build_context(data_dir: &Path, build_id: &str) -> PathBuf {
    build_dir(data_dir, build_id).join("context")
}

/// Where a version's files live (builds and imports alike).
pub fn version_dir(data_dir: &Path, account: &str, image: &str, version: u32) -> PathBuf {
    data_dir
        .join("images")
        .join(account)
        .join(image)
        .join(version.to_string())
}

/// A version's snapshot (memory and disk), inside its [`version_dir`].
pub fn snapshot_dir(version_dir: &Path) -> PathBuf {
    version_dir.join("snapshot")
}

/// An imported version's immutable root disk, inside its [`version_dir`].
pub fn imported_rootfs(version_dir: &Path) -> PathBuf {
    version_dir.join("rootfs.ext4")
}

/// Where an import unpacks a tar archive before making its disk.
pub fn import_unpack_dir(version_dir: &Path) -> PathBuf {
    version_dir.join("rootfs.tmp")
}

/// The snapshot disk of every version on disk, whatever its record says
/// (the roots of the step cache's sweep).
pub fn snapshot_disks(data_dir: &Path) -> Vec<PathBuf> {
    let children = |dir: &Path| -> Vec<PathBuf> {
        std::fs::read_dir(dir)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    };
    let mut disks = Vec::new();
    for account in children(&data_dir.join("images")) {
        for image in children(&account) {
            for version in children(&image) {
                disks.push(snapshot_dir(&version).join(hearth_vm::snapshot::DISK_FILE));
            }
        }
    }
    disks
}

/// The operator's managed base images (`images/<name>/<build>/`, made by
/// scripts/setup-host) in the VM layer's shared cache.
pub fn managed_images_dir(assets: &Assets) -> PathBuf {
    assets.cache_dir.join("images")
}

/// The VM layer's paths for a server: the shared kernel and base-image cache,
/// and VM state under the data directory (so every VM there is the server's).
pub fn engine_assets(data_dir: &Path) -> Assets {
    let mut assets = Assets::from_env();
    assets.state_dir = data_dir.join("engine");
    assets
}

/// QEMU's sockets live at `<vms dir>/<vm name>/agent.sock`: refuses a data
/// directory so deep that they would not fit a UNIX socket path.
pub fn check_socket_room(assets: &Assets) -> Result<(), LayoutError> {
    let longest = assets.vms_dir().as_os_str().len() + 1 + MAX_VM_NAME + "/agent.sock".len();
    if longest > MAX_SOCKET_PATH {
        return Err(LayoutError::DataDirTooLong(assets.state_dir.clone()));
    }
    Ok(())
}

/// The engine's name for a microVM's VM (directory and socket paths must
/// stay short, so not the API id).
pub fn microvm_vm_name(uuid: &str) -> String {
    format!("{MICROVM_VM_PREFIX}{}", uuid.replace('-', ""))
}

/// The VM of an import's build.
pub fn import_vm_name(build_id: &str) -> String {
    format!("{IMPORT_VM_PREFIX}{}", build_id.replace('-', ""))
}

/// Whether a VM belongs to an import (run by another process).
pub fn is_import_vm(vm_name: &str) -> bool {
    vm_name.starts_with(IMPORT_VM_PREFIX)
}

/// The prefix of a Dockerfile build's VMs (`b<20 hex digits>`; the builder
/// appends a suffix per VM).
pub fn build_vm_prefix(build_id: &str) -> String {
    let hex = build_id.replace('-', "");
    format!("b{}", &hex[..hex.len().min(20)])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_names_are_valid_short_and_told_apart() {
        let uuid = "0f8e7d6c-5b4a-4938-8271-605f4e3d2c1b";
        let microvm = microvm_vm_name(uuid);
        let import = import_vm_name(uuid);
        let build = build_vm_prefix(uuid);
        for name in [&microvm, &import, &build] {
            assert!(hearth_vm::validate_name(name), "{name}");
            assert!(name.len() <= MAX_VM_NAME, "{name}");
        }
        assert!(is_import_vm(&import));
        assert!(!is_import_vm(&microvm) && !is_import_vm(&build));
        assert_eq!(build, "b0f8e7d6c5b4a49388271");
    }

    #[test]
    fn versions_live_under_images() {
        let dir = version_dir(Path::new("/d"), "123", "web", 2);
        assert_eq!(dir, Path::new("/d/images/123/web/2"));
        assert_eq!(
            snapshot_dir(&dir),
            Path::new("/d/images/123/web/2/snapshot")
        );
    }

    #[test]
    fn snapshot_disks_walk_every_version() {
        let data = tempfile::tempdir().expect("tempdir");
        for (account, image, version) in [("1", "a", 1), ("1", "a", 2), ("2", "b", 1)] {
            std::fs::create_dir_all(snapshot_dir(&version_dir(
                data.path(),
                account,
                image,
                version,
            )))
            .expect("mkdir");
        }
        let mut disks = snapshot_disks(data.path());
        disks.sort();
        assert_eq!(disks.len(), 3);
        assert!(disks[0].ends_with("images/1/a/1/snapshot/disk.qcow2"));
        assert!(snapshot_disks(&data.path().join("missing")).is_empty());
    }

    #[test]
    fn deep_data_directories_are_refused() {
        let mut assets = Assets::from_env();
        assets.state_dir = PathBuf::from("/d/engine");
        assert!(check_socket_room(&assets).is_ok());
        assets.state_dir = PathBuf::from(format!("/{}", "x".repeat(80)));
        assert!(check_socket_room(&assets).is_err());
    }
}

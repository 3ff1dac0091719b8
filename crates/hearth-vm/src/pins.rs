//! The host parts hearth was tested with, from `scripts/host-pins.env` (the
//! one place their versions are written; `scripts/setup-host` installs them),
//! and the check that refuses any other QEMU or guest kernel unless
//! `HEARTH_ALLOW_UNTESTED_HOST=1`.
//!
//! Why refuse: a guest's boot and every snapshot depend on the exact VMM and
//! kernel (a newer kernel package once resolved silently on a fresh machine,
//! and the 2 GiB boot hang of docs/qemu-microvm-edd.md shows how a VMM detail
//! breaks a size). Running on what was tested, or saying loudly that it is not,
//! keeps "works here" meaning "works there".

/// The pins file, compiled in.
const PINS_FILE: &str = include_str!("../../../scripts/host-pins.env");

/// Set to `1` to run on a QEMU or guest kernel other than the pinned ones.
pub const ALLOW_UNTESTED_ENV: &str = "HEARTH_ALLOW_UNTESTED_HOST";

/// What the tests ran on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPins {
    /// Debian's version of `qemu-system-x86`, as `qemu-system-x86_64 --version`
    /// prints it in parentheses after `Debian`.
    pub qemu_package_version: String,
    /// The guest kernel's release (`uname -r` in a guest), e.g. `6.1.0-57-cloud-amd64`.
    pub kernel_release: String,
}

/// A host part that is not the tested one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("untested {part}: this host has {found:?}, hearth was tested with {tested:?}; run scripts/setup-host to install the tested one, or set HEARTH_ALLOW_UNTESTED_HOST=1 to run anyway")]
pub struct UntestedHost {
    pub part: &'static str,
    pub found: String,
    pub tested: String,
}

impl HostPins {
    /// The compiled-in pins. The file is part of the source tree and checked by
    /// a unit test, so a missing key is a build mistake, reported as empty.
    pub fn tested() -> Self {
        Self::parse(PINS_FILE)
    }

    /// Reads `KEY=VALUE` lines; `#` starts a comment line.
    fn parse(text: &str) -> Self {
        let value = |key: &str| {
            text.lines()
                .map(str::trim)
                .filter(|line| !line.starts_with('#'))
                .filter_map(|line| line.split_once('='))
                .find(|(k, _)| k.trim() == key)
                .map(|(_, v)| v.trim().to_string())
                .unwrap_or_default()
        };
        Self {
            qemu_package_version: value("QEMU_PACKAGE_VERSION"),
            kernel_release: value("KERNEL_RELEASE"),
        }
    }

    /// Checks the first line of `qemu-system-x86_64 --version`.
    pub fn check_qemu(&self, version_line: &str) -> Result<(), UntestedHost> {
        let tested = format!("(Debian {})", self.qemu_package_version);
        if version_line.contains(&tested) || untested_allowed() {
            return Ok(());
        }
        Err(UntestedHost {
            part: "QEMU",
            found: version_line.trim().to_string(),
            tested: format!("qemu-system-x86 {}", self.qemu_package_version),
        })
    }

    /// Checks the guest kernel's release (the cache's `kernel/current/version`).
    pub fn check_kernel(&self, release: &str) -> Result<(), UntestedHost> {
        if release.trim() == self.kernel_release || untested_allowed() {
            return Ok(());
        }
        Err(UntestedHost {
            part: "guest kernel",
            found: release.trim().to_string(),
            tested: self.kernel_release.clone(),
        })
    }
}

pub(crate) fn untested_allowed() -> bool {
    std::env::var(ALLOW_UNTESTED_ENV).as_deref() == Ok("1")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pins_file_names_every_part() {
        let pins = HostPins::tested();
        assert!(pins.qemu_package_version.starts_with("1:10."), "{pins:?}");
        assert!(pins.kernel_release.ends_with("-cloud-amd64"), "{pins:?}");
        // setup-host reads the same file for the package names and versions.
        for key in [
            "KERNEL_PACKAGE=",
            "KERNEL_PACKAGE_VERSION=",
            "QEMU_PACKAGE_VERSION=",
        ] {
            assert!(PINS_FILE.lines().any(|l| l.starts_with(key)), "{key}");
        }
    }

    #[test]
    fn only_the_pinned_versions_pass() {
        // The variable is never set by the test suite (CI runs on pinned parts).
        if untested_allowed() {
            return;
        }
        let pins = HostPins::parse(
            "# comment\nQEMU_PACKAGE_VERSION=1:10.0.2+ds-2\nKERNEL_RELEASE=6.1.0-57-cloud-amd64\n",
        );
        assert!(pins
            .check_qemu("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2)")
            .is_ok());
        let err = pins
            .check_qemu("QEMU emulator version 10.1.0 (Debian 1:10.1.0+ds-1)")
            .expect_err("another QEMU is refused");
        assert_eq!(err.part, "QEMU");
        assert!(err.to_string().contains("HEARTH_ALLOW_UNTESTED_HOST=1"));
        assert!(pins.check_qemu("QEMU emulator version 10.0.2").is_err());
        assert!(pins.check_kernel("6.1.0-57-cloud-amd64\n").is_ok());
        assert!(pins.check_kernel("6.1.0-58-cloud-amd64").is_err());
    }
}

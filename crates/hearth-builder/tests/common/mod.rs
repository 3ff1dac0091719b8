//! What the builder's VM tests share: a log that keeps lines, a driver over a
//! fresh state directory, and booting a built disk to look inside.

#![allow(dead_code)]

use std::sync::Mutex;

use hearth_builder::run::{BuildLog, Disk};
use hearth_vm::{
    AgentClient, Assets, BootRequest, ColdBoot, Driver, MachineShape, QemuDriver, VmRecord,
};

/// Keeps every line, for assertions and failure messages.
#[derive(Default)]
pub struct Lines(Mutex<Vec<String>>);

impl BuildLog for Lines {
    fn line(&self, text: &str) {
        self.0.lock().expect("lock").push(text.to_string());
    }
}

impl Lines {
    pub fn text(&self) -> String {
        self.0.lock().expect("lock").join("\n")
    }
}

/// A short state directory (QEMU's socket paths must stay short) and a
/// driver whose VMs live in it.
pub fn driver(prefix: &str) -> (tempfile::TempDir, Assets, QemuDriver) {
    let state = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/tmp")
        .expect("state dir");
    let assets = Assets {
        state_dir: state.path().join("engine"),
        ..Assets::from_env()
    };
    let driver = QemuDriver::new(assets.clone()).expect("driver");
    (state, assets, driver)
}

/// Boots `disk` (a build's result) and connects to its agent.
pub async fn boot_built(driver: &QemuDriver, disk: &Disk) -> (VmRecord, AgentClient) {
    let vm = driver
        .boot_with(
            &BootRequest {
                name: "check".into(),
                image: "built".into(),
                shape: MachineShape::default(),
            },
            &ColdBoot {
                base: disk.path.clone(),
                base_format: disk.format,
                overlay: None,
                egress: false,
                disk_size: None,
                free_page_reporting: false,
            },
        )
        .await
        .expect("boot the built disk");
    let agent = driver.agent(&vm).await.expect("agent");
    (vm, agent)
}

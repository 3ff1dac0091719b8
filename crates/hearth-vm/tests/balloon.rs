//! Memory a guest frees goes back to the host: a VM booted with
//! `free_page_reporting` (build VMs) gets a virtio-balloon device with free
//! page reporting (the guest kernel's initramfs loads `virtio_balloon`, as
//! `scripts/setup-host` installs it), so after the guest allocates 1 GiB and
//! frees it, its RAM file (what the VM holds on the host) shrinks back.
//! Clones cannot (QEMU 10.0 refuses discards in their read-only private
//! mapping of the snapshot's memory), so VMs that get snapshotted boot without.
//! Needs `scripts/setup-host`.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::sh;
use hearth_vm::disk::BackingFormat;
use hearth_vm::{Assets, BootRequest, ColdBoot, Driver, MachineShape, QemuDriver};

const GIB: u64 = 1 << 30;

/// Bytes the RAM file holds on the host (a sparse file: holes are free).
fn held(path: &Path) -> u64 {
    std::fs::metadata(path)
        .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
        .expect("RAM file")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freed_guest_memory_goes_back_to_the_host() {
    let state = tempfile::Builder::new()
        .prefix("hbl")
        .tempdir_in("/tmp")
        .expect("state dir");
    let assets = Assets {
        state_dir: state.path().to_path_buf(),
        ..Assets::from_env()
    };
    assert!(
        assets.guest_kernel().expect("kernel").free_page_reporting,
        "the guest kernel's modules lack virtio_balloon: run scripts/setup-host"
    );
    let driver = QemuDriver::new(assets).expect("driver");
    // The 512 MiB size's peak: 2 GiB.
    let base = Assets::from_env()
        .base_image("debian-12")
        .expect("debian-12 base image");
    let vm = driver
        .boot_with(
            &BootRequest {
                name: "balloon".into(),
                image: "debian-12".into(),
                shape: MachineShape::burst_of(512),
            },
            &ColdBoot {
                base,
                base_format: BackingFormat::Raw,
                overlay: None,
                egress: false,
                disk_size: None,
                free_page_reporting: true,
            },
        )
        .await
        .expect("boot");
    assert!(vm.balloon);
    let ram = vm.memory.path().expect("RAM file").to_path_buf();
    let agent = driver.agent(&vm).await.expect("agent");
    assert_eq!(
        sh(
            &agent,
            "cat /sys/bus/virtio/drivers/virtio_balloon/*/features | cut -c6"
        )
        .await,
        "1",
        "free page reporting (feature bit 5) negotiated"
    );
    let before = held(&ram);
    // Touch 1 GiB (a bytes object of non-zero bytes), then exit: freed.
    sh(
        &agent,
        "python3 -c \"b = b'x' * (1 << 30); open('/tmp/touched', 'w').write(str(len(b)))\"",
    )
    .await;
    let peak = held(&ram);
    eprintln!(
        "RAM file: {} MiB before, {} MiB after touching 1 GiB",
        before >> 20,
        peak >> 20
    );
    assert!(
        peak >= before + GIB * 9 / 10,
        "the guest's 1 GiB reached the host"
    );
    // Reporting runs about 2 s after pages are freed, in 2 MiB blocks.
    let started = Instant::now();
    let mut now = peak;
    while started.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        now = held(&ram);
        if now <= before + GIB / 4 {
            break;
        }
    }
    eprintln!(
        "RAM file: {} MiB {:.1} s after the guest freed it",
        now >> 20,
        started.elapsed().as_secs_f64()
    );
    assert!(
        now <= before + GIB / 4,
        "freed memory stayed with the VM: {} MiB held, {} MiB before",
        now >> 20,
        before >> 20
    );
    drop(agent);

    driver.remove(&vm).await.expect("remove");
}

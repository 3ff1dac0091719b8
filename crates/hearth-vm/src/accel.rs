//! Choosing QEMU's accelerator.
//!
//! `/dev/kvm` existing is not enough: on hosts that are themselves VMs under a
//! paravirtual hypervisor (e.g. `kvm_pvm`), KVM emulates ordinary guests
//! instruction by instruction and is far slower than TCG (see HOST-FACTS.md). So
//! `auto` runs a tiny real-mode loop under KVM and uses KVM only when the loop runs
//! at native speed.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Iterations of the probe loop; native speed runs them in about a millisecond.
const PROBE_ITERATIONS: u32 = 200_000;
/// Slower than this and KVM is not running guest code natively.
const PROBE_LIMIT: Duration = Duration::from_millis(20);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    /// QEMU's `-accel` argument.
    pub fn qemu_arg(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg,thread=multi,tb-size=256",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AccelError {
    #[error("HEARTH_ACCEL must be kvm, tcg or auto, not {0:?}")]
    BadSetting(String),
    #[error("HEARTH_ACCEL=kvm but KVM is unusable: {0}")]
    KvmUnusable(String),
}

/// Like [`select`], but remembers an `auto` probe's answer in `cache_file` for
/// the current boot of the host, so each command does not pay the probe again.
pub fn select_cached(cache_file: &std::path::Path) -> Result<(Accel, String), AccelError> {
    let auto = matches!(
        std::env::var("HEARTH_ACCEL").as_deref(),
        Err(_) | Ok("auto") | Ok("")
    );
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    if auto {
        if let Ok(text) = std::fs::read_to_string(cache_file) {
            if let Ok((id, accel, reason)) = serde_json::from_str::<(String, Accel, String)>(&text)
            {
                if id == boot_id {
                    return Ok((accel, reason));
                }
            }
        }
    }
    let (accel, reason) = select()?;
    if auto {
        if let Ok(text) = serde_json::to_string(&(boot_id, accel, &reason)) {
            // A cache that cannot be written only costs a probe next time.
            let _ = std::fs::write(cache_file, text);
        }
    }
    Ok((accel, reason))
}

/// The accelerator to use: `HEARTH_ACCEL=kvm|tcg|auto` (default `auto`).
/// Returns the choice and why it was made, for the log.
pub fn select() -> Result<(Accel, String), AccelError> {
    let setting = std::env::var("HEARTH_ACCEL").unwrap_or_else(|_| "auto".into());
    match setting.as_str() {
        "tcg" => Ok((Accel::Tcg, "HEARTH_ACCEL=tcg".into())),
        "kvm" => match probe_kvm() {
            Ok(_) => Ok((Accel::Kvm, "HEARTH_ACCEL=kvm".into())),
            Err(reason) => Err(AccelError::KvmUnusable(reason)),
        },
        "auto" | "" => Ok(match probe_kvm() {
            Ok(took) if took <= PROBE_LIMIT => (
                Accel::Kvm,
                format!("KVM ran the probe loop in {took:?}"),
            ),
            Ok(took) => (
                Accel::Tcg,
                format!("KVM ran the probe loop in {took:?} (limit {PROBE_LIMIT:?}): not native speed, using TCG"),
            ),
            Err(reason) => (Accel::Tcg, format!("KVM unusable ({reason}), using TCG")),
        }),
        other => Err(AccelError::BadSetting(other.to_string())),
    }
}

/// Runs a counting loop in a one-page real-mode guest under KVM and returns how
/// long it took. Gives up (reports an error) on any KVM failure.
fn probe_kvm() -> Result<Duration, String> {
    use kvm_ioctls::{Kvm, VcpuExit};

    const GUEST_ADDR: u64 = 0x1000;
    const MEM_SIZE: usize = 0x1000;
    // mov ecx, PROBE_ITERATIONS; again: dec ecx; jnz again; hlt
    let n = PROBE_ITERATIONS.to_le_bytes();
    let code = [
        0x66, 0xb9, n[0], n[1], n[2], n[3], 0x66, 0x49, 0x75, 0xfc, 0xf4,
    ];

    if !std::path::Path::new("/dev/kvm").exists() {
        return Err("no /dev/kvm".into());
    }
    let kvm = Kvm::new().map_err(|e| format!("open /dev/kvm: {e}"))?;
    let vm = kvm.create_vm().map_err(|e| format!("create VM: {e}"))?;
    let mut memory = GuestPage::new(MEM_SIZE).ok_or("cannot map probe memory")?;
    memory.as_mut_slice()[..code.len()].copy_from_slice(&code);
    let region = kvm_bindings::kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: GUEST_ADDR,
        memory_size: MEM_SIZE as u64,
        userspace_addr: memory.addr(),
        flags: 0,
    };
    // SAFETY: the region points at `memory`, a private anonymous mapping of
    // MEM_SIZE bytes that outlives `vm` (declared before it is dropped below).
    unsafe { vm.set_user_memory_region(region) }.map_err(|e| format!("map memory: {e}"))?;
    let mut vcpu = vm.create_vcpu(0).map_err(|e| format!("create vCPU: {e}"))?;
    let mut sregs = vcpu.get_sregs().map_err(|e| format!("get sregs: {e}"))?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs)
        .map_err(|e| format!("set sregs: {e}"))?;
    let regs = kvm_bindings::kvm_regs {
        rip: GUEST_ADDR,
        rflags: 2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(|e| format!("set regs: {e}"))?;
    let start = Instant::now();
    match vcpu.run().map_err(|e| format!("run: {e}"))? {
        VcpuExit::Hlt => {}
        VcpuExit::InternalError => return Err("KVM internal error".into()),
        VcpuExit::FailEntry(reason, _) => return Err(format!("entry failed ({reason})")),
        other => return Err(format!("unexpected exit {other:?}")),
    }
    let took = start.elapsed();
    drop(vcpu);
    drop(vm);
    drop(memory);
    Ok(took)
}

/// An anonymous private mapping used as the probe guest's memory.
struct GuestPage {
    ptr: *mut libc::c_void,
    len: usize,
}

impl GuestPage {
    fn new(len: usize) -> Option<Self> {
        // SAFETY: a fresh anonymous mapping; no existing memory is affected.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        (ptr != libc::MAP_FAILED).then_some(Self { ptr, len })
    }

    fn addr(&self) -> u64 {
        self.ptr as u64
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` is a live, writable mapping of `len` bytes owned by self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.cast::<u8>(), self.len) }
    }
}

impl Drop for GuestPage {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping created in `new`, exactly once.
        unsafe {
            libc::munmap(self.ptr, self.len);
        }
    }
}

/// The host's TSC frequency in kHz, measured once per process against the
/// monotonic clock (about 50 ms).
///
/// Under TCG the guest's TSC runs at the host's rate, while the guest's
/// PIT-based TSC calibration depends on how fast QEMU emulates: on a busy host
/// it fails ("Unable to calibrate against PIT"), the kernel finds no other
/// clock source on the `microvm` machine, and the boot hangs. Passing this
/// value as `tsc_early_khz=` skips that calibration.
pub fn host_tsc_khz() -> Option<u64> {
    static KHZ: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *KHZ.get_or_init(measure_tsc_khz)
}

#[cfg(target_arch = "x86_64")]
fn measure_tsc_khz() -> Option<u64> {
    let read = || {
        // SAFETY: RDTSC has no memory effects and exists on every x86-64 CPU.
        unsafe { core::arch::x86_64::_rdtsc() }
    };
    let start = std::time::Instant::now();
    let first = read();
    std::thread::sleep(std::time::Duration::from_millis(50));
    let ticks = read().wrapping_sub(first);
    let elapsed = start.elapsed().as_nanos() as u64;
    if elapsed == 0 {
        return None;
    }
    let khz = ticks.saturating_mul(1_000_000) / elapsed;
    // A plausible CPU clock (100 MHz to 10 GHz), else do not pass one.
    (100_000..=10_000_000).contains(&khz).then_some(khz)
}

#[cfg(not(target_arch = "x86_64"))]
fn measure_tsc_khz() -> Option<u64> {
    None
}

//! What a running VM has used so far, as the host sees it: the counters the
//! server's usage meter samples ([`crate::Driver::usage`]).

pub use crate::cgroup::VmUsage;

/// A process's usage from `/proc/PID/stat` (utime + stime) and
/// `/proc/PID/statm` (resident pages). `None` when the process is gone or its
/// files do not parse. Without cgroups this is what a VM costs the host; the
/// per-VM cgroup's counters replace it where the jail makes them.
pub fn process_usage(pid: u32) -> Option<VmUsage> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let ticks = cpu_ticks(&stat)?;
    let resident_pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(VmUsage {
        cpu_ns: ticks.saturating_mul(1_000_000_000) / clock_ticks_per_second(),
        memory_bytes: resident_pages.saturating_mul(page_size()),
    })
}

/// utime + stime (fields 14 and 15) of a `/proc/PID/stat` line. The command
/// name (field 2) is in parentheses and may hold spaces or parentheses, so
/// fields are counted from the last `)`.
fn cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // After the name: state is field 3, so utime (14) is the 12th from here.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime.saturating_add(stime))
}

fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf only reads a configuration value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(ticks).ok().filter(|&t| t > 0).unwrap_or(100)
}

fn page_size() -> u64 {
    // SAFETY: sysconf only reads a configuration value.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).ok().filter(|&s| s > 0).unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_after_odd_names() {
        let line =
            "42 (qemu (x) y) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 99 1000 200";
        assert_eq!(cpu_ticks(line), Some(300));
        assert_eq!(cpu_ticks("garbage"), None);
        assert_eq!(cpu_ticks("1 (x) S 1"), None);
    }

    #[test]
    fn own_process_has_usage() {
        let usage = process_usage(std::process::id()).expect("own /proc entry");
        assert!(usage.memory_bytes > 0);
        assert_eq!(process_usage(u32::MAX), None);
    }
}

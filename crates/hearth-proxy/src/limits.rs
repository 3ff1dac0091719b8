//! Per-microVM limits: concurrent connections (requests in flight plus open
//! WebSocket streams) and a requests-per-second token bucket.
//!
//! Only authorised requests reach the limiter, so its table holds real microVMs;
//! idle entries are pruned when the table grows.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

/// Per-microVM limits; 0 means unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmLimits {
    /// Requests in flight plus open WebSocket streams to one microVM.
    pub max_connections: usize,
    /// Sustained requests per second to one microVM (a token bucket holding one
    /// second's worth).
    pub requests_per_second: u32,
}

impl Default for VmLimits {
    fn default() -> Self {
        VmLimits {
            max_connections: 64,
            requests_per_second: 160,
        }
    }
}

/// Entries kept before idle ones are pruned.
const PRUNE_AT: usize = 4096;

/// Which limit a request ran into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Exceeded {
    Connections,
    Rate,
}

pub(crate) struct Limiter {
    limits: VmLimits,
    vms: Mutex<HashMap<String, Counters>>,
}

struct Counters {
    active: usize,
    tokens: f64,
    refilled: Instant,
}

impl Limiter {
    pub(crate) fn new(limits: VmLimits) -> Arc<Self> {
        Arc::new(Limiter {
            limits,
            vms: Mutex::new(HashMap::new()),
        })
    }

    /// Takes one request token and one connection slot for `microvm_id`.
    pub(crate) fn acquire(self: &Arc<Self>, microvm_id: &str) -> Result<Permit, Exceeded> {
        let now = Instant::now();
        let capacity = f64::from(self.limits.requests_per_second);
        let mut vms = self.lock();
        if vms.len() >= PRUNE_AT && !vms.contains_key(microvm_id) {
            vms.retain(|_, c| c.active > 0 || c.refill(now, capacity) < capacity);
        }
        let counters = vms.entry(microvm_id.to_owned()).or_insert(Counters {
            active: 0,
            tokens: capacity,
            refilled: now,
        });
        if self.limits.max_connections > 0 && counters.active >= self.limits.max_connections {
            return Err(Exceeded::Connections);
        }
        if self.limits.requests_per_second > 0 {
            if counters.refill(now, capacity) < 1.0 {
                return Err(Exceeded::Rate);
            }
            counters.tokens -= 1.0;
        }
        counters.active += 1;
        Ok(Permit {
            limiter: Arc::clone(self),
            microvm_id: microvm_id.to_owned(),
        })
    }

    fn release(&self, microvm_id: &str) {
        if let Some(counters) = self.lock().get_mut(microvm_id) {
            counters.active = counters.active.saturating_sub(1);
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Counters>> {
        // The map stays consistent even if a holder panicked: every update is one step.
        self.vms
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    #[cfg(test)]
    fn entries(&self) -> usize {
        self.lock().len()
    }
}

impl Counters {
    /// Adds the tokens earned since the last refill (capped at one second's
    /// worth) and returns the balance.
    fn refill(&mut self, now: Instant, capacity: f64) -> f64 {
        let earned = now.saturating_duration_since(self.refilled).as_secs_f64() * capacity;
        self.tokens = (self.tokens + earned).min(capacity);
        self.refilled = now;
        self.tokens
    }
}

impl fmt::Debug for Limiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Limiter")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// A connection slot; released on drop.
pub(crate) struct Permit {
    limiter: Arc<Limiter>,
    microvm_id: String,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.limiter.release(&self.microvm_id);
    }
}

impl fmt::Debug for Permit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit")
            .field("microvm_id", &self.microvm_id)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_limit_is_per_vm_and_released_on_drop() {
        let limiter = Limiter::new(VmLimits {
            max_connections: 2,
            requests_per_second: 0,
        });
        let a = limiter.acquire("a");
        let b = limiter.acquire("a");
        assert!(a.is_ok() && b.is_ok());
        assert_eq!(limiter.acquire("a").err(), Some(Exceeded::Connections));
        assert!(limiter.acquire("b").is_ok());
        drop(a);
        assert!(limiter.acquire("a").is_ok());
    }

    #[test]
    fn rate_limit_refills() {
        let limiter = Limiter::new(VmLimits {
            max_connections: 0,
            requests_per_second: 20,
        });
        let granted = (0..40).filter(|_| limiter.acquire("a").is_ok()).count();
        assert!((20..=21).contains(&granted), "{granted}");
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(limiter.acquire("a").is_ok());
    }

    #[test]
    fn idle_entries_are_pruned() {
        let limiter = Limiter::new(VmLimits {
            max_connections: 1,
            requests_per_second: 1000,
        });
        for i in 0..PRUNE_AT {
            drop(limiter.acquire(&format!("vm-{i}")));
        }
        let busy = limiter.acquire("vm-0");
        assert!(busy.is_ok());
        std::thread::sleep(std::time::Duration::from_millis(20));
        let held = limiter.acquire("held");
        assert!(held.is_ok());
        assert_eq!(limiter.entries(), 2);
        assert_eq!(limiter.acquire("vm-0").err(), Some(Exceeded::Connections));
        assert_eq!(limiter.acquire("held").err(), Some(Exceeded::Connections));
    }
}

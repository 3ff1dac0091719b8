//! The server's warm pools: per image version, VMs restored from its snapshot
//! ahead of time, agent greeted, one command run, paused
//! ([`hearth_vm::Prewarmed`]). A RunMicrovm that finds a slot pays only
//! `cont` + `restored` (clock and RNG reseed) + its `/run` hook.
//!
//! - Keyed by account, image, version and snapshot directory: a slot never
//!   serves another account or another version.
//! - Sized from demand: a version run within [`PoolSettings::demand_window`]
//!   keeps `per_version` slots, all pools together at most `max_total`.
//! - Slots are not microVMs: they count against the host (the
//!   memory they hold is [`WarmPools::memory_mib`]) but never against a
//!   tenant's quota, and they go first when the host runs short of memory.
//! - A version deleted (or no longer ACTIVE) drains its pool; a slot whose
//!   QEMU died is discarded when found, never launched.
//! - Slots are not kept across a restart: reconcile ends their processes,
//!   and the pools refill from the launches the store recorded recently.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hearth_vm::Prewarmed;
use tokio::sync::Notify;

/// The operator's bounds (`hearth serve --warm-pool-*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolSettings {
    /// Slots of all versions together (0: no pool, every launch is cold).
    pub max_total: usize,
    /// Slots one version keeps while it is in demand.
    pub per_version: usize,
    /// A version run within this long keeps its slots.
    pub demand_window: Duration,
    /// Below this much available host memory (MiB) pools shrink and stop filling.
    pub min_available_mib: u64,
}

impl PoolSettings {
    /// No pool: what a server embedded in a test or tool gets unless it asks
    /// (slots' QEMUs outlive a process that never calls
    /// [`super::engine::Engine::shutdown_pools`]); `hearth serve` turns it on.
    pub fn off() -> Self {
        Self {
            max_total: 0,
            ..Self::default()
        }
    }
}

impl Default for PoolSettings {
    fn default() -> Self {
        Self {
            max_total: 4,
            per_version: 1,
            demand_window: Duration::from_secs(300),
            min_available_mib: 512,
        }
    }
}

/// Which pool a slot belongs to: only a launch of exactly this account,
/// image version and snapshot takes it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub account_id: String,
    pub image_name: String,
    pub version: u32,
    pub snapshot_dir: PathBuf,
}

#[derive(Debug)]
struct VersionPool {
    slots: VecDeque<Prewarmed>,
    /// Slots being prepared now.
    filling: usize,
    last_demand: Instant,
    memory_mib: u64,
    /// Tells a slot prepared for a pool drained meanwhile from one for its successor.
    generation: u64,
}

/// A fill the refiller should do next.
#[derive(Debug, Clone)]
pub(crate) struct FillTicket {
    pub key: PoolKey,
    pub generation: u64,
}

/// All versions' pools. The refilling itself is [`super::engine::Engine::run_pools`].
#[derive(Debug)]
pub struct WarmPools {
    settings: Mutex<PoolSettings>,
    pools: Mutex<HashMap<PoolKey, VersionPool>>,
    next_generation: Mutex<u64>,
    pub(crate) wake: Notify,
    warm_launches: AtomicU64,
    cold_launches: AtomicU64,
    /// Launches in progress, and when the last one ended: slots are prepared
    /// only when launches leave the CPU alone (see [`Self::quiet`]).
    launching: AtomicUsize,
    last_launch: Mutex<Option<Instant>>,
    /// Fills from [`Self::next_fill`] until the refiller is done with them
    /// (slot stored or discarded). Unlike `filling`, a drained pool's fill
    /// still counts here: shutdown waits on it so no slot's QEMU outlives it.
    refills_in_hand: AtomicUsize,
}

/// Ends a launch's claim on the CPU when dropped.
#[derive(Debug)]
pub(crate) struct LaunchGuard<'a>(&'a WarmPools);

impl Drop for LaunchGuard<'_> {
    fn drop(&mut self) {
        *lock(&self.0.last_launch) = Some(Instant::now());
        self.0.launching.fetch_sub(1, Ordering::SeqCst);
        self.0.wake.notify_one();
    }
}

/// How long after a launch the refiller waits: preparing a slot (a QEMU start,
/// a restore, one command) competes with the launched VM's first requests.
pub(crate) const QUIET_AFTER_LAUNCH: Duration = Duration::from_millis(300);

impl WarmPools {
    pub fn new(settings: PoolSettings) -> Self {
        Self {
            settings: Mutex::new(settings),
            pools: Mutex::default(),
            next_generation: Mutex::new(0),
            wake: Notify::new(),
            warm_launches: AtomicU64::new(0),
            cold_launches: AtomicU64::new(0),
            launching: AtomicUsize::new(0),
            last_launch: Mutex::new(None),
            refills_in_hand: AtomicUsize::new(0),
        }
    }

    pub fn settings(&self) -> PoolSettings {
        *lock(&self.settings)
    }

    /// Changes the bounds; slots over the new ones go at the refiller's next pass.
    pub fn set_settings(&self, settings: PoolSettings) {
        *lock(&self.settings) = settings;
        self.wake.notify_one();
    }

    /// Records a launch of `key` (its pool fills while the demand lasts).
    pub fn note_demand(&self, key: &PoolKey, memory_mib: u64) {
        let generation = {
            let mut next = lock(&self.next_generation);
            *next += 1;
            *next
        };
        lock(&self.pools)
            .entry(key.clone())
            .and_modify(|pool| pool.last_demand = Instant::now())
            .or_insert_with(|| VersionPool {
                slots: VecDeque::new(),
                filling: 0,
                last_demand: Instant::now(),
                memory_mib,
                generation,
            });
        self.wake.notify_one();
    }

    /// Takes a ready slot of exactly `key`, noting the demand.
    pub fn take(&self, key: &PoolKey, memory_mib: u64) -> Option<Prewarmed> {
        self.note_demand(key, memory_mib);
        lock(&self.pools)
            .get_mut(key)
            .and_then(|pool| pool.slots.pop_front())
    }

    /// Slots ready now, all pools together.
    pub fn ready(&self) -> usize {
        lock(&self.pools).values().map(|p| p.slots.len()).sum()
    }

    /// Slots ready now in `key`'s pool.
    pub fn ready_for(&self, key: &PoolKey) -> usize {
        lock(&self.pools).get(key).map_or(0, |p| p.slots.len())
    }

    /// The records of `key`'s ready slots (their processes, directories).
    pub fn slot_vms(&self, key: &PoolKey) -> Vec<hearth_vm::VmRecord> {
        lock(&self.pools)
            .get(key)
            .map(|p| p.slots.iter().map(|slot| slot.vm.clone()).collect())
            .unwrap_or_default()
    }

    /// Guest memory the ready slots hold (MiB), for host capacity.
    pub fn memory_mib(&self) -> u64 {
        lock(&self.pools)
            .values()
            .map(|p| p.memory_mib * p.slots.len() as u64)
            .sum()
    }

    /// Forgets every pool of a snapshot (its version is going away) and
    /// returns their slots for the caller to discard.
    pub fn drain_snapshot(&self, dir: &Path) -> Vec<Prewarmed> {
        let mut pools = lock(&self.pools);
        let keys: Vec<PoolKey> = pools
            .keys()
            .filter(|k| k.snapshot_dir == dir)
            .cloned()
            .collect();
        keys.iter()
            .filter_map(|k| pools.remove(k))
            .flat_map(|p| p.slots)
            .collect()
    }

    /// Drops pools whose demand ended and trims to the bounds; returns the
    /// slots to discard.
    pub(crate) fn expire(&self, now: Instant) -> Vec<Prewarmed> {
        let settings = self.settings();
        let mut pools = lock(&self.pools);
        let mut gone = Vec::new();
        pools.retain(|_, pool| {
            let wanted = now.duration_since(pool.last_demand) < settings.demand_window;
            if !wanted {
                gone.extend(pool.slots.drain(..));
            }
            // Keep an entry whose slot is being prepared: the fill finds it
            // unwanted (by its demand) and discards its slot.
            wanted || pool.filling > 0
        });
        for pool in pools.values_mut() {
            while pool.slots.len() > settings.per_version {
                gone.extend(pool.slots.pop_back());
            }
        }
        let mut total: usize = pools.values().map(|p| p.slots.len()).sum();
        while total > settings.max_total {
            let Some(pool) = pools
                .values_mut()
                .filter(|p| !p.slots.is_empty())
                .min_by_key(|p| p.last_demand)
            else {
                break;
            };
            gone.extend(pool.slots.pop_back());
            total -= 1;
        }
        gone
    }

    /// Takes one slot from the pool whose demand is oldest (memory pressure).
    pub(crate) fn shrink_one(&self) -> Option<Prewarmed> {
        lock(&self.pools)
            .values_mut()
            .filter(|p| !p.slots.is_empty())
            .min_by_key(|p| p.last_demand)
            .and_then(|p| p.slots.pop_back())
    }

    /// The next slot to prepare, if the bounds allow one: for the pool most
    /// recently in demand that is short of `per_version`. Counts it as filling.
    pub(crate) fn next_fill(&self, now: Instant) -> Option<FillTicket> {
        let settings = self.settings();
        let mut pools = lock(&self.pools);
        let total: usize = pools.values().map(|p| p.slots.len() + p.filling).sum();
        if total >= settings.max_total {
            return None;
        }
        let (key, pool) = pools
            .iter_mut()
            .filter(|(_, p)| {
                p.slots.len() + p.filling < settings.per_version
                    && now.duration_since(p.last_demand) < settings.demand_window
            })
            .max_by_key(|(_, p)| p.last_demand)?;
        pool.filling += 1;
        self.refills_in_hand.fetch_add(1, Ordering::SeqCst);
        Some(FillTicket {
            key: key.clone(),
            generation: pool.generation,
        })
    }

    /// Ends a fill: the slot joins its pool if that pool still wants it;
    /// otherwise it is handed back for the caller to discard.
    pub(crate) fn finish_fill(
        &self,
        ticket: &FillTicket,
        slot: Option<Prewarmed>,
    ) -> Option<Prewarmed> {
        let settings = self.settings();
        let mut pools = lock(&self.pools);
        let Some(pool) = pools
            .get_mut(&ticket.key)
            .filter(|p| p.generation == ticket.generation)
        else {
            return slot;
        };
        pool.filling = pool.filling.saturating_sub(1);
        let slot = slot?;
        let expired = Instant::now().duration_since(pool.last_demand) >= settings.demand_window;
        let full = pool.slots.len() >= settings.per_version;
        if expired || full {
            return Some(slot);
        }
        pool.slots.push_back(slot);
        let total: usize = pools.values().map(|p| p.slots.len()).sum();
        if total > settings.max_total {
            return pools
                .get_mut(&ticket.key)
                .and_then(|pool| pool.slots.pop_back());
        }
        None
    }

    /// The refiller is done with a ticket: its slot is stored or discarded.
    pub(crate) fn refill_ended(&self) {
        let _ = self
            .refills_in_hand
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
    }

    /// Tickets handed out whose slot the refiller still holds.
    pub fn refills_in_hand(&self) -> usize {
        self.refills_in_hand.load(Ordering::SeqCst)
    }

    /// Slots being prepared now, all pools together.
    pub fn filling(&self) -> usize {
        lock(&self.pools).values().map(|p| p.filling).sum()
    }

    /// Marks a launch in progress until the guard drops.
    pub(crate) fn launching(&self) -> LaunchGuard<'_> {
        self.launching.fetch_add(1, Ordering::SeqCst);
        LaunchGuard(self)
    }

    /// How long until no launch competes with a refill (zero: now).
    pub(crate) fn quiet_in(&self, now: Instant) -> Duration {
        if self.launching.load(Ordering::SeqCst) > 0 {
            return QUIET_AFTER_LAUNCH;
        }
        lock(&self.last_launch).map_or(Duration::ZERO, |at| {
            (at + QUIET_AFTER_LAUNCH).saturating_duration_since(now)
        })
    }

    /// Counts a launch by where its VM came from.
    pub(crate) fn count_launch(&self, warm: bool) {
        let counter = if warm {
            &self.warm_launches
        } else {
            &self.cold_launches
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Launches served from a slot, and launches that started a QEMU, so far.
    pub fn launch_counts(&self) -> (u64, u64) {
        (
            self.warm_launches.load(Ordering::Relaxed),
            self.cold_launches.load(Ordering::Relaxed),
        )
    }

    /// Removes slots whose process died (`alive` says no).
    pub(crate) fn take_dead(&self, alive: impl Fn(&hearth_vm::VmRecord) -> bool) -> Vec<Prewarmed> {
        let mut pools = lock(&self.pools);
        let mut dead = Vec::new();
        for pool in pools.values_mut() {
            let (live, gone): (VecDeque<_>, VecDeque<_>) =
                pool.slots.drain(..).partition(|slot| alive(&slot.vm));
            pool.slots = live;
            dead.extend(gone);
        }
        dead
    }

    /// Every slot, for a shutdown.
    pub fn drain_all(&self) -> Vec<Prewarmed> {
        lock(&self.pools)
            .values_mut()
            .flat_map(|p| p.slots.drain(..).collect::<Vec<_>>())
            .collect()
    }
}

/// Available host memory (MiB) from `/proc/meminfo`; None when unreadable.
pub(crate) fn available_mib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(account: &str, version: u32) -> PoolKey {
        PoolKey {
            account_id: account.into(),
            image_name: "web".into(),
            version,
            snapshot_dir: PathBuf::from(format!("/data/images/{account}/web/{version}/snapshot")),
        }
    }

    fn settings(max_total: usize, per_version: usize) -> PoolSettings {
        PoolSettings {
            max_total,
            per_version,
            ..PoolSettings::default()
        }
    }

    #[test]
    fn fills_only_versions_in_demand_within_the_bounds() {
        let pools = WarmPools::new(settings(2, 1));
        assert!(
            pools.next_fill(Instant::now()).is_none(),
            "no demand, no fill"
        );
        pools.note_demand(&key("a", 1), 256);
        let first = pools.next_fill(Instant::now()).expect("a fill");
        assert_eq!(first.key, key("a", 1));
        // One slot per version, and it is being prepared.
        assert!(pools.next_fill(Instant::now()).is_none());
        pools.note_demand(&key("b", 1), 256);
        let second = pools.next_fill(Instant::now()).expect("b's fill");
        assert_eq!(second.key, key("b", 1));
        // Total bound reached.
        pools.note_demand(&key("a", 2), 256);
        assert!(pools.next_fill(Instant::now()).is_none());
        assert_eq!(pools.filling(), 2);
        // A failed fill frees its place.
        assert!(pools.finish_fill(&first, None).is_none());
        assert_eq!(pools.filling(), 1);
        let third = pools.next_fill(Instant::now()).expect("a fill");
        assert_eq!(third.key, key("a", 2), "the most recent demand first");
    }

    #[test]
    fn demand_ends_after_the_window_and_a_drained_pool_forgets_fills() {
        let pools = WarmPools::new(settings(4, 1));
        pools.note_demand(&key("a", 1), 256);
        let ticket = pools.next_fill(Instant::now()).expect("a fill");
        let later = Instant::now() + PoolSettings::default().demand_window;
        assert!(pools.next_fill(later).is_none(), "demand over");
        // Kept while its fill runs, then gone.
        assert!(pools.expire(later).is_empty());
        assert_eq!(pools.filling(), 1);
        assert!(pools.drain_snapshot(&key("a", 1).snapshot_dir).is_empty());
        assert_eq!(pools.filling(), 0);
        // Shutdown still waits for the refiller holding that ticket.
        assert_eq!(pools.refills_in_hand(), 1);
        // The fill of the drained pool ends without joining anything.
        assert!(pools.finish_fill(&ticket, None).is_none());
        pools.refill_ended();
        assert_eq!(pools.refills_in_hand(), 0);
        assert_eq!(pools.ready(), 0);
        // New demand makes a new pool, which an old ticket cannot fill.
        pools.note_demand(&key("a", 1), 256);
        let fresh = pools.next_fill(Instant::now()).expect("a fill");
        assert_ne!(fresh.generation, ticket.generation);
    }

    #[test]
    fn no_pool_when_the_operator_turns_it_off() {
        let pools = WarmPools::new(settings(0, 1));
        pools.note_demand(&key("a", 1), 256);
        assert!(pools.next_fill(Instant::now()).is_none());
        assert!(pools.take(&key("a", 1), 256).is_none());
        assert_eq!(pools.memory_mib(), 0);
    }
}

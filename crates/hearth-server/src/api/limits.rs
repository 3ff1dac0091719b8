//! Per-account, per-operation request rate limits (token buckets), with the
//! reference service's published rates as defaults (BEHAVIOUR.md, quotas):
//! RunMicrovm and ResumeMicrovm 5/s, SuspendMicrovm 2/s, TerminateMicrovm 10/s,
//! CreateMicrovmAuthToken 50/s, CreateMicrovmShellAuthToken 5/s, and 100/s for
//! every other operation. Past the rate: 429 `ThrottlingException`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

const DEFAULT_RATE: f64 = 100.0;
const REFERENCE_RATES: &[(&str, f64)] = &[
    ("RunMicrovm", 5.0),
    ("ResumeMicrovm", 5.0),
    ("SuspendMicrovm", 2.0),
    ("TerminateMicrovm", 10.0),
    ("CreateMicrovmAuthToken", 50.0),
    ("CreateMicrovmShellAuthToken", 5.0),
];

#[derive(Debug, thiserror::Error)]
pub enum LimitsError {
    #[error("rate limit {0:?} must look like Operation=PER_SECOND")]
    Syntax(String),
    #[error("rate limit for unknown operation {0:?}")]
    UnknownOperation(String),
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// Token buckets keyed by account and operation. A bucket holds one second's
/// worth of requests (at least one), refilled continuously.
#[derive(Debug)]
pub struct RateLimits {
    rates: HashMap<String, f64>,
    buckets: Mutex<HashMap<(String, String), Bucket>>,
}

impl RateLimits {
    /// Reference rates, overridden by `Operation=PER_SECOND` entries.
    pub fn new(overrides: &[String]) -> Result<Self, LimitsError> {
        let mut rates: HashMap<String, f64> = REFERENCE_RATES
            .iter()
            .map(|(op, rate)| (op.to_string(), *rate))
            .collect();
        for entry in overrides {
            let (op, rate) = entry
                .split_once('=')
                .ok_or_else(|| LimitsError::Syntax(entry.clone()))?;
            let rate: f64 = rate
                .parse()
                .ok()
                .filter(|r: &f64| r.is_finite() && *r > 0.0 && *r <= 1e6)
                .ok_or_else(|| LimitsError::Syntax(entry.clone()))?;
            if hearth_api::model().operation(op).is_none() {
                return Err(LimitsError::UnknownOperation(op.to_string()));
            }
            rates.insert(op.to_string(), rate);
        }
        Ok(Self {
            rates,
            buckets: Mutex::default(),
        })
    }

    pub fn rate(&self, operation: &str) -> f64 {
        self.rates.get(operation).copied().unwrap_or(DEFAULT_RATE)
    }

    /// Takes one request from the bucket; false when the caller is over the rate.
    pub fn allow(&self, account: &str, operation: &str) -> bool {
        self.allow_at(account, operation, Instant::now())
    }

    fn allow_at(&self, account: &str, operation: &str, now: Instant) -> bool {
        let rate = self.rate(operation);
        let capacity = rate.max(1.0);
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let bucket = buckets
            .entry((account.to_string(), operation.to_string()))
            .or_insert(Bucket {
                tokens: capacity,
                updated: now,
            });
        let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rate).min(capacity);
        bucket.updated = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn burst_then_refill_per_account_and_operation() {
        let limits = RateLimits::new(&[]).expect("limits");
        let t0 = Instant::now();
        assert_eq!(limits.rate("SuspendMicrovm"), 2.0);
        assert!(limits.allow_at("a", "SuspendMicrovm", t0));
        assert!(limits.allow_at("a", "SuspendMicrovm", t0));
        assert!(!limits.allow_at("a", "SuspendMicrovm", t0));
        // Other accounts and operations have their own buckets.
        assert!(limits.allow_at("b", "SuspendMicrovm", t0));
        assert!(limits.allow_at("a", "GetMicrovm", t0));
        // Half a second refills one request at 2/s.
        assert!(limits.allow_at("a", "SuspendMicrovm", t0 + Duration::from_millis(500)));
        assert!(!limits.allow_at("a", "SuspendMicrovm", t0 + Duration::from_millis(500)));
    }

    #[test]
    fn overrides_are_checked() {
        let limits = RateLimits::new(&["GetMicrovm=0.5".into()]).expect("limits");
        let t0 = Instant::now();
        assert!(limits.allow_at("a", "GetMicrovm", t0));
        assert!(!limits.allow_at("a", "GetMicrovm", t0 + Duration::from_secs(1)));
        assert!(limits.allow_at("a", "GetMicrovm", t0 + Duration::from_secs(2)));
        for bad in [
            "GetMicrovm",
            "GetMicrovm=0",
            "GetMicrovm=-1",
            "GetMicrovm=x",
            "GetMicrovm=inf",
        ] {
            assert!(
                matches!(RateLimits::new(&[bad.into()]), Err(LimitsError::Syntax(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            RateLimits::new(&["NoSuchOp=1".into()]),
            Err(LimitsError::UnknownOperation(_))
        ));
    }
}

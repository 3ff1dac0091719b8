//! Usage types (named as the reference's CUR usage types) and the price sheet
//! that turns metered quantities into dollars: BEHAVIOUR.md 1.6's us-east-1
//! rates by default, an operator's JSON file (`hearth serve --price-sheet`)
//! to override any of them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Metered amounts are integers in a fixed fraction of the unit, so sums are
/// exact however many samples add up: compute in millionths.
pub const MICRO: i64 = 1_000_000;
const BYTES_PER_GB: f64 = (1u64 << 30) as f64;

/// What a bucket counts. Stored by [`UsageType::as_str`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum UsageType {
    /// vCPU-seconds (baseline while running, plus CPU used above it);
    /// stored in millionths.
    VcpuSeconds,
    /// GB-seconds of memory (baseline plus memory held above it); millionths.
    MemoryGbSeconds,
    /// Bytes of state written by suspends.
    SnapshotWrite,
    /// Bytes of snapshot read by launches and resumes.
    SnapshotRead,
    /// GB-hours of stored snapshots (image versions, suspended VMs); millionths.
    SnapshotStorageGbHours,
    /// Bytes the VM sent out (filled by the networking layer's counter).
    EgressBytes,
}

/// The host's architecture as the usage type's suffix (`-ARM` as the
/// reference; `-X86` on x86-64 hosts).
pub fn arch_suffix() -> &'static str {
    if cfg!(target_arch = "aarch64") {
        "ARM"
    } else {
        "X86"
    }
}

impl UsageType {
    pub const ALL: [UsageType; 6] = [
        UsageType::VcpuSeconds,
        UsageType::MemoryGbSeconds,
        UsageType::SnapshotWrite,
        UsageType::SnapshotRead,
        UsageType::SnapshotStorageGbHours,
        UsageType::EgressBytes,
    ];

    /// The stored name (architecture-free, so a database moved between
    /// hosts reads the same).
    pub fn as_str(self) -> &'static str {
        match self {
            UsageType::VcpuSeconds => "vcpu-seconds",
            UsageType::MemoryGbSeconds => "memory-gb-seconds",
            UsageType::SnapshotWrite => "snapshot-write",
            UsageType::SnapshotRead => "snapshot-read",
            UsageType::SnapshotStorageGbHours => "snapshot-storage",
            UsageType::EgressBytes => "egress",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == text)
    }

    /// The CUR usage type, e.g. `Lambda-MicroVM-vCPU-Second-X86`.
    pub fn wire_name(self) -> String {
        match self {
            UsageType::VcpuSeconds => format!("Lambda-MicroVM-vCPU-Second-{}", arch_suffix()),
            UsageType::MemoryGbSeconds => {
                format!("Lambda-MicroVM-Memory-GB-Second-{}", arch_suffix())
            }
            UsageType::SnapshotWrite => "Lambda-MicroVM-Snapshot-Write-GB".into(),
            UsageType::SnapshotRead => "Lambda-MicroVM-Snapshot-Read-GB".into(),
            UsageType::SnapshotStorageGbHours => "Lambda-MicroVM-Snapshot-Storage-GB-Hour".into(),
            UsageType::EgressBytes => "Lambda-MicroVM-DataTransfer-Out-GB".into(),
        }
    }

    pub fn unit(self) -> &'static str {
        match self {
            UsageType::VcpuSeconds => "vCPU-Seconds",
            UsageType::MemoryGbSeconds => "GB-Seconds",
            UsageType::SnapshotWrite | UsageType::SnapshotRead | UsageType::EgressBytes => "GB",
            UsageType::SnapshotStorageGbHours => "GB-Hours",
        }
    }

    /// A stored amount in the report's unit.
    pub fn quantity(self, amount: i64) -> f64 {
        match self {
            UsageType::VcpuSeconds
            | UsageType::MemoryGbSeconds
            | UsageType::SnapshotStorageGbHours => amount as f64 / MICRO as f64,
            UsageType::SnapshotWrite | UsageType::SnapshotRead | UsageType::EgressBytes => {
                amount as f64 / BYTES_PER_GB
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PricingError {
    #[error("cannot read the price sheet {0}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("the price sheet {0} is not valid JSON of the documented form")]
    Parse(PathBuf, #[source] serde_json::Error),
    #[error("the price sheet names an unknown usage type {0:?}")]
    UnknownType(String),
    #[error("the price of {0} is not a finite non-negative number")]
    BadPrice(String),
}

/// Dollars per unit of each usage type.
#[derive(Debug, Clone, PartialEq)]
pub struct PriceSheet {
    rates: BTreeMap<UsageType, f64>,
}

impl Default for PriceSheet {
    /// The reference's us-east-1 rates (BEHAVIOUR.md 1.6); storage is
    /// $0.08 per GB-month of 720 hours. Data transfer is priced apart by the
    /// reference: 0 here unless the operator sets it.
    fn default() -> Self {
        Self {
            rates: BTreeMap::from([
                (UsageType::VcpuSeconds, 0.000_027_694_4),
                (UsageType::MemoryGbSeconds, 0.000_003_666_7),
                (UsageType::SnapshotWrite, 0.0038),
                (UsageType::SnapshotRead, 0.00155),
                (UsageType::SnapshotStorageGbHours, 0.08 / 720.0),
                (UsageType::EgressBytes, 0.0),
            ]),
        }
    }
}

impl PriceSheet {
    /// The default rates with the file's: `{"Lambda-MicroVM-Snapshot-Read-GB":
    /// 0.002, ...}`, keyed by the usage types' wire names (the architecture
    /// suffix of this host).
    pub fn load(path: &Path) -> Result<Self, PricingError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| PricingError::Read(path.to_path_buf(), e))?;
        let entries: BTreeMap<String, f64> =
            serde_json::from_str(&text).map_err(|e| PricingError::Parse(path.to_path_buf(), e))?;
        Self::default().with(entries)
    }

    fn with(mut self, entries: BTreeMap<String, f64>) -> Result<Self, PricingError> {
        for (name, price) in entries {
            let usage_type = UsageType::ALL
                .into_iter()
                .find(|t| t.wire_name() == name)
                .ok_or_else(|| PricingError::UnknownType(name.clone()))?;
            if !price.is_finite() || price < 0.0 {
                return Err(PricingError::BadPrice(name));
            }
            self.rates.insert(usage_type, price);
        }
        Ok(self)
    }

    pub fn rate(&self, usage_type: UsageType) -> f64 {
        self.rates.get(&usage_type).copied().unwrap_or(0.0)
    }

    /// The cost of a stored amount, in dollars.
    pub fn cost(&self, usage_type: UsageType, amount: i64) -> f64 {
        usage_type.quantity(amount) * self.rate(usage_type)
    }
}

/// The minimum an image version's snapshot is billed for (the reference's
/// one week), in milliseconds.
pub const VERSION_STORAGE_MINIMUM_MS: i64 = 7 * 24 * 3600 * 1000;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_rates_price_the_documented_examples() {
        let sheet = PriceSheet::default();
        // "2 GB/1 vCPU costs $0.1261/h" (BEHAVIOUR.md 1.6).
        let hour = sheet.cost(UsageType::VcpuSeconds, 3600 * MICRO)
            + sheet.cost(UsageType::MemoryGbSeconds, 2 * 3600 * MICRO);
        assert!((hour - 0.1261).abs() < 0.00005, "{hour}");
        // Table: (type, stored amount, dollars).
        let gib = 1i64 << 30;
        let cases = [
            (UsageType::SnapshotWrite, gib, 0.0038),
            (UsageType::SnapshotRead, gib, 0.00155),
            (UsageType::SnapshotRead, gib / 2, 0.000775),
            (UsageType::SnapshotStorageGbHours, 720 * MICRO, 0.08),
            (UsageType::VcpuSeconds, MICRO / 4, 0.000_027_694_4 / 4.0),
            (UsageType::EgressBytes, gib, 0.0),
        ];
        for (usage_type, amount, dollars) in cases {
            let cost = sheet.cost(usage_type, amount);
            assert!((cost - dollars).abs() < 1e-12, "{usage_type:?}: {cost}");
        }
    }

    #[test]
    fn names_units_and_overrides() {
        let arch = arch_suffix();
        assert_eq!(
            UsageType::VcpuSeconds.wire_name(),
            format!("Lambda-MicroVM-vCPU-Second-{arch}")
        );
        assert_eq!(
            UsageType::MemoryGbSeconds.wire_name(),
            format!("Lambda-MicroVM-Memory-GB-Second-{arch}")
        );
        for usage_type in UsageType::ALL {
            assert_eq!(UsageType::parse(usage_type.as_str()), Some(usage_type));
        }
        assert_eq!(UsageType::SnapshotStorageGbHours.unit(), "GB-Hours");
        let sheet = PriceSheet::default()
            .with(BTreeMap::from([(
                "Lambda-MicroVM-Snapshot-Read-GB".to_string(),
                0.01,
            )]))
            .expect("known type");
        assert_eq!(sheet.rate(UsageType::SnapshotRead), 0.01);
        assert_eq!(sheet.rate(UsageType::SnapshotWrite), 0.0038);
        assert!(PriceSheet::default()
            .with(BTreeMap::from([("Lambda-MicroVM-GPU".to_string(), 1.0)]))
            .is_err());
        assert!(PriceSheet::default()
            .with(BTreeMap::from([(
                "Lambda-MicroVM-Snapshot-Read-GB".to_string(),
                -1.0
            )]))
            .is_err());
    }
}

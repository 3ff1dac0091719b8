//! Machine sizes: which `resources[0].minimumMemoryInMiB` values an image may
//! ask for and what each one gives its guests. The reference's table
//! (BEHAVIOUR.md 1.1) by default: the value is the baseline; the guest sees
//! the peak, 4x the memory with one vCPU per 2 GiB of peak, and a root disk
//! of 8 GiB, or the peak's size above 8 GiB. An operator adds sizes with
//! `hearth serve --shapes FILE` (JSON, see [`Sizes::load`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use hearth_vm::MachineShape;
use serde::Deserialize;

/// The baselines of the reference's sizes (2048 is the API's default).
pub const REFERENCE_BASELINES: [u32; 5] = [512, 1024, 2048, 4096, 8192];
const MIB_PER_GIB: u32 = 1024;
/// The smallest root disk any size gets, in GiB.
const MIN_DISK_GIB: u32 = 8;

#[derive(Debug, thiserror::Error)]
pub enum SizesError {
    #[error("cannot read the shapes file {0}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("the shapes file {0} is not valid JSON of the documented form")]
    Parse(PathBuf, #[source] serde_json::Error),
    #[error("shape {0} MiB: {1}")]
    Invalid(u32, &'static str),
}

/// One size: what it guarantees (baseline) and what its guests see (peak).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size {
    pub baseline_mib: u32,
    pub peak_mib: u32,
    pub vcpus: u8,
    pub disk_gib: u32,
}

impl Size {
    /// The reference's rule for a baseline (any baseline of 128 MiB or more:
    /// operator imports may use one outside the table).
    pub fn reference(baseline_mib: u32) -> Self {
        let shape = MachineShape::burst_of(baseline_mib);
        Self {
            baseline_mib,
            peak_mib: shape.memory_mib,
            vcpus: shape.vcpus,
            disk_gib: (shape.memory_mib / MIB_PER_GIB).max(MIN_DISK_GIB),
        }
    }

    /// The VM shape of its guests (peak memory and vCPUs, the baseline kept).
    pub fn shape(&self) -> MachineShape {
        MachineShape {
            memory_mib: self.peak_mib,
            vcpus: self.vcpus,
            baseline_mib: self.baseline_mib,
        }
    }

    pub fn disk_bytes(&self) -> u64 {
        u64::from(self.disk_gib) << 30
    }
}

/// The sizes a server accepts, by baseline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sizes {
    by_baseline: BTreeMap<u32, Size>,
}

impl Default for Sizes {
    fn default() -> Self {
        Self {
            by_baseline: REFERENCE_BASELINES
                .iter()
                .map(|&b| (b, Size::reference(b)))
                .collect(),
        }
    }
}

/// One entry of a shapes file; omitted members follow the reference's rule.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct SizeEntry {
    #[serde(rename = "minimumMemoryInMiB")]
    minimum_memory_in_mib: u32,
    #[serde(rename = "peakMemoryInMiB")]
    peak_memory_in_mib: Option<u32>,
    vcpus: Option<u8>,
    #[serde(rename = "diskGiB")]
    disk_gib: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SizesFile {
    sizes: Vec<SizeEntry>,
}

impl Sizes {
    /// The reference's sizes plus (or, for the same baseline, replaced by)
    /// the file's: `{"sizes": [{"minimumMemoryInMiB": 256, "peakMemoryInMiB":
    /// 1024, "vcpus": 1, "diskGiB": 8}]}` (all but the first member optional).
    pub fn load(path: &Path) -> Result<Self, SizesError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| SizesError::Read(path.to_path_buf(), e))?;
        Self::default().with_file(&text, path)
    }

    fn with_file(mut self, text: &str, path: &Path) -> Result<Self, SizesError> {
        let file: SizesFile =
            serde_json::from_str(text).map_err(|e| SizesError::Parse(path.to_path_buf(), e))?;
        for entry in file.sizes {
            let baseline = entry.minimum_memory_in_mib;
            if baseline < 128 {
                return Err(SizesError::Invalid(
                    baseline,
                    "the baseline is under 128 MiB",
                ));
            }
            let rule = Size::reference(baseline);
            let size = Size {
                baseline_mib: baseline,
                peak_mib: entry.peak_memory_in_mib.unwrap_or(rule.peak_mib),
                vcpus: entry.vcpus.unwrap_or(rule.vcpus),
                disk_gib: entry.disk_gib.unwrap_or(rule.disk_gib),
            };
            if size.peak_mib < baseline {
                return Err(SizesError::Invalid(
                    baseline,
                    "the peak is under the baseline",
                ));
            }
            if size.vcpus == 0 || size.disk_gib == 0 {
                return Err(SizesError::Invalid(
                    baseline,
                    "vcpus and diskGiB must be positive",
                ));
            }
            self.by_baseline.insert(baseline, size);
        }
        Ok(self)
    }

    pub fn get(&self, baseline_mib: u32) -> Option<Size> {
        self.by_baseline.get(&baseline_mib).copied()
    }

    /// The accepted baselines, for error messages: `512, 1024, ...`.
    pub fn accepted(&self) -> String {
        self.by_baseline
            .keys()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_table() {
        let sizes = Sizes::default();
        // baseline, peak MiB, vCPUs, disk GiB (BEHAVIOUR.md 1.1)
        let expected = [
            (512, 2048, 1, 8),
            (1024, 4096, 2, 8),
            (2048, 8192, 4, 8),
            (4096, 16384, 8, 16),
            (8192, 32768, 16, 32),
        ];
        for (baseline, peak, vcpus, disk) in expected {
            let size = sizes.get(baseline).expect("reference size");
            assert_eq!(
                (size.peak_mib, size.vcpus, size.disk_gib),
                (peak, vcpus, disk),
                "{baseline}"
            );
            let shape = size.shape();
            assert_eq!(shape.memory_mib, peak);
            assert_eq!(shape.baseline_memory_mib(), baseline);
        }
        for refused in [0, 256, 511, 513, 3072, 16384] {
            assert_eq!(sizes.get(refused), None, "{refused}");
        }
        assert_eq!(sizes.accepted(), "512, 1024, 2048, 4096, 8192");
    }

    #[test]
    fn operator_file_adds_and_replaces() {
        let path = Path::new("shapes.json");
        let sizes = Sizes::default()
            .with_file(
                r#"{"sizes": [{"minimumMemoryInMiB": 256},
                    {"minimumMemoryInMiB": 512, "peakMemoryInMiB": 1024, "vcpus": 2, "diskGiB": 4}]}"#,
                path,
            )
            .expect("valid file");
        assert_eq!(sizes.get(256), Some(Size::reference(256)));
        assert_eq!(
            sizes.get(512),
            Some(Size {
                baseline_mib: 512,
                peak_mib: 1024,
                vcpus: 2,
                disk_gib: 4
            })
        );
        assert_eq!(sizes.get(2048), Some(Size::reference(2048)));
        for bad in [
            r#"{"sizes": [{"minimumMemoryInMiB": 64}]}"#,
            r#"{"sizes": [{"minimumMemoryInMiB": 1024, "peakMemoryInMiB": 512}]}"#,
            r#"{"sizes": [{"minimumMemoryInMiB": 1024, "vcpus": 0}]}"#,
            r#"{"sizes": [{"minimumMemoryInMiB": 1024, "cpus": 2}]}"#,
            "not json",
        ] {
            assert!(Sizes::default().with_file(bad, path).is_err(), "{bad}");
        }
    }
}

//! Sandbox resource limits, per-team quotas, and the validated shape of a sandbox
//! request.

use serde::{Deserialize, Serialize};

/// A value outside what a sandbox may ask for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} must be between {min} and {max}, got {value}")]
pub struct LimitError {
    pub field: &'static str,
    /// What the caller sent, unclamped (may be negative or huge).
    pub value: i64,
    pub min: u64,
    pub max: u64,
}

/// Bounds applied to every sandbox request. Defaults suit a small single host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxLimits {
    pub max_vcpus: u32,
    pub min_memory_mb: u32,
    pub max_memory_mb: u32,
    pub min_disk_mb: u32,
    pub max_disk_mb: u32,
    pub max_timeout_s: u32,
}

impl Default for SandboxLimits {
    fn default() -> Self {
        Self {
            max_vcpus: 8,
            min_memory_mb: 128,
            max_memory_mb: 16384,
            min_disk_mb: 64,
            max_disk_mb: 65536,
            max_timeout_s: 24 * 3600,
        }
    }
}

/// Size and lifetime of a sandbox, already checked against [`SandboxLimits`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxShape {
    pub vcpus: u32,
    pub memory_mb: u32,
    pub disk_size_mb: u32,
    pub timeout_s: u32,
}

impl SandboxShape {
    pub const DEFAULT_VCPUS: u32 = 1;
    pub const DEFAULT_MEMORY_MB: u32 = 256;
    pub const DEFAULT_DISK_MB: u32 = 1024;
    pub const DEFAULT_TIMEOUT_S: u32 = 300;

    /// Fill defaults and check every field against `limits`.
    pub fn validate(
        limits: &SandboxLimits,
        vcpus: Option<u32>,
        memory_mb: Option<u32>,
        disk_size_mb: Option<u32>,
        timeout_s: Option<u32>,
    ) -> Result<Self, LimitError> {
        let wide = |v: Option<u32>| v.map(i64::from);
        Self::validate_wide(
            limits,
            wide(vcpus),
            wide(memory_mb),
            wide(disk_size_mb),
            wide(timeout_s),
        )
    }

    /// Like [`validate`](Self::validate) for values as a user sent them (JSON numbers
    /// parsed into `i64`): an out-of-range value is reported as sent, never clamped
    /// ("got -1", not "got 0").
    pub fn validate_wide(
        limits: &SandboxLimits,
        vcpus: Option<i64>,
        memory_mb: Option<i64>,
        disk_size_mb: Option<i64>,
        timeout_s: Option<i64>,
    ) -> Result<Self, LimitError> {
        Ok(Self {
            vcpus: check_range("vcpus", vcpus, Self::DEFAULT_VCPUS, 1, limits.max_vcpus)?,
            memory_mb: check_range(
                "memory_mb",
                memory_mb,
                Self::DEFAULT_MEMORY_MB,
                limits.min_memory_mb,
                limits.max_memory_mb,
            )?,
            disk_size_mb: check_range(
                "disk_size_mb",
                disk_size_mb,
                Self::DEFAULT_DISK_MB,
                limits.min_disk_mb,
                limits.max_disk_mb,
            )?,
            timeout_s: check_range(
                "timeout_s",
                timeout_s,
                Self::DEFAULT_TIMEOUT_S,
                1,
                limits.max_timeout_s,
            )?,
        })
    }
}

/// `value` (or `default` when absent) if it lies in `min..=max`, else the error naming
/// `field` and the value as sent.
pub fn check_range(
    field: &'static str,
    value: Option<i64>,
    default: u32,
    min: u32,
    max: u32,
) -> Result<u32, LimitError> {
    let v = value.unwrap_or(i64::from(default));
    if v < i64::from(min) || v > i64::from(max) {
        return Err(LimitError {
            field,
            value: v,
            min: min.into(),
            max: max.into(),
        });
    }
    u32::try_from(v).map_err(|_| LimitError {
        field,
        value: v,
        min: min.into(),
        max: max.into(),
    })
}

/// Resources one team may hold at once, over all its active (pending, starting,
/// running, paused) sandboxes. Defaults come from the control plane's config; a team
/// may have its own (the `team_quotas` table).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TeamQuota {
    pub max_sandboxes: u32,
    pub max_vcpus: u32,
    pub max_memory_mb: u64,
    pub max_disk_mb: u64,
}

impl Default for TeamQuota {
    fn default() -> Self {
        Self {
            max_sandboxes: 20,
            max_vcpus: 40,
            max_memory_mb: 64 * 1024,
            max_disk_mb: 512 * 1024,
        }
    }
}

/// Which quota a create would pass, and its value: the message names both.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuotaExceeded {
    #[error("team quota: at most {max} concurrent sandboxes")]
    Sandboxes { max: u32 },
    #[error("team quota: at most {max} vCPUs in total ({used} in use, {asked} asked)")]
    Vcpus { max: u32, used: u64, asked: u32 },
    #[error("team quota: at most {max} MiB of memory in total ({used} in use, {asked} asked)")]
    MemoryMb { max: u64, used: u64, asked: u32 },
    #[error("team quota: at most {max} MiB of disk in total ({used} in use, {asked} asked)")]
    DiskMb { max: u64, used: u64, asked: u32 },
}

/// What a team's active sandboxes hold now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TeamUsage {
    pub sandboxes: u64,
    pub vcpus: u64,
    pub memory_mb: u64,
    pub disk_mb: u64,
}

impl TeamQuota {
    /// Whether one more sandbox of `shape` fits beside `usage`; the first limit it would
    /// pass otherwise.
    pub fn admit(&self, usage: &TeamUsage, shape: &SandboxShape) -> Result<(), QuotaExceeded> {
        if usage.sandboxes + 1 > u64::from(self.max_sandboxes) {
            return Err(QuotaExceeded::Sandboxes {
                max: self.max_sandboxes,
            });
        }
        if usage.vcpus + u64::from(shape.vcpus) > u64::from(self.max_vcpus) {
            return Err(QuotaExceeded::Vcpus {
                max: self.max_vcpus,
                used: usage.vcpus,
                asked: shape.vcpus,
            });
        }
        if usage.memory_mb + u64::from(shape.memory_mb) > self.max_memory_mb {
            return Err(QuotaExceeded::MemoryMb {
                max: self.max_memory_mb,
                used: usage.memory_mb,
                asked: shape.memory_mb,
            });
        }
        if usage.disk_mb + u64::from(shape.disk_size_mb) > self.max_disk_mb {
            return Err(QuotaExceeded::DiskMb {
                max: self.max_disk_mb,
                used: usage.disk_mb,
                asked: shape.disk_size_mb,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_within_limits() {
        let s = SandboxShape::validate(&SandboxLimits::default(), None, None, None, None).unwrap();
        assert_eq!(s.vcpus, 1);
        assert_eq!(s.memory_mb, 256);
    }

    #[test]
    fn out_of_range_values_name_the_field() {
        let l = SandboxLimits::default();
        let e = SandboxShape::validate(&l, Some(0), None, None, None).unwrap_err();
        assert_eq!(e.field, "vcpus");
        let e = SandboxShape::validate(&l, Some(99), None, None, None).unwrap_err();
        assert!(e.to_string().contains("vcpus must be between 1 and 8"));
        let e = SandboxShape::validate(&l, None, Some(16), None, None).unwrap_err();
        assert_eq!(e.field, "memory_mb");
        let e = SandboxShape::validate(&l, None, None, None, Some(0)).unwrap_err();
        assert_eq!(e.field, "timeout_s");
    }

    #[test]
    fn out_of_range_values_are_reported_as_sent() {
        let l = SandboxLimits::default();
        let e = SandboxShape::validate_wide(&l, Some(-1), None, None, None).unwrap_err();
        assert_eq!(e.to_string(), "vcpus must be between 1 and 8, got -1");
        let e =
            SandboxShape::validate_wide(&l, None, Some(10_000_000_000), None, None).unwrap_err();
        assert!(e.to_string().ends_with("got 10000000000"), "{e}");
        let e = SandboxShape::validate_wide(&l, None, None, None, Some(i64::MIN)).unwrap_err();
        assert!(e.to_string().contains(&i64::MIN.to_string()), "{e}");
    }

    #[test]
    fn quota_names_the_first_limit_passed() {
        let q = TeamQuota {
            max_sandboxes: 2,
            max_vcpus: 4,
            max_memory_mb: 1024,
            max_disk_mb: 4096,
        };
        let shape =
            SandboxShape::validate(&SandboxLimits::default(), Some(2), None, None, None).unwrap();
        assert_eq!(q.admit(&TeamUsage::default(), &shape), Ok(()));
        let full = TeamUsage {
            sandboxes: 2,
            ..Default::default()
        };
        assert_eq!(
            q.admit(&full, &shape).unwrap_err().to_string(),
            "team quota: at most 2 concurrent sandboxes"
        );
        let cpus = TeamUsage {
            sandboxes: 1,
            vcpus: 3,
            ..Default::default()
        };
        assert!(matches!(
            q.admit(&cpus, &shape),
            Err(QuotaExceeded::Vcpus {
                max: 4,
                used: 3,
                asked: 2
            })
        ));
        let mem = TeamUsage {
            sandboxes: 1,
            memory_mb: 900,
            ..Default::default()
        };
        assert!(q
            .admit(&mem, &shape)
            .unwrap_err()
            .to_string()
            .contains("at most 1024 MiB of memory"));
    }
}

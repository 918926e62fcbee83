//! Sandbox resource limits and the validated shape of a sandbox request.

use serde::{Deserialize, Serialize};

/// A value outside what a sandbox may ask for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} must be between {min} and {max}, got {value}")]
pub struct LimitError {
    pub field: &'static str,
    pub value: u64,
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
        let check = |field, value: u32, min: u32, max: u32| {
            if value < min || value > max {
                Err(LimitError {
                    field,
                    value: value.into(),
                    min: min.into(),
                    max: max.into(),
                })
            } else {
                Ok(value)
            }
        };
        Ok(Self {
            vcpus: check(
                "vcpus",
                vcpus.unwrap_or(Self::DEFAULT_VCPUS),
                1,
                limits.max_vcpus,
            )?,
            memory_mb: check(
                "memory_mb",
                memory_mb.unwrap_or(Self::DEFAULT_MEMORY_MB),
                limits.min_memory_mb,
                limits.max_memory_mb,
            )?,
            disk_size_mb: check(
                "disk_size_mb",
                disk_size_mb.unwrap_or(Self::DEFAULT_DISK_MB),
                limits.min_disk_mb,
                limits.max_disk_mb,
            )?,
            timeout_s: check(
                "timeout_s",
                timeout_s.unwrap_or(Self::DEFAULT_TIMEOUT_S),
                1,
                limits.max_timeout_s,
            )?,
        })
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
}

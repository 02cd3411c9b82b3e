//! `[kernels]`: which compute kernels run a model on the CPU, set in the
//! configuration and applied by [`crate::load`] (through [`LoadOptions`](crate::LoadOptions)).
//!
//! Why a config section and not environment switches: the kernel backend, the
//! SIMD path and the thread count change what a server computes and how fast,
//! so they belong where every other behaviour is set, validated and documented
//! (`configs/salus.toml`), and they reach the model through its loader, not
//! through process-wide variables read somewhere deep in a kernel.

use serde::Deserialize;

use crate::{ModelError, Result};

/// Which implementation runs quantized matmuls and the small per-token ops.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KernelBackend {
    /// Salus' own kernels (default).
    #[default]
    Salus,
    /// candle's reference implementation (slower; for comparisons).
    Candle,
}

/// The `[kernels]` section.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KernelConfig {
    /// `salus` (default) or `candle`.
    pub backend: KernelBackend,
    /// SIMD path of Salus' CPU kernels: `auto` (the fastest this CPU has),
    /// `avx512vnni`, `avx2` or `scalar`. A path the CPU lacks is refused at start.
    pub cpu_path: String,
    /// Worker threads of the CPU kernels, the calling thread included;
    /// 0 = one per physical core.
    pub threads: usize,
}

impl Default for KernelConfig {
    fn default() -> Self {
        KernelConfig { backend: KernelBackend::Salus, cpu_path: "auto".into(), threads: 0 }
    }
}

/// Most kernel threads a configuration may ask for.
pub const MAX_KERNEL_THREADS: usize = 256;

impl KernelConfig {
    /// Checks the values; the message names the key.
    pub fn validate(&self) -> Result<()> {
        self.forced_path()?;
        if self.threads > MAX_KERNEL_THREADS {
            return Err(ModelError::InvalidConfig(format!("kernels.threads must be at most {MAX_KERNEL_THREADS}")));
        }
        Ok(())
    }

    fn forced_path(&self) -> Result<Option<salus_kernels::KernelPath>> {
        match self.cpu_path.trim() {
            "auto" => Ok(None),
            name => salus_kernels::KernelPath::from_name(name).map(Some).ok_or_else(|| {
                ModelError::InvalidConfig("kernels.cpu_path must be auto, avx512vnni, avx2 or scalar".into())
            }),
        }
    }

    /// Applies the settings for the model about to be loaded. The SIMD path
    /// and the thread count are process-wide (one kernel pool serves every
    /// model); the backend applies to the layers built from now on.
    pub fn apply(&self) -> Result<()> {
        self.validate()?;
        salus_kernels::KernelPath::force(self.forced_path()?)
            .map_err(|e| ModelError::InvalidConfig(format!("kernels.cpu_path: {e}")))?;
        if self.threads > 0 {
            salus_kernels::set_num_threads(self.threads);
        }
        crate::qlinear::set_salus_kernels_enabled(self.backend == KernelBackend::Salus);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_parse_and_bad_values_are_refused() {
        let c: KernelConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(c, KernelConfig::default());
        c.validate().unwrap();
        let bad = KernelConfig { cpu_path: "sse2".into(), ..KernelConfig::default() };
        assert!(bad.validate().unwrap_err().to_string().contains("kernels.cpu_path"));
        let bad = KernelConfig { threads: 100_000, ..KernelConfig::default() };
        assert!(bad.validate().unwrap_err().to_string().contains("kernels.threads"));
        assert!(serde_json::from_str::<KernelConfig>(r#"{"backend":"fast"}"#).is_err());
        let c: KernelConfig = serde_json::from_str(r#"{"backend":"candle","cpu_path":"scalar","threads":1}"#).unwrap();
        c.validate().unwrap();
    }
}

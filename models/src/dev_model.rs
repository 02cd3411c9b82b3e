//! Where the default development model (SmolLM2-135M-Instruct, Q4_1 GGUF,
//! fetched by `scripts/fetch-model.sh`) is found: one place for `salus serve
//! --dev`, the tests and the benchmarks, so all look in the same places and
//! skip with the same message. Only the path: reading the file is the
//! caller's (the server reads it through its weights loader).

use std::path::PathBuf;

/// The default model's file name (what `scripts/fetch-model.sh` downloads).
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// `$SALUS_MODEL`, else `$SALUS_DEFAULT_MODEL`, else the file in
/// `$SALUS_MODEL_DIR`, else in `~/.cache/salus/models` (where
/// `scripts/fetch-model.sh` puts it).
pub fn default_model_path() -> PathBuf {
    for var in ["SALUS_MODEL", "SALUS_DEFAULT_MODEL"] {
        if let Some(p) = std::env::var_os(var) {
            return PathBuf::from(p);
        }
    }
    let dir = std::env::var_os("SALUS_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/salus/models"));
    dir.join(DEFAULT_MODEL_FILE)
}

/// The default model's path if the file is there; otherwise says that the
/// caller is skipped (and why) on stderr and returns `None`.
pub fn default_model_if_present() -> Option<PathBuf> {
    let path = default_model_path();
    if path.is_file() {
        Some(path)
    } else {
        eprintln!(
            "SKIPPED: default model not found at {} (run scripts/fetch-model.sh or set SALUS_MODEL)",
            path.display()
        );
        None
    }
}

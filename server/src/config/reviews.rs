//! `[reviews]`: clinician review attestations (`POST /v1/reviews`).

use serde::Deserialize;

use super::ConfigError;

/// `[reviews]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ReviewsConfig {
    /// A completion can be reviewed for this long after it finished.
    pub lookup_window_secs: u64,
    /// Most completions held for review (the oldest are dropped first).
    pub max_pending: usize,
    /// The `reason_code`s a review may give.
    pub reason_codes: Vec<String>,
}

impl Default for ReviewsConfig {
    fn default() -> Self {
        ReviewsConfig {
            lookup_window_secs: 7 * 24 * 3600,
            max_pending: 1_000_000,
            reason_codes: ["inaccurate", "incomplete", "unsafe", "not_applicable", "other"].map(String::from).to_vec(),
        }
    }
}

impl ReviewsConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.lookup_window_secs == 0 || self.max_pending == 0 {
            return Err(ConfigError::Value {
                key: "reviews",
                reason: "lookup_window_secs and max_pending must be at least 1".into(),
            });
        }
        for c in &self.reason_codes {
            let ok = !c.is_empty()
                && c.len() <= 64
                && c.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
            if !ok {
                return Err(ConfigError::Value {
                    key: "reviews.reason_codes",
                    reason: "each code must be 1-64 characters from A-Z a-z 0-9 _ - .".into(),
                });
            }
        }
        Ok(())
    }
}

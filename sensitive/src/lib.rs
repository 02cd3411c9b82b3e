//! Types for the two kinds of data Salus must never leak, shared by every
//! other crate:
//!
//! - [`Phi`]: protected health information (prompts, completions, schemas,
//!   tool arguments). `Debug` prints `[PHI]`; there is no `Display` or
//!   `Serialize`; the text is zeroized on drop.
//! - [`secret`]: 32-byte keys (key-encryption keys, audit keys) and the
//!   `file:`/`env:`/`cmd:` sources they are read from; zeroized on drop,
//!   compared in constant time, never formatted.

pub mod file_mode;
pub mod secret;
mod taint;

pub use secret::{KeySource, SecretError, SecretKey};
pub use taint::Phi;

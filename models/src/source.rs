//! Where model weights come from: always bytes already in process memory.
//!
//! The sealed-weights layer decrypts a model into locked, non-dumpable memory and
//! hands the buffers over as [`WeightBytes`]; development setups read plaintext
//! files into memory with [`ModelSource::read_plaintext`]. Nothing here maps a
//! plaintext file or writes one.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use crate::{ModelError, Result};

/// A buffer of plaintext model bytes. Implementations zeroize on drop (see the
/// `impl` for `zeroize::Zeroizing<Vec<u8>>`); the server's sealed loader provides
/// one backed by `mlock`ed, `MADV_DONTDUMP` memory.
pub trait WeightBuffer: Send + Sync {
    fn bytes(&self) -> &[u8];
}

impl WeightBuffer for zeroize::Zeroizing<Vec<u8>> {
    fn bytes(&self) -> &[u8] {
        self.as_slice()
    }
}

/// Shared handle to one plaintext file's bytes.
#[derive(Clone)]
pub struct WeightBytes(Arc<dyn WeightBuffer>);

impl WeightBytes {
    pub fn new(buf: impl WeightBuffer + 'static) -> Self {
        WeightBytes(Arc::new(buf))
    }
    /// Takes ownership of a vector; it is zeroized when the last handle drops.
    pub fn from_vec(v: Vec<u8>) -> Self {
        Self::new(zeroize::Zeroizing::new(v))
    }
    pub fn as_slice(&self) -> &[u8] {
        self.0.bytes()
    }
    pub fn len(&self) -> usize {
        self.as_slice().len()
    }
    pub fn is_empty(&self) -> bool {
        self.as_slice().is_empty()
    }
}

impl std::fmt::Debug for WeightBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WeightBytes({} bytes)", self.len())
    }
}

/// A model as a set of named in-memory files.
///
/// * GGUF: one file whose name ends in `.gguf` (tokenizer and chat template come
///   from its metadata; a `tokenizer.json` beside it takes precedence).
/// * Hugging Face directory: `config.json`, one or more `*.safetensors` shards,
///   `tokenizer.json`, optionally `tokenizer_config.json` (chat template) and
///   `generation_config.json`.
#[derive(Debug, Clone, Default)]
pub struct ModelSource {
    /// A display name (file stem or directory name); never contains file contents.
    pub name: String,
    files: BTreeMap<String, WeightBytes>,
}

impl ModelSource {
    pub fn new(name: impl Into<String>) -> Self {
        ModelSource { name: name.into(), files: BTreeMap::new() }
    }

    /// Adds a file under its base name (e.g. `config.json`, `model-00001-of-00002.safetensors`).
    pub fn insert(&mut self, file_name: impl Into<String>, bytes: WeightBytes) {
        self.files.insert(file_name.into(), bytes);
    }

    /// Builds a source from one GGUF file's bytes.
    pub fn from_gguf_bytes(name: impl Into<String>, bytes: WeightBytes) -> Self {
        let name = name.into();
        let mut s = Self::new(name.clone());
        let file = if name.ends_with(".gguf") { name } else { format!("{name}.gguf") };
        s.insert(file, bytes);
        s
    }

    pub fn get(&self, file_name: &str) -> Option<&WeightBytes> {
        self.files.get(file_name)
    }

    pub fn files(&self) -> impl Iterator<Item = (&str, &WeightBytes)> {
        self.files.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// The GGUF file of this source, if it is a GGUF model.
    pub fn gguf(&self) -> Option<(&str, &WeightBytes)> {
        self.files().find(|(n, _)| n.ends_with(".gguf"))
    }

    /// The safetensors shards, in name order.
    pub fn safetensors(&self) -> Vec<(&str, &WeightBytes)> {
        self.files().filter(|(n, _)| n.ends_with(".safetensors")).collect()
    }

    /// Reads a plaintext GGUF file or HF model directory into memory
    /// (development only: production loads sealed weights).
    pub fn read_plaintext(path: &Path) -> Result<Self> {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
        if path.is_dir() {
            let mut s = Self::new(name);
            let mut entries: Vec<_> = std::fs::read_dir(path)?.collect::<std::io::Result<_>>()?;
            entries.sort_by_key(|e| e.file_name());
            for e in entries {
                let fname = e.file_name().to_string_lossy().into_owned();
                let wanted = fname.ends_with(".safetensors")
                    || fname.ends_with(".gguf")
                    || matches!(
                        fname.as_str(),
                        "config.json" | "tokenizer.json" | "tokenizer_config.json" | "generation_config.json"
                    );
                if wanted && e.file_type()?.is_file() {
                    s.insert(fname, WeightBytes::from_vec(std::fs::read(e.path())?));
                }
            }
            if s.files.is_empty() {
                return Err(ModelError::InvalidWeights {
                    file: path.display().to_string(),
                    reason: "directory holds no .gguf or .safetensors files".into(),
                });
            }
            Ok(s)
        } else {
            let bytes = std::fs::read(path)
                .map_err(|e| ModelError::InvalidWeights { file: path.display().to_string(), reason: e.to_string() })?;
            if name.ends_with(".gguf") || bytes.starts_with(b"GGUF") {
                Ok(Self::from_gguf_bytes(name, WeightBytes::from_vec(bytes)))
            } else if name.ends_with(".safetensors") {
                let mut s = Self::new(name.clone());
                s.insert(name, WeightBytes::from_vec(bytes));
                Ok(s)
            } else {
                Err(ModelError::InvalidWeights {
                    file: path.display().to_string(),
                    reason: "not a GGUF file (bad magic) and not a model directory".into(),
                })
            }
        }
    }
}

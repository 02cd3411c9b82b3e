//! Packed batches: the input of one forward step.
//!
//! A step may mix prefill chunks (many tokens of one sequence) with single decode
//! tokens of other sequences. All tokens are concatenated into one flat list so
//! the matrix multiplications run once over `[total_tokens, hidden]`; attention
//! then works per sequence using the spans recorded here.

use crate::{ModelError, Result};

/// Identifies one sequence (one choice of one request) in a KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId(pub u64);

/// Where one sequence's tokens sit in a [`PackedBatch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqSpan {
    pub seq: SeqId,
    /// Index of this sequence's first token in the packed token list.
    pub offset: usize,
    /// Number of tokens this sequence contributes to this step (>= 1).
    pub len: usize,
    /// Position (in the sequence) of the first token contributed; equals the
    /// number of tokens of this sequence already in the KV cache.
    pub start_pos: usize,
}

/// Tokens of several sequences, packed for one forward pass.
#[derive(Debug, Clone, Default)]
pub struct PackedBatch {
    tokens: Vec<u32>,
    positions: Vec<u32>,
    spans: Vec<SeqSpan>,
}

impl PackedBatch {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `tokens` of sequence `seq`, the first of which is at position `start_pos`.
    /// A sequence may appear at most once per batch.
    pub fn push(&mut self, seq: SeqId, tokens: &[u32], start_pos: usize) -> Result<()> {
        if tokens.is_empty() {
            return Err(ModelError::InvalidBatch("a sequence contributes no tokens".into()));
        }
        if self.spans.iter().any(|s| s.seq == seq) {
            return Err(ModelError::InvalidBatch("a sequence appears twice in one batch".into()));
        }
        let offset = self.tokens.len();
        self.tokens.extend_from_slice(tokens);
        self.positions.extend((start_pos..start_pos + tokens.len()).map(|p| p as u32));
        self.spans.push(SeqSpan { seq, offset, len: tokens.len(), start_pos });
        Ok(())
    }

    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }
    pub fn positions(&self) -> &[u32] {
        &self.positions
    }
    pub fn spans(&self) -> &[SeqSpan] {
        &self.spans
    }
    pub fn num_tokens(&self) -> usize {
        self.tokens.len()
    }
    pub fn num_seqs(&self) -> usize {
        self.spans.len()
    }
    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_spans_and_positions() {
        let mut b = PackedBatch::new();
        b.push(SeqId(1), &[5, 6, 7], 0).unwrap();
        b.push(SeqId(2), &[9], 12).unwrap();
        assert_eq!(b.tokens(), &[5, 6, 7, 9]);
        assert_eq!(b.positions(), &[0, 1, 2, 12]);
        assert_eq!(b.spans()[1], SeqSpan { seq: SeqId(2), offset: 3, len: 1, start_pos: 12 });
        assert!(b.push(SeqId(1), &[1], 3).is_err());
        assert!(b.push(SeqId(3), &[], 0).is_err());
    }
}

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
    /// Sequences whose every position's logits the step returns (prompt
    /// scoring, `echo`), not only the last.
    every_position: Vec<SeqId>,
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

    /// Asks for the logits of every position `seq` contributes to this step
    /// (in order), where a step returns only each sequence's last by default.
    pub fn want_every_position(&mut self, seq: SeqId) {
        if !self.every_position.contains(&seq) {
            self.every_position.push(seq);
        }
    }

    /// How many logit rows a step returns for `span`: all its positions when
    /// asked for with [`Self::want_every_position`], else one (its last).
    pub fn logit_rows_of(&self, span: &SeqSpan) -> usize {
        if self.every_position.contains(&span.seq) {
            span.len
        } else {
            1
        }
    }

    /// The packed token indices whose logits the step returns, span by span.
    pub fn logit_rows(&self) -> Vec<u32> {
        let mut rows = Vec::with_capacity(self.spans.len());
        for s in &self.spans {
            let n = self.logit_rows_of(s);
            rows.extend((s.offset + s.len - n..s.offset + s.len).map(|i| i as u32));
        }
        rows
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

/// The span checks a KV cache (and `Model::forward`) makes before it touches
/// anything: every span continues its sequence exactly where the cache ends
/// (`start_pos == cached_len(seq)`), ends within `max_len` positions when a
/// limit is given, and lies inside the `packed_tokens` tokens of the step.
/// Errors name sequence ids, positions and counts, never token ids or text.
pub fn check_spans(
    spans: &[SeqSpan],
    packed_tokens: usize,
    max_len: Option<usize>,
    cached_len: impl Fn(SeqId) -> usize,
) -> Result<()> {
    for s in spans {
        let have = cached_len(s.seq);
        if s.start_pos != have {
            return Err(ModelError::InvalidBatch(format!(
                "sequence {} starts at position {} but {} tokens are cached",
                s.seq.0, s.start_pos, have
            )));
        }
        if let Some(limit) = max_len {
            if s.start_pos + s.len > limit {
                return Err(ModelError::ContextOverflow { needed: s.start_pos + s.len, limit });
            }
        }
        if s.offset + s.len > packed_tokens {
            return Err(ModelError::InvalidBatch("spans exceed the packed tokens".into()));
        }
    }
    Ok(())
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
        assert_eq!(b.logit_rows(), [2, 3], "the last position of each");
        b.want_every_position(SeqId(1));
        assert_eq!(b.logit_rows(), [0, 1, 2, 3]);
        assert_eq!((b.logit_rows_of(&b.spans()[0]), b.logit_rows_of(&b.spans()[1])), (3, 1));
        assert!(b.push(SeqId(3), &[], 0).is_err());
    }

    #[test]
    fn check_spans_names_the_problem() {
        let mut b = PackedBatch::new();
        b.push(SeqId(1), &[5, 6, 7], 4).unwrap();
        b.push(SeqId(2), &[9], 0).unwrap();
        let cached = |s: SeqId| if s == SeqId(1) { 4 } else { 0 };
        assert!(check_spans(b.spans(), b.num_tokens(), Some(8), cached).is_ok());
        assert!(check_spans(b.spans(), b.num_tokens(), None, cached).is_ok());
        // A gap (or a repeat) against the cache.
        let e = check_spans(b.spans(), b.num_tokens(), None, |_| 4).unwrap_err();
        assert!(matches!(e, ModelError::InvalidBatch(_)), "{e}");
        assert!(e.to_string().contains("sequence 2 starts at position 0 but 4"), "{e}");
        // Past the context limit.
        assert!(matches!(
            check_spans(b.spans(), b.num_tokens(), Some(6), cached),
            Err(ModelError::ContextOverflow { needed: 7, limit: 6 })
        ));
        // More span than packed tokens.
        let e = check_spans(b.spans(), 3, None, cached).unwrap_err();
        assert!(e.to_string().contains("spans exceed the packed tokens"), "{e}");
    }
}

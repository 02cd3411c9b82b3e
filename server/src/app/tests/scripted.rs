//! The engine and codec behind the router tests: a scripted engine that
//! replies with fixed words (and records what it was asked), and a codec
//! with one token per byte (test-only; not a product path).

use super::*;

/// What the engine saw of a request: (prompt length, n, seed, max_tokens).
pub(super) type Seen = (usize, usize, Option<u64>, usize);

/// Replies "Hello world" (two deltas) to every choice, or `max_tokens` words if fewer.
#[derive(Default)]
pub(super) struct ScriptedEngine {
    pub(super) seen: Mutex<Vec<Seen>>,
    pub(super) queue_full: AtomicBool,
    pub(super) cancels: Mutex<Vec<CancelToken>>,
    /// When set, sends one delta and then waits forever (for cancellation tests).
    pub(super) hang: AtomicBool,
    /// When set, every audit write fails from the moment a request is submitted
    /// (the completion record cannot be written).
    pub(super) break_audit_on_submit: Mutex<Option<AuditLog>>,
    /// The prefix-cache scope of every request, in order.
    pub(super) scopes: Mutex<Vec<PrefixScope>>,
    /// The decoding parameters of every request, in order.
    pub(super) decodes: Mutex<Vec<salus_models::DecodeParams>>,
    /// When set, every choice replies with these deltas instead of "Hello world".
    pub(super) reply: Mutex<Option<Vec<String>>>,
}

impl Engine for ScriptedEngine {
    fn submit(&self, r: GenerationRequest) -> Result<GenerationHandle, EngineError> {
        if self.queue_full.load(Ordering::Relaxed) {
            return Err(EngineError::QueueFull { retry_after: Duration::from_secs(3) });
        }
        let seed = r.decode.sampling.seed.map(|s| salus_models::choice_seed(s, r.first_choice));
        self.seen.lock().unwrap().push((r.prompt_tokens.expose().len(), r.n, seed, r.decode.max_tokens));
        self.scopes.lock().unwrap().push(r.prefix_scope.clone());
        self.decodes.lock().unwrap().push(r.decode.clone());
        if let Some(log) = &*self.break_audit_on_submit.lock().unwrap() {
            log.inject_write_failures(1_000_000);
        }
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let cancel = CancelToken::new();
        self.cancels.lock().unwrap().push(cancel.clone());
        let words: Vec<String> =
            self.reply.lock().unwrap().clone().unwrap_or_else(|| vec!["Hello".into(), " world".into()]);
        // Scheduled and sampled at once (the trace tests read the order).
        let admitted = std::time::Instant::now();
        let timing = ChoiceTiming { admitted: Some(admitted), first_token: Some(std::time::Instant::now()) };
        for choice in 0..r.n {
            if let Some(top) = r.prompt_logprobs {
                // Scores every prompt token after the first: -1, -2, … (ranks 1, 2, …)
                let ids = r.prompt_tokens.expose();
                let logprobs = ids[1..]
                    .iter()
                    .enumerate()
                    .map(|(i, &t)| {
                        // Alternatives: the next byte values, best first.
                        let top = (0..top as u32).map(|k| ((t + 1 + k) % 256, -0.5 - k as f32 / 10.0)).collect();
                        TokenLogprob { token_id: t, logprob: -(i as f32) - 1.0, top }
                    })
                    .collect();
                let ranks = (1..ids.len() as u32).collect();
                let _ = tx.send(GenerationEvent::PromptLogprobs { choice, logprobs, ranks });
            }
            let k = r.decode.max_tokens.min(words.len());
            for w in &words[..k] {
                let logprobs = match r.decode.sampling.top_logprobs {
                    Some(top) => vec![TokenLogprob {
                        token_id: u32::from(w.as_bytes()[0]),
                        logprob: -0.5,
                        top: [(72u32, -0.5f32), (74, -1.5)][..top.min(2)].to_vec(),
                    }],
                    None => Vec::new(),
                };
                let _ = tx.send(GenerationEvent::Delta { choice, text: Phi::new(w.to_string()), logprobs, tokens: 1 });
                if self.hang.load(Ordering::Relaxed) {
                    std::mem::forget(tx);
                    return Ok(GenerationHandle::new(rx, cancel));
                }
            }
            let reason = if k < words.len() { FinishReason::Length } else { FinishReason::Stop };
            // Every choice reports one prompt token from the prefix cache; the
            // API must count it once per prompt, not per choice.
            let cached_prompt_tokens = 1;
            let _ = tx.send(GenerationEvent::Finished {
                choice,
                reason,
                completion_tokens: k,
                cached_prompt_tokens,
                timing,
            });
        }
        Ok(GenerationHandle::new(rx, cancel))
    }
    fn stats(&self) -> EngineStats {
        EngineStats { waiting_seqs: 2, running_seqs: 1, ..Default::default() }
    }
    fn is_ready(&self) -> bool {
        true
    }
}

/// One token per byte; context 64. Panics on a message that is exactly "PANIC".
pub(super) struct ByteCodec;

impl PromptCodec for ByteCodec {
    fn context_length(&self) -> usize {
        64
    }
    fn vocab_size(&self) -> usize {
        256
    }
    /// The "template" is each role name followed by the content.
    fn encode_chat(&self, messages: &[ChatMessage], _template: &RenderOptions) -> Result<EncodedChat, PromptError> {
        let mut text = String::new();
        for m in messages {
            if m.content.expose().starts_with("PANIC") {
                panic!("test panic with request text {}", m.content.expose());
            }
            if m.content.expose() == "SLOW" {
                // A large prompt's tokenization: blocking CPU work.
                std::thread::sleep(Duration::from_millis(400));
            }
            text.push_str(m.role.as_str());
            text.push_str(m.content.expose());
        }
        let ids = text.bytes().map(u32::from).collect();
        Ok(EncodedChat { text: Phi::new(text), ids: Phi::new(ids) })
    }
    /// One token per byte (no BOS).
    fn tokenize(&self, text: &Phi<String>, _add_special_tokens: bool) -> Result<Phi<Vec<u32>>, PromptError> {
        Ok(Phi::new(text.expose().bytes().map(u32::from).collect()))
    }
    fn detokenize(&self, ids: &[u32]) -> Result<Phi<String>, PromptError> {
        Ok(Phi::new(ids.iter().map(|&id| char::from(id as u8)).collect()))
    }
    fn tokenizer_info(&self) -> crate::state::TokenizerInfo {
        crate::state::TokenizerInfo {
            bos_token: None,
            eos_token: Some("\u{0}".into()),
            chat_template: Some("{{ messages }}".into()),
        }
    }
    fn token_text(&self, id: u32) -> Phi<String> {
        Phi::new(char::from(id as u8).to_string())
    }
    fn max_bytes_per_token(&self) -> usize {
        1
    }
    /// Byte tokens; byte 0 ends the output.
    fn compile_constraint(
        &self,
        spec: &salus_models::ConstraintSpec,
    ) -> Result<salus_models::CompiledGrammar, salus_models::GrammarError> {
        let tokens = (0..=255u8).map(|b| if b == 0 { Vec::new() } else { vec![b] }).collect();
        salus_models::GrammarCompiler::from_token_bytes(tokens, 256, &[0])?.compile(spec)
    }
    fn tool_format(&self) -> Option<salus_models::tool_calls::ToolCallFormat> {
        Some(salus_models::tool_calls::ToolCallFormat::Hermes)
    }
    fn special_token_id(&self, _text: &str) -> Option<u32> {
        None
    }
}

//! Building a `tokenizers` pipeline from a GGUF file's `tokenizer.ggml.*`
//! metadata (a child module of `tokenizer`): reading the metadata, choosing
//! the pre-tokenizer family, and writing the equivalent `tokenizer.json` for
//! byte-level BPE (`gpt2`) and SentencePiece BPE (`llama`) vocabularies.

use super::*;

// ---------------------------------------------------------------------------
// GGUF metadata access

pub(super) fn md_str<'a>(md: &'a HashMap<String, Value>, key: &str) -> Option<&'a str> {
    match md.get(key)? {
        Value::String(s) => Some(s),
        _ => None,
    }
}

pub(super) fn md_u32(md: &HashMap<String, Value>, key: &str) -> Option<u32> {
    value_i64(md.get(key)?).and_then(|v| u32::try_from(v).ok())
}

pub(super) fn md_bool(md: &HashMap<String, Value>, key: &str) -> Option<bool> {
    match md.get(key)? {
        Value::Bool(b) => Some(*b),
        v => value_i64(v).map(|i| i != 0),
    }
}

pub(super) fn value_i64(v: &Value) -> Option<i64> {
    Some(match v {
        Value::U8(x) => *x as i64,
        Value::I8(x) => *x as i64,
        Value::U16(x) => *x as i64,
        Value::I16(x) => *x as i64,
        Value::U32(x) => *x as i64,
        Value::I32(x) => *x as i64,
        Value::U64(x) => i64::try_from(*x).ok()?,
        Value::I64(x) => *x,
        _ => return None,
    })
}

pub(super) fn md_array<'a>(md: &'a HashMap<String, Value>, key: &str) -> Result<&'a [Value]> {
    match md.get(key) {
        Some(Value::Array(a)) => Ok(a),
        Some(_) => Err(ModelError::Tokenizer(format!("GGUF {key} is not an array"))),
        None => Err(ModelError::Tokenizer(format!("GGUF metadata has no {key}"))),
    }
}

pub(super) fn md_str_array<'a>(md: &'a HashMap<String, Value>, key: &str) -> Result<Vec<&'a str>> {
    md_array(md, key)?
        .iter()
        .map(|v| match v {
            Value::String(s) => Ok(s.as_str()),
            _ => Err(ModelError::Tokenizer(format!("GGUF {key} holds a non-string entry"))),
        })
        .collect()
}

pub(super) fn md_int_array(md: &HashMap<String, Value>, key: &str) -> Result<Vec<i64>> {
    md_array(md, key)?
        .iter()
        .map(|v| value_i64(v).ok_or_else(|| ModelError::Tokenizer(format!("GGUF {key} holds a non-integer entry"))))
        .collect()
}

pub(super) fn md_f32_array(md: &HashMap<String, Value>, key: &str) -> Result<Vec<f32>> {
    md_array(md, key)?
        .iter()
        .map(|v| match v {
            Value::F32(x) => Ok(*x),
            Value::F64(x) => Ok(*x as f32),
            _ => Err(ModelError::Tokenizer(format!("GGUF {key} holds a non-float entry"))),
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Building tokenizer.json documents from GGUF metadata

/// Pre-tokenizer families of byte-level BPE vocabularies (llama.cpp's
/// `tokenizer.ggml.pre` names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PreFamily {
    /// GPT-2's regex.
    Gpt2,
    /// Every digit alone, then GPT-2's regex (StarCoder, SmolLM).
    DigitsGpt2,
    Llama3,
    Qwen2,
    Tekken,
}

pub(super) fn pre_family(pre: &str) -> Option<PreFamily> {
    Some(match pre {
        // llama.cpp's "default" applies an idiosyncratic set of regexes; the
        // vocabularies converted with it are GPT-2 style, so GPT-2's regex is used.
        "default" | "gpt-2" | "gpt2" | "phi-2" | "roberta-bpe" | "jina-es" | "jina-de" | "jina-v2-es"
        | "jina-v2-de" | "jina-v2-code" | "gigachat" | "mpt" | "olmo" | "jais" | "trillion" => PreFamily::Gpt2,
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => {
            PreFamily::DigitsGpt2
        }
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0" | "lfm2" | "dbrx"
        | "smaug-bpe" => PreFamily::Llama3,
        "qwen2" | "deepseek-r1-qwen" | "megrez" | "stablelm2" => PreFamily::Qwen2,
        "tekken" => PreFamily::Tekken,
        _ => return None,
    })
}

/// GPT-2's byte → printable character table.
pub(super) fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut extra = 0u32;
    for b in 0..256u32 {
        let printable = (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        table[b as usize] = if printable {
            char::from_u32(b).unwrap_or('\0')
        } else {
            extra += 1;
            char::from_u32(255 + extra).unwrap_or('\0')
        };
    }
    table
}

pub(super) fn added_tokens_json(tokens: &[&str], types: &[i64], include: impl Fn(usize) -> bool) -> Vec<Json> {
    let mut out = Vec::new();
    for (id, (tok, &ty)) in tokens.iter().zip(types).enumerate() {
        let special = ty == TOKEN_TYPE_CONTROL;
        if (special || ty == TOKEN_TYPE_USER_DEFINED) && include(id) {
            out.push(json!({
                "id": id, "content": tok, "single_word": false, "lstrip": false, "rstrip": false,
                "normalized": false, "special": special,
            }));
        }
    }
    out
}

pub(super) fn vocab_json<'a>(
    tokens: impl Iterator<Item = (usize, std::borrow::Cow<'a, str>)>,
) -> JsonMap<String, Json> {
    let mut vocab = JsonMap::new();
    for (id, tok) in tokens {
        // Duplicate entries (rare, seen in a few converted vocabularies): the first id wins.
        if !vocab.contains_key(tok.as_ref()) {
            vocab.insert(tok.into_owned(), json!(id));
        }
    }
    vocab
}

pub(super) fn byte_level_json(md: &HashMap<String, Value>, tokens: &[&str], types: &[i64], pre: &str) -> Result<Json> {
    let family =
        pre_family(pre).ok_or_else(|| ModelError::Tokenizer(format!("unsupported GGUF pre-tokenizer '{pre}'")))?;
    let table = bytes_to_unicode();
    let alphabet: HashSet<char> = table.iter().copied().collect();
    // Tokens are stored in the byte-level spelling; a token using other characters
    // is respelled byte by byte (as transformers' GGUF loader does).
    let spelled = tokens.iter().enumerate().map(|(id, t)| {
        if t.chars().all(|c| alphabet.contains(&c)) {
            (id, std::borrow::Cow::Borrowed(*t))
        } else {
            (id, std::borrow::Cow::Owned(t.bytes().map(|b| table[b as usize]).collect::<String>()))
        }
    });
    let vocab = vocab_json(spelled);
    let merges: Vec<Json> = md_str_array(md, "tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| {
            let (a, b) = m
                .split_once(' ')
                .ok_or_else(|| ModelError::Tokenizer("GGUF tokenizer.ggml.merges holds a malformed merge".into()))?;
            Ok(json!([a, b]))
        })
        .collect::<Result<_>>()?;
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split = |pattern: &str| json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false});
    let pre_tokenizer = match family {
        PreFamily::Gpt2 => byte_level(true),
        PreFamily::DigitsGpt2 => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
        PreFamily::Llama3 => {
            json!({"type": "Sequence", "pretokenizers": [split(LLAMA3_SPLIT), byte_level(false)]})
        }
        PreFamily::Qwen2 => {
            json!({"type": "Sequence", "pretokenizers": [split(QWEN2_SPLIT), byte_level(false)]})
        }
        PreFamily::Tekken => {
            json!({"type": "Sequence", "pretokenizers": [split(TEKKEN_SPLIT), byte_level(false)]})
        }
    };
    let ignore_merges = matches!(family, PreFamily::Llama3 | PreFamily::Tekken);
    // Control tokens whose text is not byte-level spelled would not be reachable
    // by BPE anyway; they are added as special tokens like all control tokens.
    let added = added_tokens_json(tokens, types, |_| true);
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": ignore_merges, "vocab": vocab, "merges": merges,
        },
    }))
}

pub(super) fn sentencepiece_json(
    md: &HashMap<String, Value>,
    tokens: &[&str],
    types: &[i64],
    unk: Option<u32>,
    add_space_prefix: bool,
) -> Result<Json> {
    let scores = match md.get("tokenizer.ggml.scores") {
        Some(_) => md_f32_array(md, "tokenizer.ggml.scores")?,
        // Without scores, earlier tokens are assumed to merge first.
        None => (0..tokens.len()).map(|i| -(i as f32)).collect(),
    };
    if scores.len() != tokens.len() {
        return Err(ModelError::Tokenizer(
            "GGUF tokenizer.ggml.scores and tokenizer.ggml.tokens differ in length".into(),
        ));
    }
    let vocab = vocab_json(tokens.iter().enumerate().map(|(i, t)| (i, std::borrow::Cow::Borrowed(*t))));
    let merges = match md.get("tokenizer.ggml.merges") {
        Some(_) => md_str_array(md, "tokenizer.ggml.merges")?
            .into_iter()
            .filter_map(|m| m.split_once(' ').map(|(a, b)| json!([a, b])))
            .collect(),
        None => sentencepiece_merges(tokens, &scores),
    };
    let unk_token = unk
        .map(|i| tokens[i as usize])
        .or_else(|| tokens.iter().zip(types).find(|(_, &t)| t == TOKEN_TYPE_UNKNOWN).map(|(s, _)| *s));
    // Like llama.cpp (and SentencePiece's add_dummy_prefix): a space is prepended
    // to every text segment — the start of the text and the text after each
    // special token — and spaces become "▁". (Hugging Face's Metaspace
    // pre-tokenizer differs: it does not add a second "▁" to text that already
    // starts with a space.)
    let mut normalizers = Vec::new();
    if add_space_prefix {
        normalizers.push(json!({"type": "Prepend", "prepend": "\u{2581}"}));
    }
    normalizers.push(json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}));
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if add_space_prefix {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens_json(tokens, types, |_| true),
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": null,
        "post_processor": null,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": unk_token, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
            "vocab": vocab, "merges": merges,
        },
    }))
}

/// Recovers BPE merges from a SentencePiece vocabulary: every split of a token
/// into two vocabulary tokens is a merge, ranked by the merged token's score
/// (higher first), then by the longer left and right part — the order
/// transformers' `generate_merges` produces.
pub(super) fn sentencepiece_merges(tokens: &[&str], scores: &[f32]) -> Vec<Json> {
    let mut ids: HashMap<&str, usize> = HashMap::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        ids.insert(t, i); // last occurrence wins, like a Python dict
    }
    let mut merges: Vec<(&str, &str, f32, usize, usize)> = Vec::new();
    let mut seen_merged = HashSet::new();
    // Iterate in the order a Python dict built from the vocabulary would.
    for (i, tok) in tokens.iter().enumerate() {
        if ids.get(tok) != Some(&i) || !seen_merged.insert(*tok) {
            continue;
        }
        let mut local = Vec::new();
        for (split, _) in tok.char_indices().skip(1) {
            let (l, r) = tok.split_at(split);
            if let (Some(&li), Some(&ri)) = (ids.get(l), ids.get(r)) {
                local.push((l, r, scores[i], li, ri));
            }
        }
        local.sort_by_key(|m| (m.3, m.4));
        merges.extend(local);
    }
    // Stable sort, descending on (score, chars(left), chars(right)).
    merges.sort_by(|a, b| {
        b.2.total_cmp(&a.2)
            .then_with(|| b.0.chars().count().cmp(&a.0.chars().count()))
            .then_with(|| b.1.chars().count().cmp(&a.1.chars().count()))
    });
    merges.into_iter().map(|(l, r, ..)| json!([l, r])).collect()
}

use super::*;
use crate::decoder::{ChoiceDecoder, DecodeParams, FinishReason};
use crate::sampling::SamplingParams;
use crate::tokenizer::tests::tiny_spm_metadata;
use rand::{Rng, SeedableRng};

fn tokenizer() -> Tokenizer {
    Tokenizer::from_gguf_metadata(&tiny_spm_metadata()).unwrap()
}

const EOS: u32 = 2;

fn compiler(t: &Tokenizer) -> GrammarCompiler {
    GrammarCompiler::new(t, t.vocab_size(), &[EOS]).unwrap()
}

fn schema(s: serde_json::Value) -> ConstraintSpec {
    ConstraintSpec::JsonSchema { schema: Phi::new(s.to_string()), whitespace_pattern: None }
}

/// Decodes one choice under `spec` from random logits (a model that knows
/// nothing): whatever it picks, the grammar keeps the text valid.
fn decode(spec: &ConstraintSpec, seed: u64, temperature: f32, max_tokens: usize) -> (String, Option<FinishReason>) {
    let t = tokenizer();
    let g = Arc::new(compiler(&t).compile(spec).unwrap());
    let vocab = t.vocab_size();
    let params = DecodeParams {
        sampling: SamplingParams { temperature, seed: Some(seed), ..SamplingParams::default() },
        max_tokens,
        constraint: Some(g),
        ..DecodeParams::default()
    };
    let mut d = ChoiceDecoder::new(&params, 0, &[EOS], vocab).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut context = vec![1u32];
    let mut text = String::new();
    loop {
        let logits: Vec<f32> = (0..vocab).map(|_| rng.random_range(-3.0..3.0)).collect();
        let s = d.step(&t, &logits, &context, 1).unwrap();
        text.push_str(s.text.expose());
        if let Some(n) = s.next_token() {
            context.push(n);
        }
        if s.finished.is_some() {
            return (text, s.finished);
        }
    }
}

#[test]
fn random_logits_under_a_schema_give_valid_json() {
    let spec = schema(serde_json::json!({
        "type": "object",
        "properties": {
            "dose_mg": {"type": "integer", "minimum": 1, "maximum": 500},
            "route": {"enum": ["oral", "iv"]},
            "prn": {"type": "boolean"}
        },
        "required": ["dose_mg", "route", "prn"],
        "additionalProperties": false
    }));
    for seed in 0..12 {
        let (text, reason) = decode(&spec, seed, 1.0, 200);
        assert_eq!(reason, Some(FinishReason::Stop), "seed {seed}: {text:?}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("seed {seed}: {e}: {text:?}"));
        let dose = v["dose_mg"].as_i64().unwrap();
        assert!((1..=500).contains(&dose), "{text}");
        assert!(["oral", "iv"].contains(&v["route"].as_str().unwrap()), "{text}");
        assert!(v["prn"].is_boolean(), "{text}");
        assert_eq!(v.as_object().unwrap().len(), 3, "{text}");
    }
}

#[test]
fn choice_and_regex_outputs_match_exactly() {
    let choices = ["urgent", "routine", "needs review"];
    let spec = ConstraintSpec::Choice(choices.iter().map(|c| Phi::new(c.to_string())).collect());
    for seed in 0..20 {
        let (text, reason) = decode(&spec, seed, 1.0, 50);
        assert!(choices.contains(&text.as_str()), "{text:?}");
        assert_eq!(reason, Some(FinishReason::Stop));
    }
    let rx = regex_syntax::escape("BP ") + "[0-9]{2,3}/[0-9]{2,3}";
    let spec = ConstraintSpec::Regex(Phi::new(rx));
    for seed in 0..20 {
        let (text, _) = decode(&spec, seed, 1.0, 50);
        let (sys, dia) = text.strip_prefix("BP ").unwrap().split_once('/').unwrap();
        assert!((2..=3).contains(&sys.len()) && (2..=3).contains(&dia.len()), "{text:?}");
        assert!(sys.bytes().chain(dia.bytes()).all(|b| b.is_ascii_digit()), "{text:?}");
    }
}

#[test]
fn lark_grammar_and_json_object() {
    let spec = ConstraintSpec::Grammar(Phi::new("start: \"Dose: \" NUM \" mg\"\nNUM: /[1-9][0-9]{0,2}/".into()));
    for seed in 0..10 {
        let (text, reason) = decode(&spec, seed, 1.0, 50);
        let n = text.strip_prefix("Dose: ").and_then(|t| t.strip_suffix(" mg")).unwrap_or_else(|| panic!("{text:?}"));
        assert!(n.parse::<u32>().is_ok_and(|n| (1..1000).contains(&n)), "{text:?}");
        assert_eq!(reason, Some(FinishReason::Stop));
    }
    for seed in 0..6 {
        let (text, reason) = decode(&ConstraintSpec::JsonObject, seed, 1.0, 400);
        if reason == Some(FinishReason::Stop) {
            assert!(serde_json::from_str::<serde_json::Value>(&text).unwrap().is_object(), "{text:?}");
        } else {
            assert!(text.starts_with('{'), "{text:?}");
        }
    }
}

#[test]
fn max_tokens_first_is_length() {
    let spec =
        schema(serde_json::json!({"type": "object", "properties": {"note": {"type": "string"}}, "required": ["note"]}));
    let (text, reason) = decode(&spec, 3, 1.0, 4);
    assert_eq!(reason, Some(FinishReason::Length));
    assert!(text.starts_with('{'), "{text:?}");
}

#[test]
fn recursive_refs_compile_and_hold() {
    let spec = schema(serde_json::json!({
        "$defs": {"node": {"type": "object", "properties": {
            "v": {"type": "integer", "minimum": 0, "maximum": 9},
            "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2}
        }, "required": ["v"], "additionalProperties": false}},
        "$ref": "#/$defs/node"
    }));
    fn valid(v: &serde_json::Value) -> bool {
        let o = v.as_object().unwrap();
        o["v"].as_i64().is_some_and(|n| (0..=9).contains(&n))
            && o.get("kids").is_none_or(|k| k.as_array().unwrap().len() <= 2 && k.as_array().unwrap().iter().all(valid))
    }
    let mut finished = 0;
    for seed in 0..10 {
        let (text, reason) = decode(&spec, seed, 1.0, 400);
        if reason == Some(FinishReason::Stop) {
            finished += 1;
            assert!(valid(&serde_json::from_str(&text).unwrap()), "{text:?}");
        }
    }
    assert!(finished >= 5, "{finished}");
}

#[test]
fn refusals_name_the_problem_without_quoting_the_constraint() {
    let t = tokenizer();
    let c = compiler(&t);
    let canary = "CANARY-Jane-Roe-0427";
    let e =
        c.compile(&schema(serde_json::json!({"enum": [canary], "description": canary, "contains": {}}))).unwrap_err();
    assert_eq!(e, GrammarError::UnsupportedKeyword { keyword: "contains", pointer: "#".into() });
    let cases = [
        ConstraintSpec::JsonSchema { schema: Phi::new(format!("{{\"enum\": [\"{canary}\"")), whitespace_pattern: None },
        ConstraintSpec::Regex(Phi::new(format!("({canary}"))),
        ConstraintSpec::Grammar(Phi::new(format!("start: {canary} ::= ("))),
        ConstraintSpec::Choice(vec![]),
        schema(serde_json::json!({"type": "integer", "minimum": 5, "maximum": 1, "description": canary})),
    ];
    for spec in &cases {
        let e = c.compile(spec).unwrap_err();
        assert!(!e.to_string().contains("CANARY"), "{e}");
    }
    assert_eq!(
        c.compile(&cases[0]).unwrap_err(),
        GrammarError::InvalidSchema { pointer: "#".into(), problem: "not valid JSON" }
    );
    assert!(matches!(c.compile(&cases[1]).unwrap_err(), GrammarError::InvalidRegex { .. }));
    assert_eq!(c.compile(&cases[2]).unwrap_err(), GrammarError::InvalidGrammar);
}

#[test]
fn canonical_texts() {
    assert_eq!(ConstraintSpec::JsonObject.canonical_text().expose(), "");
    let c = ConstraintSpec::Choice(vec![Phi::new("a".into()), Phi::new("b\"".into())]);
    assert_eq!(c.canonical_text().expose(), r#"["a","b\""]"#);
    let s =
        ConstraintSpec::JsonSchema { schema: Phi::new("{}".into()), whitespace_pattern: Some(Phi::new(" ?".into())) };
    assert_eq!(s.canonical_text().expose(), "{}\n ?");
}

/// Our keyword lists agree with the pinned llguidance: every keyword we refuse
/// it would refuse or ignore (never enforce), every keyword we let through it
/// compiles, and no annotation changes what it accepts.
#[test]
fn keyword_lists_agree_with_llguidance() {
    use super::schema_check::{ANNOTATIONS, ENFORCED, UNSUPPORTED};
    let t = tokenizer();
    let c = compiler(&t);
    let mut needless = Vec::new();
    for kw in UNSUPPORTED.iter().filter(|k| **k != "x-guidance") {
        assert!(!ENFORCED.contains(kw) && !ANNOTATIONS.contains(kw), "{kw}");
        // Straight to llguidance, past our check: it must refuse it too.
        let g = TopLevelGrammar::from_json_schema(serde_json::json!({ "type": "string", *kw: {} }));
        if c.factory.create_parser(g).is_ok() {
            needless.push(*kw);
        }
    }
    assert!(needless.is_empty(), "llguidance accepts {needless:?}: refusing them is needless");
    let sample = |kw: &str| -> serde_json::Value {
        match kw {
            "anyOf" | "oneOf" | "allOf" | "prefixItems" => serde_json::json!([{"type": "string"}]),
            "$ref" => serde_json::json!("#/$defs/x"),
            "const" => serde_json::json!("a"),
            "enum" => serde_json::json!(["a"]),
            "type" => serde_json::json!("string"),
            "items" | "additionalItems" | "additionalProperties" => serde_json::json!({"type": "string"}),
            "properties" | "patternProperties" => serde_json::json!({"a": {"type": "string"}}),
            "required" => serde_json::json!(["a"]),
            "pattern" => serde_json::json!("a+"),
            "format" => serde_json::json!("date"),
            "multipleOf" => serde_json::json!(2),
            _ => serde_json::json!(3),
        }
    };
    for kw in ENFORCED {
        let s = serde_json::json!({ *kw: sample(kw), "$defs": {"x": {"type": "string"}} });
        c.compile(&schema(s)).unwrap_or_else(|e| panic!("{kw}: {e}"));
    }
    for kw in ANNOTATIONS {
        let value = match *kw {
            "$defs" | "definitions" => serde_json::json!({}),
            "examples" => serde_json::json!(["x"]),
            "readOnly" | "writeOnly" => serde_json::json!(true),
            "$schema" => serde_json::json!("https://json-schema.org/draft/2020-12/schema"),
            _ => serde_json::json!("x"),
        };
        c.compile(&schema(serde_json::json!({ "type": "string", *kw: value }))).unwrap_or_else(|e| panic!("{kw}: {e}"));
    }
    for draft in [
        "http://json-schema.org/draft-04/schema#",
        "http://json-schema.org/draft-06/schema#",
        "http://json-schema.org/draft-07/schema#",
        "https://json-schema.org/draft/2019-09/schema",
    ] {
        c.compile(&schema(serde_json::json!({ "type": "string", "$schema": draft })))
            .unwrap_or_else(|e| panic!("{draft}: {e}"));
    }
}

/// Whether `grammar` accepts exactly `text`, fed byte by byte (the tiny
/// tokenizer's byte tokens `<0xXX>` are ids 3 + byte), then the end.
fn accepts(g: &CompiledGrammar, t: &Tokenizer, text: &str) -> bool {
    let mut m = g.matcher();
    for id in text.bytes().map(|b| t.token_to_id(&format!("<0x{b:02X}>")).unwrap()) {
        if !m.allows(id).unwrap() {
            return false;
        }
        m.commit(id).unwrap();
    }
    m.is_accepting().unwrap()
}

/// Regression: llguidance's `date` format accepted February 29 of any year
/// (2023-02-29), which date parsers and JSON Schema validators refuse.
#[test]
fn date_formats_know_leap_years() {
    let t = tokenizer();
    let c = compiler(&t);
    let date = c.compile(&schema(serde_json::json!({"type": "string", "format": "date"}))).unwrap();
    for ok in ["2024-02-29", "2000-02-29", "1999-12-31", "2023-02-28", "0001-01-01"] {
        assert!(accepts(&date, &t, &format!("\"{ok}\"")), "{ok} refused");
    }
    for bad in ["2023-02-29", "1900-02-29", "2023-04-31", "2023-13-01", "0000-01-01", "2023-1-01"] {
        assert!(!accepts(&date, &t, &format!("\"{bad}\"")), "{bad} accepted");
    }
    let dt = c.compile(&schema(serde_json::json!({"type": "string", "format": "date-time", "pattern": "^2"}))).unwrap();
    assert!(accepts(&dt, &t, "\"2024-02-29T12:30:05.5Z\""));
    assert!(accepts(&dt, &t, "\"2021-07-01T00:00:00+02:00\""));
    assert!(!accepts(&dt, &t, "\"2023-02-29T12:30:05Z\""), "an impossible date-time");
    assert!(!accepts(&dt, &t, "\"1999-01-01T00:00:00Z\""), "the schema's own pattern still holds");
    assert!(!accepts(&dt, &t, "\"2024-01-01T24:00:00Z\""));
}

/// A grammar that no token can continue fails its choice with a clear error
/// (the worker then fails that request only), never a panic or a bad token.
#[test]
fn a_grammar_no_token_can_follow_fails_the_choice() {
    // A vocabulary without the letter z.
    let tokens: Vec<Vec<u8>> = (0..128u8).map(|b| if b == b'z' || b == 0 { Vec::new() } else { vec![b] }).collect();
    let c = GrammarCompiler::from_token_bytes(tokens, 128, &[0]).unwrap();
    let g = Arc::new(c.compile(&ConstraintSpec::Regex(Phi::new("az".into()))).unwrap());
    let t = tokenizer();
    let params = DecodeParams { constraint: Some(g), max_tokens: 10, ..DecodeParams::default() };
    let mut d = ChoiceDecoder::new(&params, 0, &[0], 128).unwrap();
    let logits = vec![0.0f32; 128];
    let s = d.step(&t, &logits, &[1], 1).unwrap();
    assert_eq!(s.token, Some(u32::from(b'a')));
    let e = d.step(&t, &logits, &[1, 97], 1).unwrap_err();
    assert!(matches!(e, crate::ModelError::Grammar(GrammarError::Runtime)), "{e}");
}

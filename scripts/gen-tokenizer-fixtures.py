#!/usr/bin/env python3
"""Generate the reference token ids for the default model's tokenizer.

Writes models/tests/fixtures/smollm2_tokenizer_ids.json, which the Rust test
models/tests/tokenizer_smollm2.rs compares against.

No model hub is contacted. The reference ids come from an implementation that
shares no code with ours (ours builds a Hugging Face `tokenizers` pipeline in
Rust from the GGUF metadata):

  1. PRIMARY: a from-scratch Python port of llama.cpp's tokenization of a
     `gpt2`-model / `smollm`-pre vocabulary, reading the vocabulary and merges
     from the GGUF with the `gguf` package:
       - split out control tokens written in the text (longest match first);
       - pre-tokenize with llama.cpp's regexes for the smollm pre-type:
         first every digit alone (\\p{N}), then GPT-2's regex — using the
         `regex` module, not Oniguruma;
       - GPT-2 byte-to-unicode mapping, then BPE by merge rank.
  2. CHECK: known ids of SmolLM2's own Hugging Face tokenizer for a few strings
     (the ids published for this vocabulary), asserted below.
  3. CHECK: transformers' own GGUF tokenizer conversion
     (transformers.integrations.gguf.gguf_tokenizer_mapping.convert_gguf_tokenizer).
     transformers does not know the `smollm` pre-tokenizer and falls back to
     GPT-2's (which does not split digits), so it is only required to agree on
     strings without digits; disagreements on digit strings are printed.

Usage: pip install gguf regex tokenizers transformers
       python3 scripts/gen-tokenizer-fixtures.py [path/to/SmolLM2-135M-Instruct.Q4_1.gguf]
"""

import hashlib
import json
import os
import sys

import regex
from gguf import GGUFReader

DEFAULT_MODEL = os.path.expanduser("~/.cache/salus/models/SmolLM2-135M-Instruct.Q4_1.gguf")
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "models", "tests", "fixtures",
                   "smollm2_tokenizer_ids.json")

TEXTS = [
    "Hello world! 123",
    "12345",
    "3.14159 and 2,718 and 1/2 and -42",
    "Phone: 555-0199, MRN 00012345",
    "Hello, world. How's it going? I'm fine; you're great!",
    "!!! ??? ... --- ((())) [x] {y} <z> @#$%^&*_+=|\\~`",
    "café naïve résumé Ångström façade",
    "Über Größe straße",
    "患者は高血圧です。",
    "血压正常，心率72次/分。",
    "한국어 텍스트",
    "Здравствуйте, пациент",
    "مرحبا بالعالم",
    "emoji 😀👍🏽 ❤️ 🫀🩺 done",
    "family: 👨‍👩‍👧",
    "   leading spaces",
    "trailing spaces   ",
    "multiple     inner   spaces",
    "line one\nline two\n\nline four\n",
    "\r\nwindows\r\nnewlines",
    "tabs\tand\t\tmore tabs\t",
    "\n\n\n",
    " ",
    "BP 120/80 mmHg, SpO2 98%",
    "Pt c/o SOB x3d; hx of T2DM, HTN.",
    "Rx: metformin 500 mg PO BID; lisinopril 10mg qd",
    "HbA1c 7.2% (ref <5.7%), eGFR >60 mL/min/1.73m²",
    "Temp 38.5°C, HR 110 bpm, RR 22/min",
    "ICD-10 E11.9; CPT 99213",
    "DOB 1957-03-14, age 67 y/o",
    "<|im_start|>user\nWhat is hypertension?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n",
    "text<|endoftext|>more",
    "<|im_start|><|im_end|>",
    "def f(x):\n    return x ** 2  # square",
    "URL https://example.org/a?b=1&c=2",
    "MixedCASE camelCase snake_case SCREAMING",
    "don't can't won't they'll I've we'd",
    "e.g. i.e. etc. vs.",
    "",
]

# Published ids of SmolLM2's Hugging Face tokenizer for a few strings.
KNOWN = {
    "Hello world! 123": [19556, 905, 17, 216, 33, 34, 35],
    "Hello, we can use": [19556, 28, 392, 416, 722],
    "Café déjà vu.": [51, 1939, 2756, 32564, 90, 16739, 386, 101, 30],
    "  multiple   spaces": [216, 2701, 256, 5600],
    "\n": [198],
}

GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def field_strings(reader, key):
    f = reader.fields[key]
    return [bytes(f.parts[i]).decode("utf-8") for i in f.data]


def field_ints(reader, key):
    f = reader.fields[key]
    return [int(f.parts[i][0]) for i in f.data]


def field_scalar(reader, key):
    f = reader.fields.get(key)
    if f is None:
        return None
    v = f.parts[f.data[0]]
    try:
        return bytes(v).decode("utf-8")
    except Exception:
        return v.tolist()[0]


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class LlamaCppStyleBpe:
    """llama.cpp's gpt2-model tokenization for the smollm pre-type, in Python."""

    def __init__(self, tokens, types, merges):
        self.vocab = {}
        for i, t in enumerate(tokens):
            self.vocab.setdefault(t, i)
        self.ranks = {tuple(m.split(" ", 1)): r for r, m in enumerate(merges)}
        self.control = sorted((t for t, ty in zip(tokens, types) if ty == 3), key=len, reverse=True)
        self.b2u = bytes_to_unicode()

    def split_special(self, text):
        out, i, start = [], 0, 0
        while i < len(text):
            for c in self.control:
                if text.startswith(c, i):
                    if start < i:
                        out.append((False, text[start:i]))
                    out.append((True, c))
                    i += len(c)
                    start = i
                    break
            else:
                i += 1
        if start < len(text):
            out.append((False, text[start:]))
        return out

    @staticmethod
    def pre_tokenize(text):
        # Regex 1: every digit isolated; regex 2: GPT-2's, applied to the rest.
        pieces = []
        pos = 0
        for m in regex.finditer(r"\p{N}", text):
            if m.start() > pos:
                pieces.append(text[pos:m.start()])
            pieces.append(m.group())
            pos = m.end()
        if pos < len(text):
            pieces.append(text[pos:])
        words = []
        for p in pieces:
            if regex.fullmatch(r"\p{N}", p):
                words.append(p)
                continue
            pos = 0
            for m in regex.finditer(GPT2_SPLIT, p):
                if m.start() > pos:
                    words.append(p[pos:m.start()])
                words.append(m.group())
                pos = m.end()
            if pos < len(p):
                words.append(p[pos:])
        return words

    def bpe(self, word):
        symbols = [self.b2u[b] for b in word.encode("utf-8")]
        while len(symbols) > 1:
            best, best_rank = None, None
            for i in range(len(symbols) - 1):
                r = self.ranks.get((symbols[i], symbols[i + 1]))
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = i, r
            if best is None:
                break
            pair = (symbols[best], symbols[best + 1])
            merged, i = [], 0
            while i < len(symbols):
                if i < len(symbols) - 1 and (symbols[i], symbols[i + 1]) == pair:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return [self.vocab[s] for s in symbols]

    def encode(self, text):
        ids = []
        for special, part in self.split_special(text):
            if special:
                ids.append(self.vocab[part])
            else:
                for w in self.pre_tokenize(part):
                    ids.extend(self.bpe(w))
        return ids


def transformers_reference(reader, tokens, types, merges):
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer
    except Exception as e:  # transformers missing or changed
        print(f"note: transformers GGUF conversion unavailable ({e}); skipping that check", file=sys.stderr)
        return None
    d = {
        "tokenizer_type": field_scalar(reader, "tokenizer.ggml.model"),
        "pre_tokenizer_type": field_scalar(reader, "tokenizer.ggml.pre"),
        "tokens": tokens,
        "token_type": types,
        "merges": merges,
    }
    backend, _ = convert_gguf_tokenizer(field_scalar(reader, "general.architecture"), d)
    return lambda text: backend.encode(text, add_special_tokens=False).ids


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else DEFAULT_MODEL
    with open(path, "rb") as f:
        sha256 = hashlib.sha256(f.read()).hexdigest()
    reader = GGUFReader(path)
    assert field_scalar(reader, "tokenizer.ggml.model") == "gpt2"
    assert field_scalar(reader, "tokenizer.ggml.pre") == "smollm"
    tokens = field_strings(reader, "tokenizer.ggml.tokens")
    types = field_ints(reader, "tokenizer.ggml.token_type")
    merges = field_strings(reader, "tokenizer.ggml.merges")
    ref = LlamaCppStyleBpe(tokens, types, merges)

    for text, ids in KNOWN.items():
        got = ref.encode(text)
        assert got == ids, f"reference implementation disagrees with published ids for {text!r}: {got} != {ids}"

    hf = transformers_reference(reader, tokens, types, merges)
    agree = differ = 0
    cases = []
    for text in list(dict.fromkeys(TEXTS + list(KNOWN))):
        ids = ref.encode(text)
        # Every id decodes back to the text (byte-level BPE is lossless).
        u2b = {v: k for k, v in bytes_to_unicode().items()}
        decoded = b"".join(
            tokens[i].encode() if types[i] == 3 else bytes(u2b[c] for c in tokens[i]) for i in ids
        ).decode("utf-8")
        assert decoded == text, f"round trip failed for {text!r}"
        if hf is not None:
            hf_ids = hf(text)
            if hf_ids == ids:
                agree += 1
            else:
                differ += 1
                has_digit = regex.search(r"\p{N}", text) is not None
                print(f"transformers differs on {text!r} (digits: {has_digit})", file=sys.stderr)
                assert has_digit, "transformers may only differ on strings with digits (digit pre-tokenizer)"
        cases.append({"text": text, "ids": ids})

    out = {
        "model_file": os.path.basename(path),
        "model_sha256": sha256,
        "reference": "scripts/gen-tokenizer-fixtures.py: Python port of llama.cpp gpt2/smollm tokenization "
                     "(regex module + GPT-2 BPE by merge rank), checked against published SmolLM2 ids "
                     "and transformers' GGUF tokenizer conversion (non-digit strings)",
        "add_special_tokens": False,
        "cases": cases,
    }
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"wrote {len(cases)} cases to {os.path.normpath(OUT)}; transformers agrees on {agree}, differs on {differ}")


if __name__ == "__main__":
    main()

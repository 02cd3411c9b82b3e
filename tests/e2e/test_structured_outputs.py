"""End-to-end checks of structured outputs (constrained decoding) with the official openai SDK.

Run by scripts/e2e.sh against the real `salus serve`, like test_openai_sdk.py, with:
SALUS_E2E_BASE, SALUS_E2E_CA, SALUS_E2E_MODEL, SALUS_E2E_KEY.
Prints one PASS/FAIL line per check; exits 1 if any check failed.

Needs, in the e2e virtualenv: `openai` (and the `pydantic` it depends on, for the SDK's
`.parse()` helpers) and `jsonschema>=4.18`, which scripts/e2e.sh installs. Outputs are
validated with jsonschema's Draft202012Validator and Draft202012Validator.FORMAT_CHECKER;
when jsonschema's optional `rfc3339-validator` is absent (it is not installed by default,
and without it jsonschema skips "date-time" and "time"), those two formats are checked by
the RFC 3339 functions below instead of being skipped.

The model (SmolLM2-135M-Instruct) is far too small to follow a schema unaided: a valid
output is the constraint's doing. A "length" output (max_tokens came before the grammar
completed) is a prefix and is not required to be valid; every "stop" output must be valid,
and at temperature 0 at least MIN_STOP_SHARE_T0 of the outputs must be "stop". Requests
run concurrently (the server batches them); temperature-1 requests carry a seed, so a
failure reproduces. Every prompt and output is synthetic: failures print them.
"""

import datetime
import functools
import json
import os
import re
import ssl
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from enum import Enum
from typing import List, Literal, Optional

import httpx
import openai
from jsonschema import Draft202012Validator, FormatChecker
from pydantic import BaseModel, Field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from structured_schemas import BY_NAME, SCHEMAS  # noqa: E402

BASE = os.environ["SALUS_E2E_BASE"]
CA = os.environ["SALUS_E2E_CA"]
MODEL = os.environ["SALUS_E2E_MODEL"]
KEY = os.environ["SALUS_E2E_KEY"]

CTX = ssl.create_default_context(cafile=CA)
WORKERS = 8
MAX_TOKENS = 400
MIN_STOP_SHARE_T0 = 0.9
# At temperature 1 a tiny model may wander (long whitespace runs, deep recursion): only a
# loose floor, to catch a grammar that never lets the sequence end.
MIN_STOP_SHARE_T1 = 0.5
# Placed in enum values and descriptions of refused schemas: must never come back.
CANARY = "zqcanary7319"


def client(key=KEY, **kw):
    # A long timeout: with WORKERS requests in flight each one shares the batch.
    return openai.OpenAI(
        base_url=f"{BASE}/v1", api_key=key, max_retries=0, timeout=300,
        http_client=httpx.Client(verify=CTX), **kw)


C = client()


# --- validation ------------------------------------------------------------------------------

_RFC3339_TIME = re.compile(r"(\d{2}):(\d{2}):(\d{2})(\.\d+)?([Zz]|[+-](\d{2}):(\d{2}))")


def _rfc3339_time(value):
    m = _RFC3339_TIME.fullmatch(value)
    if not m:
        raise ValueError("not an RFC 3339 full-time")
    hh, mm, ss = int(m.group(1)), int(m.group(2)), int(m.group(3))
    if hh > 23 or mm > 59 or ss > 60:
        raise ValueError("time out of range")
    if m.group(6) is not None and (int(m.group(6)) > 23 or int(m.group(7)) > 59):
        raise ValueError("offset out of range")
    return True


def _rfc3339_date_time(value):
    if len(value) < 11 or value[10] not in "Tt":
        raise ValueError("not an RFC 3339 date-time")
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", value[:10]):
        raise ValueError("not an RFC 3339 full-date")
    datetime.date.fromisoformat(value[:10])  # ValueError on 2023-02-30 and the like
    return _rfc3339_time(value[11:])


def _format_checker():
    fc = FormatChecker(formats=())
    fc.checkers.update(Draft202012Validator.FORMAT_CHECKER.checkers)
    if "time" not in fc.checkers:
        fc.checks("time", raises=ValueError)(lambda v: not isinstance(v, str) or _rfc3339_time(v))
    if "date-time" not in fc.checkers:
        fc.checks("date-time", raises=ValueError)(lambda v: not isinstance(v, str) or _rfc3339_date_time(v))
    return fc


# Note: llguidance's "date" (and "date-time") regex admits February 29 in every year, so
# a sampled "2023-02-29" is possible; jsonschema rejects it and so does this test (the
# output would not be a valid date): reported, not excused.
FORMATS = _format_checker()


def schema_problems(schema, text):
    """None if `text` is JSON valid against `schema`, else what is wrong."""
    try:
        value = json.loads(text)
    except ValueError as e:
        return f"not JSON: {e}"
    errors = list(Draft202012Validator(schema, format_checker=FORMATS).iter_errors(value))
    if not errors:
        return None
    return "; ".join(f"at /{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:3])


def short(text, limit=600):
    text = repr(text)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


# --- requests ---------------------------------------------------------------------------------

def user(prompt):
    return [{"role": "user", "content": prompt}]


def chat(messages, temperature, stream, seed=None, max_tokens=MAX_TOKENS, **kw):
    """One chat choice: (content, finish_reason), streamed or not."""
    args = dict(model=MODEL, messages=messages, max_tokens=max_tokens, temperature=temperature, **kw)
    if seed is not None:
        args["seed"] = seed
    if not stream:
        r = C.chat.completions.create(**args)
        assert len(r.choices) == 1, r.choices
        return r.choices[0].message.content or "", r.choices[0].finish_reason
    parts, finishes = [], []
    for chunk in C.chat.completions.create(stream=True, **args):
        for c in chunk.choices:
            if c.delta is not None and c.delta.content:
                parts.append(c.delta.content)
            if c.finish_reason:
                finishes.append(c.finish_reason)
    assert len(finishes) == 1, f"finish reasons in stream: {finishes}"
    return "".join(parts), finishes[0]


def completion(prompt, temperature, stream, seed=None, max_tokens=MAX_TOKENS, **kw):
    """One /v1/completions choice: (text, finish_reason)."""
    args = dict(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=temperature, **kw)
    if seed is not None:
        args["seed"] = seed
    if not stream:
        r = C.completions.create(**args)
        assert len(r.choices) == 1, r.choices
        return r.choices[0].text, r.choices[0].finish_reason
    parts, finishes = [], []
    for chunk in C.completions.create(stream=True, **args):
        for c in chunk.choices:
            parts.append(c.text or "")
            if c.finish_reason:
                finishes.append(c.finish_reason)
    assert len(finishes) == 1, f"finish reasons in stream: {finishes}"
    return "".join(parts), finishes[0]


def run_parallel(jobs):
    """Runs {key: callable} on WORKERS threads; returns {key: result or the exception raised}."""
    def guarded(fn):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - reported per request by the caller
            return e
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        futures = {key: pool.submit(guarded, fn) for key, fn in jobs.items()}
        return {key: f.result() for key, f in futures.items()}


def json_schema_format(name, schema, strict=True, **kw):
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": strict, **kw}}


def assess(results, valid, label, min_stop_t0=MIN_STOP_SHARE_T0, min_stop_t1=MIN_STOP_SHARE_T1):
    """Checks results keyed (name, temperature, stream) -> (text, finish) | exception.

    Every "stop" output must satisfy `valid(name, text)` (None when fine, else a reason);
    at each temperature, the share of "stop" outputs must reach its floor; the streamed
    and non-streamed outputs of one (name, temperature) are the same (greedy at 0, the
    same seed at 1). Returns a one-line summary; raises AssertionError listing every problem.
    """
    problems, stops, totals = [], {}, {}
    for (name, temp, stream), res in sorted(results.items(), key=lambda kv: str(kv[0])):
        where = f"{name} temperature={temp} {'stream' if stream else 'non-stream'}"
        totals[temp] = totals.get(temp, 0) + 1
        if isinstance(res, Exception):
            problems.append(f"{where}: request failed: {type(res).__name__}: {res}")
            continue
        text, finish = res
        if finish == "stop":
            stops[temp] = stops.get(temp, 0) + 1
            why = valid(name, text)
            if why:
                problems.append(f"{where}: invalid 'stop' output ({why}): {short(text)}")
        elif finish != "length":
            problems.append(f"{where}: unexpected finish_reason {finish!r}: {short(text)}")
        other = results.get((name, temp, not stream))
        if not stream and isinstance(other, tuple) and other != res:
            problems.append(f"{where}: streamed output differs: non-stream {short(res)} vs stream {short(other)}")
    for temp, floor in ((0, min_stop_t0), (1, min_stop_t1)):
        n = totals.get(temp, 0)
        if n and stops.get(temp, 0) < floor * n:
            length = [f"{k[0]}{' (stream)' if k[2] else ''}" for k, v in results.items()
                      if k[1] == temp and isinstance(v, tuple) and v[1] == "length"]
            problems.append(f"temperature {temp}: only {stops.get(temp, 0)}/{n} outputs finished 'stop' "
                            f"(floor {floor:.0%}); 'length': {length}")
    summary = ", ".join(f"temperature {t}: {stops.get(t, 0)}/{n} stop" for t, n in sorted(totals.items()))
    assert not problems, f"{label}: {len(problems)} problem(s) ({summary}):\n  " + "\n  ".join(problems)
    return summary


def info(line):
    print(f"  {line}", flush=True)


# --- checks -----------------------------------------------------------------------------------

def check_schema_corpus():
    """Every corpus schema x temperature 0/1 x stream/non-stream through response_format json_schema."""
    jobs = {}
    for k, (name, prompt, schema) in enumerate(SCHEMAS):
        rf = json_schema_format(name, schema)
        for temp in (0, 1):
            for stream in (False, True):
                jobs[(name, temp, stream)] = functools.partial(
                    chat, user(prompt), temp, stream, seed=1000 + k if temp else None, response_format=rf)
    t = time.time()
    results = run_parallel(jobs)
    summary = assess(results, lambda name, text: schema_problems(BY_NAME[name][1], text), "schema corpus")
    info(f"{len(SCHEMAS)} schemas, {len(jobs)} requests in {time.time() - t:.0f}s; {summary}")


class Route(str, Enum):
    ORAL = "oral"
    INTRAVENOUS = "intravenous"
    TOPICAL = "topical"


class Medication(BaseModel):
    name: str = Field(max_length=30)
    dose_mg: int = Field(ge=1, le=2000)
    route: Route


class MedicationOrder(BaseModel):
    patient_initials: str = Field(pattern=r"^[A-Z]{2,3}$")
    priority: Literal["routine", "urgent"]
    medications: List[Medication] = Field(min_length=1, max_length=3)
    note: Optional[str] = Field(max_length=60)


ORDER_PROMPT = user("Extract the medication order from this synthetic note as JSON: 'Patient JD (test record): "
                    "start amoxicillin 500 mg oral and paracetamol 1000 mg oral, routine, no other notes.'")


def _sdk(name):
    """chat.completions.<name> (openai >= 1.92), else beta.chat.completions.<name> (1.40 ...)."""
    fn = getattr(C.chat.completions, name, None)
    return fn if fn is not None else getattr(C.beta.chat.completions, name)


def check_sdk_parse():
    """The SDK's pydantic helpers: .parse() and the .stream() context manager."""
    r = _sdk("parse")(model=MODEL, messages=ORDER_PROMPT, response_format=MedicationOrder,
                      max_tokens=MAX_TOKENS, temperature=0)
    c = r.choices[0]
    assert c.finish_reason == "stop", (c.finish_reason, c.message.content)
    parsed = c.message.parsed
    assert isinstance(parsed, MedicationOrder), (type(parsed), c.message.content)
    assert 1 <= len(parsed.medications) <= 3 and all(isinstance(m.route, Route) for m in parsed.medications)
    assert parsed.priority in ("routine", "urgent")
    with _sdk("stream")(model=MODEL, messages=ORDER_PROMPT, response_format=MedicationOrder,
                        max_tokens=MAX_TOKENS, temperature=0) as stream:
        events = sum(1 for _ in stream)
        final = stream.get_final_completion()
    assert events > 1, events
    fc = final.choices[0]
    assert isinstance(fc.message.parsed, MedicationOrder), (type(fc.message.parsed), fc.message.content)
    # Greedy: the streamed answer is the same one.
    assert fc.message.content == c.message.content, (fc.message.content, c.message.content)
    assert fc.message.parsed == parsed


JSON_OBJECT_PROMPTS = [
    "Return the vital signs of this synthetic patient as a JSON object: HR 72, BP 118/76.",
    "Give this synthetic patient's name and age as a JSON object: 'Test Person, 41 years.'",
    "Describe this synthetic allergy as a JSON object: 'Allergy: peanuts, reaction hives.'",
]


def check_json_object():
    """response_format json_object: any JSON object."""
    jobs = {}
    for k, prompt in enumerate(JSON_OBJECT_PROMPTS):
        for temp in (0, 1):
            for stream in (False, True):
                jobs[(f"prompt{k}", temp, stream)] = functools.partial(
                    chat, user(prompt), temp, stream, seed=2000 + k if temp else None,
                    response_format={"type": "json_object"})

    def is_object(_, text):
        try:
            value = json.loads(text)
        except ValueError as e:
            return f"not JSON: {e}"
        return None if isinstance(value, dict) else f"a JSON {type(value).__name__}, not an object"
    # Unbounded keys and strings: the model may wander even at temperature 0.
    info(assess(run_parallel(jobs), is_object, "json_object", min_stop_t0=0.5, min_stop_t1=0.0))


def check_response_format_text():
    """response_format text is accepted and is no constraint: the same greedy text as without it."""
    msg = user("Write one sentence about a synthetic clinic's opening hours.")
    plain = chat(msg, 0, False, max_tokens=24)
    texted = chat(msg, 0, False, max_tokens=24, response_format={"type": "text"})
    assert texted == plain, (texted, plain)


def outside_strings(text):
    """`text` with every JSON string literal (a trailing unterminated one too) emptied."""
    return re.sub(r'"(?:[^"\\]|\\.)*(?:"|\\?$)', '""', text)


def check_constraint_spellings():
    """The same schema as structured_outputs.json (object and JSON string), with whitespace_pattern,
    and as response_format json_schema with strict false and a description."""
    prompt, schema = BY_NAME["vital_signs"]
    msg = user(prompt)
    as_obj = chat(msg, 0, False, extra_body={"structured_outputs": {"json": schema}})
    as_str = chat(msg, 0, False, extra_body={"structured_outputs": {"json": json.dumps(schema)}})
    for text, finish in (as_obj, as_str):
        assert finish == "stop", (finish, text)
        assert schema_problems(schema, text) is None, (schema_problems(schema, text), text)
    assert as_obj == as_str, (as_obj, as_str)
    # At most one space between JSON tokens: no newlines, tabs or runs of spaces outside strings.
    for stream in (False, True):
        text, finish = chat(msg, 1, stream, seed=31, extra_body={"structured_outputs": {
            "json": schema, "whitespace_pattern": " "}})
        if finish == "stop":
            assert schema_problems(schema, text) is None, (schema_problems(schema, text), text)
        bare = outside_strings(text)
        assert not re.search(r"[\n\r\t]|  ", bare), f"whitespace_pattern ' ' not honoured: {short(text)}"
    # strict false and a description are accepted (what the server enforces then is its choice).
    text, finish = chat(msg, 0, False, response_format=json_schema_format(
        "vital_signs", schema, strict=False, description="Vital signs of a synthetic patient."))
    assert finish in ("stop", "length") and isinstance(text, str), (finish, text)


TRIAGE = ["urgent", "routine", "needs review"]
PREFIXED = ["stat", "stat review", "routine"]  # one choice is a prefix of another


def check_choice():
    """structured_outputs choice: every sample is exactly one of the choices."""
    jobs = {}
    msg = user("Triage this synthetic referral with one word: 'Test patient, new chest pain at rest.'")
    for seed in range(50):
        jobs[("triage", seed)] = functools.partial(
            chat, msg, 1, seed % 5 == 0, seed=seed, max_tokens=20,
            extra_body={"structured_outputs": {"choice": TRIAGE}})
    for seed in range(10):
        jobs[("prefixed", seed)] = functools.partial(
            chat, msg, 1, False, seed=100 + seed, max_tokens=20,
            extra_body={"structured_outputs": {"choice": PREFIXED}})
    bad = []
    seen = set()
    for (kind, seed), res in sorted(run_parallel(jobs).items()):
        choices = TRIAGE if kind == "triage" else PREFIXED
        if isinstance(res, Exception):
            bad.append(f"{kind} seed={seed}: {type(res).__name__}: {res}")
        elif res[1] != "stop" or res[0] not in choices:
            bad.append(f"{kind} seed={seed}: finish={res[1]!r} output={short(res[0])}")
        else:
            seen.add(res[0])
    assert not bad, "\n  ".join(["choice outputs outside the choices:"] + bad)
    info(f"choices seen: {sorted(seen)}")


REGEXES = [r"\d{4}-\d{2}-\d{2}", r"(BP|HR|RR) [0-9]{2,3}(/[0-9]{2,3})?"]
REGEX_PROMPTS = ["Give the date of this synthetic visit: 'Seen on the fourth of March 2024.'",
                 "Give one vital sign from this synthetic chart: 'BP 120/80, HR 64, RR 14.'"]


def check_regex():
    """structured_outputs regex: every sample fully matches."""
    jobs = {}
    for k, (rx, prompt) in enumerate(zip(REGEXES, REGEX_PROMPTS)):
        for seed in range(50):
            jobs[(k, seed)] = functools.partial(
                chat, user(prompt), 1, seed % 10 == 0, seed=seed, max_tokens=40,
                extra_body={"structured_outputs": {"regex": rx}})
    bad = []
    for (k, seed), res in sorted(run_parallel(jobs).items()):
        if isinstance(res, Exception):
            bad.append(f"regex {REGEXES[k]!r} seed={seed}: {type(res).__name__}: {res}")
        elif res[1] != "stop" or not re.fullmatch(REGEXES[k], res[0]):
            bad.append(f"regex {REGEXES[k]!r} seed={seed}: finish={res[1]!r} output={short(res[0])}")
    assert not bad, "\n  ".join(["outputs not matching their regex:"] + bad)


GRAMMARS = [
    ('start: "Dose: " NUMBER " mg"\nNUMBER: /[0-9]{1,4}/\n', r"Dose: [0-9]{1,4} mg",
     "State the dose in this synthetic order: 'Give 250 mg.'"),
    ('start: drug " " dose " " unit " " freq\n'
     'drug: "amoxicillin" | "ibuprofen" | "metformin"\n'
     'dose: /[1-9][0-9]{0,3}/\n'
     'unit: "mg" | "mcg"\n'
     'freq: "daily" | "twice daily" | "every 8 hours"\n',
     r"(amoxicillin|ibuprofen|metformin) [1-9][0-9]{0,3} (mg|mcg) (daily|twice daily|every 8 hours)",
     "Write this synthetic prescription in one line: 'ibuprofen 400 mg, three times a day'."),
]


def check_lark_grammar():
    """structured_outputs grammar (Lark, llguidance dialect): outputs match the equivalent regex."""
    jobs = {}
    for k, (grammar, _, prompt) in enumerate(GRAMMARS):
        for seed in range(-1, 20):  # seed -1: temperature 0
            jobs[(k, seed)] = functools.partial(
                chat, user(prompt), 0 if seed < 0 else 1, seed % 5 == 0, seed=None if seed < 0 else seed,
                max_tokens=40, extra_body={"structured_outputs": {"grammar": grammar}})
    bad = []
    for (k, seed), res in sorted(run_parallel(jobs).items()):
        rx = GRAMMARS[k][1]
        if isinstance(res, Exception):
            bad.append(f"grammar {k} seed={seed}: {type(res).__name__}: {res}")
        elif res[1] != "stop" or not re.fullmatch(rx, res[0]):
            bad.append(f"grammar {k} seed={seed}: finish={res[1]!r} output={short(res[0])}")
    assert not bad, "\n  ".join(["outputs outside their grammar:"] + bad)


# Fully bounded (enums, bounded integers, a boolean): always completes well within max_tokens.
BOUNDED = {"type": "object", "properties": {
    "heart_rate": {"type": "integer", "minimum": 20, "maximum": 250},
    "rhythm": {"type": "string", "enum": ["regular", "irregular"]},
    "alert": {"type": "boolean"}},
    "required": ["heart_rate", "rhythm", "alert"], "additionalProperties": False}
BOUNDED_PROMPT = "Synthetic ECG note: heart rate 88, regular rhythm, patient alert.\nAs JSON:"


def check_completions_endpoint():
    """/v1/completions: response_format (json_schema, json_object) and structured_outputs (via extra_body)."""
    rf = {"response_format": json_schema_format("ecg", BOUNDED)}
    plain = completion(BOUNDED_PROMPT, 0, False, extra_body=rf)
    streamed = completion(BOUNDED_PROMPT, 0, True, extra_body=rf)
    for text, finish in (plain, streamed):
        assert finish == "stop", (finish, text)
        assert schema_problems(BOUNDED, text) is None, (schema_problems(BOUNDED, text), text)
    assert plain == streamed, (plain, streamed)
    text, finish = completion(BOUNDED_PROMPT, 1, False, seed=5, extra_body=rf)
    assert finish == "stop" and schema_problems(BOUNDED, text) is None, (finish, text)
    # A corpus schema, seeded sampling.
    prompt, schema = BY_NAME["intake_extraction"]
    text, finish = completion(prompt + "\nJSON:", 1, False, seed=6,
                              extra_body={"response_format": json_schema_format("intake_extraction", schema)})
    assert finish == "length" or schema_problems(schema, text) is None, (schema_problems(schema, text), text)
    text, finish = completion(BOUNDED_PROMPT, 0, False, extra_body={"response_format": {"type": "json_object"}})
    if finish == "stop":
        assert isinstance(json.loads(text), dict), text
    text, finish = completion("Synthetic referral: new chest pain at rest. Triage:", 1, True, seed=7, max_tokens=20,
                              extra_body={"structured_outputs": {"choice": TRIAGE}})
    assert finish == "stop" and text in TRIAGE, (finish, text)
    text, finish = completion("Synthetic visit date:", 1, False, seed=8, max_tokens=40,
                              extra_body={"structured_outputs": {"regex": REGEXES[0]}})
    assert finish == "stop" and re.fullmatch(REGEXES[0], text), (finish, text)


# No '<' can occur in an output of this schema, so the stop string never cuts one short.
NO_ANGLE = {"type": "object", "properties": {
    "drug": {"type": "string", "enum": ["amoxicillin", "ibuprofen", "metformin"]},
    "dose_mg": {"type": "integer", "minimum": 1, "maximum": 1000},
    "route": {"type": "string", "enum": ["oral", "intravenous"]},
    "label": {"type": "string", "pattern": "^[a-z ]{1,20}$"}},
    "required": ["drug", "dose_mg", "route", "label"], "additionalProperties": False}


def check_constraint_with_stop_n_seed_logprobs():
    """A constraint composes with n, seed, stop and logprobs."""
    kw = dict(model=MODEL, messages=user("Write a synthetic test prescription as JSON."), max_tokens=MAX_TOKENS,
              temperature=0.9, n=3, seed=4242, stop=["<END>"], logprobs=True, top_logprobs=2,
              response_format=json_schema_format("prescription", NO_ANGLE))
    first = C.chat.completions.create(**kw)
    assert [c.index for c in first.choices] == [0, 1, 2], [c.index for c in first.choices]
    entries = 0
    for c in first.choices:
        text = c.message.content
        assert c.finish_reason == "stop", (c.index, c.finish_reason, text)
        assert schema_problems(NO_ANGLE, text) is None, (c.index, schema_problems(NO_ANGLE, text), text)
        lp = c.logprobs.content
        assert lp, f"choice {c.index}: no logprobs"
        for t in lp:
            assert isinstance(t.token, str) and t.logprob <= 0, t
            # Two alternatives, or fewer where the grammar allowed fewer (if reported after masking).
            assert 1 <= len(t.top_logprobs) <= 2, (c.index, t)
        entries += len(lp)
    # One entry per generated token (the end token of each choice may or may not have one).
    u = first.usage.completion_tokens
    assert u - len(first.choices) <= entries <= u, (entries, u)
    second = C.chat.completions.create(**kw)
    a = [c.message.content for c in first.choices]
    b = [c.message.content for c in second.choices]
    assert a == b, f"same seed, different outputs: {a} vs {b}"
    # The same seeded request, streamed: the same three outputs.
    parts = {}
    for chunk in C.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            parts.setdefault(c.index, []).append(c.delta.content or "")
    assert ["".join(parts[i]) for i in sorted(parts)] == a, (parts, a)


UNSUPPORTED = [
    # (keyword(s) the message may name, subschema using it)
    (("uniqueItems",), {"type": "array", "items": {"type": "string", "maxLength": 8}, "uniqueItems": True}),
    (("not",), {"not": {"type": "string"}}),
    (("if", "then", "else"), {"if": {"type": "string"}, "then": {"maxLength": 3}, "else": {"type": "integer"}}),
    (("contains",), {"type": "array", "contains": {"type": "integer"}}),
    (("propertyNames",), {"type": "object", "propertyNames": {"maxLength": 3}}),
    (("dependentRequired",), {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                              "dependentRequired": {"a": ["b"]}}),
    (("unevaluatedProperties",), {"type": "object", "properties": {"a": {"type": "integer"}},
                                  "unevaluatedProperties": False}),
    (("format",), {"type": "string", "format": "password"}),
]


def with_canaries(sub):
    """A schema holding `sub` under a property, with the canary in enum values and descriptions."""
    inner = dict(sub, description=f"{CANARY} inner description")
    return {"type": "object", "description": f"{CANARY} description",
            "properties": {"status": {"type": "string", "enum": [f"{CANARY}-enum", "ok"]},
                           "target": {"type": "array", "items": inner, "maxItems": 2}},
            "required": ["status", "target"]}


def names_keyword(message, words):
    return any(re.search(rf"(?<![A-Za-z]){re.escape(w)}(?![A-Za-z])", message) for w in words)


def check_rejections():
    """Unsupported or invalid constraints get a 400 naming the parameter; nothing from the schema leaks."""
    msg = user("Say ok.")
    problems = []

    def expect_400(label, call, params, words=()):
        try:
            call()
        except openai.BadRequestError as e:
            body = e.body if isinstance(e.body, dict) else {}
            text = e.response.text
            if body.get("param") not in params:
                problems.append(f"{label}: param {body.get('param')!r}, expected one of {params}: {text[:300]}")
            if words and not names_keyword(str(body.get("message", "")), words):
                problems.append(f"{label}: message does not name {words}: {body.get('message')!r}")
            if CANARY in text:
                problems.append(f"{label}: the response echoes schema values: {text[:300]}")
            return
        except Exception as e:  # noqa: BLE001 - reported with the rest
            problems.append(f"{label}: expected 400, got {type(e).__name__}: {str(e)[:300]}")
            return
        problems.append(f"{label}: accepted (expected 400)")

    def chat_call(**kw):
        return lambda: C.chat.completions.create(model=MODEL, messages=msg, max_tokens=8, **kw)

    for words, sub in UNSUPPORTED:
        schema = with_canaries(sub)
        expect_400(f"response_format with {words[0]}",
                   chat_call(response_format=json_schema_format("refused", schema)), ("response_format",), words)
        expect_400(f"structured_outputs.json with {words[0]}",
                   chat_call(extra_body={"structured_outputs": {"json": schema}}), ("structured_outputs",), words)
    expect_400("completions response_format with uniqueItems",
               lambda: C.completions.create(model=MODEL, prompt="Say ok.", max_tokens=8, extra_body={
                   "response_format": json_schema_format("refused", with_canaries(UNSUPPORTED[0][1]))}),
               ("response_format",), UNSUPPORTED[0][0])
    expect_400("completions structured_outputs.json (string) with not",
               lambda: C.completions.create(model=MODEL, prompt="Say ok.", max_tokens=8, extra_body={
                   "structured_outputs": {"json": json.dumps(with_canaries(UNSUPPORTED[1][1]))}}),
               ("structured_outputs",), UNSUPPORTED[1][0])
    # Invalid schemas and response formats.
    for label, schema in (("type 5", {"type": 5}), ("properties as a list", {"type": "object", "properties": []})):
        expect_400(f"invalid schema ({label})", chat_call(response_format=json_schema_format("bad", schema)),
                   ("response_format",))
        expect_400(f"invalid structured_outputs.json ({label})",
                   chat_call(extra_body={"structured_outputs": {"json": schema}}), ("structured_outputs",))
    expect_400("structured_outputs.json not JSON", chat_call(extra_body={"structured_outputs": {"json": "{not json"}}),
               ("structured_outputs",))
    expect_400("response_format type xml", chat_call(response_format={"type": "xml"}), ("response_format",))
    # Two constraints at once.
    either = ("response_format", "structured_outputs")
    expect_400("response_format json_schema and structured_outputs", chat_call(
        response_format=json_schema_format("ecg", BOUNDED), extra_body={"structured_outputs": {"regex": "a+"}}), either)
    expect_400("response_format json_object and structured_outputs", chat_call(
        response_format={"type": "json_object"}, extra_body={"structured_outputs": {"choice": ["a", "b"]}}), either)
    so = ("structured_outputs",)
    expect_400("structured_outputs json and regex",
               chat_call(extra_body={"structured_outputs": {"json": BOUNDED, "regex": "a+"}}), so)
    expect_400("structured_outputs regex and choice",
               chat_call(extra_body={"structured_outputs": {"regex": "a+", "choice": ["a"]}}), so)
    expect_400("structured_outputs with no constraint",
               chat_call(extra_body={"structured_outputs": {"whitespace_pattern": " "}}), so)
    expect_400("structured_outputs empty choice", chat_call(extra_body={"structured_outputs": {"choice": []}}), so)
    expect_400("structured_outputs invalid regex", chat_call(extra_body={"structured_outputs": {"regex": "([0-9]"}}),
               so)
    expect_400("structured_outputs invalid grammar", chat_call(
        extra_body={"structured_outputs": {"grammar": "start: undefined_rule\n"}}), so)
    # A huge schema: many properties with long descriptions, sized so the request body stays
    # under the server's 1 MiB limits.max_body_bytes (that limit answers 413) while the
    # schema alone is ~0.97 MiB: over any sane max_schema_bytes.
    filler = "synthetic field description " * 8
    props = {f"field_{k:05d}": {"type": "integer", "minimum": 0, "maximum": 9, "description": filler}
             for k in range(3300)}
    huge = {"type": "object", "properties": props}
    size = len(json.dumps(huge))
    assert 950_000 < size < 1_040_000, size  # ~0.97 MiB
    t = time.time()
    expect_400(f"schema of {size} bytes", chat_call(response_format=json_schema_format("huge", huge)),
               ("response_format",))
    assert time.time() - t < 60, f"a huge schema took {time.time() - t:.0f}s to refuse"
    # Over 1 MiB: refused either as a schema (400) or as a body (413), quickly.
    bigger = {"type": "object", "properties": {f"field_{k:05d}": props["field_00000"] for k in range(5000)}}
    t = time.time()
    try:
        chat_call(response_format=json_schema_format("bigger", bigger))()
        problems.append("a schema over 1 MiB was accepted")
    except openai.APIStatusError as e:
        if e.status_code not in (400, 413):
            problems.append(f"a schema over 1 MiB: status {e.status_code}, expected 400 or 413")
    except openai.APIConnectionError:
        pass  # refused mid-upload: a refusal too (the 413 path itself is test_openai_sdk.py's)
    assert time.time() - t < 60, f"a schema over 1 MiB took {time.time() - t:.0f}s to refuse"
    assert not problems, f"{len(problems)} problem(s):\n  " + "\n  ".join(problems)


def check_max_tokens_length():
    """max_tokens before the grammar completes: finish_reason "length", the output a prefix."""
    # Unbounded above; minLength makes completing within 5 tokens impossible.
    schema = {"type": "object", "properties": {"note": {"type": "string", "minLength": 200}}, "required": ["note"]}
    msg = user("Write a long synthetic nursing note as JSON.")
    rf = json_schema_format("note", schema)
    r = C.chat.completions.create(model=MODEL, messages=msg, max_tokens=5, temperature=0, response_format=rf)
    c = r.choices[0]
    assert c.finish_reason == "length", (c.finish_reason, c.message.content)
    assert r.usage.completion_tokens == 5, r.usage
    assert c.message.content.lstrip()[:1] in ("", "{"), c.message.content
    text, finish = chat(msg, 0, True, max_tokens=5, response_format=rf)
    assert finish == "length" and text == c.message.content, (finish, text, c.message.content)


CHECKS = [check_schema_corpus, check_sdk_parse, check_json_object, check_response_format_text,
          check_constraint_spellings, check_choice, check_regex, check_lark_grammar, check_completions_endpoint,
          check_constraint_with_stop_n_seed_logprobs, check_rejections, check_max_tokens_length]


def main():
    failed = 0
    for check in CHECKS:
        t = time.time()
        try:
            check()
            print(f"PASS {check.__name__} ({time.time() - t:.1f}s)", flush=True)
        except Exception:  # noqa: BLE001 - report every failure, keep going
            failed += 1
            print(f"FAIL {check.__name__}", flush=True)
            traceback.print_exc()
    print(f"{len(CHECKS) - failed}/{len(CHECKS)} checks passed", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

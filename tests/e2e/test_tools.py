"""End-to-end checks of tool calling with the official openai SDK and LangChain.

Run by scripts/e2e.sh against the real `salus serve` on the default model
(SmolLM2-135M-Instruct, whose template knows no tools: Salus renders them
generically and parses Hermes-style `<tool_call>` blocks), with
SALUS_E2E_BASE, SALUS_E2E_CA, SALUS_E2E_MODEL, SALUS_E2E_KEY.
Needs `openai`, `jsonschema` and `langchain-openai` in the virtualenv
(scripts/e2e.sh installs them). Prints one PASS/FAIL line per check; exits 1 if
any check failed. Every prompt, argument and result is synthetic.
"""

import json
import os
import ssl
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai

import checks
from jsonschema import Draft202012Validator

BASE = os.environ["SALUS_E2E_BASE"]
CA = os.environ["SALUS_E2E_CA"]
MODEL = os.environ["SALUS_E2E_MODEL"]
KEY = os.environ["SALUS_E2E_KEY"]
CTX = ssl.create_default_context(cafile=CA)
C = openai.OpenAI(base_url=f"{BASE}/v1", api_key=KEY, max_retries=0, timeout=120,
                  http_client=httpx.Client(verify=CTX))

TOOLS = [
    {"type": "function", "function": {
        "name": "get_lab_results", "description": "Latest lab results of a patient",
        "parameters": {"type": "object", "properties": {
            "mrn": {"type": "string", "maxLength": 12},
            "test": {"enum": ["potassium", "sodium", "creatinine"]}},
            "required": ["mrn", "test"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "schedule_appointment", "description": "Book a clinic visit",
        "parameters": {"type": "object", "properties": {
            "mrn": {"type": "string", "maxLength": 12}, "date": {"type": "string", "format": "date"},
            "clinic": {"type": "string", "maxLength": 30}},
            "required": ["mrn", "date"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "check_formulary", "description": "Whether a drug is on the hospital formulary",
        "parameters": {"type": "object", "properties": {
            "drug": {"type": "string", "maxLength": 30}, "dose_mg": {"type": "integer", "minimum": 0, "maximum": 5000}},
            "required": ["drug"], "additionalProperties": False}}},
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the latest potassium of patient MRN 4471?"}]


def calls_of(message):
    return [(c.function.name, c.function.arguments) for c in (message.tool_calls or [])]


def assert_valid_call(name, arguments):
    assert name in SCHEMAS, name
    args = json.loads(arguments)
    errors = list(Draft202012Validator(SCHEMAS[name]).iter_errors(args))
    assert not errors, (name, arguments, [e.message for e in errors])


def streamed_calls(**kw):
    acc = {}
    finish = None
    for chunk in C.chat.completions.create(stream=True, **kw):
        if not chunk.choices:
            continue
        for d in chunk.choices[0].delta.tool_calls or []:
            e = acc.setdefault(d.index, {"name": "", "arguments": ""})
            e["name"] += (d.function.name or "") if d.function else ""
            e["arguments"] += (d.function.arguments or "") if d.function else ""
        finish = chunk.choices[0].finish_reason or finish
    return [(e["name"], e["arguments"]) for _, e in sorted(acc.items())], finish


def check_required_round_trip():
    # One call: with parallel calls allowed the 135M model, greedy, can repeat
    # calls until `max_tokens` (then `finish_reason` is `length`, as OpenAI's).
    kw = dict(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
              max_tokens=200, temperature=0)
    r = C.chat.completions.create(**kw)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    calls = calls_of(choice.message)
    assert calls, choice.message
    for name, arguments in calls:
        assert_valid_call(name, arguments)
    assert all(c.id.startswith("call_") and c.type == "function" for c in choice.message.tool_calls)
    # Streamed, the SDK's deltas assemble the same calls (greedy).
    s_calls, s_finish = streamed_calls(**kw)
    assert (s_calls, s_finish) == (calls, "tool_calls"), (s_calls, calls)
    # The results go back; the model answers in text.
    history = ASK + [choice.message.model_dump(exclude_none=True)]
    for c in choice.message.tool_calls:
        history.append({"role": "tool", "tool_call_id": c.id, "content": "potassium 4.1 mmol/L (2026-11-30)"})
    final = C.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, tool_choice="none",
                                      max_tokens=40, temperature=0)
    assert final.choices[0].message.tool_calls is None
    assert isinstance(final.choices[0].message.content, str) and final.choices[0].message.content
    # `auto` after the results is a valid response too (text or calls).
    again = C.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, max_tokens=60, temperature=0)
    assert again.choices[0].finish_reason in ("stop", "length", "tool_calls")


def check_named_choice_20_samples():
    def one(seed):
        return C.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Is metformin 500 mg on the formulary?"}],
            tools=TOOLS, tool_choice={"type": "function", "function": {"name": "check_formulary"}},
            max_tokens=120, temperature=1, seed=seed)
    with ThreadPoolExecutor(8) as ex:
        results = list(ex.map(one, range(20)))
    for r in results:
        calls = calls_of(r.choices[0].message)
        assert len(calls) == 1 and calls[0][0] == "check_formulary", (r.choices[0].finish_reason, calls)
        assert_valid_call(*calls[0])
        assert r.choices[0].finish_reason == "tool_calls"


def check_none_and_auto():
    r = C.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=30,
                                  temperature=0)
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason in ("stop", "length")
    # SmolLM2-135M answers a greeting in text when it may choose (`auto`, greedy).
    r = C.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hello to the nurse."}],
                                  tools=TOOLS, max_tokens=30, temperature=0)
    assert r.choices[0].message.tool_calls is None, r.choices[0].message
    assert r.choices[0].message.content


def check_auto_calls_follow_strict_schemas():
    # Under `auto` the model may start a call on its own; from the call marker
    # on, decoding is constrained: a strict tool's arguments follow its schema.
    strict = [dict(t, function=dict(t["function"], strict=True)) for t in TOOLS]

    def one(seed):
        return C.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Use get_lab_results to fetch the potassium of MRN 4471."}],
            tools=strict, max_tokens=160, temperature=1, seed=seed)
    with ThreadPoolExecutor(8) as ex:
        results = list(ex.map(one, range(16)))
    called = 0
    for r in results:
        choice = r.choices[0]
        assert choice.finish_reason in ("stop", "length", "tool_calls"), choice
        if choice.finish_reason == "tool_calls":
            called += 1
            for name, arguments in calls_of(choice.message):
                assert_valid_call(name, arguments)
    print(f"  auto: {called}/16 answers called a tool, every call valid")


def check_streamed_calls_arrive_in_openai_deltas():
    kw = dict(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=120, temperature=0)
    firsts, fragments = {}, {}
    for chunk in C.chat.completions.create(stream=True, **kw):
        for d in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            if d.index not in firsts:
                assert d.id and d.id.startswith("call_") and d.type == "function" and d.function.name, d
                firsts[d.index] = d
            else:
                assert d.id is None and (d.function.name is None), d
                fragments[d.index] = fragments.get(d.index, 0) + 1
    assert firsts and all(fragments.get(i, 0) > 1 for i in firsts), (firsts, fragments)


def check_parallel_tool_calls():
    r = C.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                  parallel_tool_calls=False, max_tokens=200, temperature=0)
    calls = calls_of(r.choices[0].message)
    assert len(calls) == 1 and r.choices[0].finish_reason == "tool_calls", (calls, r.choices[0].finish_reason)
    assert_valid_call(*calls[0])
    # Parallel (the default): one or more calls; a call that `max_tokens` cut
    # off (finish_reason `length`) is the last one, with partial arguments.
    r = C.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                  max_tokens=200, temperature=0)
    calls, finish = calls_of(r.choices[0].message), r.choices[0].finish_reason
    assert calls and finish in ("tool_calls", "length"), (calls, finish)
    for name, arguments in (calls if finish == "tool_calls" else calls[:-1]):
        assert_valid_call(name, arguments)


def check_refusals():
    cases = [
        dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "no_such_tool"}}),
        dict(tool_choice="required"),
        dict(tools=[{"type": "function", "function": {"name": "f", "description": "zqcanary",
                                                      "parameters": {"type": "object", "not": {}}}}]),
        dict(messages=[{"role": "user", "content": "x"}, {"role": "tool", "tool_call_id": "call_zz", "content": "r"}]),
    ]
    params = ["tool_choice", "tool_choice", "tools[0].function.parameters", "messages[1].tool_call_id"]
    for kw, param in zip(cases, params):
        body = dict(model=MODEL, messages=ASK, max_tokens=5)
        body.update(kw)
        try:
            C.chat.completions.create(**body)
            raise AssertionError(f"accepted: {param}")
        except openai.BadRequestError as e:
            assert e.body["param"] == param, e.body
            assert "zqcanary" not in json.dumps(e.body), e.body


def check_langchain_bind_tools():
    from langchain_openai import ChatOpenAI
    llm = ChatOpenAI(model=MODEL, base_url=f"{BASE}/v1", api_key=KEY, temperature=0, max_tokens=200,
                     max_retries=0, http_client=httpx.Client(verify=CTX))
    bound = llm.bind_tools([t for t in TOOLS], tool_choice="required")
    msg = bound.invoke("What is the latest potassium of patient MRN 4471?")
    assert msg.tool_calls, msg
    for call in msg.tool_calls:
        assert call["name"] in SCHEMAS and isinstance(call["args"], dict), call
        errors = list(Draft202012Validator(SCHEMAS[call["name"]]).iter_errors(call["args"]))
        assert not errors, (call, [e.message for e in errors])


if __name__ == "__main__":
    checks.run(globals())

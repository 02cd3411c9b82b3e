#!/usr/bin/env python3
"""Writes the golden renderings of the reference chat templates' tool sections.

Each golden file under models/src/chat/ is what Hugging Face transformers'
own renderer (`render_jinja_template`, the code behind `apply_chat_template`)
makes of the template beside it for one conversation: tools offered, an
assistant tool call, its result. `models/src/chat/tools.rs` renders the same
conversation with Salus's template engine and demands the same text.

Not run by the test suite (it needs transformers). To regenerate:
    python3 -m venv /tmp/hf && /tmp/hf/bin/pip install transformers==4.57.1 jinja2
    /tmp/hf/bin/python scripts/chat-template-goldens.py
"""

import pathlib

from transformers.utils.chat_template_utils import render_jinja_template

CHAT = pathlib.Path(__file__).resolve().parent.parent / "models" / "src" / "chat"

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather <now>",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def conversation(call_id):
    # As the OpenAI API carries it, with the arguments parsed (the form
    # templates expect, as vLLM and transformers pass them).
    return [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": call_id, "type": "function",
                                                               "function": {"name": "get_weather",
                                                                            "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_call_id": call_id, "content": '{"temp_c": 21}'},
    ]


CASES = [
    # (template, golden, call id, add_generation_prompt, template variables)
    ("llama3_2_tools.jinja", "llama3_2_tools.golden", "call_1", True,
     {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "date_string": "26 Jul 2024"}),
    ("mistral_nemo_tools.jinja", "mistral_nemo_tools.golden", "a1B2c3D4e", False,
     {"bos_token": "<s>", "eos_token": "</s>"}),
]

for template, golden, call_id, gen, variables in CASES:
    rendered, _ = render_jinja_template(
        conversations=[conversation(call_id)], tools=TOOLS, chat_template=(CHAT / template).read_text(),
        add_generation_prompt=gen, **variables)
    (CHAT / golden).write_text(rendered[0])
    print(f"{golden}: {len(rendered[0])} characters")

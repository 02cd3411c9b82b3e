#!/usr/bin/env python3
"""Runs the production steps of docs/deployment.md verbatim, so the guide cannot drift.

    python3 tests/e2e/test_production_docs.py --bin PATH/TO/salus --model MODEL.gguf

1. Extracts the fenced blocks whose info string is `sh production-step` from
   docs/deployment.md, in document order (they are never copied here).
2. Runs them, in order, in ONE bash process (`set -euo pipefail`, so shell
   variables such as the API key carry from step to step), in a fresh
   temporary directory. Only the guide's documented placeholders are set, as
   environment variables: SALUS_ETC and SALUS_VAR (directories under the
   temporary directory), SALUS_HOST=localhost, SALUS_LISTEN and SALUS_URL (a
   free loopback port), SALUS_CA (the step-4 certificate, as the guide says
   for a self-signed trial), MODEL_GGUF (--model), and `salus` on PATH (--bin).
3. The step that starts `salus serve` runs it in the background, as the
   guide does; after it the harness waits until /health answers (or the
   server exits). The guide's own steps then check /health, /ready with the
   created key, a chat completion, stop the server with SIGTERM, and run
   `salus audit verify` and `salus audit query`. Their outputs are checked.
4. Checks that every key of configs/salus.toml, including commented-out
   example keys, is documented in its section of docs/configuration.md, and
   that every test named in docs/compliance.md exists.

Loopback only; the whole run is bounded (--timeout, default 110 s) and the
server is killed on every exit path (the steps run in their own process
group). Exits 1 with a message naming the failing step. Standard library only.
"""

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from checks import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEPLOYMENT = os.path.join(ROOT, "docs", "deployment.md")
CONFIGURATION = os.path.join(ROOT, "docs", "configuration.md")
COMPLIANCE = os.path.join(ROOT, "docs", "compliance.md")
SHIPPED_CONFIG = os.path.join(ROOT, "configs", "salus.toml")
INFO = "sh production-step"
MARK = "@@salus-docs-step"


class Failure(Exception):
    pass


def extract_steps(path):
    """[(line number, heading, block text)] of the production steps, in order."""
    steps, heading = [], "(no heading)"
    in_fence, run, block, start = False, False, [], 0
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    for n, line in enumerate(lines, 1):
        if not in_fence:
            if line.startswith("```"):
                in_fence, run, block, start = True, line[3:].strip() == INFO, [], n
            elif line.startswith("#"):
                heading = line.lstrip("#").strip()
        elif line.startswith("```"):
            if run:
                steps.append((start, heading, "\n".join(block)))
            in_fence = False
        else:
            block.append(line)
    if in_fence:
        raise Failure(f"{path}:{start}: unterminated code fence")
    return steps


# Run between the server start and the next step: wait for /health (the
# harness's own wait, not a documented step).
WAIT_FOR_SERVER = r"""
__salus_pid=$!
for __i in $(seq 1 120); do
  if salus health --url "$SALUS_URL/health" --timeout-secs 2 >/dev/null 2>&1; then break; fi
  if ! kill -0 "$__salus_pid" 2>/dev/null; then echo "the server exited during start-up" >&2; exit 70; fi
  if [ "$__i" -eq 120 ]; then echo "the server did not answer /health within 60 s" >&2; exit 71; fi
  sleep 0.5
done
"""


def build_script(steps):
    # Markers on lines of their own (a step's output may not end with a newline).
    out = ["set -euo pipefail", f"printf '\\n{MARK} start 0\\n'"]
    for i, (_, _, text) in enumerate(steps, 1):
        out.append(f"printf '\\n{MARK} begin {i}\\n'")
        out.append(text)
        if re.search(r"^\s*salus serve\b.*&\s*$", text, re.M):
            out.append(WAIT_FOR_SERVER)
        out.append(f"printf '\\n{MARK} end {i}\\n'")
    return "\n".join(out) + "\n"


def split_outputs(stdout):
    """Step number -> its standard output; and the steps that began / ended."""
    outputs, began, ended, current = {}, set(), set(), None
    for line in stdout.split("\n"):
        m = re.match(rf"^{MARK} (begin|end|start) (\d+)$", line)
        if m:
            kind, i = m.group(1), int(m.group(2))
            if kind == "begin":
                began.add(i)
                current = i
                outputs[i] = []
            elif kind == "end":
                ended.add(i)
                current = None
            continue
        if current is not None:
            outputs[current].append(line)
    return {k: "\n".join(v) for k, v in outputs.items()}, began, ended


def json_lines(text):
    out = []
    for line in text.split("\n"):
        line = line.strip()
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


# What the guide must check, how to recognise the step, and what its output must show.
def check_health(out):
    if not any(v.get("status") == "ok" for v in json_lines(out)):
        raise Failure('expected {"status":"ok"} from /health')


def check_ready(out):
    if not any(v.get("status") == "ready" for v in json_lines(out)):
        raise Failure('expected {"status":"ready"} from /ready')


def check_chat(out):
    for v in json_lines(out):
        if v.get("object") == "chat.completion":
            content = v["choices"][0]["message"]["content"]
            if not content:
                raise Failure("the chat completion has no content")
            if v.get("usage", {}).get("completion_tokens", 0) < 1:
                raise Failure("the chat completion reports no completion tokens")
            return
    raise Failure(f"expected a chat.completion object, got: {out[-500:]!r}")


def check_verify(out):
    if not re.search(r"^OK: \d+ records", out, re.M):
        raise Failure(f"`salus audit verify` did not report OK: {out[-500:]!r}")


def check_query(out):
    kinds = [v.get("kind") for v in json_lines(out)]
    if "inference.completed" not in kinds:
        raise Failure(f"`salus audit query` shows no inference.completed record (kinds: {kinds})")


EXPECTED = [
    ("creates an API key", r"\bsalus keys create\b", None),
    ("starts the server", r"^\s*salus serve\b.*&\s*$", None),
    ("checks /health", r"/health\b", check_health),
    ("checks /ready with the created key", r"/ready\b", check_ready),
    ("sends a chat completion", r"/v1/chat/completions\b", check_chat),
    ("stops the server with SIGTERM", r"\bkill -TERM\b", None),
    ("runs `salus audit verify`", r"\bsalus audit verify\b", check_verify),
    ("runs `salus audit query`", r"\bsalus audit query\b", check_query),
]


def run_guide(args):
    steps = extract_steps(DEPLOYMENT)
    if not steps:
        raise Failure(f"no ```{INFO} blocks in {DEPLOYMENT}")
    # Every expected action must be in some step, in this order.
    found, last = {}, 0
    for what, pattern, _ in EXPECTED:
        idx = [i for i, (_, _, t) in enumerate(steps, 1) if re.search(pattern, t, re.M)]
        if not idx:
            raise Failure(f"docs/deployment.md has no production step that {what}")
        first = min(i for i in idx if i >= last) if any(i >= last for i in idx) else None
        if first is None:
            raise Failure(f"docs/deployment.md: the step that {what} comes too early")
        found[what] = first
        last = first
    print(f"extracted {len(steps)} production steps from docs/deployment.md", flush=True)

    work = tempfile.mkdtemp(prefix="salus-docs-")
    os.chmod(work, 0o700)
    proc = None
    try:
        bindir = os.path.join(work, "bin")
        os.mkdir(bindir)
        os.symlink(os.path.abspath(args.bin), os.path.join(bindir, "salus"))
        home = os.path.join(work, "home")
        os.mkdir(home, 0o700)
        port = free_port()
        etc = os.path.join(work, "etc", "salus")
        env = {
            "PATH": bindir + os.pathsep + os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": home,
            "LANG": "C.UTF-8",
            "TMPDIR": work,
            # The documented placeholders (docs/deployment.md, step 0).
            "SALUS_ETC": etc,
            "SALUS_VAR": os.path.join(work, "var", "lib", "salus"),
            "SALUS_HOST": "localhost",
            "SALUS_LISTEN": f"127.0.0.1:{port}",
            "SALUS_URL": f"https://localhost:{port}",
            "SALUS_CA": os.path.join(etc, "tls", "cert.pem"),
            "MODEL_GGUF": os.path.abspath(args.model),
        }
        script = os.path.join(work, "steps.sh")
        with open(script, "w", encoding="utf-8") as f:
            f.write(build_script(steps))
        out_path, err_path = os.path.join(work, "stdout"), os.path.join(work, "stderr")
        started = time.time()
        with open(out_path, "w") as out, open(err_path, "w") as err:
            proc = subprocess.Popen(["bash", script], cwd=work, env=env, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=err, start_new_session=True)
            try:
                rc = proc.wait(timeout=args.timeout)
            except subprocess.TimeoutExpired:
                rc = None
        elapsed = time.time() - started
        with open(out_path, encoding="utf-8", errors="replace") as f:
            stdout = f.read()
        with open(err_path, encoding="utf-8", errors="replace") as f:
            stderr = f.read()
        outputs, began, ended = split_outputs(stdout)

        def where(i):
            line, heading, _ = steps[i - 1]
            return f"step {i} (docs/deployment.md line {line}, section \"{heading}\")"

        if rc != 0 or len(ended) != len(steps):
            failed = max(began - ended) if began - ended else (max(ended) + 1 if ended else 1)
            why = f"timed out after {args.timeout} s" if rc is None else f"exit status {rc}"
            tail = "\n".join(stderr.strip().split("\n")[-25:])
            raise Failure(f"{where(failed)} failed: {why}\n--- its output ---\n"
                          f"{outputs.get(failed, '')[-1500:]}\n--- stderr (last 25 lines) ---\n{tail}")
        for what, _, check in EXPECTED:
            i = found[what]
            if check:
                try:
                    check(outputs.get(i, ""))
                except Failure as e:
                    raise Failure(f"{where(i)}, which {what}: {e}") from None
            print(f"PASS {what} ({where(i)})", flush=True)
        # The server's own output holds no prompt text and no key.
        if "sk-salus-" in stderr or "Say hello in five words" in stderr:
            raise Failure("the server's log contains an API key or the prompt text")
        print(f"PASS all {len(steps)} production steps ran verbatim in {elapsed:.1f}s", flush=True)
    finally:
        if proc is not None:
            for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 0)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                deadline = time.time() + grace
                while time.time() < deadline:
                    try:
                        os.killpg(proc.pid, 0)
                    except ProcessLookupError:
                        break
                    time.sleep(0.1)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if args.keep:
            print(f"kept {work}", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)


def config_keys(path):
    """[(section, key)] of configs/salus.toml, set or commented out (`# key = value`)."""
    keys, section = [], None
    value = r'(".*"|\'.*\'|-?[0-9][0-9_.eE+-]*|true|false|\[.*\])'
    with open(path, encoding="utf-8") as f:
        for line in f:
            # `[section]`, `[section.sub]`, `[[section.array]]`, also commented out.
            m = re.match(r"^\s*#?\s*\[\[?([a-z_.]+)\]\]?\s*$", line)
            if m:
                section = m.group(1)
                continue
            m = re.match(rf"^\s*#?\s*([a-z][a-z0-9_]*)\s*=\s*{value}\s*(#.*)?$", line)
            if m and section:
                if (section, m.group(1)) not in keys:
                    keys.append((section, m.group(1)))
    return keys


def check_configuration_doc():
    keys = config_keys(SHIPPED_CONFIG)
    if len(keys) < 20:
        raise Failure(f"found only {len(keys)} keys in configs/salus.toml: the parser is out of date")
    with open(CONFIGURATION, encoding="utf-8") as f:
        doc = f.read()
    sections = {}
    for part in re.split(r"^## ", doc, flags=re.M)[1:]:
        m = re.match(r"`\[\[?([a-z_.]+)\]\]?`", part)
        if m:
            sections[m.group(1)] = part
    missing = []
    for section, key in keys:
        body = sections.get(section)
        if body is None or not re.search(rf"^\| `{key}` \|", body, re.M):
            missing.append(f"{section}.{key}")
    if missing:
        raise Failure("docs/configuration.md does not document (as a table row of its section): "
                      + ", ".join(missing))
    print(f"PASS docs/configuration.md documents all {len(keys)} keys of configs/salus.toml", flush=True)


def check_compliance_tests():
    with open(COMPLIANCE, encoding="utf-8") as f:
        rows = [line for line in f if line.startswith("|") and not line.startswith("|---")]
    names = set()
    for row in rows:
        last = row.rstrip().rstrip("|").split(" | ")[-1]
        last = re.sub(r"\([^()]*\)", "", last)  # notes in parentheses name other things
        names.update(n for n in re.findall(r"`([a-z][a-z0-9_]+)`", last) if n.count("_") >= 1)
    defined = set()
    pattern = re.compile(r"^\s*(?:pub\s+)?(?:async\s+)?(?:fn|def)\s+([a-z][a-z0-9_]*)\s*\(", re.M)
    for top, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in ("target", ".git", "node_modules") and not d.startswith(".")]
        for name in files:
            if name.endswith((".rs", ".py")):
                try:
                    with open(os.path.join(top, name), encoding="utf-8", errors="replace") as f:
                        defined.update(pattern.findall(f.read()))
                except OSError:
                    pass
    missing = sorted(names - defined)
    if missing:
        raise Failure("docs/compliance.md names tests that do not exist: " + ", ".join(missing))
    print(f"PASS the {len(names)} tests named in docs/compliance.md exist", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bin", required=True, help="the salus binary under test")
    ap.add_argument("--model", required=True, help="a plaintext GGUF model (MODEL_GGUF)")
    ap.add_argument("--timeout", type=float, default=110, help="seconds for all steps together")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = ap.parse_args()
    # The steps run in a session of their own (so that the server can be killed
    # as a group); a SIGTERM to this script (e.g. from `timeout`) must still
    # reach the cleanup below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    failed = 0
    for check in (check_configuration_doc, check_compliance_tests, lambda: run_guide(args)):
        try:
            check()
        except Failure as e:
            failed += 1
            print(f"FAIL {e}", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

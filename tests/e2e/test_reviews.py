"""End-to-end checks of review attestations, auditor access and the access report.

Run by scripts/e2e.sh against the real `salus serve` with SALUS_E2E_BASE,
SALUS_E2E_CA, SALUS_E2E_MODEL, SALUS_E2E_KEY (a service), SALUS_E2E_REVIEWER_KEY
(human: inference + review), SALUS_E2E_AUDITOR_KEY (audit.read), SALUS_E2E_BIN,
SALUS_E2E_AUDIT_DIR, SALUS_E2E_AUDIT_KEY. Checks: a review of an SDK response id
is recorded and leaves the pending list; another principal's id is a 404;
paging `/v1/audit/events` returns exactly what `salus audit query` prints; the
FHIR bundle validates as an R4(B) Bundle of AuditEvents (`fhir.resources`);
`salus audit report access --format html` rendered by headless Chromium shows
the same numbers as the CSV. Prints one PASS/FAIL line per check.
"""

import csv
import io
import json
import os
import shutil
import ssl
import subprocess
import tempfile
from html.parser import HTMLParser

import httpx
import openai

import checks

BASE = os.environ["SALUS_E2E_BASE"]
CA = os.environ["SALUS_E2E_CA"]
MODEL = os.environ["SALUS_E2E_MODEL"]
KEY = os.environ["SALUS_E2E_KEY"]
REVIEWER = os.environ["SALUS_E2E_REVIEWER_KEY"]
AUDITOR = os.environ["SALUS_E2E_AUDITOR_KEY"]
BIN = os.environ["SALUS_E2E_BIN"]
AUDIT_DIR = os.environ["SALUS_E2E_AUDIT_DIR"]
AUDIT_KEY = os.environ["SALUS_E2E_AUDIT_KEY"]
CTX = ssl.create_default_context(cafile=CA)
HTTP = httpx.Client(base_url=BASE, verify=CTX, timeout=120)
HELLO = [{"role": "user", "content": "Summarize: patient stable overnight."}]


def sdk(key):
    return openai.OpenAI(base_url=f"{BASE}/v1", api_key=key, max_retries=0, timeout=120,
                         http_client=httpx.Client(verify=CTX))


def auth(key):
    return {"Authorization": f"Bearer {key}"}


def check_review_lifecycle_with_sdk_response_ids():
    r = sdk(REVIEWER).chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, n=2)
    pending = HTTP.get("/v1/reviews/pending", headers=auth(REVIEWER)).json()["data"]
    mine = [p for p in pending if p["response_id"] == r.id]
    assert mine and mine[0]["unreviewed_choices"] == [0, 1], pending
    ok = HTTP.post("/v1/reviews", headers=auth(REVIEWER), json={"response_id": r.id, "action": "accepted"})
    assert ok.status_code == 200, ok.text
    body = ok.json()
    assert body["object"] == "review" and body["choice"] == 0 and body["reviewed_audit_seq"] > 0, body
    edited = HTTP.post("/v1/reviews", headers=auth(REVIEWER), json={
        "response_id": r.id, "choice": 1, "action": "edited", "edited_text": "Patient stable.",
        "reason_code": "incomplete"})
    assert edited.status_code == 200, edited.text
    pending = HTTP.get("/v1/reviews/pending", headers=auth(REVIEWER)).json()["data"]
    assert all(p["response_id"] != r.id for p in pending), pending
    # A streamed response's id is reviewable too.
    stream = sdk(REVIEWER).chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4, stream=True)
    sid = [c.id for c in stream][0]
    assert HTTP.post("/v1/reviews", headers=auth(REVIEWER),
                     json={"response_id": sid, "action": "rejected"}).status_code == 200
    # Another principal's response: 404, like an unknown one.
    theirs = sdk(KEY).chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
    for rid in (theirs.id, "chatcmpl-req_ffffffffffffffffffffffffffffffff"):
        nf = HTTP.post("/v1/reviews", headers=auth(REVIEWER), json={"response_id": rid, "action": "accepted"})
        assert nf.status_code == 404 and nf.json()["error"]["code"] == "response_not_found", nf.text
    # The service key lacks `review`.
    assert HTTP.post("/v1/reviews", headers=auth(KEY), json={"response_id": theirs.id, "action": "accepted"}).status_code == 403


def all_pages(params=None, limit=250):
    out, after = [], 0
    while True:
        q = dict(params or {}, limit=limit, after=after)
        v = HTTP.get("/v1/audit/events", headers=auth(AUDITOR), params=q)
        assert v.status_code == 200, v.text
        v = v.json()
        out.extend(v["data"])
        if v["next_after"] is None:
            return out
        after = v["next_after"]


def check_auditor_pages_equal_salus_audit_query():
    pages = all_pages()
    query = subprocess.run([BIN, "audit", "query", "--dir", AUDIT_DIR, "--key", f"file:{AUDIT_KEY}"],
                           capture_output=True, text=True, check=True).stdout
    printed = [json.loads(line) for line in query.splitlines() if line.strip()]
    # The query ran after the pages (whose own audit.accessed records came later): compare the common seqs.
    last = min(pages[-1]["seq"], printed[-1]["seq"])
    a = [r for r in pages if r["seq"] <= last]
    b = [r for r in printed if r["seq"] <= last]
    assert len(a) == len(b) and a == b, (len(a), len(b))
    assert len(a) > 100, len(a)
    # Filters.
    reviews = all_pages({"kind": "review"})
    assert reviews and all(r["kind"] == "review.recorded" for r in reviews)
    accessed = all_pages({"kind": "audit.accessed"})
    assert accessed and accessed[-1]["principal"]["id"] == "e2e-auditor", accessed[-1]
    assert HTTP.get("/v1/audit/events", headers=auth(REVIEWER)).status_code == 403


def check_fhir_bundle_validates_as_r4():
    from fhir.resources.R4B.bundle import Bundle
    v = HTTP.get("/v1/audit/events", headers=auth(AUDITOR), params={"format": "fhir", "limit": 1000})
    assert v.status_code == 200, v.text
    bundle = v.json()
    parsed = Bundle.model_validate(bundle)
    kinds = set()
    for e in parsed.entry:
        assert e.resource.get_resource_type() == "AuditEvent"
        kinds.update(c.code for c in (e.resource.subtype or []))
    assert "review.recorded" in kinds and "inference.completed" in kinds, kinds
    # A review's entity references its inference's AuditEvent in the same trail.
    ids = {e["resource"]["id"] for e in bundle["entry"]}
    refs = [ent["what"]["reference"] for e in bundle["entry"] if any(
        s.get("code") == "review.recorded" for s in e["resource"]["subtype"])
        for ent in e["resource"].get("entity", []) if "reference" in ent.get("what", {})]
    assert refs and all(ref.removeprefix("urn:uuid:") in ids for ref in refs), refs


class Cells(HTMLParser):
    """The totals table's rows and the chart's bars, from the rendered DOM."""

    def __init__(self):
        super().__init__()
        self.rows, self.row, self.cell, self.bars = {}, None, None, 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "tr" and "data-principal" in a:
            self.row = a["data-principal"]
            self.rows[self.row] = []
        elif tag == "td" and self.row is not None:
            self.cell = ""
        elif tag == "rect" and a.get("class") == "bar":
            self.bars += 1

    def handle_data(self, data):
        if self.cell is not None:
            self.cell += data

    def handle_endtag(self, tag):
        if tag == "td" and self.cell is not None:
            self.rows[self.row].append(self.cell.strip())
            self.cell = None
        elif tag == "tr":
            self.row = None


def browser():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return name
    raise AssertionError("no headless browser (scripts/e2e.sh installs chromium)")


def check_access_report_renders_the_same_numbers_in_a_browser():
    run = lambda *a: subprocess.run([BIN, "audit", "report", "access", "--dir", AUDIT_DIR, "--key",
                                     f"file:{AUDIT_KEY}", *a], capture_output=True, text=True, check=True)
    rows = {r["principal"]: r for r in csv.DictReader(io.StringIO(run("--format", "csv").stdout))}
    assert int(rows["e2e-reviewer"]["inferences"]) >= 2, rows
    assert int(rows["e2e-reviewer"]["reviews_edited"]) >= 1, rows
    with tempfile.TemporaryDirectory() as d:
        html = os.path.join(d, "report.html")
        run("--format", "html", "--out", html)
        dom = subprocess.run([browser(), "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                              f"file://{html}"], capture_output=True, text=True, timeout=120).stdout
    cells = Cells()
    cells.feed(dom)
    assert cells.bars >= 1, "the chart has bars"
    for principal, r in rows.items():
        shown = cells.rows.get(principal)
        assert shown is not None, (principal, list(cells.rows))
        assert shown[1:] == [r[k] for k in list(r)[1:]], (principal, shown, r)


if __name__ == "__main__":
    checks.run(globals())

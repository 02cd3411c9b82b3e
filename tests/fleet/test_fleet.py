#!/usr/bin/env python3
"""The fleet kit (configs/kubernetes, configs/prometheus, configs/grafana),
checked against the Kubernetes schemas, promtool, a real `salus serve` and a
real Prometheus. Driven by scripts/fleet-test.sh, which installs what it needs.

    python tests/fleet/test_fleet.py --bin SALUS --model MODEL.gguf \
        --promtool promtool --prometheus prometheus

1. Manifests: renders configs/kubernetes/base, overlays/cpu and the base with
   components/pod-security-restricted (kustomize_lite.py; where kubectl is
   installed also `kubectl kustomize`, and both must agree), validates every
   resource with kubernetes-validate (strict: unknown fields fail) for fixed
   Kubernetes versions, offline, and checks what the schemas cannot: a claim
   per replica holding audit.dir, Secret references but no secret values, a
   non-root read-only container whose only writable mounts are the audit claim
   and an in-memory /tmp, probes without credentials, a grace period covering
   preStop + drain, selectors that match.
2. Alerts: `promtool check rules`, `promtool test rules`, and every alert of
   alerts.yml fires in at least one test.
3. A replica as Kubernetes would run it: the CPU overlay's salus.toml (from its
   ConfigMap), container command, image and container environment, files laid
   out as kubelet mounts them (ConfigMap file by subPath, Secret files
   root:10001 mode 0440 in sticky tmpfs-like directories, the audit claim
   root:10001 mode 2770), keys through env: sources, a sealed model, run as uid
   10001 without privileges when this runs as root. The startup, liveness and
   readiness probe commands of the manifest are run as kubelet would. The
   readiness probe uses /ready on the loopback metrics listener; with a binary
   whose metrics listener has no /ready yet, the same command runs against
   /health and the run says so.
4. Prometheus scrapes the replica over TLS with a metrics key (the static job
   of configs/prometheus/prometheus.yml, addresses replaced) and loads
   alerts.yml. After traffic carrying a canary (prompt, URL path, query string,
   header), its API must show: the target up; Salus series; every label value of
   every salus_* series in its fixed set (route templates and policy rule names
   read from the server's source, status codes, the configured model id, ...)
   and the canary nowhere; every metric the dashboard and the alerts use
   exposed by the server (a few the server does not expose yet are listed as
   pending); every dashboard query valid and answered; every rule evaluated
   without error and no critical alert active.
5. SIGTERM: the replica drains and exits 0 within its grace period, the
   readiness probe fails from then on, and `salus audit verify` accepts the trail.

Prints one PASS/FAIL line per check and a closing "N passed, M failed" line;
exits 1 if any check failed.
"""

import argparse
import copy
import json
import os
import re
import secrets
import shutil
import signal
import ssl
import stat
import subprocess
import sys
import time
import tomllib
import traceback
import urllib.parse
import urllib.request

import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "e2e"))
import kustomize_lite  # noqa: E402
from checks import free_port  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
K8S = os.path.join(ROOT, "configs", "kubernetes")
PROM = os.path.join(ROOT, "configs", "prometheus")
DASHBOARD = os.path.join(ROOT, "configs", "grafana", "salus-dashboard.json")
SALUS_UID = 10001

# Metrics the alerts or the dashboard use that the server does not expose yet
# (being added); reported, not failed, while absent.
PENDING_METRICS: set = set()
# Exposed only where [audit.forward] is configured.
FORWARD_METRICS = {
    "salus_audit_forward_lag_records", "salus_audit_forward_last_seq", "salus_audit_forward_records_total",
    "salus_audit_forward_connection_failures_total", "salus_audit_forward_connected",
    "salus_audit_forward_skipped_records_total",
}
# Exposed only where [audit.ship] is configured (the replica here ships nowhere).
SHIP_METRICS = {
    "salus_audit_ship_lag_segments", "salus_audit_ship_lag_seconds", "salus_audit_ship_shipped_segment",
    "salus_audit_ship_last_seq", "salus_audit_ship_shipments_total", "salus_audit_ship_failures_total",
    "salus_audit_ship_uploaded_bytes_total", "salus_audit_ship_failing",
}
# Metrics that are not Salus' own.
FOREIGN_METRICS = {"up"}

PROMQL_FUNCTIONS = {
    "abs", "absent", "absent_over_time", "avg_over_time", "ceil", "changes", "clamp", "clamp_max", "clamp_min",
    "count_over_time", "day_of_month", "day_of_week", "day_of_year", "days_in_month", "delta", "deriv", "exp",
    "floor", "histogram_quantile", "holt_winters", "hour", "idelta", "increase", "irate", "label_join",
    "label_replace", "last_over_time", "ln", "log10", "log2", "max_over_time", "min_over_time", "minute",
    "month", "predict_linear", "present_over_time", "quantile_over_time", "rate", "resets", "round", "scalar",
    "sgn", "sort", "sort_desc", "sqrt", "stddev_over_time", "stdvar_over_time", "sum_over_time", "time",
    "timestamp", "vector", "year",
    # aggregation operators (followed by "(" or by/without)
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk", "quantile",
}
PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                   "offset", "inf", "nan", "atan2"}


# --------------------------------------------------------------------------- harness

class Failure(Exception):
    pass


RESULTS = []


def check(name):
    def wrap(fn):
        def run(*a, **kw):
            t = time.time()
            try:
                detail = fn(*a, **kw)
            except Failure as e:
                print(f"FAIL {name}: {e}", flush=True)
                RESULTS.append(False)
                return None
            except Exception as e:  # a bug in the check itself counts as a failure
                traceback.print_exc()
                print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)
                RESULTS.append(False)
                return None
            print(f"PASS {name}" + (f" ({detail})" if detail else "") + f" [{time.time() - t:.1f}s]", flush=True)
            RESULTS.append(True)
            return True
        return run
    return wrap


def note(msg):
    print(f"NOTE {msg}", flush=True)


def run(cmd, **kw):
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    kw.setdefault("timeout", 120)
    return subprocess.run(cmd, **kw)


# --------------------------------------------------------------------------- 1. manifests

def render_variants(work):
    """{variant: [resources]} (kustomize_lite) and {variant: kustomization dir}."""
    restricted = os.path.join(work, "restricted")
    os.makedirs(restricted, exist_ok=True)
    with open(os.path.join(restricted, "kustomization.yaml"), "w") as f:
        yaml.safe_dump({
            "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
            "resources": [os.path.relpath(os.path.join(K8S, "base"), restricted)],
            "components": [os.path.relpath(os.path.join(K8S, "components", "pod-security-restricted"), restricted)],
        }, f)
    dirs = {"base": os.path.join(K8S, "base"), "overlays/cpu": os.path.join(K8S, "overlays", "cpu"),
            "base+pod-security-restricted": restricted}
    return dirs


GENERATED = re.compile(r"^(salus-config)-[a-z0-9]{10}$")


def hash_names(docs):
    return sorted(d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap" and GENERATED.match(d["metadata"]["name"]))


def unhash(docs):
    names = hash_names(docs)
    text = json.dumps(docs)
    for n in names:
        text = text.replace(f'"{n}"', f'"{GENERATED.match(n).group(1)}-HASH"')
    return json.loads(text)


@check("kustomize_lite renders every variant, as kubectl kustomize does where kubectl is installed")
def check_render(dirs, rendered):
    details = []
    kubectl = shutil.which("kubectl")
    for variant, d in dirs.items():
        mine = kustomize_lite.render(d)
        rendered[variant] = mine
        if kubectl:
            out = run([kubectl, "kustomize", d])
            if out.returncode != 0:
                raise Failure(f"kubectl kustomize {d}: {out.stderr.strip()}")
            theirs_docs = [r for r in yaml.safe_load_all(out.stdout) if r]
            if hash_names(theirs_docs) != hash_names(mine):
                # Only the generated names' hash suffix may differ (a kustomize release hashing differently).
                note(f"{variant}: kubectl kustomize names the generated ConfigMaps {hash_names(theirs_docs)}, "
                     f"kustomize_lite {hash_names(mine)}; compared without the suffix")
                theirs_docs, mine_cmp = unhash(theirs_docs), unhash(mine)
            else:
                mine_cmp = mine
            theirs = {kustomize_lite.key(r): r for r in theirs_docs}
            ours = {kustomize_lite.key(r): r for r in mine_cmp}
            if theirs.keys() != ours.keys():
                raise Failure(f"{variant}: kubectl renders {sorted(theirs)}, kustomize_lite {sorted(ours)}")
            for k in ours:
                if ours[k] != theirs[k]:
                    raise Failure(f"{variant}: {k} differs between kubectl kustomize and kustomize_lite")
        details.append(f"{variant}: {len(mine)}")
    return ", ".join(details) + ("; same as kubectl kustomize" if kubectl else "; kubectl not installed")


@check("every rendered resource validates against the Kubernetes schemas (strict, offline)")
def check_schemas(rendered, versions):
    import kubernetes_validate
    n = 0
    for variant, docs in rendered.items():
        for doc in docs:
            for v in versions:
                try:
                    kubernetes_validate.validate(doc, v, strict=True)
                except kubernetes_validate.ValidationError as e:
                    raise Failure(f"{variant} {doc['kind']}/{doc['metadata']['name']} against {v}: "
                                  f"{getattr(e, 'message', e)} at {list(getattr(e, 'path', []))}")
                n += 1
    # The validator must be able to fail: a misspelt field is an error.
    sts = copy.deepcopy(next(d for d in rendered["base"] if d["kind"] == "StatefulSet"))
    sts["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}
    try:
        kubernetes_validate.validate(sts, versions[0], strict=True)
    except kubernetes_validate.ValidationError:
        pass
    else:
        raise Failure("a StatefulSet with a misspelt field (readinessprobe) passed: validation is not strict")
    resources = sum(len(d) for d in rendered.values())
    return f"{resources} resources x {len(versions)} versions ({', '.join(versions)}) = {n} validations"


def by_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def one(docs, kind, name=None):
    hits = [d for d in by_kind(docs, kind) if name is None or d["metadata"]["name"] == name]
    if len(hits) != 1:
        raise Failure(f"expected one {kind}{' ' + name if name else ''}, found {len(hits)}")
    return hits[0]


def workload(docs):
    sts = one(docs, "StatefulSet")
    pod = sts["spec"]["template"]["spec"]
    c = next(c for c in pod["containers"] if c["name"] == "salus")
    return sts, pod, c


def salus_toml(docs, pod):
    vol = next(v for v in pod["volumes"] if v["name"] == "config")
    cm = one(docs, "ConfigMap", vol["configMap"]["name"])
    return cm["data"]["salus.toml"]


def exec_url(probe):
    cmd = probe["exec"]["command"]
    return cmd[cmd.index("--url") + 1]


def mount_for(container, path):
    """The volumeMount holding `path` (longest mountPath prefix)."""
    best = None
    for m in container.get("volumeMounts", []):
        mp = m["mountPath"]
        if path == mp or path.startswith(mp.rstrip("/") + "/"):
            if best is None or len(mp) > len(best["mountPath"]):
                best = m
    return best


@check("the workload keeps Salus' invariants (trail per replica, secrets by reference, non-root read-only, probes without keys, drain)")
def check_invariants(rendered):
    checked = []
    for variant, docs in rendered.items():
        sts, pod, c = workload(docs)
        cfg = tomllib.loads(salus_toml(docs, pod))
        where = f"{variant}:"
        # Kinds.
        kinds = sorted(d["kind"] for d in docs)
        for k in ("ConfigMap", "NetworkPolicy", "PersistentVolumeClaim", "PodDisruptionBudget", "Service",
                  "ServiceAccount", "StatefulSet"):
            if k not in kinds:
                raise Failure(f"{where} no {k}")
        if "Secret" in kinds:
            raise Failure(f"{where} a Secret is rendered: secret values must never be in the manifests")
        text = json.dumps(docs)
        if re.search(r"sk-salus-[0-9a-f]{16}|\b[0-9a-f]{64}\b", text):
            raise Failure(f"{where} something like a key is in the manifests")
        # Audit trail: one claim per replica, holding audit.dir, kept.
        tmpl = {t["metadata"]["name"]: t for t in sts["spec"].get("volumeClaimTemplates", [])}
        audit_dir = cfg["audit"]["dir"]
        m = mount_for(c, audit_dir)
        if not m or m["name"] not in tmpl:
            raise Failure(f"{where} audit.dir {audit_dir} is not on a volumeClaimTemplate")
        if m["mountPath"] == audit_dir:
            raise Failure(f"{where} audit.dir should be a subdirectory of the claim (Salus creates it 0700)")
        if tmpl[m["name"]]["spec"]["accessModes"] not in (["ReadWriteOnce"], ["ReadWriteOncePod"]):
            raise Failure(f"{where} the audit claim must be ReadWriteOnce(Pod): never shared")
        if sts["spec"].get("persistentVolumeClaimRetentionPolicy") != {"whenDeleted": "Retain", "whenScaled": "Retain"}:
            raise Failure(f"{where} audit claims must be retained when scaled down or deleted")
        if any(v["name"] == m["name"] for v in pod.get("volumes", [])):
            raise Failure(f"{where} a pod volume shadows the audit claim")
        # Headless governing Service, selectors.
        svcs = {s["metadata"]["name"]: s for s in by_kind(docs, "Service")}
        gov = svcs.get(sts["spec"]["serviceName"])
        if not gov or gov["spec"].get("clusterIP") != "None":
            raise Failure(f"{where} serviceName must be a headless Service")
        labels = sts["spec"]["template"]["metadata"]["labels"]
        if not set(sts["spec"]["selector"]["matchLabels"].items()) <= set(labels.items()):
            raise Failure(f"{where} StatefulSet selector does not match its pods")
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        for s in svcs.values():
            if not set(s["spec"]["selector"].items()) <= set(labels.items()):
                raise Failure(f"{where} Service {s['metadata']['name']} selects no Salus pod")
            for p in s["spec"]["ports"]:
                if p["targetPort"] not in ports and p["targetPort"] not in ports.values():
                    raise Failure(f"{where} Service {s['metadata']['name']} targets unknown port {p['targetPort']}")
        pdb = one(docs, "PodDisruptionBudget")
        if not set(pdb["spec"]["selector"]["matchLabels"].items()) <= set(labels.items()):
            raise Failure(f"{where} PodDisruptionBudget selects no Salus pod")
        if pdb["spec"].get("maxUnavailable") != 1 and "minAvailable" not in pdb["spec"]:
            raise Failure(f"{where} PodDisruptionBudget should allow one disruption at a time")
        # Configuration: production values.
        srv = cfg.get("server", {})
        listen_port = int(srv["listen"].rsplit(":", 1)[1])
        if listen_port not in ports.values():
            raise Failure(f"{where} server.listen port {listen_port} is not a container port")
        mhost = srv.get("metrics_listen", "").rsplit(":", 1)[0]
        if mhost not in ("127.0.0.1", "[::1]", "localhost"):
            raise Failure(f"{where} server.metrics_listen must be on loopback")
        if cfg.get("tls", {}).get("enabled", True) is not True:
            raise Failure(f"{where} TLS must be on")
        if cfg.get("model", {}).get("allow_plaintext_weights", False):
            raise Failure(f"{where} production serves sealed weights")
        if cfg.get("memory", {}).get("lock") not in ("best_effort", "required"):
            raise Failure(f"{where} memory.lock must lock")
        env = {e["name"]: e for e in c.get("env", [])}
        for key in (cfg["model"]["kek"], cfg["audit"]["key"]):
            if not key.startswith("env:"):
                raise Failure(f"{where} key source {key}: use env: from a secretKeyRef (file: fails kubelet's 0440)")
            ref = (env.get(key[4:], {}).get("valueFrom") or {}).get("secretKeyRef")
            if not ref:
                raise Failure(f"{where} {key[4:]} must come from a secretKeyRef")
        for path in (cfg["tls"]["cert"], cfg["tls"]["key"], cfg["auth"]["api_keys"], cfg["model"]["path"]):
            mm = mount_for(c, path)
            if not mm or not mm.get("readOnly"):
                raise Failure(f"{where} {path} must be on a read-only mount")
        for name in ("POD_NAME", "SALUS_AUDIT__INSTANCE"):
            if env.get(name, {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") != "metadata.name":
                raise Failure(f"{where} {name} must be the pod's name (downward API)")
        # Security context.
        psc, csc = pod.get("securityContext", {}), c.get("securityContext", {})
        if not (psc.get("runAsNonRoot") and psc.get("runAsUser") == SALUS_UID and psc.get("fsGroup") == SALUS_UID):
            raise Failure(f"{where} pod must run as non-root uid {SALUS_UID} with fsGroup {SALUS_UID}")
        if not (csc.get("readOnlyRootFilesystem") and csc.get("allowPrivilegeEscalation") is False
                and csc.get("capabilities", {}).get("drop") == ["ALL"] and not csc.get("privileged")):
            raise Failure(f"{where} container must be read-only, without privilege escalation, all capabilities dropped")
        want_add = [] if "restricted" in variant else ["IPC_LOCK"]
        if csc.get("capabilities", {}).get("add", []) != want_add:
            raise Failure(f"{where} capabilities.add should be {want_add}")
        if pod.get("automountServiceAccountToken") is not False:
            raise Failure(f"{where} no service account token in the pod")
        writable = sorted(m["mountPath"] for m in c["volumeMounts"] if not m.get("readOnly"))
        tmp = next((v for v in pod["volumes"] if v["name"] == mount_for(c, "/tmp/x")["name"]), None)
        if writable != sorted([m["mountPath"], "/tmp"]) or not tmp or tmp.get("emptyDir", {}).get("medium") != "Memory":
            raise Failure(f"{where} writable mounts must be the audit claim and an in-memory /tmp, got {writable}")
        # Probes: no credentials, the right endpoints.
        probes = {k: c.get(k) for k in ("startupProbe", "livenessProbe", "readinessProbe")}
        for k, p in probes.items():
            if not p:
                raise Failure(f"{where} no {k}")
            blob = json.dumps(p)
            if "httpHeaders" in blob or re.search(r"(?i)authorization|bearer|sk-salus", blob):
                raise Failure(f"{where} {k} carries credentials")
        if not exec_url(probes["livenessProbe"]).endswith("/health"):
            raise Failure(f"{where} liveness must probe /health")
        rurl = urllib.parse.urlsplit(exec_url(probes["readinessProbe"]))
        if rurl.scheme != "http" or rurl.netloc != srv["metrics_listen"] or rurl.path != "/ready":
            raise Failure(f"{where} readiness must probe /ready on server.metrics_listen")
        # Drain: preStop + shutdown_timeout_secs + forward flush < grace period.
        pre = c["lifecycle"]["preStop"]["exec"]["command"]
        sleep = int(pre[-1]) if pre[0].endswith("sleep") else 0
        drain = srv.get("shutdown_timeout_secs", 30)
        flush = cfg.get("audit", {}).get("forward", {}).get("shutdown_flush_secs", 5)
        grace = pod.get("terminationGracePeriodSeconds", 30)
        if not sleep or grace <= sleep + drain + flush:
            raise Failure(f"{where} terminationGracePeriodSeconds {grace} must exceed preStop {sleep} + drain {drain} + flush {flush}")
        # GPU or CPU.
        limits = c.get("resources", {}).get("limits", {})
        if variant == "overlays/cpu":
            if "nvidia.com/gpu" in json.dumps(c.get("resources")) or pod.get("tolerations"):
                raise Failure(f"{where} the CPU variant must not ask for GPUs")
            if env["SALUS_MODEL__DEVICE"]["value"] != "cpu" or not c["image"].endswith(":cpu"):
                raise Failure(f"{where} the CPU variant must run the CPU image on device cpu")
            if "SALUS_SCHEDULER__KV_CACHE_FRACTION" in env or "SALUS_SCHEDULER__KV_CACHE_BYTES" not in env:
                raise Failure(f"{where} the CPU variant sizes the KV cache in bytes")
        else:
            if limits.get("nvidia.com/gpu") != "1" or not env["SALUS_MODEL__DEVICE"]["value"].startswith("cuda"):
                raise Failure(f"{where} the GPU variant asks for one nvidia.com/gpu and device cuda")
        checked.append(variant)
    return ", ".join(checked)


# --------------------------------------------------------------------------- 2. alerts

def load_alerts():
    with open(os.path.join(PROM, "alerts.yml")) as f:
        groups = yaml.safe_load(f)["groups"]
    return [r for g in groups for r in g["rules"]]


@check("promtool check rules configs/prometheus/alerts.yml")
def check_rules(promtool):
    out = run([promtool, "check", "rules", os.path.join(PROM, "alerts.yml")])
    if out.returncode != 0:
        raise Failure(out.stdout + out.stderr)
    rules = load_alerts()
    for r in rules:
        if r.get("labels", {}).get("severity") not in ("critical", "warning", "info"):
            raise Failure(f"{r['alert']}: severity must be critical, warning or info")
        if not {"summary", "description"} <= set(r.get("annotations", {})):
            raise Failure(f"{r['alert']}: needs summary and description")
    return f"{len(rules)} alerting rules"


@check("promtool test rules configs/prometheus/alerts.test.yml, every alert fires in a test")
def check_rule_tests(promtool):
    out = run([promtool, "test", "rules", "alerts.test.yml"], cwd=PROM)
    if out.returncode != 0:
        raise Failure(out.stdout[-3000:] + out.stderr[-2000:])
    with open(os.path.join(PROM, "alerts.test.yml")) as f:
        tests = yaml.safe_load(f)["tests"]
    fired = {t["alertname"] for case in tests for t in case.get("alert_rule_test", []) if t.get("exp_alerts")}
    names = [r["alert"] for r in load_alerts()]
    missing = sorted(set(names) - fired)
    if missing:
        raise Failure(f"alerts never shown firing in alerts.test.yml: {missing}")
    evals = sum(len(case.get("alert_rule_test", [])) for case in tests)
    return f"{len(tests)} test cases, {evals} evaluations, all {len(names)} alerts fire"


@check("promtool check config configs/prometheus/prometheus.yml (the example)")
def check_example_config(promtool, work):
    # The example names files of a real host; lay them out beside a copy.
    d = os.path.join(work, "example-prom")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(PROM, "prometheus.yml")) as f:
        cfg = yaml.safe_load(f)
    for job in cfg["scrape_configs"]:
        for sect, key in (("authorization", "credentials_file"), ("tls_config", "ca_file")):
            p = job.get(sect, {}).get(key)
            if p:
                local = os.path.join(d, p.strip("/").replace("/", "_"))
                open(local, "w").close()
                job[sect][key] = local
    cfg["rule_files"] = [os.path.join(PROM, r) for r in cfg.get("rule_files", [])]
    for j in cfg["scrape_configs"]:
        if j.get("scheme") != "https" or j.get("authorization", {}).get("type") != "Bearer" \
                or not j.get("authorization", {}).get("credentials_file") or not j.get("tls_config", {}).get("ca_file"):
            raise Failure(f"job {j['job_name']} must scrape over https with a bearer token file and a CA file")
    path = os.path.join(d, "prometheus.yml")

    def promtool_check(c):
        with open(path, "w") as f:
            yaml.safe_dump(c, f)
        return run([promtool, "check", "config", path])
    out = promtool_check(cfg)
    skipped = ""
    if out.returncode != 0 and "kubernetes_sd_configs not found" in out.stdout + out.stderr:
        # Debian builds Prometheus without Kubernetes service discovery.
        k8s = [j["job_name"] for j in cfg["scrape_configs"] if "kubernetes_sd_configs" in j]
        cfg["scrape_configs"] = [j for j in cfg["scrape_configs"] if "kubernetes_sd_configs" not in j]
        note(f"this promtool has no Kubernetes service discovery (Debian's build): job {', '.join(k8s)} "
             "checked for TLS and the key file only")
        skipped = f"; {', '.join(k8s)} not parsed by this promtool"
        out = promtool_check(cfg)
    if out.returncode != 0:
        raise Failure(out.stdout + out.stderr)
    jobs = [j["job_name"] for j in cfg["scrape_configs"]]
    return f"jobs {', '.join(jobs)}{skipped}"


# --------------------------------------------------------------------------- 3. a replica

class Replica:
    """The CPU overlay's pod, laid out under `work` the way kubelet would."""

    def __init__(self, args, docs, work):
        self.args, self.docs, self.work = args, docs, work
        self.sts, self.pod, self.c = workload(docs)
        self.as_salus = os.geteuid() == 0 and shutil.which("setpriv") is not None
        self.port, self.mport = free_port(), free_port()
        self.proc = None
        self.forward = False
        self.stderr_path = os.path.join(work, "server.err")

    # ---- files
    def _secret_dir(self, path):
        """A Secret volume: tmpfs root mode 1777 (sticky), kubelet-owned."""
        os.makedirs(path, exist_ok=True)
        os.chmod(path, 0o1777)

    def _secret_file(self, path, data):
        with open(path, "wb") as f:
            f.write(data)
        # defaultMode 0400 | fsGroup's 0440, group = fsGroup.
        os.chmod(path, 0o440)
        if self.as_salus:
            os.chown(path, 0, SALUS_UID)

    def host(self, container_path):
        return self.remap(container_path)

    def remap(self, text):
        """Container paths to their host paths, in one pass (a mount path is
        replaced only where it starts a path)."""
        table = dict(self.mounts)
        alt = "|".join(re.escape(mp) for mp in sorted(table, key=len, reverse=True))
        return re.sub(rf"(?<![\w./-])({alt})(?=[/\"'\s]|$)", lambda m: table[m.group(1)], text)

    def lay_out(self):
        w, binp = self.work, self.args.bin
        os.chmod(w, 0o755)
        self.mounts = []
        for m in sorted(self.c["volumeMounts"], key=lambda m: -len(m["mountPath"])):
            self.mounts.append((m["mountPath"], os.path.join(w, "pod") + m["mountPath"]))
        # The image: the binary at /usr/local/bin/salus, the working directory.
        self.bin = os.path.join(w, "pod", "usr", "local", "bin", "salus")
        os.makedirs(os.path.dirname(self.bin), exist_ok=True)
        try:
            os.link(binp, self.bin)
        except OSError:
            shutil.copy2(binp, self.bin)
        os.chmod(self.bin, 0o755)
        self.mounts.append(("/usr/local/bin/salus", self.bin))
        self.home = os.path.join(w, "pod", "var", "lib", "salus")
        os.makedirs(self.home, exist_ok=True)
        for d in (os.path.join(w, "pod", "etc", "salus"), os.path.join(w, "pod")):
            os.makedirs(d, exist_ok=True)
            os.chmod(d, 0o755)
        vols = {v["name"]: v for v in self.pod["volumes"]}
        tmpl = {t["metadata"]["name"] for t in self.sts["spec"]["volumeClaimTemplates"]}
        secrets_dir = os.path.join(w, "secrets")
        os.makedirs(secrets_dir, mode=0o700, exist_ok=True)
        # Keys and certificate, made with Salus' and openssl's own tools.
        kek = os.path.join(secrets_dir, "kek")
        audit_key = os.path.join(secrets_dir, "audit")
        for cmd in ([binp, "model", "keygen", kek], [binp, "audit", "keygen", audit_key]):
            out = run(cmd)
            if out.returncode != 0:
                raise Failure(f"{' '.join(cmd)}: {out.stderr}")
        self.cert, key = os.path.join(secrets_dir, "tls.crt"), os.path.join(secrets_dir, "tls.key")
        out = run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                   "-days", "365", "-subj", "/CN=salus.salus.svc",
                   "-addext", "subjectAltName=DNS:salus.salus.svc,DNS:localhost,IP:127.0.0.1",
                   "-keyout", key, "-out", self.cert])
        if out.returncode != 0:
            raise Failure(f"openssl: {out.stderr}")
        store = os.path.join(secrets_dir, "api-keys.json")
        self.inference_key = self._key(store, "fleet-client", "inference")
        self.metrics_key = self._key(store, "fleet-prometheus", "metrics")
        self.secret_values = {("salus-keys", "kek"): open(kek, "rb").read(),
                              ("salus-keys", "audit"): open(audit_key, "rb").read(),
                              ("salus-tls", "tls.crt"): open(self.cert, "rb").read(),
                              ("salus-tls", "tls.key"): open(key, "rb").read(),
                              ("salus-api-keys", "api-keys.json"): open(store, "rb").read()}
        self.audit_key_file = audit_key
        cfg_text = None
        for m in self.c["volumeMounts"]:
            hp = self.host(m["mountPath"])
            if m["name"] in tmpl:
                # The claim: its root as kubelet leaves it with fsGroup (setgid, group rwx).
                os.makedirs(hp, exist_ok=True)
                os.chmod(hp, 0o2770)
                if self.as_salus:
                    os.chown(hp, 0, SALUS_UID)
                self.claim = hp
                continue
            v = vols[m["name"]]
            if "configMap" in v:
                cm = one(self.docs, "ConfigMap", v["configMap"]["name"])
                cfg_text = cm["data"][m["subPath"]]
                self.config_path = hp
                self.config_text = cfg_text
            elif "secret" in v:
                self._secret_dir(hp)
                name = v["secret"]["secretName"]
                items = v["secret"].get("items") or [{"key": k, "path": k} for (s, k) in self.secret_values if s == name]
                for it in items:
                    self._secret_file(os.path.join(hp, it["path"]), self.secret_values[(name, it["key"])])
            elif "persistentVolumeClaim" in v:
                # The shared model claim: the sealed model, readable by the group.
                os.makedirs(hp, exist_ok=True)
                os.chmod(hp, 0o755)
                self.models_dir = hp
            elif "emptyDir" in v:
                os.makedirs(hp, exist_ok=True)
                os.chmod(hp, 0o1777)
                self.tmp = hp
        if cfg_text is None:
            raise Failure("no ConfigMap mount of salus.toml")
        cfg = tomllib.loads(cfg_text)
        # The sealed model where the configuration expects it.
        model = self.host(cfg["model"]["path"])
        out = run([binp, "model", "seal", self.args.model, "--out", model, "--kek", f"file:{kek}"], timeout=300)
        if out.returncode != 0:
            raise Failure(f"model seal: {out.stderr}")
        os.chmod(model, 0o440)
        if self.as_salus:
            os.chown(model, 0, SALUS_UID)
        # The configuration: container paths and ports replaced, nothing else.
        text = self.remap(cfg_text)
        text = text.replace(f'"{cfg["server"]["listen"]}"', f'"127.0.0.1:{self.port}"')
        text = text.replace(f'"{cfg["server"]["metrics_listen"]}"', f'"127.0.0.1:{self.mport}"')
        with open(self.config_path, "w") as f:
            f.write(text)
        os.chmod(self.config_path, 0o644)
        self.cfg = tomllib.loads(text)
        self.model_id = self.cfg["model"]["id"]
        self.audit_dir = self.cfg["audit"]["dir"]
        self.listen, self.metrics_listen = cfg["server"]["listen"], cfg["server"]["metrics_listen"]

    def _key(self, store, principal, role):
        out = run([self.args.bin, "keys", "--api-keys", store, "create", "--principal", principal,
                   "--kind", "service", "--role", role])
        if out.returncode != 0:
            raise Failure(f"keys create: {out.stderr}")
        return out.stdout.strip()

    # ---- the container
    def image_env(self):
        """ENV of the CPU image (the last stage of configs/docker/Dockerfile.cpu), as the runtime sets it."""
        with open(os.path.join(ROOT, "configs", "docker", "Dockerfile.cpu")) as f:
            text = f.read().replace("\\\n", " ")
        env = {}
        for line in text.split("\nFROM ")[-1].splitlines():
            if line.startswith("ENV "):
                for kv in line[4:].split():
                    k, _, v = kv.partition("=")
                    env[k] = v
        return env

    def remap_value(self, v):
        """A container value on this host: paths, and the two listeners'
        addresses (also as loopback URLs, which is how the probes name them)."""
        v = self.remap(v)
        v = v.replace(self.listen, f"127.0.0.1:{self.port}").replace(self.metrics_listen, f"127.0.0.1:{self.mport}")
        lport, mport = self.listen.rsplit(":", 1)[1], self.metrics_listen.rsplit(":", 1)[1]
        v = re.sub(rf"://(127\.0\.0\.1|localhost):{lport}\b", f"://127.0.0.1:{self.port}", v)
        return re.sub(rf"://(127\.0\.0\.1|localhost):{mport}\b", f"://127.0.0.1:{self.mport}", v)

    def environment(self, forward_port=None, instance=True):
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": self.home,
               "TMPDIR": self.tmp, "HOSTNAME": "salus-0", "LANG": "C.UTF-8"}
        for k, v in self.image_env().items():
            env[k] = self.remap_value(v)
        for e in self.c.get("env", []):
            if "value" in e:
                env[e["name"]] = self.remap_value(e["value"])
            elif "secretKeyRef" in e.get("valueFrom", {}):
                ref = e["valueFrom"]["secretKeyRef"]
                # The Secret's bytes as they are (keygen's trailing newline included), as kubelet passes them.
                env[e["name"]] = self.secret_values[(ref["name"], ref["key"])].decode()
            elif "fieldRef" in e.get("valueFrom", {}):
                env[e["name"]] = {"metadata.name": "salus-0", "metadata.namespace": "salus"}[e["valueFrom"]["fieldRef"]["fieldPath"]]
        if not instance:
            env.pop("SALUS_AUDIT__INSTANCE", None)
        if forward_port:
            # A SIEM collector that is not there: the forwarder's metrics appear, lag grows.
            env["SALUS_AUDIT__FORWARD"] = f'{{target = "127.0.0.1:{forward_port}"}}'
        return env

    def as_container(self, argv):
        """argv (host paths already) as the container's user."""
        if self.as_salus:
            return ["setpriv", f"--reuid={SALUS_UID}", f"--regid={SALUS_UID}", "--clear-groups", "--no-new-privs",
                    "--inh-caps=-all", "--bounding-set=-all,+ipc_lock", "--"] + argv
        return argv

    def start(self, forward=True, instance=True):
        cmd = [self.remap_value(a) for a in self.c["command"] + self.c.get("args", [])]
        self.forward, self.instance = forward, instance
        env = self.environment(free_port() if forward else None, instance)
        self.env = env
        self.err = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(self.as_container(cmd), env=env, cwd=self.home, stdout=self.err,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.started_at = time.time()

    def probe(self, name, url=None):
        """Runs a probe's exec command as kubelet would (in the container, its timeout)."""
        p = self.c[name]
        argv = list(p["exec"]["command"])
        if url:
            argv[argv.index("--url") + 1] = url
        argv = [self.remap_value(a) for a in argv]
        try:
            out = run(self.as_container(argv), env=self.env, cwd=self.home, timeout=p.get("timeoutSeconds", 1) + 2)
        except subprocess.TimeoutExpired:
            return 124, "timed out"
        return out.returncode, (out.stdout + out.stderr).strip()

    def log(self):
        try:
            with open(self.stderr_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def stop(self, sig=signal.SIGTERM):
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)

    # ---- talking to it
    def ctx(self):
        return ssl.create_default_context(cafile=self.cert)

    def request(self, method, path, body=None, key=None, headers=None, timeout=60):
        url = f"https://127.0.0.1:{self.port}{path}"
        data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
        req = urllib.request.Request(url, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if key:
            req.add_header("Authorization", f"Bearer {key}")
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        try:
            with urllib.request.urlopen(req, context=self.ctx(), timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()


@check("a replica starts from the CPU overlay's config, command, image and environment, laid out as kubelet mounts it")
def check_start(rep):
    rep.lay_out()
    # A configuration Salus refuses exits at once, before the model loads. Keys
    # that older binaries lack are dropped, with a note: audit.instance (the
    # manifest's SALUS_AUDIT__INSTANCE) and the test's own [audit.forward].
    forward, instance = True, True
    for _ in range(3):
        rep.start(forward=forward, instance=instance)
        # While the trail opens and the model loads, neither probe may pass.
        rep.early = {name: rep.probe(name)[0] for name in ("startupProbe", "readinessProbe")}
        deadline = time.time() + 3
        while time.time() < deadline and rep.proc.poll() is None:
            time.sleep(0.2)
        if rep.proc.poll() is None:
            break
        log = rep.log()
        if instance and "unknown field `instance`" in log:
            note("this binary has no audit.instance: started without SALUS_AUDIT__INSTANCE (records name the host)")
            instance = False
        elif forward and "forward" in log:
            note("this binary refuses [audit.forward]; started without it (forwarder metrics count as optional)")
            forward = False
        else:
            break
    if rep.proc.poll() is not None:
        raise Failure(f"salus serve exited {rep.proc.returncode}:\n{rep.log()[-3000:]}")
    who = f"uid {SALUS_UID} via setpriv, no capabilities but ipc_lock in the bounding set" if rep.as_salus else "the current user"
    return f"as {who}; config {os.path.relpath(rep.config_path, rep.work)}"


@check("the startup probe's command passes once the model is loaded and the trail is open, not before")
def check_startup(rep):
    passed_early = [name for name, rc in rep.early.items() if rc == 0]
    if passed_early:
        raise Failure(f"{passed_early} passed right after the process started, before the model could load")
    p = rep.c["startupProbe"]
    limit = time.time() + min(p.get("failureThreshold", 3) * p.get("periodSeconds", 10), 180)
    tries = 0
    while True:
        tries += 1
        rc, out = rep.probe("startupProbe")
        if rc == 0:
            break
        if rep.proc.poll() is not None:
            raise Failure(f"salus serve exited {rep.proc.returncode} during start-up:\n{rep.log()[-3000:]}")
        if time.time() > limit:
            raise Failure(f"startup probe never passed: {out}")
        time.sleep(0.5)
    # Passing means serving: a generation succeeds at once, and the trail holds server.started.
    status, body = rep.request("POST", "/v1/chat/completions", {
        "model": rep.model_id, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4}, key=rep.inference_key)
    if status != 200:
        raise Failure(f"startup probe passed but a chat completion got {status}: {body[:300]!r}")
    took = time.time() - rep.started_at
    q = run([rep.args.bin, "audit", "query", "--dir", rep.audit_dir, "--key", f"file:{rep.audit_key_file}", "--event", "server"])
    if q.returncode != 0 or '"server.started"' not in q.stdout:
        raise Failure(f"no server.started record while the probe passes: {q.stderr[-500:]}")
    if rep.instance:
        names = {json.loads(l).get("instance") for l in q.stdout.splitlines() if l.strip()}
        if names != {rep.env["SALUS_AUDIT__INSTANCE"]}:
            raise Failure(f"records name instance {names}, not the pod's name {rep.env['SALUS_AUDIT__INSTANCE']}")
    return (f"failed at start, passed after {took:.1f}s ({tries} tries); then a chat completion answered 200 "
            "and the trail held server.started" + (f" from instance {rep.env['SALUS_AUDIT__INSTANCE']}" if rep.instance else ""))


@check("the liveness probe's command passes (https /health on loopback, no key)")
def check_liveness(rep):
    rc, out = rep.probe("livenessProbe")
    if rc != 0:
        raise Failure(out)
    return " ".join(rep.remap_value(a) for a in rep.c["livenessProbe"]["exec"]["command"][1:])


def ready_served(rep):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{rep.mport}/ready", timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@check("the readiness probe's command passes (/ready on the loopback metrics listener: ready or not, nothing else)")
def check_readiness(rep):
    status, body = ready_served(rep)
    if status == 404:
        url = f"https://127.0.0.1:{rep.port}/health"
        note(f"this binary's metrics listener has no /ready yet (404): the readiness command runs against {url}; "
             "with /ready there it runs as the manifest says")
        rep.ready_url = url
        rc, out = rep.probe("readinessProbe", url=url)
        if rc != 0:
            raise Failure(out)
        return "against /health (metrics listener without /ready)"
    rep.ready_url = None
    if status != 200:
        raise Failure(f"/ready answered {status}: {body[:200]!r}")
    doc = json.loads(body)
    if doc != {"status": "ready"}:
        raise Failure(f"/ready on the metrics listener must say only ready/not ready, got {doc}")
    rc, out = rep.probe("readinessProbe")
    if rc != 0:
        raise Failure(out)
    # It can fail: the same command against a port where nothing listens.
    rc, _ = rep.probe("readinessProbe", url=f"http://127.0.0.1:{free_port()}/ready")
    if rc == 0:
        raise Failure("the readiness command passed against a closed port")
    return " ".join(rep.remap_value(a) for a in rep.c["readinessProbe"]["exec"]["command"][1:])


@check("the replica runs as the pod spec says: JSON logs, trail 0700 on the claim, weights sealed, memory lock best effort")
def check_running(rep, metrics):
    lines = [l for l in rep.log().splitlines() if l.strip()]
    bad = [l for l in lines if not l.startswith("{")]
    if bad:
        raise Failure(f"logging.format = json, but {len(bad)} lines are not JSON: {bad[0][:200]}")
    for l in lines:
        json.loads(l)
    st = os.stat(rep.audit_dir)
    # 0700 (plus the setgid bit a fsGroup claim passes on to new directories).
    if stat.S_IMODE(st.st_mode) & 0o777 != 0o700 or os.path.dirname(rep.audit_dir) != rep.claim:
        raise Failure(f"audit dir {rep.audit_dir} mode {oct(stat.S_IMODE(st.st_mode))}")
    if rep.as_salus and st.st_uid != SALUS_UID:
        raise Failure(f"audit dir owned by {st.st_uid}, not {SALUS_UID}")
    status, body = rep.request("GET", "/v1/models", key=rep.inference_key)
    models = json.loads(body)["data"] if status == 200 else []
    if [m["id"] for m in models] != [rep.model_id]:
        raise Failure(f"/v1/models: {status} {body[:200]!r}")
    locked = metrics.get("salus_memory_locked_bytes", 0)
    failed = metrics.get("salus_memory_lock_failed_bytes", 0)
    return (f"{len(lines)} JSON log lines; memlock limit here {'covers' if not failed else 'short by'} "
            f"{int(failed or locked)} bytes (best_effort serves either way; alert SalusMemoryNotLocked)")


def scrape_direct(rep):
    status, body = rep.request("GET", "/metrics", key=rep.metrics_key)
    if status != 200:
        raise Failure(f"/metrics with the metrics key: {status}")
    values, names = {}, set()
    for line in body.decode().splitlines():
        if not line or line.startswith("#"):
            continue
        name = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line).group(0)
        names.add(name)
        if "{" not in line:
            values[name] = float(line.split()[-1])
    return names, values


# --------------------------------------------------------------------------- 4. Prometheus

class Prometheus:
    def __init__(self, args, rep, work):
        self.args, self.rep = args, rep
        self.dir = os.path.join(work, "prometheus")
        os.makedirs(self.dir, exist_ok=True)
        self.port = free_port()
        self.proc = None

    def config(self):
        with open(os.path.join(PROM, "prometheus.yml")) as f:
            example = yaml.safe_load(f)
        job = copy.deepcopy(next(j for j in example["scrape_configs"] if "static_configs" in j))
        token = os.path.join(self.dir, "metrics-key")
        with open(token, "w") as f:
            f.write(self.rep.metrics_key + "\n")
        os.chmod(token, 0o600)
        ca = os.path.join(self.dir, "ca.pem")
        shutil.copy(self.rep.cert, ca)
        job["static_configs"] = [{"targets": [f"127.0.0.1:{self.rep.port}"]}]
        job["authorization"]["credentials_file"] = token
        job["tls_config"]["ca_file"] = ca
        job["scrape_interval"] = "1s"
        job["scrape_timeout"] = "1s"
        cfg = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
               "rule_files": [os.path.join(PROM, r) for r in example.get("rule_files", [])],
               "scrape_configs": [job]}
        self.job = job["job_name"]
        path = os.path.join(self.dir, "prometheus.yml")
        with open(path, "w") as f:
            yaml.safe_dump(cfg, f)
        return path

    def start(self):
        path = self.config()
        out = run([self.args.promtool, "check", "config", path])
        if out.returncode != 0:
            raise Failure(f"promtool check config: {out.stdout}{out.stderr}")
        self.log = open(os.path.join(self.dir, "prometheus.log"), "wb")
        self.proc = subprocess.Popen(
            [self.args.prometheus, f"--config.file={path}", f"--storage.tsdb.path={os.path.join(self.dir, 'data')}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1h"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def api(self, path, **params):
        url = f"http://127.0.0.1:{self.port}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params, doseq=True)
        with urllib.request.urlopen(url, timeout=10) as r:
            doc = json.loads(r.read())
        if doc.get("status") != "success":
            raise Failure(f"{path}: {doc}")
        return doc["data"]

    def query(self, expr):
        return self.api("/api/v1/query", query=expr)["result"]

    def logtail(self):
        with open(os.path.join(self.dir, "prometheus.log"), "rb") as f:
            return f.read().decode("utf-8", "replace")[-2000:]

    def stop(self):
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


@check("a real Prometheus scrapes the replica over TLS with a metrics key (the example's static job)")
def check_scrape(prom):
    prom.start()
    deadline = time.time() + 60
    last = None
    while time.time() < deadline:
        if prom.proc.poll() is not None:
            raise Failure(f"prometheus exited {prom.proc.returncode}: {prom.logtail()}")
        try:
            targets = prom.api("/api/v1/targets")["activeTargets"]
            last = targets
            if targets and all(t["health"] == "up" for t in targets) and prom.query(f'up{{job="{prom.job}"}} == 1'):
                t = targets[0]
                return f"{t['scrapeUrl']} up, job {prom.job}"
        except (OSError, Failure, ValueError):
            pass
        time.sleep(0.5)
    raise Failure(f"target never up: {json.dumps(last)[:800]}\n{prom.logtail()}")


def traffic(rep, canary):
    """Requests of each kind, the canary in every place a client controls."""
    expect = []
    msg = {"model": rep.model_id, "messages": [{"role": "user", "content": f"Repeat {canary} once."}], "max_tokens": 8,
           "temperature": 0}
    for _ in range(3):
        expect.append(("chat", 200, rep.request("POST", "/v1/chat/completions", msg, key=rep.inference_key,
                                                headers={"X-Fleet-Canary": canary})[0]))
    expect.append(("chat stream", 200, rep.request("POST", "/v1/chat/completions", dict(msg, stream=True),
                                                   key=rep.inference_key)[0]))
    expect.append(("completions", 200, rep.request("POST", "/v1/completions", {
        "model": rep.model_id, "prompt": f"{canary} is", "max_tokens": 4}, key=rep.inference_key)[0]))
    expect.append(("tokenize", 200, rep.request("POST", "/tokenize", {"model": rep.model_id, "prompt": canary},
                                                key=rep.inference_key)[0]))
    expect.append(("unknown path", 404, rep.request("GET", f"/v1/{canary}?q={canary}", key=rep.inference_key)[0]))
    expect.append(("bad key", 401, rep.request("GET", "/v1/models", key=f"sk-salus-{canary}")[0]))
    expect.append(("bad body", 400, rep.request("POST", "/v1/chat/completions", f'{{"{canary}": '.encode(),
                                                key=rep.inference_key)[0]))
    wrong = [f"{what}: {got} (expected {want})" for what, want, got in expect if want != got]
    if wrong:
        raise Failure("; ".join(wrong))
    return len(expect)


def source_sets():
    """Fixed label values, read from the server's source (so they cannot drift)."""
    with open(os.path.join(ROOT, "server", "src", "metrics.rs")) as f:
        metrics_rs = f.read()
    m = re.search(r"const ROUTES: &\[&str\] = &\[(.*?)\];", metrics_rs, re.S)
    routes = set(re.findall(r'"([^"]+)"', m.group(1))) if m else set()
    results = set(re.findall(r'ConstraintResult::\w+ => "(\w+)"', metrics_rs))
    with open(os.path.join(ROOT, "server", "src", "auth", "policy.rs")) as f:
        rules = set(re.findall(r'PolicyRule::\w+ => "(\w+)"', f.read()))
    if len(routes) < 10 or len(results) < 3 or len(rules) < 3:
        raise Failure(f"could not read the fixed label sets from the source (routes {routes}, results {results}, "
                      f"rules {rules}): update source_sets()")
    return routes | {"other"}, results, rules


@check("every label value of every salus_* series in Prometheus is in its fixed set; the canary is nowhere")
def check_labels(prom, rep, canary, exposed):
    routes, results, rules = source_sets()
    principals = set(rep.cfg.get("auth", {}).get("limits", {}).get("metric_principals", []))
    allowed = {
        "route": lambda v: v in routes,
        "status": lambda v: re.fullmatch(r"[1-5][0-9]{2}", v) is not None,
        "model": lambda v: v == rep.model_id,
        "limit": lambda v: v in rules,
        "rule": lambda v: v in rules,
        "result": lambda v: v in results,
        "le": lambda v: v == "+Inf" or re.fullmatch(r"[0-9.]+(e[-+]?[0-9]+)?", v) is not None,
        "principal": lambda v: v in principals,
        # Added by Prometheus from its own configuration.
        "job": lambda v: v == prom.job,
        "instance": lambda v: v == f"127.0.0.1:{rep.port}",
    }
    series = prom.api("/api/v1/series", **{"match[]": '{__name__=~"salus_.+"}'})
    if len(series) < 50:
        raise Failure(f"only {len(series)} Salus series")
    bad = []
    for s in series:
        for k, v in s.items():
            if canary.lower() in v.lower():
                bad.append(f"canary in {s}")
            if k == "__name__":
                continue
            if k not in allowed or not allowed[k](v):
                bad.append(f"{s['__name__']}{{{k}={v!r}}}")
    if bad:
        raise Failure(f"{len(bad)} label values outside the fixed sets: {bad[:10]}")
    names = {s["__name__"] for s in series}
    missing = {n for n in exposed if n.startswith("salus_")} - names
    if missing:
        raise Failure(f"exposed on /metrics but not in Prometheus: {sorted(missing)}")
    chat = prom.query('sum(salus_requests_total{route="/v1/chat/completions", status="200"})')
    if not chat or float(chat[0]["value"][1]) < 4:
        raise Failure(f"salus_requests_total for chat completions: {chat}")
    other = prom.query('salus_requests_total{route="other", status="404"}')
    if not other:
        raise Failure("the request to an unknown path is not counted as route other")
    labels = prom.api("/api/v1/labels", **{"match[]": '{__name__=~"salus_.+"}'})
    return (f"{len(series)} series of {len(names)} metrics, label names {sorted(set(labels) - {'__name__'})}; "
            f"unknown path counted as route=\"other\"")


def promql_metric_names(expr):
    """Metric names an expression selects (strings, matchers, ranges and
    grouping lists removed; functions and keywords skipped)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    s = re.sub(r"'(?:[^'\\]|\\.)*'", "''", s)
    s = re.sub(r"\{[^}]*\}", "{}", s)
    s = re.sub(r"\[[^\]]*\]", "[]", s)
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r"\1()", s)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", s):
        tok = m.group(0)
        if m.start() > 0 and (s[m.start() - 1].isdigit() or s[m.start() - 1] in ".$"):
            continue  # 1e3, 5m, a variable
        if tok in PROMQL_KEYWORDS:
            continue
        if s[m.end():].lstrip().startswith("("):
            if tok not in PROMQL_FUNCTIONS:
                raise Failure(f"unknown function {tok} in {expr}")
            continue
        if tok in PROMQL_FUNCTIONS and re.match(r"\s*(by|without)\b", s[m.end():]):
            continue
        names.add(tok)
    return names


def grafana_expr(expr):
    return (expr.replace("$__rate_interval", "1m").replace("$__interval", "1m").replace("$__range", "5m")
            .replace("$job", ".*").replace("$instance", ".*"))


def allowed_names(exposed, rep):
    optional = (set() if rep.forward else FORWARD_METRICS) | SHIP_METRICS
    return exposed | FOREIGN_METRICS, PENDING_METRICS | optional


@check("the Grafana dashboard parses and every query uses exposed metrics, is valid PromQL and gets an answer")
def check_dashboard(prom, rep, exposed):
    with open(DASHBOARD) as f:
        dash = json.load(f)
    for k in ("uid", "title", "panels", "templating", "schemaVersion"):
        if k not in dash:
            raise Failure(f"no {k}")
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    if variables.get("datasource", {}).get("type") != "datasource" or variables["datasource"].get("query") != "prometheus":
        raise Failure("the data source must be the templated variable `datasource` (type prometheus)")
    for v in variables.values():
        if v["type"] == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", q)
            if not m or not promql_metric_names(grafana_expr(m.group(1))) <= exposed:
                raise Failure(f"variable {v['name']}: {q}")
    known, pending = allowed_names(exposed, rep)
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    exprs, empty, used_pending = 0, [], set()
    titles = set()
    for p in panels:
        if p["title"] in titles:
            raise Failure(f"two panels titled {p['title']!r}")
        titles.add(p["title"])
        if p.get("datasource", {}).get("uid") != "${datasource}":
            raise Failure(f"panel {p['title']!r}: datasource must be ${{datasource}}")
        answered, all_pending = False, True
        for t in p.get("targets", []):
            if t.get("datasource", {}).get("uid") != "${datasource}":
                raise Failure(f"panel {p['title']!r}: target datasource must be ${{datasource}}")
            names = promql_metric_names(t["expr"])
            unknown = names - known - pending
            if unknown:
                raise Failure(f"panel {p['title']!r} uses metrics the server does not expose: {sorted(unknown)}")
            used_pending |= names & pending
            if not names <= pending:
                all_pending = False
            try:
                result = prom.query(grafana_expr(t["expr"]))
            except urllib.error.HTTPError as e:
                raise Failure(f"panel {p['title']!r}: {t['expr']}: {e.read()[:300]!r}")
            exprs += 1
            answered = answered or bool(result)
        if not answered and not all_pending:
            empty.append(p["title"])
    if empty:
        raise Failure(f"panels without any data against a server with traffic: {empty}")
    if used_pending:
        note(f"dashboard uses metrics this binary does not expose yet: {sorted(used_pending)} (panels stay empty until then)")
    return f"{len(panels)} panels, {exprs} queries"


@check("alerts.yml uses only exposed metrics; Prometheus loaded and evaluated every rule; no critical alert is active")
def check_rules_live(prom, rep, exposed):
    known, pending = allowed_names(exposed, rep)
    rules = load_alerts()
    used_pending = set()
    for r in rules:
        names = promql_metric_names(r["expr"])
        unknown = names - known - pending
        if unknown:
            raise Failure(f"{r['alert']} uses metrics the server does not expose: {sorted(unknown)}")
        used_pending |= names & pending
    deadline = time.time() + 20
    while True:
        groups = prom.api("/api/v1/rules")["groups"]
        loaded = [r for g in groups for r in g["rules"]]
        unevaluated = [r["name"] for r in loaded if r.get("lastEvaluation", "0001").startswith("0001")]
        if len(loaded) == len(rules) and not unevaluated:
            break
        if time.time() > deadline:
            raise Failure(f"{len(loaded)} of {len(rules)} rules loaded; not evaluated: {unevaluated}")
        time.sleep(0.5)
    broken = [f"{r['name']}: {r.get('lastError')}" for r in loaded if r.get("health") != "ok"]
    if broken:
        raise Failure(f"rules failing to evaluate: {broken}")
    active = prom.api("/api/v1/alerts")["alerts"]
    # The audit volume alerts depend on the disk this runs on.
    crit = [a["labels"]["alertname"] for a in active if a["labels"].get("severity") == "critical"
            and not a["labels"]["alertname"].startswith("SalusAuditVolume")]
    if crit:
        raise Failure(f"critical alerts active against a healthy replica: {crit}")
    if used_pending:
        note(f"alerts use metrics this binary does not expose yet: {sorted(used_pending)}")
    shown = sorted({f"{a['labels']['alertname']} ({a['state']})" for a in active})
    return f"{len(loaded)} rules healthy; active: {', '.join(shown) or 'none'}"


# --------------------------------------------------------------------------- 5. drain

@check("SIGTERM: readiness fails at once, the replica drains and exits 0 within its grace period, the trail verifies")
def check_drain(rep, canary):
    grace = rep.pod.get("terminationGracePeriodSeconds", 30)
    pre = rep.c["lifecycle"]["preStop"]["exec"]["command"]
    budget = grace - (int(pre[-1]) if pre[0].endswith("sleep") else 0)
    # A generation in flight when SIGTERM arrives must still complete.
    import threading
    result = {}

    def inflight():
        result["r"] = rep.request("POST", "/v1/chat/completions", {
            "model": rep.model_id, "messages": [{"role": "user", "content": "Count to fifty."}], "max_tokens": 160,
            "logit_bias": {"0": -100, "1": -100, "2": -100}, "stream": True}, key=rep.inference_key, timeout=budget)
    t = threading.Thread(target=inflight)
    t.start()
    time.sleep(0.3)
    t0 = time.time()
    rep.stop(signal.SIGTERM)
    time.sleep(0.2)
    if rep.ready_url is None and rep.proc.poll() is None:
        rc, _ = rep.probe("readinessProbe")
        if rc == 0:
            raise Failure("the readiness probe still passes after SIGTERM")
    elif rep.ready_url is not None:
        note("readiness after SIGTERM not checked: this binary's metrics listener has no /ready")
    try:
        code = rep.proc.wait(timeout=budget)
    except subprocess.TimeoutExpired:
        rep.stop(signal.SIGKILL)
        raise Failure(f"still running {budget}s after SIGTERM (grace period {grace}s minus preStop)")
    took = time.time() - t0
    t.join(5)
    if code != 0:
        raise Failure(f"exit status {code}:\n{rep.log()[-1500:]}")
    status, body = result.get("r", (None, b""))
    if status != 200 or b"data: [DONE]" not in body:
        raise Failure(f"the generation in flight at SIGTERM did not complete: {status} {body[-200:]!r}")
    out = run([rep.args.bin, "audit", "verify", "--dir", rep.audit_dir, "--key", f"file:{rep.audit_key_file}"])
    if out.returncode != 0:
        raise Failure(f"audit verify: {out.stdout}{out.stderr}")
    log = rep.log()
    if canary in log or rep.inference_key in log:
        raise Failure("the server's output holds the canary or an API key")
    stray = []
    if rep.as_salus:
        for d in ("/tmp", "/var/tmp", "/dev/shm", "/run"):
            try:
                entries = list(os.scandir(d))
            except OSError:
                continue
            for e in entries:
                try:
                    if e.stat(follow_symlinks=False).st_uid == SALUS_UID:
                        stray.append(e.path)
                except OSError:
                    pass
        if stray:
            raise Failure(f"uid {SALUS_UID} wrote outside the pod's writable mounts: {stray[:5]}")
    return f"exit 0 after {took:.1f}s (budget {budget}s); {out.stdout.strip()[:120]}"


# --------------------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bin", required=True)
    ap.add_argument("--model", required=True, help="the plaintext default model (GGUF); sealed here")
    ap.add_argument("--promtool", default="promtool")
    ap.add_argument("--prometheus", default="prometheus")
    ap.add_argument("--work", required=True)
    ap.add_argument("--k8s-versions", default="1.29.0,1.34.0")
    args = ap.parse_args()
    versions = args.k8s_versions.split(",")
    work = os.path.abspath(args.work)
    os.chmod(work, 0o755)  # uid 10001 must reach the pod's files below (each protected on its own)

    rendered = {}
    dirs = render_variants(work)
    if check_render(dirs, rendered):
        check_schemas(rendered, versions)
        check_invariants(rendered)
    check_rules(args.promtool)
    check_rule_tests(args.promtool)
    check_example_config(args.promtool, work)

    rep = prom = None
    canary = "fleetcanary" + secrets.token_hex(6)
    try:
        if "overlays/cpu" in rendered:
            rep = Replica(args, rendered["overlays/cpu"], os.path.join(work, "replica"))
            os.makedirs(rep.work, exist_ok=True)
            if check_start(rep) and check_startup(rep):
                check_liveness(rep)
                check_readiness(rep)
                exposed, values = scrape_direct(rep)
                check_running(rep, values)
                prom = Prometheus(args, rep, work)
                if check_scrape(prom):
                    n = traffic(rep, canary)
                    note(f"sent {n} requests (canary in prompt, path, query, header, key, body)")
                    exposed, _ = scrape_direct(rep)
                    time.sleep(4)  # a few scrapes and rule evaluations
                    check_labels(prom, rep, canary, exposed)
                    check_dashboard(prom, rep, exposed)
                    check_rules_live(prom, rep, exposed)
                check_drain(rep, canary)
    finally:
        if prom:
            prom.stop()
        if rep and rep.proc and rep.proc.poll() is None:
            rep.stop(signal.SIGKILL)

    passed = sum(RESULTS)
    failed = len(RESULTS) - passed
    if failed and rep:
        print("--- server output (last 30 lines) ---", flush=True)
        print("\n".join(rep.log().splitlines()[-30:]), flush=True)
    print(f"fleet: {passed} passed, {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

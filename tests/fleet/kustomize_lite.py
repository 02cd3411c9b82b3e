"""The part of kustomize that configs/kubernetes uses, for machines without kubectl.

Supported, and nothing else (any other key is an error, so a manifest change
that needs more is noticed instead of rendered wrongly):

* `resources`: files (multi-document YAML) and directories with a kustomization;
* `components` (kind Component): their `resources` and `patches`;
* `configMapGenerator` with `files` and `literals`, `generatorOptions`
  `disableNameSuffixHash`; the name suffix is kustomize's own hash, and
  references from pod templates are renamed;
* `patches` whose patch (inline or `path`) is a JSON 6902 list (add, remove,
  replace, move, copy, test), selected by `target` kind and name;
* `images` (`newName`, `newTag`, `digest`).

Where kubectl is installed, scripts/fleet-test.sh renders with both and
requires the same resources.
"""

import copy
import hashlib
import json
import os

import yaml

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
SUPPORTED = {
    "Kustomization": {"apiVersion", "kind", "resources", "components", "configMapGenerator",
                      "generatorOptions", "patches", "images"},
    "Component": {"apiVersion", "kind", "resources", "patches", "images"},
}


class KustomizeError(Exception):
    pass


def _load_kustomization(path):
    for name in KUSTOMIZATION_FILES:
        f = os.path.join(path, name)
        if os.path.isfile(f):
            with open(f, encoding="utf-8") as fh:
                k = yaml.safe_load(fh) or {}
            kind = k.get("kind", "Kustomization")
            unknown = set(k) - SUPPORTED.get(kind, set())
            if kind not in SUPPORTED or unknown:
                raise KustomizeError(f"{f}: unsupported by kustomize_lite: kind {kind}, keys {sorted(unknown)}")
            return k
    raise KustomizeError(f"{path}: no kustomization file")


def _load_docs(path):
    with open(path, encoding="utf-8") as fh:
        return [d for d in yaml.safe_load_all(fh) if d]


def _go_json(obj):
    """json.Marshal of Go: sorted keys, no spaces, HTML characters escaped."""
    s = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        s = s.replace(ch, esc)
    return s


def configmap_hash(cm):
    """kustomize's name suffix of a generated ConfigMap (api/hasher): the first
    10 hex digits of SHA-256 over {data, kind, name}, vowel-like digits mapped.
    kustomize v5 looks the name up with a path that never matches, so the name
    it hashes is always empty; that is reproduced here."""
    m = {"kind": "ConfigMap", "name": "", "data": cm.get("data") or ""}
    if cm.get("binaryData"):
        m["binaryData"] = cm["binaryData"]
    digest = hashlib.sha256(_go_json(m).encode("utf-8")).hexdigest()[:10]
    return digest.translate(str.maketrans("013ae", "ghkmt"))


def _generate_configmap(base, gen, options):
    unknown = set(gen) - {"name", "files", "literals", "options"}
    if unknown:
        raise KustomizeError(f"configMapGenerator {gen.get('name')}: unsupported keys {sorted(unknown)}")
    data = {}
    for f in gen.get("files", []):
        key, _, rel = f.partition("=") if "=" in f else (os.path.basename(f), "", f)
        with open(os.path.join(base, rel), encoding="utf-8") as fh:
            data[key] = fh.read()
    for lit in gen.get("literals", []):
        key, _, value = lit.partition("=")
        data[key] = value
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"]}, "data": data}
    opts = dict(options or {})
    opts.update(gen.get("options") or {})
    if not opts.get("disableNameSuffixHash"):
        cm["metadata"]["name"] = f"{gen['name']}-{configmap_hash(cm)}"
    return cm


def _pod_specs(res):
    kind = res.get("kind")
    spec = res.get("spec") or {}
    if kind == "Pod":
        yield spec
    elif kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        yield (spec.get("template") or {}).get("spec") or {}
    elif kind == "CronJob":
        yield ((spec.get("jobTemplate") or {}).get("spec") or {}).get("template", {}).get("spec") or {}


def _containers(pod):
    for key in ("initContainers", "containers", "ephemeralContainers"):
        yield from pod.get(key) or []


def _rename_configmaps(resources, renames):
    for res in resources:
        for pod in _pod_specs(res):
            for v in pod.get("volumes") or []:
                if "configMap" in v and v["configMap"].get("name") in renames:
                    v["configMap"]["name"] = renames[v["configMap"]["name"]]
                for src in (v.get("projected") or {}).get("sources") or []:
                    if "configMap" in src and src["configMap"].get("name") in renames:
                        src["configMap"]["name"] = renames[src["configMap"]["name"]]
            for c in _containers(pod):
                for e in c.get("env") or []:
                    ref = (e.get("valueFrom") or {}).get("configMapKeyRef")
                    if ref and ref.get("name") in renames:
                        ref["name"] = renames[ref["name"]]
                for e in c.get("envFrom") or []:
                    ref = e.get("configMapRef")
                    if ref and ref.get("name") in renames:
                        ref["name"] = renames[ref["name"]]


def _split_image(image):
    """(name, tag-or-None, digest-or-None) of an image reference."""
    digest = None
    if "@" in image:
        image, digest = image.split("@", 1)
    tag = None
    slash = image.rfind("/")
    colon = image.rfind(":")
    if colon > slash:
        image, tag = image[:colon], image[colon + 1:]
    return image, tag, digest


def _apply_images(resources, images):
    for res in resources:
        for pod in _pod_specs(res):
            for c in _containers(pod):
                name, tag, digest = _split_image(c.get("image", ""))
                for img in images:
                    if img.get("name") != name:
                        continue
                    new = img.get("newName", name)
                    if img.get("digest"):
                        c["image"] = f"{new}@{img['digest']}"
                    elif img.get("newTag"):
                        c["image"] = f"{new}:{img['newTag']}"
                    else:
                        c["image"] = new + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")


def _pointer(path):
    if path == "":
        return []
    if not path.startswith("/"):
        raise KustomizeError(f"JSON pointer {path!r} must start with /")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _walk(doc, parts):
    cur = doc
    for p in parts:
        cur = cur[int(p)] if isinstance(cur, list) else cur[p]
    return cur


def _json_patch(doc, ops):
    for op in ops:
        kind = op["op"]
        parts = _pointer(op["path"])
        if kind in ("move", "copy"):
            value = copy.deepcopy(_walk(doc, _pointer(op["from"])))
            if kind == "move":
                _json_patch(doc, [{"op": "remove", "path": op["from"]}])
            _json_patch(doc, [{"op": "add", "path": op["path"], "value": value}])
            continue
        if kind == "test":
            if _walk(doc, parts) != op["value"]:
                raise KustomizeError(f"test failed at {op['path']}")
            continue
        parent = _walk(doc, parts[:-1])
        last = parts[-1]
        if isinstance(parent, list):
            idx = len(parent) if last == "-" else int(last)
            if kind == "add":
                parent.insert(idx, copy.deepcopy(op["value"]))
            elif kind == "remove":
                del parent[idx]
            elif kind == "replace":
                parent[idx] = copy.deepcopy(op["value"])
            else:
                raise KustomizeError(f"unsupported JSON patch op {kind}")
        else:
            if kind in ("remove", "replace") and last not in parent:
                raise KustomizeError(f"{kind}: no {op['path']}")
            if kind in ("add", "replace"):
                parent[last] = copy.deepcopy(op["value"])
            elif kind == "remove":
                del parent[last]
            else:
                raise KustomizeError(f"unsupported JSON patch op {kind}")


def _apply_patches(base, resources, patches):
    for p in patches:
        unknown = set(p) - {"target", "patch", "path"}
        if unknown:
            raise KustomizeError(f"patch: unsupported keys {sorted(unknown)}")
        text = p.get("patch")
        if text is None:
            with open(os.path.join(base, p["path"]), encoding="utf-8") as fh:
                text = fh.read()
        ops = yaml.safe_load(text)
        if not isinstance(ops, list):
            raise KustomizeError("only JSON 6902 patches (a list of operations) are supported")
        target = p.get("target") or {}
        unknown = set(target) - {"kind", "name"}
        if unknown or not target:
            raise KustomizeError(f"patch target: only kind and name are supported, got {target}")
        hits = [r for r in resources
                if r.get("kind") == target.get("kind", r.get("kind"))
                and r["metadata"].get("name") == target.get("name", r["metadata"].get("name"))]
        if not hits:
            raise KustomizeError(f"patch target {target} matches no resource")
        for r in hits:
            _json_patch(r, ops)


def render(path, _component=False):
    """The resources of the kustomization in directory `path`."""
    k = _load_kustomization(path)
    if (k.get("kind") == "Component") != _component:
        raise KustomizeError(f"{path}: a Component must be used under `components`, a Kustomization under `resources`")
    resources = []
    for r in k.get("resources", []):
        p = os.path.normpath(os.path.join(path, r))
        resources += render(p) if os.path.isdir(p) else _load_docs(p)
    for c in k.get("components", []):
        resources = _apply_component(os.path.normpath(os.path.join(path, c)), resources)
    renames = {}
    for gen in k.get("configMapGenerator", []):
        cm = _generate_configmap(path, gen, k.get("generatorOptions"))
        renames[gen["name"]] = cm["metadata"]["name"]
        resources.append(cm)
    _apply_patches(path, resources, k.get("patches", []))
    _apply_images(resources, k.get("images", []))
    _rename_configmaps(resources, renames)
    return resources


def _apply_component(path, resources):
    k = _load_kustomization(path)
    if k.get("kind") != "Component":
        raise KustomizeError(f"{path}: not a Component")
    for r in k.get("resources", []):
        p = os.path.normpath(os.path.join(path, r))
        resources += render(p) if os.path.isdir(p) else _load_docs(p)
    _apply_patches(path, resources, k.get("patches", []))
    _apply_images(resources, k.get("images", []))
    return resources


def key(res):
    return (res.get("apiVersion"), res.get("kind"), res.get("metadata", {}).get("name"))

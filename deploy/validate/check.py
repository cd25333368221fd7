#!/usr/bin/env python3
"""Offline checks of deploy/ and the images' config files (run by deploy/validate.sh).

1. Every Kubernetes object in deploy/kubernetes/*.yaml against the API schemas of the Kubernetes
   versions in KUBERNETES_VERSIONS, strictly (unknown fields are errors), with the schemas that the
   pinned kubernetes-validate package carries. Kinds it has no schema for are errors, except the
   CRDs in CRD_KINDS, which are written to a JSON file for the CRD check (servicemonitor.mjs).
2. What schemas cannot see: each Deployment's ConfigMap, claims, probes and ports exist and agree;
   its config.toml parses and names absolute paths; Services and the ServiceMonitor select pods and
   ports that exist; every HorizontalPodAutoscaler metric is one that inferd exports and that
   prometheus-adapter's rules (deploy/prometheus-adapter/values.yaml) serve; the images' default
   configs (docker/config*.toml) parse. Run-time adapter loading has an admin key from a Secret.
   kubernetes-validate reports the first schema error of each object.

    check.py OUT_CRDS.json
"""
import glob
import json
import os
import re
import sys
import tomllib

import kubernetes_validate
import yaml

KUBERNETES_VERSIONS = ["1.30.0", "1.37.0"]  # oldest and newest minor checked
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}
root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
errors = []


def inferd_gauges():
    """The gauges inferd's /metrics exports (read from src/http/metrics.rs): what an HPA may follow."""
    with open(os.path.join(root, "src/http/metrics.rs")) as f:
        text = f.read()
    gauges = set(re.findall(r'\("([a-z_:]+)", "gauge",', text))
    if "inferd_requests_waiting" not in gauges:
        sys.exit("check.py: cannot read inferd's gauges from src/http/metrics.rs")
    return gauges


INFERD_GAUGES = inferd_gauges()


def err(msg):
    errors.append(msg)
    print("ERROR " + msg)


def load_objects():
    objects = []
    for path in sorted(glob.glob(os.path.join(root, "deploy/kubernetes/*.yaml"))):
        rel = os.path.relpath(path, root)
        with open(path) as f:
            for doc in yaml.safe_load_all(f):
                if doc:
                    objects.append((rel, doc))
    return objects


def name_of(obj):
    md = obj.get("metadata", {})
    return f"{obj.get('kind')} {md.get('namespace', '-')}/{md.get('name')}"


def schema_checks(objects):
    crds = []
    for rel, obj in objects:
        key = (obj.get("apiVersion"), obj.get("kind"))
        if key in CRD_KINDS:
            crds.append({"file": rel, "object": obj})
            continue
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.SchemaNotFoundError:
                err(f"{rel}: {name_of(obj)}: no Kubernetes {version} schema for {key[0]} {key[1]}")
            except kubernetes_validate.ValidationError as e:
                path = "/".join(str(p) for p in e.path)
                err(f"{rel}: {name_of(obj)}: Kubernetes {version}: {path}: {e.message}")
        else:
            print(f"ok    {rel}: {name_of(obj)} (Kubernetes {', '.join(KUBERNETES_VERSIONS)}, strict)")
    return crds


def matches(selector, labels):
    return all(labels.get(k) == v for k, v in (selector or {}).items())


def check_config_toml(where, text):
    try:
        cfg = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        err(f"{where}: config.toml does not parse: {e}")
        return None
    models = cfg.get("models", [])
    if not models:
        err(f"{where}: config.toml has no [[models]]")
    for m in models:
        src = m.get("source", "")
        hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+(@[\w./-]+)?(:[\w./-]+)?", src) and (":" in src or not src.endswith(".gguf"))
        if not src.startswith("/") and not hub_id:
            err(f"{where}: model source {src!r} is a relative path (relative to the config file's folder): use an absolute one")
        dev = str(m.get("device", "cpu"))
        if not (dev in ("cpu", "coreml") or re.fullmatch(r"cuda:\d+", dev)):
            err(f"{where}: unknown device {dev!r}")
    for a in cfg.get("adapters", []):
        if not str(a.get("path", "")).startswith("/"):
            err(f"{where}: adapter path {a.get('path')!r} is not absolute")
    return cfg


def consistency_checks(objects):
    by_kind = {}
    for rel, obj in objects:
        by_kind.setdefault(obj.get("kind"), []).append((rel, obj))
    configmaps = {o["metadata"]["name"]: o for _, o in by_kind.get("ConfigMap", [])}
    claims = {o["metadata"]["name"] for _, o in by_kind.get("PersistentVolumeClaim", [])}
    deployments = by_kind.get("Deployment", [])
    pod_ports = []  # (labels, port names) of every pod template

    for rel, d in deployments:
        where = f"{rel}: {name_of(d)}"
        spec = d["spec"]
        tmpl = spec["template"]
        labels = tmpl["metadata"].get("labels", {})
        if not matches(spec["selector"].get("matchLabels"), labels):
            err(f"{where}: selector does not match the pod template's labels")
        pod = tmpl["spec"]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        cfg = None
        for v in volumes.values():
            if "configMap" in v:
                cm = configmaps.get(v["configMap"]["name"])
                if cm is None:
                    err(f"{where}: volume {v['name']} names a ConfigMap that is not in deploy/kubernetes")
                elif "config.toml" not in cm.get("data", {}):
                    err(f"{where}: ConfigMap {v['configMap']['name']} has no config.toml")
                else:
                    cfg = check_config_toml(f"{rel}: ConfigMap {v['configMap']['name']}", cm["data"]["config.toml"])
                    if cfg is not None:
                        check_lora_mount(where, cfg, pod)
                        check_admin_key(where, cfg, pod)
            if "persistentVolumeClaim" in v and v["persistentVolumeClaim"]["claimName"] not in claims:
                err(f"{where}: volume {v['name']} claims {v['persistentVolumeClaim']['claimName']}, which no file declares")
        for c in pod["containers"]:
            names = {p.get("name") for p in c.get("ports", [])}
            pod_ports.append((labels, names))
            for m in c.get("volumeMounts", []):
                if m["name"] not in volumes:
                    err(f"{where}: container {c['name']} mounts unknown volume {m['name']}")
            mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
            if "/etc/inferd" not in mounts:
                err(f"{where}: the config is not mounted at /etc/inferd (the image reads /etc/inferd/config.toml)")
            for probe, path in (("readinessProbe", "/ready"), ("livenessProbe", "/health"), ("startupProbe", "/health")):
                p = c.get(probe)
                if not p:
                    err(f"{where}: no {probe}")
                    continue
                get = p.get("httpGet", {})
                if get.get("path") != path:
                    err(f"{where}: {probe} should get {path}, not {get.get('path')}")
                if isinstance(get.get("port"), str) and get["port"] not in names:
                    err(f"{where}: {probe} port {get['port']} is not a container port")
            sc = {**pod.get("securityContext", {}), **c.get("securityContext", {})}
            if not sc.get("runAsNonRoot"):
                err(f"{where}: runAsNonRoot is not set")
            on_gpu = any(str(m.get("device", "")).startswith("cuda") for m in (cfg or {}).get("models", []))
            if on_gpu and "nvidia.com/gpu" not in c.get("resources", {}).get("limits", {}):
                err(f"{where}: a CUDA model without an nvidia.com/gpu limit")

    for rel, s in by_kind.get("Service", []):
        sel = s["spec"].get("selector", {})
        targets = [names for labels, names in pod_ports if matches(sel, labels)]
        if not targets:
            err(f"{rel}: {name_of(s)} selects no pod template")
        for p in s["spec"].get("ports", []):
            tp = p.get("targetPort")
            if isinstance(tp, str) and not any(tp in names for names in targets):
                err(f"{rel}: {name_of(s)}: targetPort {tp} is no container port of the pods it selects")

    services = [s for _, s in by_kind.get("Service", [])]
    for rel, m in by_kind.get("ServiceMonitor", []):
        sel = m["spec"]["selector"].get("matchLabels", {})
        chosen = [s for s in services if matches(sel, s["metadata"].get("labels", {}))]
        if not chosen:
            err(f"{rel}: {name_of(m)} selects no Service")
        for ep in m["spec"].get("endpoints", []):
            for s in chosen:
                if ep.get("port") not in {p.get("name") for p in s["spec"]["ports"]}:
                    err(f"{rel}: {name_of(m)}: {name_of(s)} has no port named {ep.get('port')}")
        print(f"ok    {rel}: {name_of(m)} scrapes {', '.join(name_of(s) for s in chosen)}")

    for rel, pdb in by_kind.get("PodDisruptionBudget", []):
        sel = pdb["spec"]["selector"].get("matchLabels", {})
        if not any(matches(sel, d["spec"]["template"]["metadata"].get("labels", {})) for _, d in deployments):
            err(f"{rel}: {name_of(pdb)} selects no Deployment's pods")

    served = adapter_metrics()
    deployment_names = {d["metadata"]["name"] for _, d in deployments}
    for rel, h in by_kind.get("HorizontalPodAutoscaler", []):
        if h["spec"]["scaleTargetRef"]["name"] not in deployment_names:
            err(f"{rel}: {name_of(h)} scales a Deployment that is not in deploy/kubernetes")
        for m in h["spec"].get("metrics", []):
            if m["type"] != "Pods":
                continue
            metric = m["pods"]["metric"]["name"]
            if metric not in INFERD_GAUGES:
                err(f"{rel}: {name_of(h)}: {metric} is not one of inferd's gauges {sorted(INFERD_GAUGES)}")
            if metric not in served:
                err(f"{rel}: {name_of(h)}: prometheus-adapter's rules do not serve {metric}")
        print(f"ok    {rel}: {name_of(h)} follows metrics prometheus-adapter serves")


def check_lora_mount(where, cfg, pod):
    server = cfg.get("server", {})
    if not server.get("lora_runtime_loading"):
        return
    lora_root = server.get("lora_root")
    mounts = {m["mountPath"] for c in pod["containers"] for m in c.get("volumeMounts", [])}
    if not lora_root or lora_root not in mounts:
        err(f"{where}: lora_root {lora_root!r} is not a mounted volume")


def check_admin_key(where, cfg, pod):
    """Run-time adapter loading answers 403 without an admin key (or open_admin_endpoints)."""
    server = cfg.get("server", {})
    if not server.get("lora_runtime_loading") or server.get("admin_api_key") or server.get("open_admin_endpoints"):
        return
    for c in pod["containers"]:
        env = {e["name"]: e for e in c.get("env", [])}
        ref = env.get("INFERD_ADMIN_API_KEY", {}).get("valueFrom", {}).get("secretKeyRef")
        if not ref:
            err(f"{where}: lora_runtime_loading without an admin key: set INFERD_ADMIN_API_KEY from a Secret")
        elif ref.get("optional"):
            err(f"{where}: the admin key's Secret is optional: without it run-time loading answers 403")


def adapter_metrics():
    """Metric names that deploy/prometheus-adapter/values.yaml exposes."""
    with open(os.path.join(root, "deploy/prometheus-adapter/values.yaml")) as f:
        values = yaml.safe_load(f)
    names = set()
    for rule in values["rules"]["custom"]:
        series = re.search(r'__name__=~"([^"]+)"', rule["seriesQuery"])
        if not series:
            err("prometheus-adapter rule without a __name__ regex")
            continue
        for gauge in INFERD_GAUGES:
            if re.fullmatch(series.group(1), gauge) and re.fullmatch(rule["name"]["matches"], gauge):
                names.add(re.sub(rule["name"]["matches"], rule["name"]["as"].replace("${", "\\g<").replace("}", ">"), gauge))
    return names


def main():
    objects = load_objects()
    crds = schema_checks(objects)
    consistency_checks(objects)
    for path in sorted(glob.glob(os.path.join(root, "docker/config*.toml"))):
        with open(path) as f:
            if check_config_toml(os.path.relpath(path, root), f.read()) is not None:
                print(f"ok    {os.path.relpath(path, root)} parses")
    with open(sys.argv[1], "w") as f:
        json.dump(crds, f)
    if errors:
        print(f"{len(errors)} error(s)")
        sys.exit(1)


if __name__ == "__main__":
    main()

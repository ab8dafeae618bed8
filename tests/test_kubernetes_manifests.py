"""Offline checks of the Kubernetes manifests in deploy/kubernetes.

Every Kustomize build (the base and each overlay) is rendered with
``kubectl kustomize`` and every object in it is validated against the
Kubernetes JSON schemas that the ``kubernetes-validate`` package ships, in
strict mode: an unknown field (``replica: 2``), a wrong type
(``containerPort: "x"``) or an unknown kind fails. No cluster and no network
are needed.

On top of the schemas, the tests check what the schemas cannot: names that
refer to other objects resolve, the pods are locked down (non-root,
read-only root filesystem, no privilege escalation, no capabilities,
resources), the probes use /ping and /ready, the shared Deployment is highly
available, the ingress-nginx annotations point at the sidecar Service, and
the settings the sidecar container receives are ones the sidecar accepts.
"""

from __future__ import annotations

import base64
import copy
import functools
import json
import re
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

try:
    import kubernetes_validate
except ImportError as exc:  # pragma: no cover - a loud failure, never a skip
    raise ImportError(
        "tests/test_kubernetes_manifests.py needs the 'kubernetes-validate' package "
        "(it ships the Kubernetes JSON schemas used offline). Install the test extras: "
        "pip install -e '.[test]'  (or: pip install kubernetes-validate)"
    ) from exc

from sidecar.fronts import split_routed
from sidecar.location_rules import location_rules

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "kubernetes"
BUILDS = {
    "base": K8S / "base",
    "ingress-nginx": K8S / "overlays" / "ingress-nginx",
    "pod-sidecar": K8S / "overlays" / "pod-sidecar",
}
OVERLAYS = ("ingress-nginx", "pod-sidecar")
# Oldest Kubernetes the manifests promise to work with, and the newest the
# installed kubernetes-validate knows.
K8S_VERSIONS = ("1.29", kubernetes_validate.latest_version())

SIDECAR_IMAGE = "ghcr.io/example/sidecar"
SIDECAR_UID = 10001
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job")

KUBECTL_MISSING = """\
kubectl was not found, so the Kubernetes manifests cannot be rendered.
These tests never skip: install kubectl (it bundles kustomize), e.g.
  Debian/Ubuntu: apt-get install -y kubectl   (Kubernetes or Google Cloud apt repository)
  or download it: https://kubernetes.io/docs/tasks/tools/#kubectl
and make sure `kubectl kustomize --help` works (or /usr/bin/kubectl exists)."""


# --------------------------------------------------------------------------
# Rendering and validation helpers
# --------------------------------------------------------------------------


def kubectl() -> str:
    found = shutil.which("kubectl") or ("/usr/bin/kubectl" if Path("/usr/bin/kubectl").exists() else None)
    if found is None:
        pytest.fail(KUBECTL_MISSING, pytrace=False)
    return found


def kustomize(directory: Path) -> list[dict[str, Any]]:
    """``kubectl kustomize DIR`` parsed into a list of objects."""
    proc = subprocess.run(
        [kubectl(), "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if proc.returncode != 0:
        pytest.fail(f"kubectl kustomize {directory} failed:\n{proc.stderr}", pytrace=False)
    docs = [doc for doc in yaml.safe_load_all(proc.stdout) if doc]
    assert docs, f"kubectl kustomize {directory} rendered nothing"
    return docs


@functools.cache
def _rendered(name: str) -> tuple[dict[str, Any], ...]:
    return tuple(kustomize(BUILDS[name]))


def rendered(name: str) -> list[dict[str, Any]]:
    """A fresh copy of a build's objects (tests may modify what they get)."""
    return copy.deepcopy(list(_rendered(name)))


def schema_errors(doc: dict[str, Any], versions: tuple[str, ...] = K8S_VERSIONS) -> list[str]:
    """Problems of one object against the strict Kubernetes schemas; [] when valid."""
    errors = []
    label = f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"
    for version in versions:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path) or "<root>"
            errors.append(f"{label} (k8s {version}): {path}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            errors.append(f"{label} (k8s {version}): {exc.message}")
    return errors


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected exactly one {kind}/{name}, found {len(found)}"
    return found[0]


def workloads(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] in WORKLOAD_KINDS]


def containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    spec = workload["spec"]["template"]["spec"]
    return list(spec.get("initContainers", [])) + list(spec["containers"])


def sidecar_containers(
    docs: list[dict[str, Any]],
) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for wl in workloads(docs):
        for c in wl["spec"]["template"]["spec"]["containers"]:
            if c["image"].startswith(SIDECAR_IMAGE + ":") or c["image"].startswith(SIDECAR_IMAGE + "@"):
                yield wl, c


def effective_security(workload: dict[str, Any], container: dict[str, Any]) -> dict[str, Any]:
    """The container's securityContext with the pod-level defaults filled in."""
    pod = workload["spec"]["template"]["spec"].get("securityContext", {})
    merged = {k: pod[k] for k in ("runAsNonRoot", "runAsUser", "runAsGroup", "seccompProfile") if k in pod}
    merged.update(container.get("securityContext", {}))
    return merged


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def namespace_of(doc: dict[str, Any]) -> str | None:
    ns = doc["metadata"].get("namespace")
    return None if ns is None else str(ns)


def container_env(docs: list[dict[str, Any]], workload: dict[str, Any], container: dict[str, Any]) -> dict[str, str]:
    """The environment Kubernetes gives the container: envFrom in order, then env."""
    ns = namespace_of(workload)
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        prefix = source.get("prefix", "")
        if "configMapRef" in source:
            (cm,) = [d for d in find(docs, "ConfigMap", source["configMapRef"]["name"]) if namespace_of(d) == ns]
            env.update({prefix + k: str(v) for k, v in cm.get("data", {}).items()})
        if "secretRef" in source:
            (sec,) = [d for d in find(docs, "Secret", source["secretRef"]["name"]) if namespace_of(d) == ns]
            env.update({prefix + k: str(v) for k, v in sec.get("stringData", {}).items()})
            env.update({prefix + k: base64.b64decode(v).decode() for k, v in sec.get("data", {}).items()})
    for item in container.get("env", []):
        assert "value" in item, f"{container['name']}: env {item['name']} from valueFrom is not resolved by this test"
        env[item["name"]] = str(item["value"])
    return env


def port_number(container: dict[str, Any], port: int | str) -> int | None:
    """A container port given by number or name, or None if the container has no such port."""
    for p in container.get("ports", []):
        if port in (p["containerPort"], p.get("name")):
            return int(p["containerPort"])
    return None


def parse_seconds(text: str) -> float:
    """'15s', '1m30s' or '15' as seconds (enough of the sidecar's duration syntax)."""
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a duration: {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


# --------------------------------------------------------------------------
# kubectl and schema validation
# --------------------------------------------------------------------------


def test_kubectl_is_available() -> None:
    version = subprocess.run([kubectl(), "version", "--client"], capture_output=True, text=True, timeout=30)
    assert version.returncode == 0, version.stderr


@pytest.mark.parametrize("build", sorted(BUILDS))
def test_build_renders_and_every_object_matches_the_kubernetes_schema(build: str) -> None:
    docs = rendered(build)
    problems = [e for doc in docs for e in schema_errors(doc)]
    assert not problems, "schema validation failed:\n" + "\n".join(problems)


@pytest.mark.parametrize("build", sorted(BUILDS))
def test_objects_are_unique_and_namespaced_consistently(build: str) -> None:
    docs = rendered(build)
    keys = [(d["apiVersion"], d["kind"], namespace_of(d), d["metadata"]["name"]) for d in docs]
    assert len(keys) == len(set(keys)), f"duplicate objects in {build}"
    if build in OVERLAYS:
        (ns,) = find(docs, "Namespace")
        name = ns["metadata"]["name"]
        assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
        assert {namespace_of(d) for d in docs if d["kind"] != "Namespace"} == {name}


def _valid_deployment() -> dict[str, Any]:
    return one(rendered("base"), "Deployment", "sidecar")


def _break_replicas(d: dict[str, Any]) -> None:
    d["spec"]["replica"] = d["spec"].pop("replicas")


def _break_container_port(d: dict[str, Any]) -> None:
    d["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "x"


def _break_unknown_container_field(d: dict[str, Any]) -> None:
    d["spec"]["template"]["spec"]["containers"][0]["imagePullPolice"] = "Always"


def _break_probe(d: dict[str, Any]) -> None:
    d["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["pathh"] = "/ready"


def _break_security_context(d: dict[str, Any]) -> None:
    d["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesystem"] = "yes please"


def _break_missing_template(d: dict[str, Any]) -> None:
    del d["spec"]["template"]


def _break_kind(d: dict[str, Any]) -> None:
    d["kind"] = "Deploymnet"


BREAKAGES = {
    "replica: 2": _break_replicas,
    'containerPort: "x"': _break_container_port,
    "unknown container field": _break_unknown_container_field,
    "unknown probe field": _break_probe,
    "bool field given a string": _break_security_context,
    "required field missing": _break_missing_template,
    "misspelt kind": _break_kind,
}


def test_the_unmodified_deployment_used_below_is_valid() -> None:
    assert schema_errors(_valid_deployment()) == []


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_validation_rejects_a_broken_manifest(breakage: str) -> None:
    doc = _valid_deployment()
    BREAKAGES[breakage](doc)
    assert schema_errors(doc), f"a Deployment with {breakage} passed validation"


def test_a_broken_manifest_fails_through_kustomize_as_well(tmp_path: Path) -> None:
    """The whole path - kustomize, YAML, schema - catches typos kustomize itself passes through."""
    (tmp_path / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - broken.yaml\n"
    )
    deployment = """\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {name}
spec:
  {replicas}: 2
  selector:
    matchLabels: {{app: {name}}}
  template:
    metadata:
      labels: {{app: {name}}}
    spec:
      containers:
        - name: app
          image: example/app:1.0
          ports:
            - containerPort: {port}
"""
    (tmp_path / "broken.yaml").write_text(
        "---\n".join(
            [
                deployment.format(name="good", replicas="replicas", port="8080"),
                deployment.format(name="typo", replicas="replica", port="8080"),
                deployment.format(name="port", replicas="replicas", port='"x"'),
            ]
        )
    )
    docs = {d["metadata"]["name"]: d for d in kustomize(tmp_path)}
    assert schema_errors(docs["good"]) == []
    assert "'replica' was unexpected" in "\n".join(schema_errors(docs["typo"]))
    assert "'x' is not of type 'integer'" in "\n".join(schema_errors(docs["port"]))


# --------------------------------------------------------------------------
# References between objects
# --------------------------------------------------------------------------


@pytest.mark.parametrize("build", sorted(BUILDS))
def test_references_between_objects_resolve(build: str) -> None:
    docs = rendered(build)
    names = {(d["kind"], namespace_of(d), d["metadata"]["name"]) for d in docs}
    problems: list[str] = []

    def need(kind: str, ns: str | None, name: str, where: str) -> None:
        if (kind, ns, name) not in names:
            problems.append(f"{where}: {kind}/{name} does not exist in the build")

    for wl in workloads(docs):
        ns, where = namespace_of(wl), f"{wl['kind']}/{wl['metadata']['name']}"
        pod = wl["spec"]["template"]
        assert selects(wl["spec"]["selector"]["matchLabels"], pod["metadata"]["labels"]), where
        if "serviceAccountName" in pod["spec"]:
            need("ServiceAccount", ns, pod["spec"]["serviceAccountName"], where)
        volumes = {v["name"] for v in pod["spec"].get("volumes", [])}
        volumes |= {t["metadata"]["name"] for t in wl["spec"].get("volumeClaimTemplates", [])}
        for vol in pod["spec"].get("volumes", []):
            if "configMap" in vol:
                need("ConfigMap", ns, vol["configMap"]["name"], where)
            if "secret" in vol:
                need("Secret", ns, vol["secret"]["secretName"], where)
        for c in containers(wl):
            for src in c.get("envFrom", []):
                if "configMapRef" in src:
                    need("ConfigMap", ns, src["configMapRef"]["name"], where)
                if "secretRef" in src:
                    need("Secret", ns, src["secretRef"]["name"], where)
            for m in c.get("volumeMounts", []):
                if m["name"] not in volumes:
                    problems.append(f"{where}/{c['name']}: volumeMount {m['name']} has no volume")
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                action = c.get(probe, {}).get("httpGet") or c.get(probe, {}).get("tcpSocket")
                if action and port_number(c, action["port"]) is None:
                    problems.append(f"{where}/{c['name']}: {probe} port {action['port']} is no container port")
        if wl["kind"] == "StatefulSet":
            (svc,) = [s for s in find(docs, "Service", wl["spec"]["serviceName"]) if namespace_of(s) == ns]
            assert svc["spec"].get("clusterIP") == "None", f"{where}: serviceName must be a headless Service"

    for svc in find(docs, "Service"):
        where, ns = f"Service/{svc['metadata']['name']}", namespace_of(svc)
        backends = [
            wl
            for wl in workloads(docs)
            if namespace_of(wl) == ns and selects(svc["spec"]["selector"], wl["spec"]["template"]["metadata"]["labels"])
        ]
        if not backends:
            problems.append(f"{where}: its selector matches no pods")
        for port in svc["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            for wl in backends:
                if not any(port_number(c, target) for c in wl["spec"]["template"]["spec"]["containers"]):
                    problems.append(f"{where}: targetPort {target} is not a port of {wl['metadata']['name']}")

    for pdb in find(docs, "PodDisruptionBudget"):
        ns = namespace_of(pdb)
        if not any(
            namespace_of(wl) == ns
            and selects(pdb["spec"]["selector"]["matchLabels"], wl["spec"]["template"]["metadata"]["labels"])
            for wl in workloads(docs)
        ):
            problems.append(f"PodDisruptionBudget/{pdb['metadata']['name']}: selects no pods")

    for ing in find(docs, "Ingress"):
        ns = namespace_of(ing)
        for rule in ing["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                svcs = [s for s in find(docs, "Service", backend["name"]) if namespace_of(s) == ns]
                at = f"Ingress/{ing['metadata']['name']}: Service {backend['name']}"
                if not svcs:
                    problems.append(f"{at} does not exist")
                    continue
                wanted = backend["port"].get("name") or backend["port"].get("number")
                if not any(wanted in (p.get("name"), p["port"]) for p in svcs[0]["spec"]["ports"]):
                    problems.append(f"{at} has no port {wanted}")

    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------
# Security and operations, for every pod in every build
# --------------------------------------------------------------------------


@pytest.mark.parametrize("build", sorted(BUILDS))
def test_every_pod_is_locked_down(build: str) -> None:
    problems: list[str] = []
    for wl in workloads(rendered(build)):
        pod = wl["spec"]["template"]["spec"]
        where = f"{build}: {wl['kind']}/{wl['metadata']['name']}"
        if pod.get("automountServiceAccountToken") is not False:
            problems.append(f"{where}: automountServiceAccountToken must be false")
        if pod.get("enableServiceLinks") is not False:
            problems.append(f"{where}: enableServiceLinks must be false (SIDECAR_* env collisions)")
        for key in ("hostNetwork", "hostPID", "hostIPC"):
            if pod.get(key):
                problems.append(f"{where}: {key}")
        if any("hostPath" in v for v in pod.get("volumes", [])):
            problems.append(f"{where}: hostPath volume")
        for c in containers(wl):
            at = f"{where}/{c['name']}"
            sec = effective_security(wl, c)
            if sec.get("runAsNonRoot") is not True:
                problems.append(f"{at}: runAsNonRoot must be true")
            if not sec.get("runAsUser"):
                problems.append(f"{at}: needs a numeric non-zero runAsUser")
            if sec.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{at}: readOnlyRootFilesystem must be true")
            if sec.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{at}: allowPrivilegeEscalation must be false")
            if sec.get("privileged"):
                problems.append(f"{at}: privileged")
            if "ALL" not in sec.get("capabilities", {}).get("drop", []) or sec.get("capabilities", {}).get("add"):
                problems.append(f"{at}: capabilities must drop ALL and add none")
            if sec.get("seccompProfile", {}).get("type") != "RuntimeDefault":
                problems.append(f"{at}: seccompProfile must be RuntimeDefault")
            res = c.get("resources", {})
            for kind in ("requests", "limits"):
                for what in ("cpu", "memory"):
                    if what not in res.get(kind, {}):
                        problems.append(f"{at}: resources.{kind}.{what} missing")
            image = c["image"]
            if ":" not in image.rsplit("/", 1)[-1] and "@" not in image or image.endswith(":latest"):
                problems.append(f"{at}: image {image} must have a fixed tag or digest")
            if "livenessProbe" not in c or "readinessProbe" not in c:
                problems.append(f"{at}: needs liveness and readiness probes")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("build", sorted(BUILDS))
def test_sidecar_containers(build: str) -> None:
    docs = rendered(build)
    found = list(sidecar_containers(docs))
    assert found, f"{build}: no sidecar container"
    for wl, c in found:
        at = f"{build}: {wl['metadata']['name']}/{c['name']}"
        pod = wl["spec"]["template"]["spec"]
        assert effective_security(wl, c)["runAsUser"] == SIDECAR_UID, at
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        shared = wl["metadata"]["name"] == "sidecar"  # the auth-url Deployment: its lean listener too
        assert ports == (
            {"http": 4180, "auth": 4181, "metrics": 9180} if shared else {"http": 4180, "metrics": 9180}
        ), at
        assert c["livenessProbe"]["httpGet"]["path"] == "/ping", at
        assert port_number(c, c["livenessProbe"]["httpGet"]["port"]) == 4180, at
        assert c["readinessProbe"]["httpGet"]["path"] == "/ready", at
        assert port_number(c, c["readinessProbe"]["httpGet"]["port"]) == 4180, at

        # /tmp is the only writable place: an emptyDir. The metrics directory
        # is a mount of its own, so it exists when the sidecar starts.
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert "emptyDir" in volumes[mounts["/tmp"]], at
        env = container_env(docs, wl, c)
        assert env["PROMETHEUS_MULTIPROC_DIR"] == "/tmp/prometheus", at
        assert "emptyDir" in volumes[mounts["/tmp/prometheus"]], at
        assert all(v.get("emptyDir", {}).get("sizeLimit") for v in volumes.values() if "emptyDir" in v), at
        assert env["SIDECAR_HTTP_ADDRESS"] == "0.0.0.0:4180", at
        assert env.get("SIDECAR_AUTH_ADDRESS") == ("0.0.0.0:4181" if shared else None), at
        assert env["SIDECAR_METRICS_ADDRESS"] == "0.0.0.0:9180", at
        assert env["SIDECAR_SESSION_STORE_TYPE"] == "redis", at
        assert env["SIDECAR_REVERSE_PROXY"] == "true", at
        assert int(env["SIDECAR_WORKERS"]) >= 1, at

        # SIGTERM: the preStop sleep and the sidecar's own shutdown fit in the grace period.
        pre_stop = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
        sleep = float(pre_stop[1]) if pre_stop[:1] == ["sleep"] else 0.0
        shutdown = parse_seconds(env.get("SIDECAR_SHUTDOWN_TIMEOUT", "15s"))
        grace = pod.get("terminationGracePeriodSeconds", 30)
        assert grace > sleep + shutdown, f"{at}: grace {grace}s <= preStop {sleep}s + shutdown {shutdown}s"


@pytest.mark.parametrize("build", sorted(BUILDS))
def test_sidecar_settings_are_accepted_by_the_sidecar(build: str) -> None:
    """The environment the container gets is valid sidecar configuration."""
    from sidecar.config import OPTIONS
    from sidecar.config_load import load_config

    known = {opt.env for opt in OPTIONS}
    docs = rendered(build)
    for wl, c in sidecar_containers(docs):
        env = container_env(docs, wl, c)
        unknown = sorted(k for k in env if k.startswith("SIDECAR_") and k not in known)
        assert not unknown, f"{build}: settings the sidecar does not know: {unknown}"

        # The shipped placeholder cookie secret is refused at start-up ...
        with pytest.raises(Exception, match="cookie-secret") as refused:
            load_config([], environ=env)
        assert "too short" in str(refused.value)

        # ... and with real secrets everything else is accepted as it is.
        env["SIDECAR_COOKIE_SECRET"] = secrets.token_urlsafe(32)
        env["SIDECAR_CLIENT_SECRET"] = secrets.token_urlsafe(24)
        config = load_config([], environ=env)
        assert (config.listen_host, config.listen_port) == ("0.0.0.0", 4180)
        assert config.auth_port == (4181 if wl["metadata"]["name"] == "sidecar" else None)
        assert config.metrics_port == 9180
        assert config.session_store_type == "redis"
        assert config.reverse_proxy is True


def test_placeholder_secrets_are_obvious_and_unusable() -> None:
    (secret,) = [s for s in rendered("base") if s["kind"] == "Secret"]
    values = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert set(values) == {"SIDECAR_CLIENT_SECRET", "SIDECAR_COOKIE_SECRET"}
    for key, value in values.items():
        assert "CHANGE_ME" in value, f"{key} should be an obvious placeholder"
    # Shorter than the 16 bytes the sidecar requires: a forgotten placeholder
    # stops the sidecar instead of signing cookies with a published key.
    assert len(values["SIDECAR_COOKIE_SECRET"].encode()) < 16


# --------------------------------------------------------------------------
# The shared Deployment (base) and Redis
# --------------------------------------------------------------------------


def test_shared_deployment_is_highly_available() -> None:
    docs = rendered("base")
    dep = one(docs, "Deployment", "sidecar")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["replicas"] >= 2
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pod = dep["spec"]["template"]["spec"]
    spread = pod.get("topologySpreadConstraints", [])
    anti = pod.get("affinity", {}).get("podAntiAffinity")
    assert anti or any(
        t["topologyKey"] == "kubernetes.io/hostname" and selects(t["labelSelector"]["matchLabels"], labels)
        for t in spread
    ), "replicas must be spread over nodes"

    (pdb,) = find(docs, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    assert selects(pdb["spec"]["selector"]["matchLabels"], labels)

    svc = one(docs, "Service", "sidecar")
    ports = {p["name"]: (p["port"], p["targetPort"]) for p in svc["spec"]["ports"]}
    assert ports == {"http": (4180, "http"), "auth": (4181, "auth"), "metrics": (9180, "metrics")}
    assert selects(svc["spec"]["selector"], labels)


def test_base_image_is_the_placeholder() -> None:
    (c,) = one(rendered("base"), "Deployment", "sidecar")["spec"]["template"]["spec"]["containers"]
    assert c["image"] == "ghcr.io/example/sidecar:0.1.0"


@pytest.mark.parametrize("build", OVERLAYS)
def test_redis(build: str) -> None:
    docs = rendered(build)
    sts = one(docs, "StatefulSet", "sidecar-redis")
    assert sts["spec"]["replicas"] == 1
    (c,) = sts["spec"]["template"]["spec"]["containers"]
    assert c["image"].startswith("redis:7")
    args = c["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--dir") + 1] == "/data"
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert {"name": claim["metadata"]["name"], "mountPath": "/data"} in c["volumeMounts"]
    assert claim["spec"]["resources"]["requests"]["storage"]

    # The sidecar's Redis URL names this Redis's Service and port.
    svc = one(docs, "Service", "sidecar-redis")
    assert selects(svc["spec"]["selector"], sts["spec"]["template"]["metadata"]["labels"])
    for wl, sc in sidecar_containers(docs):
        url = urlsplit(container_env(docs, wl, sc)["SIDECAR_REDIS_CONNECTION_URL"])
        assert url.scheme == "redis"
        assert url.hostname in (
            svc["metadata"]["name"],
            f"{svc['metadata']['name']}.{namespace_of(svc)}.svc",
        )
        assert url.port == svc["spec"]["ports"][0]["port"] == 6379

        # ... and its pods are let through the NetworkPolicy.
        (policy,) = find(docs, "NetworkPolicy")
        assert selects(
            policy["spec"]["podSelector"]["matchLabels"],
            sts["spec"]["template"]["metadata"]["labels"],
        )
        allowed = [f["podSelector"]["matchLabels"] for rule in policy["spec"]["ingress"] for f in rule["from"]]
        assert any(selects(sel, wl["spec"]["template"]["metadata"]["labels"]) for sel in allowed)


# --------------------------------------------------------------------------
# Overlays
# --------------------------------------------------------------------------

AUTH_RESPONSE_HEADERS = (
    "X-Auth-Request-User,X-Auth-Request-Email,X-Auth-Request-Groups,"
    "X-Auth-Request-Preferred-Username,X-Auth-Request-Access-Token,X-Auth-Request-Auth-Time,X-Forwarded-User,"
    "X-Forwarded-Email,X-Forwarded-Groups,X-Forwarded-Preferred-Username,X-Forwarded-Access-Token,X-User,X-Email,"
    "Cookie"
)


def test_ingress_nginx_overlay() -> None:
    docs = rendered("ingress-nginx")
    svc = one(docs, "Service", "sidecar")
    ns = namespace_of(svc)
    assert one(docs, "Deployment", "sidecar")["spec"]["replicas"] >= 2
    assert find(docs, "PodDisruptionBudget", "sidecar")

    app = one(docs, "Ingress", "demo-app")
    notes = app["metadata"]["annotations"]
    assert notes["nginx.ingress.kubernetes.io/auth-url"] == (
        f"http://{svc['metadata']['name']}.{ns}.svc.cluster.local:4181/oauth2/auth?routed_host=$host"
    )
    assert notes["nginx.ingress.kubernetes.io/auth-signin"] == "https://$host/oauth2/start?rd=$escaped_request_uri"
    assert notes["nginx.ingress.kubernetes.io/auth-response-headers"] == AUTH_RESPONSE_HEADERS
    assert app["spec"]["ingressClassName"] == "nginx"
    app_hosts = {r["host"] for r in app["spec"]["rules"]}

    # The sidecar's browser endpoints on the same host go to it, without an auth check.
    oauth = one(docs, "Ingress", "sidecar-oauth2")
    assert not any(k.startswith("nginx.ingress.kubernetes.io/auth-") for k in oauth["metadata"].get("annotations", {}))
    assert oauth["spec"]["ingressClassName"] == "nginx"
    routed = {
        (
            r["host"],
            p["path"],
            p["pathType"],
            p["backend"]["service"]["name"],
            p["backend"]["service"]["port"]["name"],
        )
        for r in oauth["spec"]["rules"]
        for p in r["http"]["paths"]
    }
    assert routed == {(h, p, "Exact", "sidecar", "http") for h in app_hosts for p in BROWSER_ENDPOINTS}

    # The callback URL is on the application's host, under /oauth2.
    (wl, c), *_ = sidecar_containers(docs)
    env = container_env(docs, wl, c)
    redirect = urlsplit(env["SIDECAR_REDIRECT_URL"])
    assert (redirect.scheme, redirect.path) == ("https", "/oauth2/callback")
    assert redirect.hostname in app_hosts
    assert set(env["SIDECAR_WHITELIST_DOMAIN"].split(",")) >= app_hosts
    assert env["SIDECAR_SET_XAUTHREQUEST"] == "true"
    assert env["SIDECAR_PASS_ACCESS_TOKEN"] == "true"  # X-Auth-Request-Access-Token is forwarded
    assert env["SIDECAR_TRUSTED_PROXY"] not in ("", "127.0.0.1/32")


AUTH_URL = "nginx.ingress.kubernetes.io/auth-url"
NAMESPACE_LINE = "namespace: sidecar-demo\n"
# ingress-nginx's parser.URLWithNginxVariableRegex, which validates auth-url (internal/ingress/annotations/
# parser/validators.go): extendedAlphaNumeric, urlEnabledChars and "$"
CONTROLLER_AUTH_URL = re.compile(r"^[\-._~a-zA-Z0-9/:, ,:?&=$]*$")


def routed_auth_url(url: str, where: str) -> str:
    """Check an auth-url asking the sidecar as the controller and the sidecar read it, and return its rules:
    the controller accepts it (its annotation regex; a scheme and a host), and it ends in routed_host=$host,
    which nginx expands in the auth location's ``set $target "<auth-url>"`` to the host whose server block it
    chose. Without it the sidecar takes no OAuth token from that Ingress; anywhere but last, the rest would be
    read as part of the host (refused); the rules before it must be ones the sidecar knows."""
    assert CONTROLLER_AUTH_URL.fullmatch(url), f"{where}: {url!r} fails the controller's auth-url validation"
    parts = urlsplit(url)
    assert parts.scheme and parts.hostname and ".." not in parts.netloc, (where, url)
    rules, routed = split_routed(parts.query)
    assert routed == "$host", f"{where}: {url!r} must end in routed_host=$host (no token without it)"
    assert location_rules(rules).problem is None, (where, url, location_rules(rules).problem)
    return rules


def test_ingress_nginx_sends_the_routed_host_to_the_sidecar() -> None:
    """The shipped Ingress's auth-url ends in routed_host=$host; nothing is left of the header mechanism it
    replaced (a header could be forged on any Ingress that forgot to overwrite it)."""
    docs = rendered("ingress-nginx")
    app = one(docs, "Ingress", "demo-app")
    annotations = app["metadata"]["annotations"]
    assert routed_auth_url(annotations[AUTH_URL], "Ingress/demo-app") == ""
    assert not [key for key in annotations if key.endswith("auth-proxy-set-headers")]
    assert "X-Routed-Host" not in json.dumps(docs)


def test_the_auth_url_follows_the_namespace(tmp_path: Path) -> None:
    """Changing the overlay's one "namespace:" line moves the auth-url's Service host with it (the replacements
    in kustomization.yaml), and routed_host=$host stays at its end."""
    copied = tmp_path / "kubernetes"
    shutil.copytree(K8S, copied)
    kustomization = copied / "overlays" / "ingress-nginx" / "kustomization.yaml"
    text = kustomization.read_text()
    assert text.count(NAMESPACE_LINE) == 1
    kustomization.write_text(text.replace(NAMESPACE_LINE, "namespace: team-a\n"))
    docs = kustomize(copied / "overlays" / "ingress-nginx")
    app = one(docs, "Ingress", "demo-app")
    assert namespace_of(app) == "team-a"
    url = app["metadata"]["annotations"][AUTH_URL]
    assert url == "http://sidecar.team-a.svc.cluster.local:4181/oauth2/auth?routed_host=$host"
    routed_auth_url(url, "Ingress/demo-app in team-a")


# What a browser needs of the sidecar; never /oauth2/auth, which answers with the access token.
BROWSER_ENDPOINTS = {
    "/oauth2/start",
    "/oauth2/callback",
    "/oauth2/sign_in",
    "/oauth2/sign_out",
    "/oauth2/userinfo",
    "/oauth2/backchannel_logout",
}
STRIP_COOKIE = K8S / "components" / "strip-session-cookie"
SNIPPET = "nginx.ingress.kubernetes.io/configuration-snippet"


def public_routes(docs: list[dict[str, Any]]) -> list[tuple[str, str, str, str]]:
    """(Ingress, path, pathType, backend Service) of every path of every Ingress."""
    return [
        (ing["metadata"]["name"], p["path"], p["pathType"], p["backend"]["service"]["name"])
        for ing in find(docs, "Ingress")
        for r in ing["spec"]["rules"]
        for p in r["http"]["paths"]
    ]


def reaches(path: str, route_path: str, path_type: str) -> bool:
    """Whether a request for ``path`` matches an Ingress path (Kubernetes' Exact/Prefix rules)."""
    if path_type == "Exact":
        return path == route_path
    prefix = route_path.rstrip("/")
    return path == prefix or path.startswith(prefix + "/") or prefix == ""


def test_ingress_nginx_does_not_route_the_auth_endpoint_to_the_sidecar() -> None:
    docs = rendered("ingress-nginx")
    svc = one(docs, "Service", "sidecar")
    app = one(docs, "Ingress", "demo-app")
    # ingress-nginx reaches /oauth2/auth through the Service's in-cluster name, not a route.
    auth_url = urlsplit(app["metadata"]["annotations"]["nginx.ingress.kubernetes.io/auth-url"])
    assert auth_url.scheme == "http" and auth_url.path == "/oauth2/auth"
    assert auth_url.hostname == f"sidecar.{namespace_of(svc)}.svc.cluster.local"
    assert auth_url.port == next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "auth")  # --auth-address

    routes = public_routes(docs)
    to_sidecar = [r for r in routes if r[3] == svc["metadata"]["name"]]
    assert to_sidecar, "the browser endpoints must be routed"
    for ingress, path, path_type, _ in to_sidecar:
        assert path_type == "Exact", f"{ingress}: {path} must be an Exact path, not {path_type}"
        assert path in BROWSER_ENDPOINTS, f"{ingress}: {path} is not a browser endpoint"
    # No route of any kind (a Prefix /, /oauth2, /oauth2/...) takes it to the sidecar.
    for probe in ("/oauth2/auth", "/oauth2/auth/", "/oauth2/auth/x"):
        assert not [r for r in to_sidecar if reaches(probe, r[1], r[2])], probe


@pytest.mark.parametrize("build", sorted(BUILDS))
def test_no_snippet_annotations_by_default(build: str) -> None:
    """Many clusters refuse *-snippet annotations: the shipped builds work without them."""
    for ing in find(rendered(build), "Ingress"):
        notes = ing["metadata"].get("annotations", {})
        assert not [k for k in notes if k.endswith("-snippet")], ing["metadata"]["name"]


def with_component(build: str, component: Path, tmp_path: Path) -> list[dict[str, Any]]:
    """A build with an opt-in component added, as an operator's own overlay would do it."""
    rel = Path(*[".."] * len(tmp_path.resolve().parts[1:]))
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [str(rel / BUILDS[build].resolve().relative_to("/"))],
                "components": [str(rel / component.resolve().relative_to("/"))],
            }
        )
    )
    return kustomize(tmp_path)


def test_strip_session_cookie_component(tmp_path: Path) -> None:
    docs = with_component("ingress-nginx", STRIP_COOKIE, tmp_path)
    for doc in docs:
        assert not schema_errors(doc), schema_errors(doc)
    app = one(docs, "Ingress", "demo-app")
    snippet = app["metadata"]["annotations"][SNIPPET]
    assert "proxy_set_header Cookie $sidecar_app_cookie;" in snippet
    assert snippet.count("if ($sidecar_app_cookie ~") == 8 + 2  # eight steps, the guard, the trim
    # Everything else of the Ingress is as shipped; the sidecar's own routes get no snippet (the
    # sidecar needs its cookies there).
    shipped = one(rendered("ingress-nginx"), "Ingress", "demo-app")
    del app["metadata"]["annotations"][SNIPPET]
    assert app == shipped
    assert SNIPPET not in one(docs, "Ingress", "sidecar-oauth2")["metadata"].get("annotations", {})


def test_pod_sidecar_overlay() -> None:
    docs = rendered("pod-sidecar")
    assert not find(docs, "Deployment", "sidecar"), "the shared Deployment does not belong here"
    dep = one(docs, "Deployment", "demo-app")
    assert dep["spec"]["replicas"] >= 2
    pod = dep["spec"]["template"]["spec"]
    by_name = {c["name"]: c for c in pod["containers"]}
    assert set(by_name) == {"app", "sidecar"}
    app, side = by_name["app"], by_name["sidecar"]

    # The application listens on the pod's loopback only and exposes no port.
    app_env = {e["name"]: e["value"] for e in app["env"]}
    assert (app_env["LISTEN_HOST"], app_env["LISTEN_PORT"]) == ("127.0.0.1", "8080")
    assert not app.get("ports")

    env = container_env(docs, dep, side)
    assert env["SIDECAR_UPSTREAM"] == "http://127.0.0.1:8080/"
    assert env["SIDECAR_HTTP_ADDRESS"] == "0.0.0.0:4180"
    assert side["livenessProbe"]["httpGet"]["path"] == "/ping"
    assert side["readinessProbe"]["httpGet"]["path"] == "/ready"

    # Every Service port lands on the sidecar container, never on the app.
    svc = one(docs, "Service", "demo-app")
    targets = {p["name"]: port_number(side, p["targetPort"]) for p in svc["spec"]["ports"]}
    assert targets == {"http": 4180, "metrics": 9180}
    assert all(port_number(app, p["targetPort"]) is None for p in svc["spec"]["ports"])

    pdb = one(docs, "PodDisruptionBudget", "demo-app")
    assert pdb["spec"]["minAvailable"] == 1
    assert find(docs, "StatefulSet", "sidecar-redis")

    # A plain Ingress: the auth happens in the pod, not in the controller.
    for ing in find(docs, "Ingress"):
        assert not any(
            k.startswith("nginx.ingress.kubernetes.io/auth-") for k in ing["metadata"].get("annotations", {})
        )


# --------------------------------------------------------------------------
# The image the manifests run
# --------------------------------------------------------------------------


def test_dockerfile_matches_the_manifests() -> None:
    text = (ROOT / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.replace("\\\n", " ").splitlines()]
    instructions = [ln for ln in lines if ln and not ln.startswith("#")]
    froms = [ln for ln in instructions if ln.upper().startswith("FROM ")]
    assert len(froms) >= 2, "multi-stage build expected"
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in instructions
    assert f"USER {SIDECAR_UID}:{SIDECAR_UID}" in instructions  # numeric, as runAsUser
    assert 'ENTRYPOINT ["sidecar"]' in instructions
    assert "EXPOSE 4180 9180" in instructions
    env = " ".join(ln for ln in instructions if ln.startswith("ENV "))
    for setting in (
        "SIDECAR_HTTP_ADDRESS=0.0.0.0:4180",
        "PYTHONDONTWRITEBYTECODE=1",
        "PIP_NO_CACHE_DIR=1",
    ):
        assert setting in env
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", "tests"} <= ignored


# --------------------------------------------------------------------------
# What the README tells operators to write: applied, as written, to both overlays
# --------------------------------------------------------------------------

K8S_README = K8S / "README.md"


def readme_yaml_block(containing: str) -> dict[str, Any]:
    """The one ```yaml block of deploy/kubernetes/README.md that contains ``containing``,
    parsed, with the README's list-item indentation removed."""
    blocks = re.findall(r"^( *)```yaml\n(.*?)^\1```", K8S_README.read_text(), flags=re.M | re.S)
    found = [(indent, body) for indent, body in blocks if containing in body]
    assert len(found) == 1, f"expected one yaml block with {containing!r} in {K8S_README}, found {len(found)}"
    indent, body = found[0]
    text = "\n".join(line[len(indent) :] for line in body.splitlines())
    doc = yaml.safe_load(text)
    assert isinstance(doc, dict), text
    return doc


def test_every_ingress_asking_the_sidecar_sends_the_routed_host() -> None:
    """Every Ingress asking the sidecar, shipped or shown in deploy/kubernetes/README.md (cookie-only ones too),
    ends its auth-url in routed_host=$host: tests/e2e/test_real_fronts.py shows through nginx that an Ingress
    without it takes no token whatever a client forges, and one with it refuses another server block's host."""
    docs = rendered("ingress-nginx")
    asking = [i for i in find(docs, "Ingress") if AUTH_URL in i["metadata"].get("annotations", {})]
    assert asking
    for ingress in asking:
        routed_auth_url(ingress["metadata"]["annotations"][AUTH_URL], f"Ingress/{ingress['metadata']['name']}")
    readmes = {K8S_README: K8S_README.read_text(), ROOT / "README.md": (ROOT / "README.md").read_text()}
    shown = [
        (path, url)
        for path, text in readmes.items()
        for url in re.findall(re.escape(AUTH_URL) + r':\s*"?([^"\s]+)"?', text)
        if "/oauth2/auth" in url
    ]
    assert len([p for p, _ in shown if p == K8S_README]) >= 3, shown
    for path, url in shown:
        routed_auth_url(url, path.name)
    assert "X-Routed-Host" not in "".join(readmes.values())  # the forgeable header is gone
    assert "auth-proxy-set-headers" not in readmes[K8S_README]


def relative_to(tmp_path: Path, target: Path) -> str:
    """``target`` as a path relative to ``tmp_path`` (kustomize refuses absolute resource paths)."""
    rel = Path(*[".."] * len(tmp_path.resolve().parts[1:]))
    return str(rel / target.resolve().relative_to("/"))


def overlay_on(build: str, tmp_path: Path, **fields: Any) -> list[dict[str, Any]]:
    """An operator's own overlay on top of a shipped build, with ``fields`` added."""
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [relative_to(tmp_path, BUILDS[build])],
        **fields,
    }
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return kustomize(tmp_path)


def without_placeholder_secret_ref(docs: list[dict[str, Any]], secret: str) -> list[dict[str, Any]]:
    """The shipped build as the secret-manager patches should leave it: no placeholder Secret,
    and every sidecar container's secretRef naming ``secret``."""
    placeholder = [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"].startswith("sidecar-secrets-")]
    assert len(placeholder) == 1
    docs = [copy.deepcopy(d) for d in docs if d is not placeholder[0]]
    for _, c in sidecar_containers(docs):
        for source in c["envFrom"]:
            if "secretRef" in source:
                source["secretRef"]["name"] = secret
    return docs


@pytest.mark.parametrize("build", OVERLAYS)
def test_the_documented_secret_manager_patch_applies_to_both_overlays(build: str, tmp_path: Path) -> None:
    block = readme_yaml_block("sidecar-credentials")
    shipped = rendered(build)
    docs = overlay_on(build, tmp_path, patches=block["patches"])
    for doc in docs:
        assert not schema_errors(doc), schema_errors(doc)

    patched = list(sidecar_containers(docs))
    assert len(patched) == len(list(sidecar_containers(shipped))) >= 1
    for wl, c in patched:
        refs = [s for s in c["envFrom"] if "secretRef" in s]
        assert [s["secretRef"]["name"] for s in refs] == ["sidecar-credentials"], wl["metadata"]["name"]
        # The ConfigMap is still the generated one (its hashed name resolves), and comes first,
        # so the secret manager's keys still win.
        (cm_ref,) = [s["configMapRef"]["name"] for s in c["envFrom"] if "configMapRef" in s]
        assert cm_ref.startswith("sidecar-config-") and find(docs, "ConfigMap", cm_ref)
        assert "configMapRef" in c["envFrom"][0] and "secretRef" in c["envFrom"][-1]
    assert not [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"].startswith("sidecar-secrets")]
    # Nothing else changed: no container added to a Deployment without the sidecar, no other
    # field. (A strategic merge patch may list the patched container first; order aside.)
    expected = without_placeholder_secret_ref(shipped, "sidecar-credentials")
    assert by_container_name(docs) == by_container_name(expected)


def by_container_name(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``docs`` with each workload's containers sorted by name."""
    docs = copy.deepcopy(docs)
    for wl in workloads(docs):
        wl["spec"]["template"]["spec"]["containers"].sort(key=lambda c: c["name"])
    return docs


APP_HOST_LINE = "      - host=app.example.com\n"
HOSTS = ("shop.example.org", "a.b.c.example.net", "xn--bcher-kva.example", "my-app.internal")


def ingress_hosts(docs: list[dict[str, Any]]) -> list[str]:
    """Every host of every Ingress: the rules' and the TLS entries'."""
    hosts = []
    for ing in find(docs, "Ingress"):
        hosts += [r["host"] for r in ing["spec"]["rules"]]
        hosts += [h for tls in ing["spec"].get("tls", []) for h in tls["hosts"]]
    return hosts


def assert_everything_uses_host(docs: list[dict[str, Any]], host: str) -> None:
    hosts = ingress_hosts(docs)
    assert len(hosts) == 4 and set(hosts) == {host}, hosts  # two Ingresses, rules and TLS
    (wl, c), *_ = sidecar_containers(docs)
    env = container_env(docs, wl, c)
    assert env["SIDECAR_REDIRECT_URL"] == f"https://{host}/oauth2/callback"
    assert env["SIDECAR_WHITELIST_DOMAIN"] == host
    assert "app.example.com" not in yaml.safe_dump_all(docs)
    # The host setting is for rendering only: it is never applied to the cluster.
    assert not find(docs, "ConfigMap", "app-host")
    for doc in docs:
        assert not schema_errors(doc), schema_errors(doc)


@pytest.mark.parametrize("host", HOSTS)
def test_the_ingress_host_is_changed_in_one_place(host: str, tmp_path: Path) -> None:
    copied = tmp_path / "kubernetes"
    shutil.copytree(K8S, copied)
    kustomization = copied / "overlays" / "ingress-nginx" / "kustomization.yaml"
    text = kustomization.read_text()
    assert text.count(APP_HOST_LINE) == 1
    kustomization.write_text(text.replace(APP_HOST_LINE, f"      - host={host}\n"))
    assert_everything_uses_host(kustomize(copied / "overlays" / "ingress-nginx"), host)


@pytest.mark.parametrize("host", HOSTS[:2])
def test_the_documented_host_overlay_changes_every_host(host: str, tmp_path: Path) -> None:
    block = readme_yaml_block("host=my-app.example.org")
    (component,) = block["components"]
    assert component == "../deploy/kubernetes/components/app-host"
    (generator,) = block["configMapGenerator"]
    assert generator["literals"] == ["host=my-app.example.org"]
    generator["literals"] = [f"host={host}"]
    docs = overlay_on(
        "ingress-nginx",
        tmp_path,
        components=[relative_to(tmp_path, K8S / "components" / "app-host")],
        configMapGenerator=[generator],
    )
    assert_everything_uses_host(docs, host)
    # Only the host changed.
    shipped = yaml.safe_dump_all(rendered("ingress-nginx"))
    ours = yaml.safe_dump_all(docs).replace(host, "app.example.com")
    assert re.sub(r"sidecar-config-\w+", "sidecar-config-X", ours) == re.sub(
        r"sidecar-config-\w+", "sidecar-config-X", shipped
    )


# --------------------------------------------------------------------------
# The documents shipped with the deployment files
# --------------------------------------------------------------------------

# sha256 of the Apache License 2.0 as the ASF publishes it (LICENSE-2.0.txt), byte for byte.
APACHE_2_0_SHA256 = "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30"


def test_the_license_file_is_the_declared_apache_2_0() -> None:
    import hashlib
    import tomllib

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"]
    assert declared in ("Apache-2.0", {"text": "Apache-2.0"})
    text = (ROOT / "LICENSE").read_bytes()
    assert hashlib.sha256(text).hexdigest() == APACHE_2_0_SHA256, "LICENSE is not the unmodified Apache-2.0 text"


def shell_blocks(markdown_text: str) -> list[str]:
    """Every ```sh block of a Markdown text, backslash continuations joined."""
    blocks = re.findall(r"^ *```sh\n(.*?)^ *```", markdown_text, flags=re.M | re.S)
    return [block.replace("\\\n", " ") for block in blocks]


# A cookie secret made up when the command runs: a new one at every start.
FRESH_SECRET = re.compile(r"--cookie-secret[ =][\"']?\$\(")
DOCS = (ROOT / "README.md", K8S_README, ROOT / "deploy" / "nginx" / "README.md")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_command_makes_up_a_new_cookie_secret_at_each_start(doc: Path) -> None:
    for block in shell_blocks(doc.read_text()):
        assert not FRESH_SECRET.search(block), block


def test_the_production_command_reads_one_fixed_cookie_secret_from_a_file(tmp_path: Path) -> None:
    import shlex

    from sidecar.config_load import load_config

    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Production") :]
    section = section[: section.index("\n## ", 1)]
    (command, *_) = shell_blocks(section)
    argv = shlex.split(command, comments=True)
    argv = argv[argv.index("sidecar") + 1 :]
    assert "--cookie-secret" not in argv
    secret_file = argv[argv.index("--cookie-secret-file") + 1]
    assert secret_file.startswith("/run/secrets/")
    # The documented command, with the two secret files made real, is accepted as it is, and
    # every start (every replica) reads the same secret.
    files = {}
    for flag in ("--cookie-secret-file", "--client-secret-file"):
        path = tmp_path / flag.strip("-")
        path.write_text(secrets.token_urlsafe(32) + "\n")
        files[argv[argv.index(flag) + 1]] = str(path)
    real = [files.get(arg, arg) for arg in argv]
    first, second = load_config(real, environ={}), load_config(real, environ={})
    expected = (tmp_path / "cookie-secret-file").read_text().strip().encode()
    assert first.cookie_secrets == second.cookie_secrets == (expected,)


# The ingress-nginx auth cache, wherever it is written down (README examples, commented manifests).
AUTH_CACHE_FILES = (K8S_README, K8S / "overlays" / "ingress-nginx" / "ingress.yaml")
_CACHE_ANNOTATION = re.compile(r'nginx\.ingress\.kubernetes\.io/auth-cache-(key|duration):\s*"([^"]*)"')


@pytest.mark.parametrize("doc", AUTH_CACHE_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_documented_auth_cache_keeps_only_202_briefly_and_keys_by_credentials(doc: Path) -> None:
    """ingress-nginx's default duration caches 401 for 5 minutes, and a key of the session cookie alone
    replays one request's app cookies (auth-response-headers "Cookie") and mixes in bearer-token answers."""
    found = _CACHE_ANNOTATION.findall(doc.read_text())
    keys = [value for kind, value in found if kind == "key"]
    durations = [value for kind, value in found if kind == "duration"]
    assert keys and len(keys) == len(durations), found  # no key without an explicit duration
    for duration in durations:
        *statuses, period = duration.split()
        assert statuses == ["202"] and period == "1s", duration
    for key in keys:
        assert "$http_authorization" in key and "$http_cookie" in key, key

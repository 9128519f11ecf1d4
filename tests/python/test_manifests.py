#!/usr/bin/env python3
"""Checks of deploy/k8s (run by `make k8s-check`, which `make test` runs).

For every overlay: `kubectl kustomize` renders it, `kubernetes-validate --strict` validates the
output offline against a pinned Kubernetes version (unknown or misspelt fields fail), and the
properties the deployment relies on are asserted on the rendered objects, so none of them can
disappear silently in an edit: headless stage Services that the orchestrator's args name,
native gRPC probes on the right ports with a startup budget for model loading, the denoiser's
HPA on a Pods metric, PDBs, NetworkPolicies, non-root read-only containers, weights on a
read-only volume, GPUs in the gpu overlay only.

A plain script (pytest is not a dependency): each check prints PASS, the first failure raises.
Needs `kubectl` (with its built-in kustomize) and the venv from tests/python/requirements.txt.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
OVERLAYS = ROOT / "deploy" / "k8s" / "overlays"
# The Kubernetes version the manifests are validated against: native gRPC probes are GA since
# 1.27, autoscaling/v2 behavior since 1.23; 1.33 is a version clusters commonly run.
K8S_VERSION = os.environ.get("K8S_VERSION", "1.33.0")

STAGE_PORTS = {"text-encoder": 50061, "denoiser": 50062, "vae": 50063}
ORCHESTRATOR_PORT = 50051
METRICS_PORT = 9464
GPU = "nvidia.com/gpu"


def render(overlay: str) -> list[dict]:
    out = subprocess.run(
        ["kubectl", "kustomize", str(OVERLAYS / overlay)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def validate(overlay: str, docs: list[dict], tmp: Path) -> None:
    path = tmp / f"{overlay}.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    res = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet",
         "-k", K8S_VERSION, str(path)],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, f"{overlay}: kubernetes-validate --strict failed:\n{res.stdout}{res.stderr}"


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def containers(deploy: dict) -> list[dict]:
    spec = deploy["spec"]["template"]["spec"]
    return spec.get("initContainers", []) + spec["containers"]


def check_services(docs: list[dict]) -> None:
    services = by_kind(docs, "Service")
    orch = by_kind(docs, "Deployment")["sd-orchestrator"]
    args = orch["spec"]["template"]["spec"]["containers"][0].get("args", [])
    for stage, port in STAGE_PORTS.items():
        name = f"sd-{stage}-headless"
        svc = services.get(name)
        assert svc, f"no Service {name}"
        assert svc["spec"].get("clusterIP") == "None", f"{name} is not headless"
        assert svc["spec"]["selector"] == {"app.kubernetes.io/name": f"sd-{stage}"}, name
        assert port in [p["port"] for p in svc["spec"]["ports"]], f"{name} lacks port {port}"
        flag = f"--{stage}"
        assert flag in args, f"orchestrator args lack {flag}"
        want = f"http://{name}:{port}"
        assert args[args.index(flag) + 1] == want, f"orchestrator {flag} is not {want}"
    for name, d in by_kind(docs, "Deployment").items():
        image = d["spec"]["template"]["spec"]["containers"][0]["image"]
        target = name.removeprefix("sd-")
        repo = image.rsplit("/", 1)[-1].split("@")[0].split(":")[0]
        assert repo == target, f"{name} runs {image}, not the {target} image"
    orch_svc = services["sd-orchestrator"]
    assert orch_svc["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert orch_svc["spec"].get("clusterIP") != "None"
    ports = {p["port"] for p in orch_svc["spec"]["ports"]}
    assert {ORCHESTRATOR_PORT, METRICS_PORT} <= ports, ports


def check_probes(docs: list[dict]) -> None:
    deploys = by_kind(docs, "Deployment")
    want = {f"sd-{s}": p for s, p in STAGE_PORTS.items()} | {"sd-orchestrator": ORCHESTRATOR_PORT}
    for name, port in want.items():
        c = deploys[name]["spec"]["template"]["spec"]["containers"][0]
        assert port in [p["containerPort"] for p in c["ports"]], f"{name} does not expose {port}"
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert probe in c, f"{name} has no {probe}"
            assert c[probe].get("grpc", {}).get("port") == port, f"{name} {probe} is not gRPC on {port}"
        sp = c["startupProbe"]
        budget = sp.get("failureThreshold", 3) * sp.get("periodSeconds", 10)
        if name != "sd-orchestrator":
            assert budget >= 600, f"{name} startupProbe allows only {budget}s for loading weights"
        pre = c.get("lifecycle", {}).get("preStop")
        assert pre, f"{name} has no preStop"
        grace = deploys[name]["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
        assert grace > 30, f"{name} terminationGracePeriodSeconds {grace} leaves no time to drain"


def check_security(docs: list[dict]) -> None:
    for name, d in by_kind(docs, "Deployment").items():
        pod = d["spec"]["template"]["spec"]
        psc = pod.get("securityContext", {})
        mounts_tmp = False
        for c in containers(d):
            sc = c.get("securityContext", {})
            non_root = sc.get("runAsNonRoot", psc.get("runAsNonRoot"))
            user = sc.get("runAsUser", psc.get("runAsUser"))
            assert non_root is True, f"{name}/{c['name']} may run as root"
            assert user != 0, f"{name}/{c['name']} runs as uid 0"
            assert sc.get("readOnlyRootFilesystem") is True, f"{name}/{c['name']} root fs is writable"
            assert sc.get("allowPrivilegeEscalation") is False, f"{name}/{c['name']} may escalate"
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], f"{name}/{c['name']} keeps capabilities"
            mounts_tmp |= any(m["mountPath"] == "/tmp" for m in c.get("volumeMounts", []))
            res = c.get("resources", {})
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(res.get(kind, {})), f"{name}/{c['name']} lacks cpu/memory {kind}"
        vols = {v["name"]: v for v in pod.get("volumes", [])}
        assert mounts_tmp and any("emptyDir" in v for v in vols.values()), f"{name} has no emptyDir /tmp"


def check_models_volume(docs: list[dict]) -> None:
    pvcs = by_kind(docs, "PersistentVolumeClaim")
    for stage in STAGE_PORTS:
        d = by_kind(docs, "Deployment")[f"sd-{stage}"]
        pod = d["spec"]["template"]["spec"]
        vols = {v["name"]: v for v in pod["volumes"]}
        c = pod["containers"][0]
        mounts = [m for m in c["volumeMounts"] if m["mountPath"] == "/models"]
        assert mounts, f"sd-{stage} does not mount /models"
        assert mounts[0].get("readOnly") is True, f"sd-{stage} mounts /models writable"
        vol = vols[mounts[0]["name"]]
        claim = vol.get("persistentVolumeClaim")
        assert claim and claim.get("readOnly") is True, f"sd-{stage} /models is not a read-only PVC"
        assert claim["claimName"] in pvcs, f"sd-{stage} claims missing PVC {claim['claimName']}"
    orch = by_kind(docs, "Deployment")["sd-orchestrator"]["spec"]["template"]["spec"]
    assert not any(
        m["mountPath"] == "/models" for m in orch["containers"][0].get("volumeMounts", [])
    ), "the orchestrator needs no weights"


def check_hpa(docs: list[dict]) -> None:
    hpas = [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]
    assert hpas and all(h["apiVersion"] == "autoscaling/v2" for h in hpas), "no autoscaling/v2 HPA"
    hpa = by_kind(docs, "HorizontalPodAutoscaler")["sd-denoiser"]
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["apiVersion"], ref["kind"], ref["name"]) == ("apps/v1", "Deployment", "sd-denoiser"), ref
    pods = [m for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert pods, "the denoiser HPA has no Pods metric"
    assert pods[0]["pods"]["metric"]["name"].startswith("sd_stage_"), pods[0]
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300


def check_pdbs_and_netpol(docs: list[dict]) -> None:
    pdbs = by_kind(docs, "PodDisruptionBudget")
    for name in [f"sd-{s}" for s in STAGE_PORTS] + ["sd-orchestrator"]:
        pdb = pdbs.get(name)
        assert pdb, f"no PodDisruptionBudget for {name}"
        assert pdb["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": name}
    pols = by_kind(docs, "NetworkPolicy")
    stages = pols.get("sd-stages")
    assert stages, "no NetworkPolicy for the stages"
    assert stages["spec"]["policyTypes"] == ["Ingress"]
    stage_ports = set(STAGE_PORTS.values())
    for rule in stages["spec"]["ingress"]:
        ports = {p["port"] for p in rule.get("ports", [])}
        peers = rule.get("from")
        assert peers, "a stage ingress rule is open to every pod"
        if ports & stage_ports:
            assert peers == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "sd-orchestrator"}}}], peers
        else:
            assert ports == {METRICS_PORT}, ports
    # Every stage pod is selected by the policy.
    sel = stages["spec"]["podSelector"]["matchLabels"]
    for stage in STAGE_PORTS:
        labels = by_kind(docs, "Deployment")[f"sd-{stage}"]["spec"]["template"]["metadata"]["labels"]
        assert sel.items() <= labels.items(), f"NetworkPolicy does not select sd-{stage}"


def check_config(docs: list[dict]) -> None:
    cms = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    common = [c for n, c in cms.items() if n.startswith("sd-common")]
    assert common, "no sd-common ConfigMap"
    assert common[0]["data"]["OTEL_EXPORTER_OTLP_ENDPOINT"].startswith("http://otel-collector.")
    for name, d in by_kind(docs, "Deployment").items():
        refs = [e["configMapRef"]["name"] for e in d["spec"]["template"]["spec"]["containers"][0]["envFrom"]]
        assert any(r.startswith("sd-common") for r in refs), f"{name} does not read sd-common"
        for r in refs:
            assert r in cms, f"{name} reads missing ConfigMap {r}"


def stage_env(docs: list[dict], stage: str) -> dict[str, str]:
    cms = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    d = by_kind(docs, "Deployment")[f"sd-{stage}"]
    env: dict[str, str] = {}
    for e in d["spec"]["template"]["spec"]["containers"][0]["envFrom"]:
        env.update(cms[e["configMapRef"]["name"]].get("data", {}))
    return env


def gpus(d: dict) -> tuple[str | None, str | None]:
    res = d["spec"]["template"]["spec"]["containers"][0]["resources"]
    return res.get("requests", {}).get(GPU), res.get("limits", {}).get(GPU)


def check_cpu(docs: list[dict]) -> None:
    for name, d in by_kind(docs, "Deployment").items():
        for c in containers(d):
            for kind in ("requests", "limits"):
                assert GPU not in c.get("resources", {}).get(kind, {}), f"cpu overlay: {name} asks for a GPU"
        assert "tolerations" not in d["spec"]["template"]["spec"], f"cpu overlay: {name} tolerates GPU taints"
    for stage in STAGE_PORTS:
        assert stage_env(docs, stage)["SD_DEVICE"] == "cpu"


def check_gpu(docs: list[dict]) -> None:
    deploys = by_kind(docs, "Deployment")
    den = deploys["sd-denoiser"]
    req, lim = gpus(den)
    assert lim is not None and int(lim) >= 1, "gpu overlay: the denoiser has no nvidia.com/gpu limit"
    assert req == lim, "gpu overlay: nvidia.com/gpu requests != limits"
    pod = den["spec"]["template"]["spec"]
    assert any(t.get("key") == GPU for t in pod.get("tolerations", [])), "denoiser lacks the GPU toleration"
    assert pod.get("nodeSelector"), "denoiser has no GPU nodeSelector"
    env = stage_env(docs, "denoiser")
    assert (env["SD_DEVICE"], env["SD_DTYPE"]) == ("cuda", "f16"), env
    vae = stage_env(docs, "vae")
    assert vae["SD_DTYPE"] == "f32", "the VAE must decode in f32"
    if vae["SD_DEVICE"].startswith("cuda"):
        req, lim = gpus(deploys["sd-vae"])
        assert lim is not None and req == lim, "gpu overlay: the VAE is on cuda without a GPU"
    assert gpus(deploys["sd-orchestrator"]) == (None, None), "the orchestrator needs no GPU"


def check_images() -> None:
    """The Dockerfile cannot be built here (no container engine): keep its contract checked."""
    text = (ROOT / "deploy" / "docker" / "Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", text, re.M | re.I)
    for target in list(STAGE_PORTS) + ["orchestrator"]:
        assert target in stages, f"Dockerfile has no target {target}"
        body = text.split(f" AS {target}\n", 1)[1].split("\nFROM ", 1)[0]
        assert f"sd-{target}" in body, f"target {target} does not ship sd-{target}"
    assert "cargo build --release --locked" in text
    assert "tests/python/requirements.txt" in text, "the torch pin must come from the requirements"
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and all(not u.startswith(("0", "root")) for u in users), users
    runtime = text.split(" AS orchestrator\n", 1)[1]
    assert "torch" not in runtime.lower(), "the orchestrator image must not carry libtorch"
    assert not re.search(r"^(COPY|ADD)\s.*\s/models/?\s*$", text, re.M), "weights are never baked in"
    ignored = (ROOT / ".dockerignore").read_text().split()
    for path in ("target/", ".venv/", ".cache/", "out/"):
        assert path in ignored, f".dockerignore lacks {path}"


COMMON = [check_services, check_probes, check_security, check_models_volume, check_hpa,
          check_pdbs_and_netpol, check_config]
PER_OVERLAY = {"cpu": [check_cpu], "gpu": [check_gpu]}


def main() -> None:
    import tempfile

    found = sorted(p.name for p in OVERLAYS.iterdir() if (p / "kustomization.yaml").exists())
    assert set(PER_OVERLAY) <= set(found), f"overlays missing: {set(PER_OVERLAY) - set(found)}"
    check_images()
    print("PASS images: Dockerfile targets, non-root users, .dockerignore")
    with tempfile.TemporaryDirectory() as tmp:
        for overlay in found:
            docs = render(overlay)
            print(f"PASS {overlay}: kubectl kustomize rendered {len(docs)} objects")
            validate(overlay, docs, Path(tmp))
            print(f"PASS {overlay}: kubernetes-validate --strict against Kubernetes {K8S_VERSION}")
            for check in COMMON + PER_OVERLAY.get(overlay, []):
                check(docs)
                print(f"PASS {overlay}: {check.__name__}")


if __name__ == "__main__":
    main()

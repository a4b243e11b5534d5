"""Check rendered PyTorchJob manifests: the operator's CRD schema, its admission rules, and our lint.

Usage::

    kubectl kustomize k8s/overlays/asr_ddp | python k8s/validate.py -       # exit 1 and one line per problem
    python k8s/validate.py rendered.yaml --crds ../shared/k8s-crds

    from validate import validate_job, validate_stream
    problems = validate_job(job_dict, crd_schema=load_crd_schema(crds_dir))   # ["[rule] message", ...]

Every problem starts with its rule id in brackets, so tests (and people) see which rule broke:

schema          the PyTorchJob v1 openAPIV3Schema of the CRD, unknown fields rejected (the API
                server prunes fields its structural schema does not list: a typo would vanish
                silently, so it is an error here)
admission-*     the operator's validating webhook (job name, roles, replicas, containers, elastic)
restart-policy  every replica restarts OnFailure (a crashed rank resumes instead of failing the job)
standalone      no elasticPolicy.standalone (it makes torchrun ignore the operator's rendezvous)
nproc-gpus      nprocPerNode equals every pod's nvidia.com/gpu limit (one process per GPU)
operator-env    the user sets none of PET_*, MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK, ... (the operator
                and torchrun do; a user value would be silently overridden or, worse, win)
volume-mount    every volumeMount names a volume of the pod
image-tag       images carry a pinned tag or digest, never none and never 'latest'
secret-env      WANDB_API_KEY / HF_TOKEN only from a Secret (secretKeyRef, optional: true)
shm             /dev/shm is a memory emptyDir (NCCL and data-loader workers need more than 64 MiB)
outputs-pvc     the working directory (where data/ and outputs/ go) is on a PersistentVolumeClaim
run-name        RUN_NAME is the job name (downward API), so every node and every restart share one run dir
"""

from __future__ import annotations

import copy
import functools
import os
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CRDS = ROOT.parent / "shared" / "k8s-crds"  # beside the checkout; never copied into it
CRD_FILE = "kubeflow.org_pytorchjobs.yaml"
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
OPERATOR_ENV = re.compile(
    r"^(PET_.*|MASTER_ADDR|MASTER_PORT|WORLD_SIZE|RANK|LOCAL_RANK|LOCAL_WORLD_SIZE|GROUP_RANK|"
    r"GROUP_WORLD_SIZE|ROLE_RANK|ROLE_WORLD_SIZE|NODE_RANK|TORCHELASTIC_.*)$"
)
SECRET_ENV = ("WANDB_API_KEY", "HF_TOKEN")
JOB_NAME_LABEL = "metadata.labels['training.kubeflow.org/job-name']"


TRAINJOB_CRD_FILE = "trainer-v2.3.0/trainer.kubeflow.org_trainjobs.yaml"


def crds_dir() -> Path:
    return Path(os.environ.get("K8S_CRDS_DIR", DEFAULT_CRDS))


def strict(schema):
    """Close every object schema that lists its properties (as the API server's pruning effectively does)."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if ("properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


def load_crd_schema(directory: Path | None = None, version: str = "v1", crd_file: str = CRD_FILE) -> dict:
    """The strict openAPIV3Schema of the PyTorchJob CRD (or ``crd_file``, e.g. TRAINJOB_CRD_FILE with
    version "v1alpha1"); FileNotFoundError names the missing file."""
    path = Path(directory or crds_dir()) / crd_file
    if not path.exists():
        raise FileNotFoundError(f"CRD not found: {path} (set K8S_CRDS_DIR to the directory holding {crd_file})")
    return _strict_schema(path, version)


@functools.lru_cache(maxsize=4)
def _strict_schema(path: Path, version: str) -> dict:
    # Parsing the 600 kB CRD takes seconds; tests and render ask for it many times.
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            return strict(v["schema"]["openAPIV3Schema"])
    raise ValueError(f"{path}: no version {version!r} in the CRD")


def schema_problems(job: dict, schema: dict) -> list[str]:
    import jsonschema

    validator = jsonschema.Draft7Validator(schema)
    problems = []
    for err in sorted(validator.iter_errors(job), key=lambda e: list(e.absolute_path)):
        where = "/".join(str(p) for p in err.absolute_path) or "<root>"
        problems.append(f"[schema] {where}: {err.message}")
    return problems


def _replicas(job: dict) -> dict:
    return (job.get("spec") or {}).get("pytorchReplicaSpecs") or {}


def admission_problems(job: dict) -> list[str]:
    """The operator webhook's checks (training-operator v1.9, pkg/webhooks/pytorch)."""
    out = []
    name = (job.get("metadata") or {}).get("name", "")
    if not DNS1035.match(name or "") or len(name) > 63:
        out.append(f"[admission-name] metadata.name {name!r} is not a DNS-1035 label")
    spec = job.get("spec") or {}
    replicas = _replicas(job)
    if not replicas:
        out.append("[admission-roles] spec.pytorchReplicaSpecs is empty")
    for role, rs in replicas.items():
        if role not in ("Master", "Worker"):
            out.append(f"[admission-roles] replica type {role!r} is not Master or Worker")
        containers = (((rs or {}).get("template") or {}).get("spec") or {}).get("containers") or []
        if not any(c.get("name") == "pytorch" for c in containers):
            out.append(f"[admission-container] {role}: no container named 'pytorch'")
        for c in containers:
            if not c.get("image"):
                out.append(f"[admission-container] {role}: container {c.get('name')!r} has no image")
    if "Master" in replicas and replicas["Master"].get("replicas", 1) != 1:
        out.append(f"[admission-replicas] Master replicas must be 1, got {replicas['Master'].get('replicas')}")
    if "Worker" in replicas and replicas["Worker"].get("replicas", 1) < 1:
        out.append(f"[admission-replicas] Worker replicas must be >= 1, got {replicas['Worker'].get('replicas')}")
    elastic = spec.get("elasticPolicy")
    if elastic is not None:
        if "Worker" not in replicas:
            out.append("[admission-elastic] elasticPolicy needs a Worker replica spec")
        if elastic.get("nProcPerNode") is not None and spec.get("nprocPerNode") is not None:
            out.append("[admission-elastic] elasticPolicy.nProcPerNode and spec.nprocPerNode are both set")
    return out


def _image_ok(image: str) -> str | None:
    if "@sha256:" in image:
        return None
    name, _, tag = image.rpartition(":")
    if not name or "/" in tag:
        return f"image {image!r} has no tag"
    if tag == "latest":
        return f"image {image!r} uses 'latest'"
    return None


def lint_problems(job: dict) -> list[str]:
    out = []
    spec = job.get("spec") or {}
    if (spec.get("elasticPolicy") or {}).get("standalone") is not None:
        out.append("[standalone] elasticPolicy.standalone is set: torchrun would ignore the operator's "
                   "rendezvous (PET_STANDALONE); remove it")
    nproc = spec.get("nprocPerNode")
    for role, rs in _replicas(job).items():
        if rs.get("restartPolicy") != "OnFailure":
            out.append(f"[restart-policy] {role}: restartPolicy is {rs.get('restartPolicy')!r}, want 'OnFailure'")
        pod = ((rs.get("template") or {}).get("spec")) or {}
        volumes = {v.get("name"): v for v in pod.get("volumes") or []}
        for c in (pod.get("containers") or []) + (pod.get("initContainers") or []):
            where = f"{role}/{c.get('name')}"
            problem = _image_ok(c.get("image") or "")
            if problem:
                out.append(f"[image-tag] {where}: {problem}; pin a release tag or a digest")
            env = {e.get("name"): e for e in c.get("env") or []}
            for name in env:
                if OPERATOR_ENV.match(name or ""):
                    out.append(f"[operator-env] {where}: env {name} is set by the operator/torchrun; remove it")
            for name in SECRET_ENV:
                e = env.get(name)
                ref = ((e or {}).get("valueFrom") or {}).get("secretKeyRef")
                if e is not None and (not ref or ref.get("optional") is not True or "value" in e):
                    out.append(f"[secret-env] {where}: {name} must come only from a Secret "
                               "(valueFrom.secretKeyRef with optional: true)")
            mounts = {m.get("mountPath"): m for m in c.get("volumeMounts") or []}
            for m in mounts.values():
                if m.get("name") not in volumes:
                    out.append(f"[volume-mount] {where}: volumeMount {m.get('name')!r} ({m.get('mountPath')}) "
                               "has no volume of that name")
            if c.get("name") != "pytorch":
                continue
            text = " ".join(str(x) for x in (c.get("command") or []) + (c.get("args") or []))
            if "--standalone" in text:
                out.append(f"[standalone] {where}: torchrun --standalone ignores the operator's PET_* rendezvous")
            gpus = ((c.get("resources") or {}).get("limits") or {}).get("nvidia.com/gpu")
            if str(gpus) != str(nproc):
                out.append(f"[nproc-gpus] {where}: nprocPerNode {nproc!r} != nvidia.com/gpu limit {gpus!r}")
            shm = volumes.get((mounts.get("/dev/shm") or {}).get("name"))
            if not shm or (shm.get("emptyDir") or {}).get("medium") != "Memory":
                out.append(f"[shm] {where}: /dev/shm must be mounted from an emptyDir with medium: Memory")
            workdir = c.get("workingDir")
            covering = [m for p, m in mounts.items() if workdir and (workdir == p or workdir.startswith(p + "/"))]
            if not covering or not (volumes.get(covering[0].get("name")) or {}).get("persistentVolumeClaim"):
                out.append(f"[outputs-pvc] {where}: workingDir {workdir!r} (data/ and outputs/) is not on a "
                           "PersistentVolumeClaim volume; restarts would lose checkpoints")
            run_name = env.get("RUN_NAME") or {}
            field = ((run_name.get("valueFrom") or {}).get("fieldRef") or {}).get("fieldPath")
            if field != JOB_NAME_LABEL:
                out.append(f"[run-name] {where}: RUN_NAME must come from fieldRef {JOB_NAME_LABEL} (one run "
                           "directory per job, the same on every node and after restarts)")
    return out


def validate_job(job: dict, crd_schema: dict | None = None) -> list[str]:
    """All problems of one PyTorchJob (schema only when ``crd_schema`` is given)."""
    problems = schema_problems(job, crd_schema) if crd_schema is not None else []
    for check in (admission_problems, lint_problems):
        try:
            problems += check(job)
        except (AttributeError, TypeError, KeyError, ValueError) as exc:
            # A field of the wrong type (the schema, when given, has already said which).
            problems.append(f"[malformed] {check.__name__} could not read the manifest: {exc!r}")
    return problems


def validate_trainjob(tj: dict, crd_schema: dict | None = None) -> list[str]:
    """A Kubeflow Trainer v2 TrainJob: its CRD schema and the same lint as the PyTorchJob's container."""
    problems = schema_problems(tj, crd_schema) if crd_schema is not None else []
    trainer = (tj.get("spec") or {}).get("trainer") or {}
    pod_patch = {}
    for patch in (tj.get("spec") or {}).get("runtimePatches") or []:
        for rj in ((((patch.get("trainingRuntimeSpec") or {}).get("template") or {}).get("spec") or {})
                   .get("replicatedJobs") or []):
            pod_patch = ((rj.get("template") or {}).get("spec") or {}).get("template", {}).get("spec") or {}
    mounts = next((c.get("volumeMounts") for c in pod_patch.get("containers") or [] if c.get("name") == "node"), [])
    # Seen as a one-pod PyTorchJob, so every rule above applies to the trainer container too.
    as_job = {"metadata": tj.get("metadata"), "spec": {"nprocPerNode": str(trainer.get("numProcPerNode")),
              "pytorchReplicaSpecs": {"Master": {"replicas": 1, "restartPolicy": "OnFailure", "template": {"spec": {
                  "volumes": pod_patch.get("volumes"), "containers": [{
                      "name": "pytorch", "image": trainer.get("image"), "command": trainer.get("command"),
                      "args": trainer.get("args"), "env": trainer.get("env"), "workingDir": "/workspace",
                      "resources": trainer.get("resourcesPerNode"), "volumeMounts": mounts}]}}}}}}
    for p in admission_problems(as_job) + lint_problems(as_job):
        if p.startswith("[run-name]"):  # Trainer v2: the JobSet's name label, not the v1 operator's
            env = {e.get("name"): e for e in trainer.get("env") or []}
            field = (((env.get("RUN_NAME") or {}).get("valueFrom") or {}).get("fieldRef") or {}).get("fieldPath")
            if field == "metadata.labels['jobset.sigs.k8s.io/jobset-name']":
                continue
        problems.append(p.replace("Master/pytorch", "trainer"))
    return problems


def pytorchjobs(text: str) -> list[dict]:
    return [copy.deepcopy(d) for d in yaml.safe_load_all(text) if d and d.get("kind") == "PyTorchJob"]


def validate_stream(text: str, crds: Path | None = None, require_schema: bool = False) -> list[str]:
    """Problems of every PyTorchJob in a YAML stream; the schema check is skipped (with a note on
    stderr) when the CRD file is absent, unless ``require_schema``."""
    try:
        schema = load_crd_schema(crds)
    except FileNotFoundError as exc:
        if require_schema:
            raise
        print(f"note: schema check skipped: {exc}", file=sys.stderr)
        schema = None
    jobs = pytorchjobs(text)
    if not jobs:
        return ["[admission-roles] no PyTorchJob in the input"]
    return [p for job in jobs for p in validate_job(job, schema)]


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="validate rendered PyTorchJob manifests")
    ap.add_argument("file", help="YAML file, or - for stdin")
    ap.add_argument("--crds", type=Path, default=None, help=f"CRD directory (default {DEFAULT_CRDS})")
    a = ap.parse_args(argv)
    text = sys.stdin.read() if a.file == "-" else Path(a.file).read_text()
    problems = validate_stream(text, a.crds, require_schema=a.crds is not None)
    for p in problems:
        print(p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

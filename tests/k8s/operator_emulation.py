"""Run a rendered PyTorchJob on this machine the way the Kubeflow v1 operator would start its pods.

Usage::

    pods = pod_specs(job, nproc_per_node=2, port=free_port())     # [Pod(name, argv, env, workdir), ...]
    procs = launch(pods, volume=tmp_path / "pvc", extra_args=[...tiny hydra overrides...])

What is emulated (training-operator v1.9, as summarized in ../shared/k8s-crds/SOURCES.md):

* defaults: replicas 1, nprocPerNode "auto", the `pytorchjob-port` (23456) on the `pytorch` container;
* the env the operator appends after the user's (a repeated name takes the last value):
  PYTHONUNBUFFERED; with a Master: MASTER_ADDR/PET_MASTER_ADDR=<job>-master-0, MASTER_PORT/
  PET_MASTER_PORT, WORLD_SIZE, RANK, PET_NPROC_PER_NODE, PET_NODE_RANK; PET_NNODES = replicas, or with
  an elasticPolicy PET_RDZV_ENDPOINT=<job>-worker-0:<port>, PET_RDZV_BACKEND, PET_NNODES=min:max, ...;
* the kubelet: ``valueFrom`` (downward API labels the operator puts on pods; optional Secrets that
  do not exist are left out), ``$(VAR)`` expansion in command/args, workingDir.

What differs, on purpose: pod host names resolve to 127.0.0.1, the port is a free one, nprocPerNode is
reduced to what the CPU fits, the image's /app is this checkout, the PVC is a local directory, and the
caller appends tiny-config Hydra overrides. The command itself is the manifest's.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import free_port  # noqa: F401 - the k8s tests take it from here

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_PORT = 23456
JOB_NAME_LABEL = "training.kubeflow.org/job-name"


@dataclass
class Pod:
    name: str
    argv: list[str]
    env: dict[str, str]
    workdir: str




def _pytorch_container(rs: dict) -> dict:
    return next(c for c in rs["template"]["spec"]["containers"] if c["name"] == "pytorch")


def _port(rs: dict) -> int:
    for p in _pytorch_container(rs).get("ports") or []:
        if p.get("name") == "pytorchjob-port":
            return int(p["containerPort"])
    return DEFAULT_PORT


def _user_env(container: dict, job_name: str, pod_name: str, labels: dict) -> list[tuple[str, str]]:
    out = []
    for e in container.get("env") or []:
        if "value" in e:
            out.append((e["name"], str(e["value"])))
            continue
        ref = e.get("valueFrom") or {}
        if "fieldRef" in ref:
            path = ref["fieldRef"]["fieldPath"]
            m = re.fullmatch(r"metadata\.labels\['(.+)'\]", path)
            if m:
                out.append((e["name"], labels.get(m.group(1), "")))
            elif path == "metadata.name":
                out.append((e["name"], pod_name))
            else:
                raise NotImplementedError(f"fieldRef {path} is not emulated")
        elif "secretKeyRef" in ref:
            if not ref["secretKeyRef"].get("optional"):
                raise RuntimeError(f"env {e['name']}: required Secret {ref['secretKeyRef']['name']} does not exist "
                                   "here; the pod would not start")
            # An optional key of a missing Secret: the variable is simply not set.
        else:
            raise NotImplementedError(f"env {e['name']}: valueFrom {sorted(ref)} is not emulated")
    return out


def _operator_env(job: dict, role: str, index: int, nproc: str, ports: dict, host: str) -> list[tuple[str, str]]:
    name, spec = job["metadata"]["name"], job["spec"]
    replicas = spec["pytorchReplicaSpecs"]
    total = sum(int(rs.get("replicas", 1)) for rs in replicas.values())
    env = [("PYTHONUNBUFFERED", "1")]
    if "Master" in replicas:
        rank = index + 1 if role == "Worker" else index
        per_node = int(nproc) if nproc.isdigit() else 1
        addr = host or f"{name}-master-0"
        env += [("MASTER_ADDR", addr), ("PET_MASTER_ADDR", addr),
                ("MASTER_PORT", str(ports["Master"])), ("PET_MASTER_PORT", str(ports["Master"])),
                ("WORLD_SIZE", str(total * per_node)), ("RANK", str(rank)),
                ("PET_NPROC_PER_NODE", nproc), ("PET_NODE_RANK", str(rank))]
    elastic = spec.get("elasticPolicy")
    if elastic is None:
        env.append(("PET_NNODES", str(total)))
        return env
    rdzv_host = elastic.get("rdzvHost") or host or f"{name}-worker-0"
    rdzv_port = elastic.get("rdzvPort") or ports["Worker"]
    env += [("PET_RDZV_ENDPOINT", f"{rdzv_host}:{rdzv_port}"),
            ("PET_RDZV_BACKEND", elastic.get("rdzvBackend", "c10d"))]
    if elastic.get("minReplicas") is None and elastic.get("maxReplicas") is None:
        env.append(("PET_NNODES", str(replicas["Worker"].get("replicas", 1))))
    else:
        env.append(("PET_NNODES", f"{elastic['minReplicas']}:{elastic['maxReplicas']}"))
    if elastic.get("maxRestarts") is not None:
        env.append(("PET_MAX_RESTARTS", str(elastic["maxRestarts"])))
    if elastic.get("nProcPerNode") is not None:
        env.append(("PET_NPROC_PER_NODE", str(elastic["nProcPerNode"])))
    if elastic.get("rdzvId") is not None:
        env.append(("PET_RDZV_ID", elastic["rdzvId"]))
    if elastic.get("rdzvConf"):
        env.append(("PET_RDZV_CONF", ",".join(f"{c['key']}={c['value']}" for c in elastic["rdzvConf"])))
    if elastic.get("standalone"):
        env.append(("PET_STANDALONE", ""))
    return env


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes $(VAR) expansion: defined names are replaced, undefined ones kept, $$ escapes."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)


def pod_specs(job: dict, nproc_per_node: int, port: int, host: str = "127.0.0.1") -> list[Pod]:
    """Every pod of the job, Master first, with the argv and env its `pytorch` container would get."""
    job = {**job, "spec": {**job["spec"], "nprocPerNode": str(nproc_per_node)}}  # reduced to fit the CPU
    replicas = job["spec"]["pytorchReplicaSpecs"]
    # One free local port stands in for every replica's pytorchjob-port (they are different hosts there).
    ports = {role: port for role in replicas}
    pods = []
    for role in ("Master", "Worker"):
        if role not in replicas:
            continue
        rs = replicas[role]
        for index in range(int(rs.get("replicas", 1))):
            pod_name = f"{job['metadata']['name']}-{role.lower()}-{index}"
            labels = {**(rs["template"].get("metadata") or {}).get("labels", {}),
                      JOB_NAME_LABEL: job["metadata"]["name"]}
            c = _pytorch_container(rs)
            env: dict[str, str] = {}
            for k, v in _user_env(c, job["metadata"]["name"], pod_name, labels) + _operator_env(
                    job, role, index, job["spec"]["nprocPerNode"], ports, host):
                env[k] = v  # a repeated name takes the last value, as in the pod
            argv = [expand(x, env) for x in (c.get("command") or []) + (c.get("args") or [])]
            pods.append(Pod(pod_name, argv, env, c.get("workingDir") or "/"))
    return pods


def launch(pods: list[Pod], volume: Path, mount_path: str = "/workspace", extra_args: list[str] = (),
           extra_env: dict | None = None, log_dir: Path | None = None) -> list[subprocess.Popen]:
    """Start each pod's command as a local process (the image's /app is this checkout, the PVC ``volume``)."""
    torchrun = str(Path(sys.executable).parent / "torchrun")
    procs = []
    for pod in pods:
        argv = [a.replace("/app/", f"{ROOT}/") for a in pod.argv] + list(extra_args)
        if argv[0] == "torchrun":
            argv[0] = torchrun
        elif argv[0] == "python":  # the image's interpreter: this venv's
            argv[0] = sys.executable
        workdir = Path(pod.workdir.replace(mount_path, str(volume), 1))
        workdir.mkdir(parents=True, exist_ok=True)
        # Host variables that a pod would not have (and that would change torchrun's behaviour) are dropped.
        base = {k: v for k, v in os.environ.items()
                if not (k.startswith(("PET_", "TORCHELASTIC_")) or k in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE",
                                                                         "RANK", "LOCAL_RANK", "RUN_NAME"))}
        env = {**base, **pod.env, **(extra_env or {})}
        log = open((log_dir or volume) / f"{pod.name}.log", "w")  # noqa: SIM115 - closed with the process
        # Own session: a pod is its process group, so a timed-out pod can be stopped with its children.
        procs.append(subprocess.Popen(argv, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
                                      start_new_session=True))
    return procs


def wait_all(procs: list[subprocess.Popen], timeout: float) -> list[int]:
    """Exit codes; a pod still running at the timeout is killed (its process group) and reported as None."""
    import time

    deadline = time.monotonic() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            codes.append(None)
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, 9)  # the pod's own process group (start_new_session)
            p.wait()
    return codes

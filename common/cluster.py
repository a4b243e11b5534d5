"""The launch plan: how many processes on how many nodes, and what each rank's environment holds.

Every way of starting a job takes its shape from here, so the rules live in one place:

* ``make run`` / ``docker run`` (:func:`local`), a Kubernetes pod (:func:`kubernetes`, from the
  operator's ``PET_*`` variables), a Slurm task (:func:`slurm`, from ``SLURM_*``): a
  :class:`NodeLayout` with torchrun's arguments, used by ``common.tools.launch``;
* a job not yet started -- ``make k8s-render``, ``make slurm-render``, ``make dry-run`` --
  (:func:`requested`), checked by :func:`check_shape` before anything is submitted.

Usage::

    shape = requested(nodes=16, gpus_per_node=8)
    cfg, checked = check_shape("salm_tp_fsdp2", shape, model="canary_qwen_2p5b", data="librispeech")
    # ConfigError naming the setting if dp x tp != 128, TP would span nodes, a preset is unknown, ...
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from common.errors import ConfigError

# Each rank's environment, whatever started it (the launcher sets these unless already set). A hang
# must surface: a collective that times out (run.collective_timeout_s) tears the process down instead
# of leaving it blocked, and NCCL's flight recorder dumps what every rank was waiting for.
RANK_ENV = {
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3",  # on a failed or timed-out collective: abort the communicator, exit
    "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",       # ... after dumping the flight recorder (needs the buffer below)
    "TORCH_FR_BUFFER_SIZE": "2000",          # the flight recorder: the last 2000 collectives per rank
    "TORCH_NCCL_ENABLE_MONITORING": "1",     # a watchdog that kills a rank stuck beyond the heartbeat
    "TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC": "900",  # > run.collective_timeout_s (600): the timeout reports first
    "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",  # torchrun restarts: a fresh store each (common/train.py)
    "OMP_NUM_THREADS": "1",
}
NCCL_DUMP_NAME = "nccl_trace/rank_"  # under the run directory: TORCH_FR_DUMP_TEMP_FILE


@dataclass(frozen=True)
class NodeLayout:
    """One job's shape as a launcher sees it."""

    scheduler: str  # "local" | "kubernetes" | "slurm" | "requested"
    nodes: int
    procs_per_node: int
    node_rank: int | None = None  # this node's index where the scheduler says it (log names)
    torchrun_args: tuple[str, ...] = field(default=())  # rendezvous and counts (empty: from PET_* variables)
    worker_env_drop: tuple[str, ...] = field(default=())  # variables the ranks must not see

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node

    def trainer_overrides(self, cfg=None) -> list[str]:
        """What the config must say for this shape (check_launch compares it with what torchrun started).
        With the recipe's composed ``cfg``: a model-parallel recipe's data-parallel size follows the
        shape (``auto`` = world size / tensor_parallel_size), as the Kubernetes overlays set it."""
        out = [f"trainer.devices={self.procs_per_node}", f"trainer.num_nodes={self.nodes}"]
        if cfg is not None and "data_parallel_size" in (cfg.trainer.strategy or {}):
            out.append("trainer.strategy.data_parallel_size=auto")
        return out

    def rank_env(self, run_dir) -> dict:
        """The environment the ranks start with: ``RANK_ENV`` where not set, the flight recorder's dump
        files in the run directory, without the scheduler's variables that would mislead Lightning."""
        env = {k: v for k, v in os.environ.items() if k not in self.worker_env_drop}
        for key, value in RANK_ENV.items():
            env.setdefault(key, value)
        env.setdefault("TORCH_FR_DUMP_TEMP_FILE", str(run_dir / NCCL_DUMP_NAME))
        return env


def _count(value: str | None, name: str, what: str) -> int:
    """A scheduler's count (a variable's text) as a positive integer, or a ConfigError naming the variable."""
    if not (value or "").isdigit() or int(value) < 1:
        raise ConfigError(f"{name} must be a positive integer ({what}), got {value or ''!r}")
    return int(value)


def local(nproc: int) -> NodeLayout:
    """``make run``: ``nproc`` processes on this machine, torchrun's standalone rendezvous."""
    return NodeLayout("local", 1, nproc, 0, ("--standalone", f"--nproc-per-node={nproc}"))


def kubernetes(env=os.environ) -> NodeLayout:
    """A pod of a PyTorchJob / TrainJob: torchrun reads the rendezvous from the operator's ``PET_*``
    variables itself; an elastic range counts as its largest size for the checks."""
    nproc = _count(env.get("PET_NPROC_PER_NODE"), "PET_NPROC_PER_NODE", "processes per node")
    nodes = _count(env.get("PET_NNODES", "1").split(":")[-1], "PET_NNODES", "nodes, or a min:max range")
    node = env.get("PET_NODE_RANK")
    return NodeLayout("kubernetes", nodes, nproc, int(node) if (node or "").isdigit() else None)


def slurm(nproc: int, env=os.environ) -> NodeLayout:
    """One task per node of a Slurm allocation (``srun --ntasks-per-node=1``), ``nproc`` ranks each.

    torchrun's c10d rendezvous on ``RDZV_ENDPOINT`` (the batch script sets it to the allocation's first
    node and a port from the job id) assigns node ranks, so the same job id's relaunch (a requeue) forms
    the group again. Slurm's ``SLURM_NTASKS``/``SLURM_NPROCS`` are hidden from the ranks: Lightning
    would otherwise take its Slurm environment (one rank per task) instead of torchrun's."""
    nodes = _count(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES"), "SLURM_JOB_NUM_NODES",
                   "nodes of the allocation")
    endpoint = env.get("RDZV_ENDPOINT", "")
    if not endpoint:
        raise ConfigError("RDZV_ENDPOINT is not set (host:port of the rendezvous, which the batch script of "
                          "make slurm-render sets); run this through that script")
    job = env.get("SLURM_JOB_ID", "none")
    procid = env.get("SLURM_PROCID", "")
    return NodeLayout("slurm", nodes, nproc, int(procid) if procid.isdigit() else None,
                      (f"--nnodes={nodes}", f"--nproc-per-node={nproc}", "--rdzv-backend=c10d",
                       f"--rdzv-endpoint={endpoint}", f"--rdzv-id=slurm-{job}", "--max-restarts=0"),
                      worker_env_drop=("SLURM_NTASKS", "SLURM_NPROCS"))


def requested(nodes: int, gpus_per_node: int) -> NodeLayout:
    """A job about to be rendered or dry-run: NODES x GPUS_PER_NODE."""
    if nodes < 1:
        raise ConfigError(f"NODES must be >= 1, got {nodes}")
    if gpus_per_node < 1:
        raise ConfigError(f"GPUS_PER_NODE must be >= 1, got {gpus_per_node}")
    return NodeLayout("requested", nodes, gpus_per_node)


def preset_overrides(recipe: str, model: str | None, data: str | None) -> list[str]:
    """``model=``/``data=`` overrides after checking that MODEL is a preset of the recipe's model family
    and DATA a data preset (common/conf/), naming the ones that exist."""
    from common.models import presets_of
    from common.run import ROOT, compose

    out = []
    if model:
        fits = presets_of(compose(recipe, []))
        if model not in fits:
            raise ConfigError(f"MODEL {model!r} is not a model preset of RECIPE={recipe} (its presets: "
                              f"{', '.join(fits)}; all live in common/conf/model/)")
        out.append(f"model={model}")
    if data:
        known = sorted(p.stem for p in (ROOT / "common" / "conf" / "data").glob("*.yaml"))
        if data not in known:
            raise ConfigError(f"DATA {data!r} is not a data preset (known: {', '.join(known)}; common/conf/data/)")
        out.append(f"data={data}")
    return out


def job_overrides(recipe: str, shape: NodeLayout, model: str | None = None, data: str | None = None,
                  overrides=()) -> list[str]:
    """The overrides a job of ``shape`` runs with: the presets (checked), the user's, then the shape's
    (devices, nodes, and ``auto`` data parallel for a model-parallel recipe unless the user set a size)."""
    from common.run import compose

    chosen = [*preset_overrides(recipe, model, data), *overrides]
    own = {o.split("=")[0] for o in overrides}
    return [*chosen, *(a for a in shape.trainer_overrides(compose(recipe, chosen)) if a.split("=")[0] not in own)]


def check_shape(recipe: str, shape: NodeLayout, model: str | None = None, data: str | None = None,
                overrides=()):
    """(cfg, :class:`common.run.CheckedRun`) of ``recipe`` on ``shape``: presets, every setting,
    dp x tp = nodes x GPUs per node, tensor parallel inside a node. ``ConfigError`` otherwise."""
    from common.parallel.layout import check_tensor_parallel_within_node
    from common.run import check_run, compose

    cfg = compose(recipe, job_overrides(recipe, shape, model, data, overrides))
    checked = check_run(cfg)
    check_tensor_parallel_within_node(checked.layout.tensor_parallel_size, shape.procs_per_node)
    return cfg, checked

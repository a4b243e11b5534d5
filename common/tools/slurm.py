"""Render and submit a recipe's Slurm batch script: one torchrun per node, requeued on preemption.

Usage (what ``make slurm-render`` / ``make slurm-submit`` run)::

    python -m common.tools.slurm render salm_tp_fsdp2 --nodes 16 --gpus-per-node 8 \\
        --model canary_qwen_2p5b --data librispeech [--container pyxis --image reg/speech-recipes:0.1.0] \\
        [--sbatch "--partition=gpu --time=24:00:00"] [--max-requeues 3] [--cpu] [hydra overrides ...]
    python -m common.tools.slurm submit ...   # same arguments: writes outputs/slurm/<run name>.sbatch, runs sbatch

The layout is checked first (:func:`common.cluster.check_shape`: presets, settings, dp x tp = nodes x
GPUs per node, tensor parallel inside a node); a bad one is one ``error:`` line, nothing submitted.

What the script does, and why:

* one task per node (``srun --ntasks-per-node=1``) running ``python -m common.tools.launch --slurm``,
  which checks the config again on the node and starts torchrun with ``--nproc`` ranks; torchrun's c10d
  rendezvous on the allocation's first node (port from the job id) numbers the nodes. Not Lightning's
  Slurm environment (one task per GPU): with torchrun the ranks start exactly as under ``make run``
  and Kubernetes, and one launcher per node ends a failure in one line and keeps ``launch.log``;
* ``--container pyxis`` (``srun --container-image``) or ``apptainer`` runs the repository's image with
  ``outputs/`` and ``data/`` mounted at ``/workspace``; ``none`` runs this checkout's venv;
* the run directory is ``outputs/<recipe>/<run name>``, fixed when rendered: a requeued job (same
  job id, ``SLURM_RESTART_COUNT`` + 1) resumes from its newest complete checkpoint;
* preemption: ``--signal=B:USR1@<checkpoint.preemption_grace_s + 60>`` warns the batch shell, which
  sends SIGTERM to the tasks (the ranks checkpoint at the next log step and exit 0), then requeues
  the job; Slurm's own preemption (SIGTERM to everything) checkpoints the same way. A failed launch
  (a node lost, a collective timeout) is requeued too; a refused one (exit 2: a bad setting) is not.
  Requeues are bounded (``--max-requeues``): past the bound the job ends failed, saying so.
* ranks get ``common.cluster.RANK_ENV`` (NCCL async error handling, flight-recorder dump on timeout).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time

from common import cluster
from common.errors import ConfigError
from common.run import ROOT, new_run_name

CONTAINERS = ("none", "pyxis", "apptainer")
RDZV_PORT_BASE = 29500  # + job id % 10000: two jobs sharing a first node do not collide


def render(recipe: str, nodes: int, gpus_per_node: int, model: str | None = None, data: str | None = None,
           overrides=(), container: str = "none", image: str | None = None, sbatch: str = "",
           max_requeues: int = 3, cpu: bool = False, run_name: str | None = None,
           python: str | None = None) -> str:
    """The batch script's text, after checking the layout (``ConfigError`` naming what is wrong)."""
    _check_options(container, image, max_requeues)
    shape = cluster.requested(nodes, gpus_per_node)
    cfg, checked = cluster.check_shape(recipe, shape, model, data, list(overrides))
    run_name = run_name or os.environ.get("RUN_NAME") or new_run_name()
    lead_s = int(float(cfg.checkpoint.preemption_grace_s)) + 60  # reach a log step, then save
    # The job's overrides as checked; devices and nodes come from the allocation (the launcher adds them).
    chosen = [o for o in cluster.job_overrides(recipe, shape, model, data, list(overrides))
              if not o.startswith(("trainer.devices=", "trainer.num_nodes="))]
    launch = ["-m", "common.tools.launch", recipe, "--slurm", "--nproc", str(gpus_per_node), *chosen]
    outputs = ROOT / "outputs"
    step, command = _step_command(container, image, cpu, python, launch)
    header = [f"--job-name={run_name}", f"--nodes={nodes}", "--ntasks-per-node=1",
              *([] if cpu else [f"--gpus-per-node={gpus_per_node}"]),
              f"--signal=B:USR1@{lead_s}", "--requeue", "--open-mode=append",
              f"--output={outputs}/slurm/%x-%j.out", *shlex.split(sbatch)]
    return _script(recipe, nodes, gpus_per_node, cpu, checked.layout, run_name, header, container, max_requeues,
                   step, command)


def _check_options(container: str, image: str | None, max_requeues: int) -> None:
    if container not in CONTAINERS:
        raise ConfigError(f"CONTAINER {container!r} is not one of {', '.join(CONTAINERS)}")
    if container != "none" and not image:
        raise ConfigError(f"CONTAINER={container} needs IMAGE (the repository's image, e.g. "
                          "registry.example.com/speech-recipes:0.1.0; apptainer also takes a .sif file)")
    if max_requeues < 0:
        raise ConfigError(f"MAX_REQUEUES must be >= 0, got {max_requeues}")


def _step_command(container: str, image: str | None, cpu: bool, python: str | None,
                  launch: list[str]) -> tuple[list[str], list[str]]:
    """srun's container options and the command each node runs: the launcher, in the image (pyxis,
    apptainer) or in this checkout's Python."""
    outputs, data_dir = ROOT / "outputs", ROOT / "data"
    if container == "pyxis":
        return (["--container-image", image, "--container-workdir=/workspace", "--no-container-mount-home",
                 f"--container-mounts={outputs}:/workspace/outputs,{data_dir}:/workspace/data"],
                ["python", *launch])
    if container == "apptainer":
        return [], ["apptainer", "exec", *([] if cpu else ["--nv"]), "--pwd", "/workspace",
                    "--bind", f"{outputs}:/workspace/outputs,{data_dir}:/workspace/data",
                    image if image.endswith(".sif") or "://" in image else f"docker://{image}", "python", *launch]
    return [], [python or sys.executable, *launch]


def _script(recipe: str, nodes: int, gpus_per_node: int, cpu: bool, layout, run_name: str, header: list[str],
            container: str, max_requeues: int, step: list[str], command: list[str]) -> str:
    """The batch script: #SBATCH header, rendezvous, preemption traps, srun, and the requeue decision."""
    q = shlex.quote
    return f"""#!/bin/bash
# {recipe} on {nodes} node(s) x {gpus_per_node} {'CPU process(es)' if cpu else 'GPU(s)'}: data parallel {layout.data_parallel_size} x tensor parallel {layout.tensor_parallel_size}
# Rendered {time.strftime('%Y-%m-%d %H:%M:%S')} by: python -m common.tools.slurm {' '.join(map(q, sys.argv[1:])) or 'render'}
# Run directory: outputs/{recipe}/{run_name} (a requeue resumes it); this job's log: outputs/slurm/{run_name}-<job id>.out
""" + "".join(f"#SBATCH {h}\n" for h in header) + f"""
set -uo pipefail
cd {q(str(ROOT))}
export RUN_NAME={q(run_name)}{'' if container != 'none' else ' SPEECH_RECIPES_ROOT=' + q(str(ROOT))}
MAX_REQUEUES={max_requeues}
restarts=${{SLURM_RESTART_COUNT:-0}}
echo "=== $(date '+%F %T') job $SLURM_JOB_ID attempt $((restarts + 1)) on $SLURM_JOB_NODELIST"

# The rendezvous: the allocation's first node (its address as slurmctld knows it) and a port from the job id.
head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
addr=$(scontrol show node "$head" -o | sed -n 's/.* NodeAddr=\\([^ ]*\\).*/\\1/p')
export RDZV_ENDPOINT="${{addr:-$head}}:$(( {RDZV_PORT_BASE} + SLURM_JOB_ID % 10000 ))"

# Preemption: USR1 (--signal) or SIGTERM. The tasks get SIGTERM: every rank checkpoints at its next log
# step and exits 0. The job is requeued once the step has ended.
warned=""
warn() {{ warned=$1; echo "=== $(date '+%F %T') $1: checkpoint, then requeue"; scancel --signal=TERM "$SLURM_JOB_ID"; }}
trap 'warn USR1' USR1
trap 'warned=TERM' TERM

srun --ntasks-per-node=1 --kill-on-bad-exit=0 {' '.join(map(q, step))} \\
  {' '.join(map(q, command))} &
step=$!
rc=0
while kill -0 "$step" 2>/dev/null; do wait "$step"; rc=$?; done   # a trapped signal interrupts wait

requeue() {{
  if (( restarts >= MAX_REQUEUES )); then
    echo "error: $1; not requeued: the job was requeued $restarts time(s) already (MAX_REQUEUES=$MAX_REQUEUES)" >&2
    exit 1
  fi
  echo "=== $(date '+%F %T') $1: requeued (requeue $((restarts + 1)) of $MAX_REQUEUES)"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
}}
if [[ -n "$warned" ]]; then requeue "preempted ($warned)"; fi
if (( rc == 0 )); then echo "=== $(date '+%F %T') done"; exit 0; fi
if (( rc == 2 )); then echo "error: the launch was refused (the error line above); not requeued" >&2; exit 2; fi
requeue "the launch failed with status $rc (a lost node or a failed rank; outputs/{recipe}/{run_name}/launch-node*.log)"
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m common.tools.slurm", description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=("render", "submit"))
    ap.add_argument("recipe")
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--gpus-per-node", type=int, default=8, help="ranks per node (GPUs; CPU processes with --cpu)")
    ap.add_argument("--model", default=None, help="model preset (common/conf/model/)")
    ap.add_argument("--data", default=None, help="data preset (common/conf/data/)")
    ap.add_argument("--container", default="none", choices=CONTAINERS)
    ap.add_argument("--image", default=None)
    ap.add_argument("--sbatch", default="", help="more #SBATCH options, e.g. '--partition=gpu --time=24:00:00'")
    ap.add_argument("--max-requeues", type=int, default=3)
    ap.add_argument("--cpu", action="store_true", help="nodes without GPUs: request none, ranks use gloo")
    args, overrides = ap.parse_known_args(argv)
    run_name = os.environ.get("RUN_NAME") or new_run_name()  # make sets it; the run directory's name
    try:
        script = render(args.recipe, args.nodes, args.gpus_per_node, args.model, args.data, overrides,
                        args.container, args.image, args.sbatch, args.max_requeues, args.cpu, run_name=run_name)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.action == "render":
        sys.stdout.write(script)
        return 0
    # The same RUN_NAME again continues that run (it resumes); each submission's script is kept.
    path = ROOT / "outputs" / "slurm" / f"{run_name}.sbatch"
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 1
    while path.exists():
        n += 1
        path = path.with_name(f"{run_name}.{n}.sbatch")
    path.write_text(script)
    proc = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True)
    if proc.returncode:
        print(f"error: sbatch refused {path}: {proc.stderr.strip()}", file=sys.stderr)
        return 1
    job = proc.stdout.strip().split(";")[0]
    print(f"submitted job {job}: {path}\n  log: outputs/slurm/{run_name}-{job}.out; run directory: "
          f"outputs/{args.recipe}/{run_name}; states: sacct -j {job} --duplicates")
    return 0


if __name__ == "__main__":
    sys.exit(main())

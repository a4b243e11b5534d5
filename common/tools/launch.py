"""Launch a recipe on this machine: checked before any rank starts, and ended in one line.

Usage (what ``make run`` and the image's ``docker run`` do; the Kubernetes pods add ``--cluster``)::

    python -m common.tools.launch asr_ddp --nproc 2 trainer.max_steps=20 run.name=try1   # Hydra overrides
    python -m common.tools.launch asr_ddp --cluster model=fastconformer_ctc_large ...   # one node of a job

``--cluster``: one node of a multi-node job. torchrun takes the node count, processes per node and
rendezvous from the ``PET_*`` variables the Kubeflow operator (or Trainer v2) sets, as it would
without this launcher; the checks use the same numbers.

``--slurm``: one task per node of a Slurm job (the batch script of ``make slurm-render``): nodes
from ``SLURM_JOB_NUM_NODES``, ``--nproc`` ranks on this node, c10d rendezvous at ``RDZV_ENDPOINT``.

The job's shape and every rank's environment (NCCL error handling, flight-recorder dumps in
``<run dir>/nccl_trace/``) come from :mod:`common.cluster`, as for the renderers and the dry run.

1. The recipe's config is composed with the overrides and checked (settings, layout, batch sizes,
   that the data sources exist, that a relaunch matches the run's checkpoints) before torchrun
   starts: a mistake is one ``error:`` line and exit status 2, with no rank spawned.
2. torchrun starts the ranks (``--standalone``, ``--nproc`` processes). Their output reaches the
   terminal as before, except tracebacks and torchrun's failure report: those go, whole, to
   ``<run dir>/launch.log`` (each launch appended).
3. A failed launch ends with the ranks' ``error:`` line once (or the exception that ended them),
   then one line saying where the run's record and the full log are. The exit status is torchrun's.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import cluster
from common.checkpoint import check_relaunch
from common.errors import ConfigError
from common.run import ROOT, check_run, compose, new_run_name, prepare_data
from common.rundir import ATTEMPTS_FILE, SUMMARY_FILE, check_restart_budget, read_summary

# torch.distributed.elastic's own log lines (glog format: I/W/E + MMDD), and torchrun's report.
_LAUNCHER_LINE = re.compile(r"^[IWE]\d{4} \d\d:\d\d:\d\d")
_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*(Error|Exception|Interrupt|Failure)): ?(.*)$")
_ERROR_LINE = re.compile(r"^error(?: \(rank \d+\))?: (.*)$")
_CHAINED = ("The above exception was the direct cause", "During handling of the above exception",
            # Hydra's own lines around a rank's traceback
            "Error executing job with overrides:", "Set the environment variable HYDRA_FULL_ERROR=1")


class TerminalFilter:
    """Which stderr lines of a launch reach the terminal: everything but tracebacks, torchrun's
    log lines and its failure report; each distinct ``error:`` message once.

    >>> f = TerminalFilter()
    >>> [f.feed(x) for x in ["error (rank 1): bad", "error: bad", "Traceback (most recent call last):",
    ...                       '  File "x.py", line 1', "ValueError: boom", "warning: kept"]]
    ['error: bad', None, None, None, None, 'warning: kept']
    >>> f.exceptions
    ['ValueError: boom']
    """

    def __init__(self):
        self.in_traceback = False
        self.report = False  # torchrun's ChildFailedError report: the rest is the launcher's
        self.errors: list[str] = []
        self.exceptions: list[str] = []

    def feed(self, line: str) -> str | None:
        text = line.rstrip("\n")
        error = _ERROR_LINE.match(text)
        if error:
            self.in_traceback = False
            if error.group(1) in self.errors:
                return None
            self.errors.append(error.group(1))
            return f"error: {error.group(1)}"
        if self.report or _LAUNCHER_LINE.match(text):
            return None
        if text.startswith("Traceback (most recent call last):"):
            self.in_traceback = True
            return None
        if self.in_traceback:
            if text and not text[0].isspace():  # the exception line ends the traceback
                self.in_traceback = False
                if "ChildFailedError" in text:
                    self.report = True
                else:
                    self.exceptions.append(text)
            return None
        if text.startswith(_CHAINED):
            return None
        return text


def run_directory(cfg) -> Path:
    return Path(cfg.run.output_dir).resolve()


def check(recipe: str, shape: cluster.NodeLayout, overrides: list[str]):
    """The composed, checked config of this launch (ConfigError: one line, nothing started)."""
    if shape.scheduler == "slurm":  # the shape is the allocation's: checked as make slurm-render checked it
        cfg, _ = cluster.check_shape(recipe, shape, overrides=overrides)
    else:
        # make run: NPROC processes (ARGS may still name trainer.devices: check_launch compares);
        # Kubernetes: the manifest's overrides read the group's size from torchrun's variables.
        cfg = compose(recipe, [f"trainer.devices={shape.procs_per_node}", *overrides] if shape.scheduler == "local"
                      else overrides)
        layout = check_run(cfg).layout
        if layout.num_nodes != 1 and shape.scheduler == "local":
            raise ConfigError(f"trainer.num_nodes is {layout.num_nodes}: this launcher starts one node (make run); "
                              "on several nodes use Kubernetes (make k8s-render) or Slurm (make slurm-submit)")
        if shape.scheduler == "kubernetes":
            from common.parallel.layout import check_tensor_parallel_within_node

            check_tensor_parallel_within_node(layout.tensor_parallel_size, layout.devices)
    # The sources exist and are readable (metadata only); a generated corpus is made here, once, with
    # this machine's cores and a progress line, before any rank waits for it.
    prepare_data(cfg)
    check_relaunch(cfg, run_directory(cfg))
    check_restart_budget(run_directory(cfg), cfg.run.max_failures_at_step, count_unrecorded=True)
    return cfg


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m common.tools.launch", description=__doc__.splitlines()[0])
    ap.add_argument("recipe")
    ap.add_argument("--nproc", default="1", help="processes on this machine (one per GPU on GPU machines)")
    where = ap.add_mutually_exclusive_group()
    where.add_argument("--cluster", action="store_true", help="one node of a multi-node job: node count, processes "
                       "per node and rendezvous from the PET_* variables (Kubeflow operator, Trainer v2)")
    where.add_argument("--slurm", action="store_true", help="one task per node of a Slurm job (make slurm-render's "
                       "script): nodes from SLURM_JOB_NUM_NODES, rendezvous at RDZV_ENDPOINT")
    args, overrides = ap.parse_known_args(argv)  # the rest: Hydra overrides, as make run's ARGS
    os.environ.setdefault("RUN_NAME", new_run_name())  # one name: known here and in every rank
    try:
        if args.cluster:
            shape = cluster.kubernetes()
        else:
            if not re.fullmatch(r"[1-9]\d*", args.nproc):
                raise ConfigError(f"NPROC must be a positive integer (processes per node), got {args.nproc!r}")
            shape = cluster.slurm(int(args.nproc)) if args.slurm else cluster.local(int(args.nproc))
        with _group_size_for_checks(shape):
            cfg = check(args.recipe, shape, overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    run_dir = run_directory(cfg)
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    shape_args = {"local": shape.trainer_overrides()[:1], "slurm": shape.trainer_overrides()}.get(shape.scheduler, [])
    cmd = [torchrun if Path(torchrun).exists() else "torchrun", *shape.torchrun_args, "-m", "common.train",
           f"--config-path={ROOT / 'recipes' / args.recipe}", "--config-name=config",
           *(shape_args if shape.scheduler == "local" else []), *overrides,
           *(shape_args if shape.scheduler != "local" else [])]
    env = shape.rank_env(run_dir)
    log = tempfile.NamedTemporaryFile("w", prefix=".launch-", suffix=".log", delete=False,
                                      dir=_writable_parent(run_dir))
    chosen = " ".join(f"{k}={env[k]}" for k in (*cluster.RANK_ENV, "TORCH_FR_DUMP_TEMP_FILE"))
    log.write(f"=== launch {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(cmd)}\n=== rank environment: {chosen}\n")
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env, cwd=os.getcwd())
    # Ctrl-C reaches the ranks directly (same process group) and they checkpoint; this process keeps
    # reading their output to the end. A SIGTERM (docker stop, Slurm's preemption) is passed on to torchrun.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    forwarded: list[int] = []
    signal.signal(signal.SIGTERM, lambda *_: (forwarded.append(1), proc.send_signal(signal.SIGTERM)))
    terminal = TerminalFilter()
    reader = threading.Thread(target=_pump, args=(proc.stderr, log, terminal), daemon=True)
    reader.start()
    rc = proc.wait()
    reader.join()
    log.close()
    node = shape.node_rank if shape.scheduler != "local" else None
    where = _keep_log(Path(log.name), run_dir, "launch.log" if node is None else f"launch-node{node}.log")
    return closing_lines(rc, bool(forwarded), terminal, run_dir, where)


def closing_lines(rc: int, forwarded_sigterm: bool, terminal: TerminalFilter, run_dir: Path, where: Path) -> int:
    """What the launcher says last, after torchrun returned ``rc``; returns the exit status."""
    record = run_dir / SUMMARY_FILE
    summary = read_summary(run_dir) if rc != 0 else {}
    if summary.get("status") == "preempted" and forwarded_sigterm:
        # torchrun exits non-zero on the SIGTERM it was sent, after every rank checkpointed and left: a
        # preemption as asked for, said as one, not as an error. The status stays non-zero, so that a
        # pod's OnFailure policy restarts it and the restart resumes (README: "Preemption and Ctrl-C").
        print(f"preempted: {summary['error']} (exit status {rc}: a restart policy "
              "resumes it)", file=sys.stderr, flush=True)
        return rc
    if rc == 0:
        return rc
    if summary.get("status") == "running":
        # No rank wrote the end: they were killed without warning (SIGKILL: the OOM killer, a lost node).
        # The running summary says how far the run got; the next attempt records this one as killed.
        print(f"killed: the ranks stopped without recording their end (SIGKILL: the OOM killer, a lost node?) "
              f"after step {summary.get('steps')}; newest complete checkpoint: {summary.get('checkpoint') or 'none'}; "
              f"the same command resumes from it (exit status {rc})", file=sys.stderr)
    elif not terminal.errors:
        cause = next((e for e in terminal.exceptions if "SIGTERM" not in e), None) or (
            f"the ranks exited with status {rc}")
        print(f"error: {cause}", file=sys.stderr)
    if record.exists():
        said = f"the run's record: {record} (attempts.jsonl beside it)"
    elif (run_dir / ATTEMPTS_FILE).exists():
        said = f"the run started ({run_dir / ATTEMPTS_FILE}) but ended before its first step was recorded"
    else:
        said = "no record was written (the launch ended before the run started)"
    print(f"  {said}; full log: {where}", file=sys.stderr, flush=True)
    return rc


@contextlib.contextmanager
def _group_size_for_checks(shape: cluster.NodeLayout):
    """A Kubernetes job's overrides read the group's size from torchrun's variables
    (``trainer.devices='${oc.decode:${oc.env:LOCAL_WORLD_SIZE}}'``); for the checks they are what the
    operator asked for (an elastic range: its largest size). Not passed on: torchrun sets its own."""
    if shape.scheduler != "kubernetes":
        yield
        return
    saved = {k: os.environ.get(k) for k in ("LOCAL_WORLD_SIZE", "GROUP_WORLD_SIZE")}
    os.environ.update(LOCAL_WORLD_SIZE=str(shape.procs_per_node), GROUP_WORLD_SIZE=str(shape.nodes))
    try:
        yield
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


def _pump(stream, log, terminal: TerminalFilter) -> None:
    for line in stream:
        log.write(line)
        log.flush()
        shown = terminal.feed(line)
        if shown is not None:
            print(shown, file=sys.stderr, flush=True)


def _writable_parent(run_dir: Path) -> str:
    for candidate in (run_dir.parent, Path(tempfile.gettempdir())):
        try:
            candidate.mkdir(parents=True, exist_ok=True)
            if os.access(candidate, os.W_OK):
                return str(candidate)
        except OSError:
            continue
    return tempfile.gettempdir()


def _keep_log(tmp: Path, run_dir: Path, name: str = "launch.log") -> Path:
    """The launch's stderr appended to ``<run dir>/launch.log`` (one per node of a cluster job) if the
    run directory exists, else kept beside it as ``<run name>.launch.log``."""
    target = run_dir / name if run_dir.is_dir() else run_dir.with_name(f"{run_dir.name}.{name}")
    try:
        with open(target, "a") as out, open(tmp) as src:
            out.write(src.read())
        tmp.unlink()
        return target
    except OSError:
        return tmp


if __name__ == "__main__":
    sys.exit(main())

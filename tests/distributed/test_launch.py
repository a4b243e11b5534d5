"""`make run`'s launcher (common.tools.launch): a mistake is one line before any rank starts; a failure
in the ranks is one line and where the log is; a relaunch with another model changes nothing;
`latest` only names runs with something to load."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from common.tools.launch import TerminalFilter
from tests.conftest import ROOT, run_recipe

TINY = ["trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0", "logger.wandb=false",
        "data.generated.num_train=120", "data.generated.num_val=16"]


def launch(recipe: str, nproc, *overrides: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RUN_NAME", None)
    return subprocess.run([sys.executable, "-m", "common.tools.launch", recipe, "--nproc", str(nproc), *overrides],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error")]


MISTAKES = {
    "unknown key": (["trainer.nope=1"], "bad override 'trainer.nope=1': Could not override 'trainer.nope'.; To append"),
    "override that does not parse": (["trainer.max_steps=["], "bad override 'trainer.max_steps=['"),
    "max_steps 0": (["trainer.max_steps=0"], "trainer.max_steps must be an integer >= 1, got 0"),
    "missing data": (["data.train=/nonexistent/train.jsonl.gz", "data.val=/nonexistent/val.jsonl.gz"],
                     "data.train[0]: no such file or directory: /nonexistent/train.jsonl.gz"),
    "layout": (["trainer.strategy.data_parallel_size=3"],
               "data_parallel_size (3) x tensor_parallel_size (2) = 6 != world size 2"),
}


@pytest.mark.parametrize("case", MISTAKES)
def test_a_mistake_is_one_line_before_any_rank_starts(case, tiny_corpus, tmp_path):
    overrides, message = MISTAKES[case]
    recipe = "salm_tp_fsdp2" if case == "layout" else "asr_ddp"
    proc = launch(recipe, 2, *overrides, f"run.output_dir={tmp_path / 'run'}", f"data.dir={tiny_corpus['dir']}", *TINY,
                  timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == error_lines(proc.stderr) and len(error_lines(proc.stderr)) == 1, proc.stderr
    assert message in proc.stderr, proc.stderr
    assert "torchrun" not in proc.stdout + proc.stderr and not (tmp_path / "run").exists()  # nothing started


def test_make_run_goes_through_the_launcher(tmp_path):
    proc = subprocess.run(["make", "run", "RECIPE=asr_ddp", "NPROC=two"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and "error: NPROC must be a positive integer" in proc.stderr
    proc = subprocess.run(["make", "run", "RECIPE=asr_ddp", "NPROC=1", "ARGS=trainer.nope=1"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and error_lines(proc.stderr) == [
        "error: bad override 'trainer.nope=1': Could not override 'trainer.nope'.; To append to your config use "
        "+trainer.nope=1"], proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_relaunch_with_another_model_changes_nothing_and_latest_names_runs_with_checkpoints(tiny_corpus, tmp_path):
    """A finished run; relaunched with another model (through the launcher, and through torchrun
    directly) it is refused, naming the override that restores the checkpoint's model, with
    config.yaml, summary.json and attempts.jsonl byte for byte unchanged. A later launch that fails in
    its ranks (a batch budget no utterance fits, found before validation) prints one error line and
    where its log is, no traceback, and `latest` keeps naming the run that has a checkpoint."""
    data = [f"data.dir={tiny_corpus['dir']}", *TINY]
    run = tmp_path / "runs" / "a"
    first = launch("asr_ddp", 1, "trainer.max_steps=2", "checkpoint.every_n_steps=2", f"run.output_dir={run}", *data)
    assert first.returncode == 0, first.stderr[-3000:]
    latest = tmp_path / "runs" / "latest"
    assert latest.is_symlink() and os.readlink(latest) == "a"
    record = {name: (run / name).read_bytes() for name in ("config.yaml", "summary.json", "attempts.jsonl")}

    other = launch("asr_ddp", 1, "trainer.max_steps=4", "model.encoder.hidden_size=64", f"run.output_dir={run}", *data)
    assert other.returncode == 2 and len(error_lines(other.stderr)) == 1, other.stderr
    assert f"run directory {run} holds checkpoints of another model" in other.stderr
    assert "model.encoder.hidden_size=96" in other.stderr and "Nothing was changed" in other.stderr
    direct = run_recipe("asr_ddp", 1, ["trainer.devices=1", "trainer.max_steps=4", "model.encoder.hidden_size=64",
                                       *data], run)
    assert direct.returncode != 0 and "model.encoder.hidden_size=96" in direct.stderr, direct.stderr[-3000:]
    assert {name: (run / name).read_bytes() for name in record} == record

    failed = tmp_path / "runs" / "b"
    proc = launch("asr_ddp", 2, "data.max_duration_s=0.1", f"run.output_dir={failed}", *data)
    assert proc.returncode != 0
    (line,) = error_lines(proc.stderr)
    assert line.startswith("error: data.max_duration_s is 0.1 s (the longest utterance a batch may hold), but the "
                           "shortest of the first 120 training utterances lasts 0.3") and line.endswith(
        "s: no utterance fits; raise data.max_duration_s (on GPU presets: data.max_duration_s_per_gpu)"), line
    for noise in ("Traceback", "ChildFailedError", "exitcode", "SIGTERM", 'File "'):
        assert noise not in proc.stderr, noise
    where = proc.stderr.strip().splitlines()[-1]
    assert where == f"  the run's record: {failed / 'summary.json'} (attempts.jsonl beside it); full log: " \
                    f"{failed / 'launch.log'}"
    assert "ChildFailedError" in (failed / "launch.log").read_text()  # the whole story is kept
    assert not (failed / "validation.jsonl").exists()  # stopped before validating
    assert os.readlink(latest) == "a"


def test_the_terminal_gets_one_line_per_failure_and_the_log_gets_everything():
    """What torchrun's stderr looks like when a rank raises something other than our errors (two
    ranks' tracebacks, the other rank killed, torchrun's report): one error line, the exception's."""
    lines = [
        "W1204 22:21:13.000000 123 torch/distributed/elastic/multiprocessing/api.py:908] Sending process 2 closing "
        "signal SIGTERM",
        "[rank0]: Traceback (most recent call last):".removeprefix("[rank0]: "),
        '  File "/work/common/models/asr_ctc.py", line 40, in __init__',
        "    raise ValueError('hidden_size 95 is not divisible by 4 heads')",
        "ValueError: hidden_size 95 is not divisible by 4 heads",
        "The above exception was the direct cause of the following exception:",
        "Traceback (most recent call last):",
        '  File "/venv/bin/torchrun", line 8, in <module>',
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: ",
        "============================================================",
        "common.train FAILED",
        "  exitcode  : -15 (pid: 2)",
        "  traceback : Signal 15 (SIGTERM) received by PID 2",
        "/venv/lib/lightning/fabric.py:12: UserWarning: a warning the user should still see",
    ]
    hydra = ["Error executing job with overrides: ['trainer.devices=1']",
             "Set the environment variable HYDRA_FULL_ERROR=1 for a complete stack trace."]
    assert [TerminalFilter().feed(x) for x in hydra] == [None, None]
    f = TerminalFilter()
    shown = [s for s in (f.feed(x + "\n") for x in lines) if s is not None]
    assert shown == [] and f.exceptions == ["ValueError: hidden_size 95 is not divisible by 4 heads"]
    f = TerminalFilter()
    shown = [s for s in (f.feed(x + "\n") for x in [lines[-1], "error (rank 1): bad data", "error: bad data"])
             if s is not None]
    assert shown == [lines[-1], "error: bad data"]


def _root_or_skip() -> list[str]:
    """The prefix that mounts a small file system: none as root, password-less sudo otherwise."""
    from tests.ci_guard import in_ci

    root = [] if os.geteuid() == 0 else ["sudo", "-n"]  # CI runs as root or with password-less sudo
    if root and subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode != 0:
        if in_ci():
            pytest.fail("CI must run as root or with password-less sudo: the test mounts a small tmpfs")
        pytest.skip("mounting a small tmpfs needs root or password-less sudo")
    return root


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_a_full_disk_ends_recorded_with_the_newest_complete_checkpoint_last(async_save, tiny_corpus, tmp_path):
    """The run directory on a 12 MB file system that fills up while checkpoints are written (in the
    step loop, or by the background writer, whose error the loop raises at its next step): the
    run ends `failed` with the one-line error in summary.json, an end row in attempts.jsonl, no
    half-written file left (.tmp, partial checkpoint), `last.ckpt` a complete checkpoint, and the
    terminal shows one error line. A read-only (unwritable) output directory is one line too."""
    import json

    from common.checkpoint import PARTIAL_PREFIX, checkpoint_problem
    from common.rundir import read_attempts

    root = _root_or_skip()
    unwritable = launch("asr_ddp", 1, "run.output_dir=/sys/speech-recipes-test/run", f"data.dir={tiny_corpus['dir']}",
                        *TINY)
    (line,) = error_lines(unwritable.stderr)
    assert unwritable.returncode != 0 and line.startswith(
        "error: run directory /sys/speech-recipes-test/run cannot be written (") and line.endswith(
        "): run.output_dir must be on a writable file system with free space; nothing was written"), unwritable.stderr
    assert "no record was written" in unwritable.stderr.splitlines()[-1]
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run([*root, "mount", "-t", "tmpfs", "-o", f"size=12m,uid={os.getuid()},gid={os.getgid()}", "tmpfs",
                    str(small)], check=True)
    try:
        run = small / "run"
        proc = launch("asr_ddp", 1, "trainer.max_steps=40", "checkpoint.every_n_steps=1", "checkpoint.keep_last=100",
                      f"checkpoint.async_save={async_save}", f"run.output_dir={run}", f"data.dir={tiny_corpus['dir']}",
                      *TINY)
        assert proc.returncode != 0
        assert len(error_lines(proc.stderr)) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert "No space left on device" in error_lines(proc.stderr)[0] and "HYDRA_FULL_ERROR" not in proc.stderr
        summary = json.loads((run / "summary.json").read_text())
        assert summary["status"] == "failed" and "\n" not in summary["error"], summary["error"]
        assert "space" in summary["error"].lower() or "write" in summary["error"].lower(), summary["error"]
        end = read_attempts(run)[-1]
        assert (end["event"], end["status"]) == ("end", "failed")
        assert not [p for p in run.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(PARTIAL_PREFIX)]
        last = run / "checkpoints" / "last.ckpt"
        assert last.is_symlink() and checkpoint_problem(last.resolve()) is None
        assert len(list((run / "checkpoints").glob("step*.ckpt"))) >= 1
    finally:
        subprocess.run([*root, "umount", "-l", str(small)], check=False)


def test_a_vanished_output_directory_is_said_in_one_line(tiny_corpus, tmp_path):
    """The file system holding the run directory goes away under a running job (unmounted): the run
    stops at its next checkpoint, and since nothing of its record can be written any more, the
    terminal says so in one line naming what could not be written and why the run ended."""
    import time

    root = _root_or_skip()
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run([*root, "mount", "-t", "tmpfs", "-o", f"size=64m,uid={os.getuid()},gid={os.getgid()}", "tmpfs",
                    str(small)], check=True)
    run = small / "run"
    env = {k: v for k, v in os.environ.items() if k != "RUN_NAME"}
    proc = subprocess.Popen([sys.executable, "-m", "common.tools.launch", "asr_ddp", "--nproc", "1",
                             "trainer.max_steps=5000", "checkpoint.every_n_steps=5", f"run.output_dir={run}",
                             f"data.dir={tiny_corpus['dir']}", *TINY], cwd=ROOT, env={**env, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (run / "checkpoints" / "last.ckpt").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert (run / "checkpoints" / "last.ckpt").exists(), "the run never saved a checkpoint"
        subprocess.run([*root, "umount", "-l", str(small)], check=True)  # the directory vanishes
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
        subprocess.run([*root, "umount", "-l", str(small)], capture_output=True)
    assert proc.returncode != 0
    (line,) = error_lines(stderr)
    assert line.startswith(f"error: the run's record could not be written in {run}: ") and "summary.json (" in line \
        and "attempts.jsonl (" in line and "the run ended failed (" in line, stderr[-3000:]
    assert "Traceback" not in stderr


def test_sigterm_to_the_launcher_checkpoints_and_is_said_as_a_preemption_not_an_error(tiny_corpus, tmp_path):
    """docker stop / a pod's eviction reach the launcher: every rank checkpoints, the record says
    preempted, and the launcher says so, not "error: SignalException"; its status stays non-zero
    (torchrun's), so that Kubernetes' OnFailure restarts the pod and the restart resumes."""
    import signal
    import time

    run = tmp_path / "runs" / "stopped"
    cmd = [sys.executable, "-m", "common.tools.launch", "asr_ddp", "--nproc", "2", "trainer.max_steps=2000",
           f"run.output_dir={run}", f"data.dir={tiny_corpus['dir']}", *TINY]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RUN_NAME": "", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics, deadline = run / "metrics.jsonl", time.monotonic() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)  # a bound only a hang reaches
    assert proc.returncode != 0, err[-3000:]
    assert "preempted: stopped by SIGTERM after step" in err and "error:" not in err, err[-3000:]
    assert list((run / "checkpoints").glob("step*.ckpt"))

"""The one training entry point of every recipe (Hydra). Reads top to bottom.

Usage (what ``make run`` does)::

    torchrun --standalone --nproc-per-node=4 -m common.train \\
        --config-path=$PWD/recipes/salm_tp_fsdp2 --config-name=config \\
        trainer.devices=4 trainer.max_steps=20 seed=3 run.name=try1

Writes ``outputs/<recipe>/<run.name>/``: config.yaml, metrics.jsonl, validation.jsonl,
summary.json, checkpoints/, tokenizer/, wandb/ (and an ``outputs/<recipe>/latest`` link).
"""

from __future__ import annotations

import faulthandler
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from common.data.guard import DataGuard
from common.errors import ConfigError
from common.parallel import build_strategy
from common.recording import RunRecorder
from common.run import Run, build_run, check_run
from common.rundir import (
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    TOKENIZER_DIR,
    WANDB_ID_FILE,
    WORD_LM_FILE,
    RunDirectory,
    check_restart_budget,
)
from common.watchdog import Watchdog

log = logging.getLogger("common.train")
RANK = int(os.environ.get("RANK", 0))
NONZERO_RANK_ERROR_DELAY_S = 5.0


def setup_logging() -> None:
    """Our progress lines from rank 0 (others: warnings only); Lightning keeps its own handler."""
    import warnings

    # FSDP2 warns that a unit returned a view; SALM only reads those outputs out of place
    # (masked_scatter, boolean indexing), which keeps the backward hooks intact.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(f"[rank{RANK}] %(asctime)s %(message)s", datefmt="%H:%M:%S"))
    common = logging.getLogger("common")
    common.handlers[:] = [handler]
    common.setLevel(logging.INFO if RANK == 0 else logging.WARNING)
    common.propagate = False
    for noisy in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.distributed"):
        logging.getLogger(noisy).setLevel(logging.INFO if RANK == 0 else logging.WARNING)


def build_trainer(cfg: DictConfig, run_dir: Path, recorder, resuming: bool, callbacks: list = ()):
    import lightning as L

    from common.checkpoint import ExactResume, FaultHooks, RunCheckpoint

    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_kwargs["strategy"] = build_strategy(cfg.trainer.strategy, cfg.run.get("collective_timeout_s"))
    if resuming:
        trainer_kwargs["num_sanity_val_steps"] = 0  # the step-0 validation is in validation.jsonl already
    checkpoint = RunCheckpoint(run_dir / CHECKPOINTS_DIR, every_n_steps=cfg.checkpoint.every_n_steps,
                               keep_last=cfg.checkpoint.keep_last,
                               preemption_grace_s=cfg.checkpoint.preemption_grace_s,
                               check_stop_every_n_steps=cfg.trainer.log_every_n_steps,
                               at_end=cfg.checkpoint.at_end is not False,
                               async_save=cfg.checkpoint.async_save,  # check_run resolved auto
                               faults=FaultHooks.from_env(os.environ))  # tests' fault injection; unset in a real run
    loggers = []
    if cfg.logger.wandb:
        from lightning.pytorch.loggers import WandbLogger

        # Offline unless the user opts in: logging must never need a network or a secret in a file.
        online = wandb_online(run_dir)
        loggers.append(WandbLogger(project=cfg.logger.project, name=cfg.run.name, save_dir=str(run_dir),
                                   offline=not online, id=wandb_run_id(run_dir), resume="allow"))
    if OmegaConf.select(cfg, "ema.decay") is not None:  # before the checkpoint callback: its saves hold the average
        from common.averaging import WeightEMA

        callbacks = [*callbacks, WeightEMA(decay=float(cfg.ema.decay))]
    trainer = L.Trainer(**trainer_kwargs, callbacks=[recorder, ExactResume(), *callbacks, checkpoint],
                        logger=loggers or False)
    return trainer, checkpoint


WANDB_REACH_TIMEOUT_S = 10.0  # per try of the connection and the answer: at most 20 s before logging offline


def wandb_online(run_dir: Path) -> bool:
    """Online logging only when asked for (``WANDB_API_KEY`` and ``WANDB_MODE=online``) and the wandb
    server answers within the bound; otherwise the run logs offline, saying so once, and goes on:
    logging never blocks or fails a training run. Offline files sync later (``wandb sync``)."""
    if not (os.environ.get("WANDB_API_KEY") and os.environ.get("WANDB_MODE") == "online"):
        return False
    if RANK != 0:
        return True  # only rank 0 logs
    import requests

    url = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    try:
        requests.head(url, timeout=(WANDB_REACH_TIMEOUT_S, WANDB_REACH_TIMEOUT_S))
        return True
    except requests.RequestException as exc:
        os.environ["WANDB_MODE"] = "offline"
        log.warning("warning: wandb server %s cannot be reached (%s): logging offline to %s/wandb instead; sync later "
                    "with: wandb sync %s/wandb/offline-run-*", url, type(exc).__name__, run_dir, run_dir)
        return False


def wandb_run_id(run_dir: Path) -> str | None:
    """The run's wandb id, kept in ``<run_dir>/wandb_run_id`` so that a resumed run continues the
    same wandb run. Rank 0 only (other ranks log nothing)."""
    if RANK != 0:
        return None
    path = run_dir / WANDB_ID_FILE
    if path.exists():
        return path.read_text().strip()
    import uuid

    run_id = uuid.uuid4().hex[:12]  # wandb run ids: lowercase letters and digits
    path.write_text(run_id + "\n")
    return run_id


def link_latest(run_dir: Path) -> None:
    from common.rundir import replace_link

    replace_link(run_dir.parent / "latest", run_dir.name)


@hydra.main(version_base="1.3", config_path=None, config_name=None)
def main(cfg: DictConfig) -> None:
    from common.data.checks import BadItemError

    try:
        train(cfg)
        leave_process_group()
    except (ConfigError, BadItemError) as exc:
        if isinstance(exc, BadItemError):  # re-raised from a DataLoader worker: keep its own message
            exc = next((line.split("BadItemError: ", 1)[1] for line in str(exc).splitlines()
                        if "BadItemError: " in line), str(exc))
        # A clear one-line message instead of a traceback per rank; SystemExit passes through Hydra.
        # torchrun kills every rank as soon as one exits, so the other ranks give rank 0 (which sees
        # the same error) a moment to print first, and print themselves if still alive (an error
        # only some ranks see, e.g. a manifest missing on one node).
        if RANK != 0:
            time.sleep(NONZERO_RANK_ERROR_DELAY_S)
        print(f"error: {exc}" if RANK == 0 else f"error (rank {RANK}): {exc}", file=sys.stderr, flush=True)
        sys.exit(2)


def warn_if_restarts_reuse_the_store() -> None:
    """torchrun's in-place restarts (``--max-restarts``) need a fresh rendezvous store per attempt.

    By default torchrun's agent hands every restarted group the store of the first one, without a
    per-attempt key prefix, so the new gloo/NCCL group reads the peer addresses of the killed
    generation ("Connection refused") and the next attempt hangs in ``init_process_group``.
    ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` in torchrun's environment gives each attempt its own
    store; ``make run``, the image and the tests set it.
    """
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0)
    if RANK == 0 and restarts > 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        log.warning("torchrun --max-restarts=%d with its shared rendezvous store: a restarted group would "
                    "reach the peers of the failed one and hang; set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 "
                    "in torchrun's environment (make run and the image do)", restarts)


def release_process_group() -> None:
    """Every rank's last collective: wait for all, then tear the process group down. Called before
    rank 0 works alone for minutes (a large model's test sets): the other ranks leave instead of
    waiting in a barrier that ``run.collective_timeout_s`` would end in an error."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # nobody tears its connections down while a peer may still be talking
        dist.destroy_process_group()


def leave_process_group() -> None:
    """End a finished distributed run: wait for every rank, tear the process group down, and exit
    without running the interpreter's and C++ static destructors.

    Finished ranks were seen aborting in that teardown (SIGABRT, "terminate called without an
    active exception", about one run in a hundred, even after an explicit destroy_process_group):
    gloo's worker threads and the tensors they hold are destroyed while the interpreter is going
    away (pytorch/pytorch#179291). A run whose results are all written must not turn into a failed
    job for that, so the process leaves with ``os._exit`` once its outputs are flushed.
    """
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return  # one process, no process group: a normal interpreter exit
    release_process_group()  # (a completed run released it before scoring its test sets)
    if "wandb" in sys.modules and sys.modules["wandb"].run is not None:
        sys.modules["wandb"].finish()  # os._exit skips wandb's own atexit hook
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@dataclass
class Launch:
    """One launch of a run, built and checked (:func:`prepare_launch`): nothing in the run directory
    has changed yet but unusable checkpoints moved aside."""

    run: Run                    # config, layout, data sources, tokenizer, model, spec
    module: object              # the TrainingModule (common.module)
    datamodule: object          # the SpeechDataModule (common.data.datamodule)
    ckpt_path: str | None       # the checkpoint this launch resumes from (None: a fresh start)
    resume_step: int | None     # its step


@dataclass
class Outcome:
    """How an attempt ended, and what it measured after training (rank 0's test sets)."""

    status: str = "failed"
    error: str | None = None
    extra_val: dict = field(default_factory=dict)    # TTS: CER of synthesized speech
    test_scores: dict = field(default_factory=dict)  # recognizers: {set: {wer, cer, ...}}
    data_report: dict = field(default_factory=dict)  # skipped items, substituted batches


def train(cfg: DictConfig) -> None:
    faulthandler.enable()  # a rank that dies of a signal (SIGSEGV, SIGABRT) prints every thread's stack
    setup_logging()
    t0 = time.perf_counter()
    run_dir = Path(cfg.run.output_dir).resolve()
    # 1. Settings, layout and the restart budget, before anything expensive (every rank raises alike).
    checked = check_run(cfg)
    warn_if_restarts_reuse_the_store()
    check_restart_budget(run_dir, cfg.run.max_failures_at_step)
    # 2. One writer per run directory: a second launch on it stops here, naming the holder.
    rundir = RunDirectory(run_dir)
    if RANK == 0:
        rundir.lock()
    try:
        launch = prepare_launch(cfg, checked.layout, run_dir)
    except BaseException:
        rundir.release_if_unused()  # a launch that failed its checks leaves no empty run directory
        raise
    # 3. The record: the previous launch's goes to history/ first; config and tokenizer next, so that
    #    a failed run still explains itself.
    if RANK == 0:
        begin_record(rundir, cfg, launch)
    recorder = RunRecorder(run_dir, print_every_n_steps=cfg.run.print_every_n_steps,
                           log_every_n_steps=cfg.trainer.log_every_n_steps, earlier_rows=rundir.earlier_rows)
    guard = DataGuard(launch.datamodule, max_bad_item_fraction=cfg.data.max_bad_item_fraction)
    watchdog = Watchdog(run_dir, RANK, checked.layout.world_size, cfg.run.stall_timeout_s, cfg.run.collective_timeout_s)
    trainer, checkpoint = build_trainer(cfg, run_dir, recorder, resuming=launch.ckpt_path is not None,
                                        callbacks=[guard, watchdog])
    if RANK == 0:  # summary.json says "running" from the first step on, and names each new checkpoint
        recorder.on_progress, watchdog.on_stall = records_while_training(cfg, checked, recorder, checkpoint, launch,
                                                                         guard, rundir, t0)
        checkpoint.on_published = lambda: (link_latest(run_dir), recorder.on_progress())
    # 4. Train and score; the record is written whether it completes or fails.
    outcome = Outcome(data_report={"items": launch.datamodule.bad_items,
                                   "substituted_batches": launch.datamodule.substituted_batches})
    try:
        fit_and_score(cfg, launch, trainer, checkpoint, run_dir, outcome)
    finally:
        if RANK == 0:
            summary = summarize(cfg, checked, recorder, outcome, checkpoint, launch, guard, rundir,
                                wall_s=time.perf_counter() - t0)
            end_record(rundir, run_dir, summary, outcome, launch.run.spec)


def prepare_launch(cfg: DictConfig, layout, run_dir: Path) -> Launch:
    """Data sources, tokenizer, model, training module, data module and the checkpoint to resume,
    every check included; nothing in the run directory changes but moving unusable checkpoints aside."""
    from common.checkpoint import resolve_resume
    from common.module import TrainingModule

    run = build_run(cfg, layout)
    parallel = OmegaConf.to_container(cfg.parallel) if cfg.parallel else None  # ModelParallelStrategy only
    module = TrainingModule(run.model, run.tokenizer, run.spec, optim=cfg.optim, parallel=parallel,
                            run_config=OmegaConf.to_container(cfg, resolve=True))
    # The same run.name again continues from its newest readable checkpoint (common.checkpoint.resume).
    ckpt_path, resume_step = resolve_resume(cfg, run_dir, rank=RANK)
    return Launch(run, module, run.datamodule(), ckpt_path, resume_step)


def begin_record(rundir: RunDirectory, cfg: DictConfig, launch: Launch) -> None:
    """Rank 0, before training: the attempt's start row (the earlier record copied to history/ first),
    the resolved config, the tokenizer, and ``latest`` for a run with something to load."""
    rundir.begin_attempt(sys.argv[1:], resume_step=launch.resume_step if launch.ckpt_path else None)
    OmegaConf.save(cfg, rundir.path / CONFIG_FILE, resolve=True)
    launch.run.tokenizer.save(rundir.path / TOKENIZER_DIR)
    if launch.ckpt_path:  # `latest` names a run with something to load: one that saved a checkpoint or completed
        link_latest(rundir.path)


def fit_and_score(cfg: DictConfig, launch: Launch, trainer, checkpoint, run_dir: Path, outcome: Outcome) -> None:
    """Train, then (rank 0, alone) score the test sets; ``outcome`` says how it ended. A preemption
    returns (every rank saved at the same step; a relaunch resumes); any other error is recorded
    in one line, then raised."""
    from common.checkpoint import Preempted

    run = launch.run
    try:
        trainer.fit(launch.module, datamodule=launch.datamodule, ckpt_path=launch.ckpt_path, weights_only=True)
        outcome.data_report = gather_data_report(launch.datamodule)
        release_process_group()  # no collective after this: rank 0 scores alone, the others leave
        if RANK == 0:
            outcome.extra_val = evaluate_intelligibility(cfg, run.model, run.spec, run.sources)
            outcome.test_scores = evaluate_test_sets(cfg, run.spec, run.sources, checkpoint.latest_path, run_dir)
            link_latest(run_dir)
        outcome.status = "completed"
    except Preempted as exc:  # SIGTERM/SIGINT
        outcome.status, outcome.error = exc.status, str(exc)
        log.info("%s", exc)
    except BaseException as exc:  # noqa: BLE001 - recorded, then re-raised
        lines = str(exc).strip().splitlines()
        outcome.error = f"{type(exc).__name__}: {lines[0] if lines else ''}".strip()  # one line; the log has the rest
        if checkpoint.stop_signal == "SIGINT":  # a second Ctrl-C: stopped at once, last checkpoint kept
            outcome.status = "interrupted"
        raise


def end_record(rundir: RunDirectory, run_dir: Path, summary: dict, outcome: Outcome, spec) -> None:
    """Rank 0, however the attempt ended: skipped items, summary.json, the attempt's end row (each
    tried; a full disk or a vanished directory is said, with the newest checkpoint), then the
    closing lines."""
    status, error = outcome.status, outcome.error
    unwritten = rundir.end_attempt(status, summary, skipped_items=outcome.data_report["items"], error=error)
    if unwritten:
        print(f"error: the run's record could not be written in {run_dir}: {', '.join(unwritten)}; the run "
              f"ended {status}" + (f" ({error})" if error else "") + "; its newest complete checkpoint: "
              f"{summary['checkpoint'] or 'none'}", file=sys.stderr, flush=True)
    print(f"\nrun {status}: results in {run_dir}\n  summary.json, metrics.jsonl, validation.jsonl, "
          f"config.yaml, attempts.jsonl, history/, checkpoints/ -- val {summary['val']}", flush=True)
    if summary["checkpoint"]:  # only commands that accept this model's checkpoint
        if spec.transcribes:
            print(f"  transcribe: python -m common.tools.transcribe {summary['checkpoint']} <audio file>", flush=True)
        if spec.synthesizes:
            print(f"  synthesize: python -m common.tools.synthesize {summary['checkpoint']} \"<text>\" "
                  "--out speech.wav", flush=True)


def records_while_training(cfg: DictConfig, checked, recorder, checkpoint, launch: Launch, guard,
                           rundir: RunDirectory, t0: float):
    """Rank 0, while training: ``running()`` writes summary.json with status ``running`` (the steps so
    far, the newest checkpoint; the next attempt marks it ``killed`` if this one never writes its end,
    :meth:`common.rundir.RunDirectory.begin_attempt`); ``stalled(message)`` ends the attempt's record as
    ``stalled`` (the watchdog, from its thread, before the process exits). A failed write is said once."""
    failed = []

    def summary(status: str, error: str | None = None) -> dict:
        outcome = Outcome(status=status, error=error, data_report={
            "items": launch.datamodule.bad_items, "substituted_batches": launch.datamodule.substituted_batches})
        return summarize(cfg, checked, recorder, outcome, checkpoint, launch, guard, rundir,
                         wall_s=time.perf_counter() - t0)

    def running() -> None:
        try:
            rundir.write_summary(summary("running"))
        except OSError as exc:
            if not failed:
                log.warning("warning: summary.json cannot be written (%s): the run goes on", exc.strerror or exc)
            failed.append(exc)

    def stalled(message: str) -> None:
        rundir.end_attempt("stalled", summary("stalled", message), skipped_items=launch.datamodule.bad_items,
                           error=message)

    return running, stalled


def summarize(cfg: DictConfig, checked, recorder, outcome: Outcome, checkpoint, launch: Launch, guard,
              rundir: RunDirectory, wall_s: float) -> dict:
    """The whole ``summary.json``: the recorder's part (common.recording.summarize) and what this
    attempt's other parts know."""
    from common.recording import summarize as recorded_summary

    summary = recorded_summary(cfg, checked.layout, recorder, status=outcome.status, error=outcome.error,
                               wall_s=wall_s, checkpoint=checkpoint.latest_path, resumed_from=launch.ckpt_path,
                               bad_items=list(outcome.data_report["items"].values()),
                               previous=rundir.previous_summary if launch.ckpt_path else None,
                               attempt=rundir.attempt)
    summary["data"]["substituted_batches"] = outcome.data_report["substituted_batches"]
    summary["data"]["coverage"] = launch.datamodule.coverage
    summary["data"]["bad_item_share"] = guard.last_share
    summary["checkpoint_saves"] = checkpoint.saves  # this attempt's saves: step, mode, stall, write (s)
    summary["derived_settings"] = checked.derived  # what check_run resolved (config.yaml has the results)
    summary["val"].update(outcome.extra_val if outcome.status == "completed" else {})
    if outcome.test_scores:
        summary["test"] = outcome.test_scores  # {set: {wer, cer, utterances, hours, examples}}
    return summary


def gather_data_report(datamodule) -> dict:
    """Every rank's skipped items, merged by cut id (TP peers and all ranks see metadata problems
    alike), and the number of steps some rank trained on silence (summed over ranks)."""
    from common.parallel.gather import gather_objects

    gathered = gather_objects({"items": datamodule.bad_items, "substituted_batches": datamodule.substituted_batches})
    merged: dict = {}
    for report in gathered:
        for cut_id, item in report["items"].items():
            # Metadata problems are found by every rank alike: count those once, not once per rank.
            merged.setdefault(cut_id, item)
    return {"items": merged, "substituted_batches": sum(r["substituted_batches"] for r in gathered)}


def evaluate_test_sets(cfg: DictConfig, spec, sources: dict, checkpoint_path, run_dir: Path) -> dict:
    """Recognizers: WER and CER on every ``data.test`` set, from the run's final checkpoint (whatever
    the layout that wrote it: rank 0 rebuilds the whole model, as ``make transcribe`` does). CTC
    models with ``eval.word_lm`` are also decoded with a word LM of the training text (``wer_lm``;
    the LM is kept as ``<run>/word_lm.json``)."""
    if not spec.transcribes or not sources.get("test"):
        return {}
    if checkpoint_path is None:
        log.warning("warning: data.test is not scored: the run saved no final checkpoint (checkpoint.at_end=false)")
        return {}
    from common.evaluation import recognition_scores
    from common.inference import load_model

    lm = None
    if OmegaConf.select(cfg, "eval.word_lm") and spec.ctc_log_probs is not None:
        from common.data.sources import iter_texts
        from common.models.ctc_lm import WordLM

        lm = WordLM.build(iter_texts(sources["train"]))
        (run_dir / WORD_LM_FILE).write_text(lm.to_json())
    model, tokenizer, cfg = load_model(checkpoint_path)
    threads = torch.get_num_threads()
    if torch.cuda.is_available():  # this rank's GPU (the process group is idle meanwhile: every rank has trained)
        model = model.to(torch.device("cuda", torch.cuda.current_device()))
    else:  # the other ranks of this node wait: their cores score the test sets with this one
        torch.set_num_threads(len(os.sched_getaffinity(0)))
    scores = {}
    try:
        for name, test_sources in sources["test"].items():
            t0 = time.perf_counter()
            scores[name] = got = recognition_scores(model, tokenizer, cfg, test_sources, lm=lm)
            with_lm = f" (with the word LM: WER {got['wer_lm']:.4f}, CER {got['cer_lm']:.4f})" if "wer_lm" in got else ""
            log.info("test %s: WER %.4f, CER %.4f%s on %d utterances (%.2f h) in %.0f s", name, got["wer"],
                     got["cer"], with_lm, got["utterances"], got["hours"], time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    return scores


def evaluate_intelligibility(cfg: DictConfig, model, spec, sources: dict) -> dict:
    """TTS only, when ``eval.asr_checkpoint`` is set: CER of that recognizer on synthesized held-out text."""
    if not spec.synthesizes or not cfg.eval.asr_checkpoint:  # eval: tts.yaml
        return {}
    asr_checkpoint = cfg.eval.asr_checkpoint
    from itertools import islice

    from common.data.sources import iter_texts
    from common.evaluation import intelligibility

    texts = list(islice(iter_texts(sources["val"]), cfg.eval.num_sentences))
    log.info("intelligibility: synthesizing %d held-out sentences, transcribing with %s", len(texts), asr_checkpoint)
    return intelligibility(model.eval(), cfg, texts, asr_checkpoint)


if __name__ == "__main__":
    main()

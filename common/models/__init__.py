"""The model registry: ``model.name`` -> how its tokenizer and model are built.

Training (:mod:`common.train`), inference (:mod:`common.inference`), the planner and the
benchmarks all build models here, so a recipe's model is the same object everywhere.

Usage::

    tokenizer = build_tokenizer(cfg, sources)    # from the training text, or the pretrained LLM's own
    model = build_model(cfg, tokenizer)           # random init, or pretrained weights per cfg.model
"""

from __future__ import annotations

from common.parallel import ConfigError

MODELS = ("salm", "asr_ctc", "tts_fastspeech", "tts_speecht5")


def check_model_name(cfg) -> None:
    if cfg.model.name not in MODELS:
        raise ConfigError(f"model.name {cfg.model.name!r} is not known (known: {', '.join(MODELS)})")


def build_tokenizer(cfg, sources: dict):
    """The run's tokenizer: the pretrained LLM's own (SALM with ``model.pretrained_llm``), a BPE
    built from the training transcripts (CTC, TTS) or a word vocabulary (tiny SALM)."""
    from common.data.sources import iter_texts
    from common.data.tokenizer import BPETokenizer, HFTokenizer, WordTokenizer

    check_model_name(cfg)
    if cfg.model.get("pretrained_llm"):
        return HFTokenizer.from_pretrained(cfg.model.pretrained_llm)
    texts = iter_texts(sources["train"])  # transcripts from metadata; no audio is read
    if cfg.model.name in ("asr_ctc", "tts_fastspeech", "tts_speecht5"):
        return BPETokenizer.build(texts, vocab_size=cfg.model.tokenizer.vocab_size)
    return WordTokenizer.build(texts, extra_words=cfg.model.prompt.split(), pad_to_multiple_of=8)


def build_model(cfg, tokenizer):
    check_model_name(cfg)
    if cfg.model.name == "asr_ctc":
        from common.models.asr_ctc import CTCASR

        return CTCASR(cfg.model, tokenizer)
    if cfg.model.name == "tts_fastspeech":
        from common.models.tts_fastspeech import FastSpeechTTS

        return FastSpeechTTS(cfg.model, tokenizer, num_mel_bins=cfg.data.num_mel_bins)
    if cfg.model.name == "tts_speecht5":
        from common.models.tts_speecht5 import SpeechT5TTS

        return SpeechT5TTS(cfg.model, tokenizer, num_mel_bins=cfg.data.num_mel_bins)
    from common.models.salm import SALM

    return SALM(cfg.model, tokenizer)


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

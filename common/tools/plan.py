"""Memory planner: predicted per-GPU memory of every valid parallel layout of a recipe, and a pick.

Usage (what ``make plan RECIPE=... GPUS_PER_NODE=... NODES=... ARGS=...`` runs)::

    python -m common.tools.plan --recipe salm_tp_fsdp2 --gpus-per-node 8 --nodes 2 \\
        [--gpu-memory-gib 80] [--precision auto|bf16-true] [--tokenizer RUN_DIR/tokenizer] [--json] \\
        model.llm.hidden_size=2048 model.llm.num_hidden_layers=28 ...   # any Hydra overrides

The model is built exactly as ``common.train`` builds it, but on the ``meta`` device (no weights
are allocated, nothing is downloaded), so the byte counts come from the real parameter shapes.
The vocabulary is the one the run would build from its training text (the generated corpus is
created under ``data.dir`` first if missing, as ``make run`` would), or ``--tokenizer`` (a run's
saved ``tokenizer/``). ``trainer.devices``/``num_nodes``/strategy sizes are ignored: every layout
of ``gpus_per_node x nodes`` GPUs is enumerated.

Per rank (the numbers ``common.recording.training_state_bytes`` measures in ``summary.json``):

* parameters: DDP holds every parameter. Under ``ModelParallelStrategy`` tensor parallel splits
  the parameters its plan (``backbone_tp_plan`` + the LM head) names colwise/rowwise, then FSDP2
  splits each local tensor's dim 0 as ``torch.chunk`` does (rank r gets ``min(ceil(n/k),
  n - r*ceil(n/k))`` rows of k shards: FSDP2's padding is not part of the local shard), k = dp for
  units with TP parameters and k = dp x tp for units TP leaves whole (``common.parallel``);
* gradients: the trainable parameters (``model.freeze``, LoRA), same shards and dtype;
* optimizer state: AdamW's ``exp_avg`` + ``exp_avg_sq`` (parameter dtype) and a 4-byte ``step``;
* activations: an ESTIMATE (not validated to 10%) of what backward keeps for one batch of
  ``data.max_duration_s / dp`` seconds (or ``data.max_tokens / dp`` LLM positions): per token and
  layer, ~19h+4i values for a Conformer layer, 4h+5q+4kv+4i for a Qwen3 layer (q/kv: query and
  key/value widths), 8h+2i / 12h+2i for SpeechT5 encoder/decoder layers, 19h+2i for the
  FastSpeech TTS's Conformer layers (tokens, then frames), memory-efficient LLM
  attention, eager encoder attention scores, logits kept twice in fp32 for the loss; TP + sequence
  parallel divide the LLM part by tp; activation checkpointing keeps one input per layer plus one
  layer. Text is assumed at 4 tokens per audio second, utterances at most ``data.max_utterance_s``
  (40 s when unset);
* buffers: FSDP2 gathers a unit's parameters (and its gradients before reduce-scatter); two
  gathered units of the largest size are counted (the current one and the prefetched one).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from common.run import build_run, compose

GIB = 1024**3
# precision -> (parameter bytes, activation bytes); "-mixed" keeps fp32 weights, computes in 16 bit.
PRECISIONS = {"bf16-true": (2, 2), "16-true": (2, 2), "bf16-mixed": (4, 2), "16-mixed": (4, 2),
              "32-true": (4, 4), "32": (4, 4), "64-true": (8, 8)}
ADAM_STEP_BYTES = 4  # AdamW's per-parameter `step`: a float32 scalar tensor
MAX_UTTERANCE_S_UNSET = 40.0


class PlanError(ValueError):
    """A request the planner cannot answer; the message names the bad value."""


def _local_config_dict(path, setting: str, config_cls) -> dict:
    """A pretrained model's architecture from its local config.json (the planner never downloads)."""
    if not (Path(path) / "config.json").exists():
        raise PlanError(f"{setting}={path!r} is not a local directory with a config.json; the planner "
                        "never downloads: pass a local copy of the model (or its config.json)")
    d = config_cls.from_pretrained(str(path)).to_dict()
    return {k: v for k, v in d.items() if not k.startswith("_") and k != "transformers_version"}


def _llm_architecture(cfg) -> dict | None:
    """The pretrained LLM's architecture without its weights: a local directory's or GGUF file's
    config, else the preset's own ``model.llm`` block when the preset says it is that backbone's
    (``model.about.llm_architecture_of``: GPU presets spell out their backbone's config.json); else None."""
    from transformers import AutoConfig

    path = Path(cfg.model.pretrained_llm)
    if path.suffix == ".gguf" and path.is_file():
        d = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name).to_dict()
        return {k: v for k, v in d.items() if not k.startswith("_") and k not in ("transformers_version",
                                                                                "quantization_config")}
    if (path / "config.json").exists():
        return _local_config_dict(path, "model.pretrained_llm", AutoConfig)
    about = cfg.model.get("about") or {}
    if cfg.model.get("llm") and about.get("vocab_size") and about.get("llm_architecture_of") == str(path):
        return {**cfg.model.llm, "vocab_size": about.vocab_size}  # the preset spells out exactly this backbone
    return None


def build_meta_model(cfg, tokenizer_dir=None, device="meta"):
    """(model on the meta device, tokenizer), built by the run layer as ``common.train`` builds them,
    from the pretrained backbone's architecture alone (never its weights). ``device=None``: where the
    caller's context puts it (the dry run: parameters on meta, buffers real)."""
    from common.data.tokenizer import SizedVocabulary, load_tokenizer

    pretrained = cfg.model.get("pretrained_llm")
    tokenizer = load_tokenizer(tokenizer_dir) if tokenizer_dir else None
    if pretrained:
        arch = _llm_architecture(cfg)
        if arch is None:
            raise PlanError(f"model.pretrained_llm={pretrained!r} is not a local directory with a config.json or a "
                            ".gguf file, and the preset does not spell out its architecture (model.about.llm_architecture_of); the "
                            "planner never downloads: pass a local copy of the model (or its config.json)")
        cfg.model.llm, cfg.model.pretrained_llm = arch, None  # the architecture alone: from_config, no weights
        if tokenizer is None:
            local = Path(pretrained).suffix == ".gguf" or Path(pretrained).is_dir()
            if local:
                from common.data.tokenizer import HFTokenizer

                tokenizer = HFTokenizer.from_pretrained(pretrained)
            else:  # the backbone's vocabulary as the preset documents it
                tokenizer = SizedVocabulary(arch["vocab_size"])
    if cfg.model.get("pretrained_encoder"):
        from transformers import ParakeetEncoderConfig

        from common.models.encoder import is_nemo_file, nemo_encoder_config

        enc = cfg.model.pretrained_encoder
        cfg.model.encoder = (nemo_encoder_config(enc) if is_nemo_file(enc)
                             else _local_config_dict(enc, "model.pretrained_encoder", ParakeetEncoderConfig))
        cfg.model.pretrained_encoder = None
    run = build_run(cfg, tokenizer=tokenizer, device=device)
    return run.model, run.tokenizer


def tp_split_dims(model, sequence_parallel: bool = True) -> tuple[dict[int, int], set[int]]:
    """({id(parameter): dim} for the parameters tensor parallel splits, {id} of every parameter TP turns
    into a DTensor, split or replicated), read from the real plan."""
    from torch import nn
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    from common.parallel.tensor_parallel import backbone_tp_plan

    spec = model.parallel_spec()
    styles = [(spec.tp_backbone.get_submodule(path), style)
              for path, style in backbone_tp_plan(spec.tp_backbone, sequence_parallel).items()]
    styles.append((spec.lm_head, ColwiseParallel()))  # common.parallel.tensor_parallel.lm_head_style
    dims, touched = {}, set()
    for module, style in styles:
        emb = isinstance(module, nn.Embedding)
        if isinstance(style, ColwiseParallel):  # Linear: out features (and bias); Embedding: width
            split = {"weight": 1 if emb else 0, "bias": 0}
        elif isinstance(style, RowwiseParallel):  # Linear: in features, bias replicated; Embedding: vocab
            split = {"weight": 0 if emb else 1}
        else:
            split = {}  # norms, q/k norms: replicated over tp
        for name, param in module.named_parameters(recurse=False):
            touched.add(id(param))
            if name in split:
                dims[id(param)] = split[name]
    return dims, touched


def _chunk(n: int, parts: int, index: int) -> int:
    """Size of ``torch.chunk(range(n), parts)[index]`` (0 where chunk returns fewer pieces)."""
    size = math.ceil(n / parts)
    return max(0, min(size, n - index * size))


def _local_shape(shape, tp_dim, tp, tp_rank, dp, dp_rank) -> list[int]:
    shape = list(shape)
    if tp > 1 and tp_dim is not None:
        shape[tp_dim] = _chunk(shape[tp_dim], tp, tp_rank)
    if dp > 1 and shape:
        shape[0] = _chunk(shape[0], dp, dp_rank)
    return shape


def state_bytes(model, strategy: str, dp: int, tp: int, param_bytes: int, sequence_parallel=True,
                ranks=None) -> list[dict]:
    """Per-rank parameter, gradient and AdamW state bytes (ranks row-major over the (dp, tp) mesh;
    ``ranks``: only these, e.g. the dry run's).

    FSDP2 units are those of ``common.parallel.fsdp_units``: a unit holding TP parameters is sharded
    over dp, a unit TP leaves whole (speech encoder, projector) over all dp x tp ranks."""
    from common.parallel import fsdp_units

    sharded = strategy == "model_parallel"
    dims, touched = tp_split_dims(model, sequence_parallel) if sharded and tp > 1 else ({}, set())
    fsdp = sharded  # common.parallel applies FSDP2 to every model-parallel layout, dp=1 included
    units = fsdp_units(model, model.parallel_spec()) if fsdp else [(model, list(model.parameters()))]
    out = []
    for rank in range(dp * tp) if ranks is None else ranks:
        dp_rank, tp_rank = divmod(rank, tp) if sharded else (0, 0)
        p_bytes = g_bytes = o_bytes = 0
        for _, params in units:
            on_tp = any(id(p) in touched for p in params)
            shards, index = (dp, dp_rank) if on_tp or tp == 1 else (dp * tp, rank)
            for p in params:
                n = math.prod(_local_shape(p.shape, dims.get(id(p)), tp, tp_rank, shards if fsdp else 1, index))
                p_bytes += n * param_bytes
                if p.requires_grad:
                    g_bytes += n * param_bytes
                    o_bytes += 2 * n * param_bytes + ADAM_STEP_BYTES
        out.append({"rank": rank, "param_bytes": p_bytes, "grad_bytes": g_bytes, "optimizer_state_bytes": o_bytes})
    return out


def fsdp_buffer_bytes(model, dp: int, tp: int, param_bytes: int) -> int:
    """Two gathered copies of the largest FSDP2 unit (params + grads of the TP-local tensors), in the
    compute dtype. FSDP2 wraps every model-parallel layout, dp=1 included (there it gathers a copy:
    an upper bound for one rank without the bf16 policy)."""
    from common.parallel import fsdp_units

    spec = model.parallel_spec()
    sizes = [sum(p.numel() * (1 + p.requires_grad) for p in params) for _, params in fsdp_units(model, spec)]
    tp_div = tp if spec.tp_backbone is not None else 1  # an upper bound: the encoder is not TP-split
    return 2 * max(sizes) * param_bytes // tp_div


def activation_bytes(cfg, model, dp: int, tp: int, act_bytes: int) -> int:
    """Rough estimate of the activations of one training step per rank (see the module docstring):
    the model's own formula (its spec's ``activation_values``) on this rank's share of the batch."""
    from common.models import spec_of
    from common.models.spec import FRAME_S, RankBatch
    from common.settings import resolve_batch_size

    spec = spec_of(cfg)
    if spec.activation_values is None:
        raise PlanError(f"model {cfg.model.name!r} has no activation estimate (its ModelSpec.activation_values): "
                        "the planner cannot size its batches")
    d = cfg.data.copy()
    resolve_batch_size(d, dp * tp)  # a GPU preset's per-GPU batch, in this layout
    # Attention spans one utterance: data.max_utterance_s, or when unset (it then defaults to the
    # whole batch) 40 s, longer than the utterances of common ASR corpora. Set it for long-form data.
    utt_s = float(d.get("max_utterance_s") or min(float(d.max_duration_s), MAX_UTTERANCE_S_UNSET))
    positions = None
    if d.get("max_tokens") and spec.audio_frames_per_token:  # positions -> audio seconds (upper bound)
        positions = d.max_tokens / dp
        audio_s = d.max_tokens / dp * spec.audio_frames_per_token(cfg) * FRAME_S
    else:
        audio_s = float(d.max_duration_s) / dp  # the global batch splits evenly over dp ranks
    parallel = cfg.parallel  # null for DDP recipes
    batch = RankBatch(audio_s=audio_s, utterance_s=min(utt_s, audio_s),  # one utterance, at most the rank's batch
                      llm_positions=positions, tp=tp,
                      activation_checkpointing=bool(parallel and parallel.activation_checkpointing),
                      sequence_parallel=bool(parallel and parallel.sequence_parallel),
                      loss_parallel=bool(parallel and parallel.loss_parallel), act_bytes=act_bytes)
    return int(spec.activation_values(cfg, model, batch) * act_bytes)


def enumerate_layouts(cfg, model, gpus_per_node: int, nodes: int):
    """([(strategy, dp, tp)], [{dp, tp, reason}]): DDP is one layout; TP stays inside a node."""
    from common.errors import ConfigError
    from common.parallel import check_tensor_parallel, resolve_layout
    from common.parallel.layout import check_tensor_parallel_within_node

    world = gpus_per_node * nodes
    strategy = resolve_layout(cfg.trainer).strategy
    if strategy == "ddp":
        return [("ddp", world, 1)], []
    from common.models import spec_of

    backbone_of = spec_of(cfg).llm
    llm = backbone_of(model) if backbone_of else None
    valid, skipped = [], []
    for tp in (t for t in range(1, world + 1) if world % t == 0):
        reason = None
        try:
            check_tensor_parallel_within_node(tp, gpus_per_node)
            if llm is None and tp > 1:
                raise ConfigError(f"model {cfg.model.name!r} declares no tensor-parallel backbone")
            if llm is not None:
                # the embedding's rows (the tokenizer's vocabulary grown to VOCAB_MULTIPLE), as a run checks
                rows = llm.get_input_embeddings().num_embeddings
                check_tensor_parallel(tp, llm.config, rows, lora=bool(cfg.model.get("lora")))
        except ConfigError as exc:
            reason = str(exc)
        if reason:
            skipped.append({"dp": world // tp, "tp": tp, "reason": reason})
        else:
            valid.append(("model_parallel", world // tp, tp))
    return valid, skipped


def recommend(layouts: list[dict], gpu_memory_gib: float) -> tuple[str | None, str]:
    """The layout that fits with the smallest tp: TP communicates inside every layer, FSDP2 per unit."""
    fits = [lay for lay in layouts if lay["fits"]]
    if fits:
        best = min(fits, key=lambda lay: lay["tp"])
        why = {"ddp": "the recipe's one layout (DDP)"}.get(best["strategy"], "smallest tp that fits")
        why = "FSDP2 alone fits" if best["name"] == f"dp{best['dp']} x tp1" else why
        return best["name"], (f"recommended: {best['name']} ({best['total_bytes'] / GIB:.2f} GiB of "
                              f"{gpu_memory_gib:g} GiB per GPU; {why})")
    if not layouts:
        return None, "no valid layout for this GPU count"
    least = min(layouts, key=lambda lay: lay["total_bytes"])
    return None, (f"nothing fits in {gpu_memory_gib:g} GiB per GPU (smallest: {least['name']}, "
                  f"{least['total_bytes'] / GIB:.2f} GiB): add GPUs (more dp shards parameters, gradients and "
                  "optimizer state), set parallel.activation_checkpointing=true, or lower data.max_duration_s "
                  "/ data.max_tokens")


def byte_widths(cfg, precision: str) -> tuple[int, int, int]:
    """Bytes per element of (parameters, activations, FSDP-gathered units) for ``precision``."""
    param_b, act_b = PRECISIONS[precision]
    gather_b = param_b
    policy = cfg.parallel.mixed_precision if cfg.parallel else False
    if policy is True or (policy == "auto" and precision in ("32-true", "32")):
        act_b = gather_b = min(act_b, 2)  # FSDP2's bf16 compute policy: bf16 activations and gathered units
    return param_b, act_b, gather_b


def layout_bytes(cfg, model, strategy: str, dp: int, tp: int, widths: tuple[int, int, int]) -> dict:
    """Per-GPU bytes of one layout: the largest rank's parameters, gradients and optimizer state,
    the activations of ``cfg``'s batch and the FSDP2 gather buffers (``total_bytes``: their sum).
    ``make plan`` lists it per layout; ``make profile-batches`` (on CPU) sizes buckets with it."""
    param_b, act_b, gather_b = widths
    seq_par = bool(cfg.parallel and cfg.parallel.sequence_parallel)
    ranks = state_bytes(model, strategy, dp, tp, param_b, seq_par)
    row = {"name": f"DDP x{dp}" if strategy == "ddp" else f"dp{dp} x tp{tp}", "strategy": strategy,
           "dp": dp, "tp": tp, "per_rank": ranks,
           **{k: max(r[k] for r in ranks) for k in ("param_bytes", "grad_bytes", "optimizer_state_bytes")},
           "activation_bytes": activation_bytes(cfg, model, dp, tp, act_b),
           "buffer_bytes": (fsdp_buffer_bytes(model, dp, tp, gather_b)
                            if strategy == "model_parallel" else 0)}
    row["total_bytes"] = max(r["param_bytes"] + r["grad_bytes"] + r["optimizer_state_bytes"] for r in ranks) \
        + row["activation_bytes"] + row["buffer_bytes"]
    return row


def plan(recipe: str, gpus_per_node: int, nodes: int = 1, overrides=(), precision: str = "auto",
         gpu_memory_gib: float = 80.0, tokenizer=None, vocab_size: int | None = None) -> dict:
    cfg = compose(recipe, overrides)
    if precision == "auto":  # what a GPU run uses by default: fp32 master weights, bf16 compute
        from common.parallel.layout import gpu_precision

        precision = gpu_precision(cfg.trainer.strategy.get("_target_"))
    if precision not in PRECISIONS:
        raise PlanError(f"--precision {precision!r} is not known (known: {', '.join(PRECISIONS)})")
    if gpus_per_node < 1 or nodes < 1:
        raise PlanError(f"--gpus-per-node ({gpus_per_node}) and --nodes ({nodes}) must be positive")
    model, tok = build_meta_model(cfg, tokenizer)
    if vocab_size:
        from common.models import spec_of

        spec = spec_of(cfg)
        if spec.llm is None:
            raise PlanError(f"--vocab-size is for the speech-LLM recipes; {recipe} sets its vocabulary with "
                            "model.tokenizer.vocab_size")
        with torch.device("meta"):  # the backbone's real vocabulary (e.g. Qwen3: 151936), not the corpus's words
            spec.llm(model).resize_token_embeddings(vocab_size, mean_resizing=False)
        tok = type("Vocab", (), {"vocab_size": vocab_size})()
    widths = byte_widths(cfg, precision)
    valid, skipped = enumerate_layouts(cfg, model, gpus_per_node, nodes)
    layouts = [layout_bytes(cfg, model, strategy, dp, tp, widths) for strategy, dp, tp in valid]
    for row in layouts:
        row["fits"] = row["total_bytes"] <= gpu_memory_gib * GIB
    best, text = recommend(layouts, gpu_memory_gib)
    return {"recipe": recipe, "gpus_per_node": gpus_per_node, "nodes": nodes, "world_size": gpus_per_node * nodes,
            "precision": precision, "gpu_memory_gib": gpu_memory_gib, "vocab_size": tok.vocab_size,
            "parameters": sum(p.numel() for p in model.parameters()),
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "layouts": layouts, "skipped": skipped, "recommended": best, "recommendation": text}


def format_plan(result: dict) -> str:
    lines = [f"{result['recipe']}: {result['parameters']:,} parameters ({result['trainable_parameters']:,} trainable), "
             f"vocab {result['vocab_size']}, {result['world_size']} GPUs ({result['nodes']} x "
             f"{result['gpus_per_node']}), {result['precision']}, {result['gpu_memory_gib']:g} GiB per GPU",
             "per GPU, GiB (activations and buffers are estimates):",
             f"{'layout':<14}{'dp':>4}{'tp':>4}{'params':>9}{'grads':>9}{'optim':>9}{'activ':>9}{'buffers':>9}"
             f"{'total':>9}  fits"]
    for lay in result["layouts"]:
        gib = [lay[k] / GIB for k in ("param_bytes", "grad_bytes", "optimizer_state_bytes", "activation_bytes",
                                      "buffer_bytes", "total_bytes")]
        lines.append(f"{lay['name']:<14}{lay['dp']:>4}{lay['tp']:>4}" + "".join(f"{g:>9.3f}" for g in gib)
                     + f"  {'yes' if lay['fits'] else 'no'}")
    lines += [f"  not offered: dp{s['dp']} x tp{s['tp']}: {s['reason']}" for s in result["skipped"]]
    lines.append(result["recommendation"])
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m common.tools.plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--gpus-per-node", type=int, required=True)
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0)
    parser.add_argument("--precision", default="auto",
                        help=f"auto (the GPU default: fp32 weights, bf16 compute) or one of {', '.join(PRECISIONS)}")
    parser.add_argument("--tokenizer", help="a run's saved tokenizer/ directory (default: built as the run would)")
    parser.add_argument("--vocab-size", type=int, help="SALM: the backbone's vocabulary (e.g. 151936 for Qwen3) "
                        "instead of the generated corpus's words")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model.llm.num_hidden_layers=28")
    args = parser.parse_args(argv)
    try:
        result = plan(args.recipe, args.gpus_per_node, args.nodes, args.overrides, args.precision,
                      args.gpu_memory_gib, args.tokenizer, args.vocab_size)
    except (PlanError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1) if args.json else format_plan(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

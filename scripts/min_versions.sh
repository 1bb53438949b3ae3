#!/usr/bin/env bash
# Minimum-versions job: a separate venv (.venv-min/, or $MIN_VENV) with the CPU torch pin and every other
# dependency at the floor pyproject.toml declares (scripts/min_constraints.py reads them), edgetool
# installed with --no-deps, then the non-slow tests. A floor that no longer works fails here.
# peft and galore-torch (test extras) are left out: they are reference implementations with their own
# heavy dependency trees (transformers, bitsandbytes), whose floors test those projects rather than
# edgetool; the cross-check tests that need them skip with that reason here and run in `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${MIN_VENV:-.venv-min}
TORCH_PIN=$("$PY" scripts/install_plan.py --print-torch-pin)
rm -rf "$VENV"
"$PY" -m venv "$VENV"
VPY=$VENV/bin/python
PIP=("$VPY" -m pip install -q --disable-pip-version-check)
# packaging parses the requirements in min_constraints.py (a fresh machine's python3 may lack it; the
# floors' own dependencies pull it in anyway).
"${PIP[@]}" "$TORCH_PIN" packaging
constraints=$VENV/min-constraints.txt
# torchvision is kept aside like torch: each release requires one torch release exactly, so its floor (the
# pair of torch's floor) cannot install next to the torch pin; the torchvision that pairs with the pin does.
"$VPY" scripts/min_constraints.py --extra onnxruntime --extra test --skip torch --skip torchvision \
  --skip peft --skip galore-torch >"$constraints"
echo "min-versions: $TORCH_PIN and its torchvision, then the declared floors:" $(cat "$constraints")
# The floors and torch together, so pip cannot move torch while resolving the floors' own dependencies.
"${PIP[@]}" -r "$constraints" "$TORCH_PIN" torchvision
"${PIP[@]}" --no-deps -e .
"$VPY" -m pip check
"$VPY" -m pip list --format=freeze 2>/dev/null | grep -iE '^(torch|torchvision|numpy|onnx|onnxruntime|onnxconverter-common|polygraphy|click|pyyaml|pydantic|tqdm|matplotlib|protobuf|pytest|ray)==' | tr '\n' ' '
echo
set +e
"$VPY" -m pytest -q -p no:cacheprovider -m "not slow" "$@"
rc=$?
set -e
# pytest exits 5 when it collected nothing: a job that ran no test has proven nothing.
if [ "$rc" -eq 5 ]; then
  echo "min-versions: error: pytest collected no test" >&2
  exit 1
fi
exit "$rc"

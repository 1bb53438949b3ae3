#!/usr/bin/env bash
# Idempotent set-up of .venv: `install.sh` installs edgetool's runtime dependencies (make demo),
# `install.sh --test` adds the test extras (make test). `--dry-run` (or EDGETOOL_INSTALL_DRY_RUN=1)
# prints the plan and runs nothing.
# The decisions live in scripts/install_plan.py (tested by tests/test_install.py):
#   - off a Jetson: the CPU torch pin is installed first when no torch is present, so pyproject's wide
#     torch range never pulls a CUDA build;
#   - on a Jetson (/etc/nv_tegra_release, or $EDGETOOL_TEGRA_RELEASE): the venv sees the system
#     site-packages (JetPack's TensorRT, NVIDIA's torch), no PyPI torch is ever installed, numpy<2 is
#     pinned where the torch build needs it;
#   - an installed onnxruntime-gpu is kept; the CPU onnxruntime is added only when none is installed.
# PYTHON picks the interpreter that makes the venv (default python3), VENV the venv folder (default .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
args=()
dry_run=${EDGETOOL_INSTALL_DRY_RUN:-0}
for arg in "$@"; do
  case $arg in
    --test) args+=(--test) ;;
    --dry-run) dry_run=1 ;;
    -h|--help) sed -n '2,4p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "install: error: unknown argument '$arg' (expected --test, --dry-run)" >&2; exit 2 ;;
  esac
done
# The version check runs before the planner, which needs 3.10 (and JetPack 5's Python 3.8 is too old).
ver=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2]); sys.exit(sys.version_info < (3, 10))' 2>/dev/null) || {
  echo "install: error: ${ver:+Python $ver from }'$PY' cannot be used: edgetool needs Python 3.10 or newer (PYTHON=/path/to/python3 picks another)" >&2
  exit 2
}
plan=$("$PY" scripts/install_plan.py --venv "$VENV" --python "$PY" "${args[@]}") || exit $?
if [ "$dry_run" = 1 ]; then
  printf '%s\n' "$plan"
  exit 0
fi
mapfile -t steps <<<"$plan"
for step in "${steps[@]}"; do
  case $step in
    "run: "*) echo "install: ${step#run: }"; eval "${step#run: }" ;;  # shlex-quoted by the planner
    "note: "*) echo "install: ${step#note: }" ;;
    "# "*) echo "install: ${step#\# }" ;;
  esac
done

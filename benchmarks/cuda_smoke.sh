#!/usr/bin/env bash
# One-shot check of training on a CUDA GPU, for a machine with torch (CUDA build), onnx and onnxruntime
# but no network and nothing else: the CUDA tests, then the default recipe adapted on the GPU in fp16,
# fused, exported and verified with ONNX Runtime, then a two-method bench (cost ratios to full
# fine-tuning) in fp16 and fp32. Prints a compact summary; exit 0 only if every step passed.
#
#   benchmarks/cuda_smoke.sh            # device cuda, precision fp16
#   benchmarks/cuda_smoke.sh cpu        # the same steps on the CPU (a dry run of this script)
#   PRECISION=bf16 benchmarks/cuda_smoke.sh cuda:1
#
# Pure-Python and other missing dependencies: put their wheels in .whl/ at the repository root (the
# list, pinned for Python 3.12 manylinux x86_64, is benchmarks/cuda_smoke_requirements.txt; download
# them elsewhere with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
#     --platform manylinux2014_x86_64 --platform any -d .whl -r benchmarks/cuda_smoke_requirements.txt
# ); they are installed into a private folder, never into the machine's Python.
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE="${1:-cuda}"
PRECISION="${PRECISION:-fp16}"
PYTHON="${PYTHON:-python3}"
TESTS="${SMOKE_TESTS:-tests/test_device.py}"
WORK="$(mktemp -d /tmp/edgetool-smoke.XXXXXX)"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" > /dev/null; then
  if "$PYTHON" -m pip --version > /dev/null 2>&1; then
    "$PYTHON" -m pip install -q --no-index --no-deps --target "$WORK/site" .whl/*.whl || exit 2
  else  # no pip: a wheel is a zip laid out for site-packages
    for w in .whl/*.whl; do "$PYTHON" -m zipfile -e "$w" "$WORK/site" || exit 2; done
  fi
  export PYTHONPATH="$WORK/site:$PYTHONPATH"
fi
EDGETOOL=("$PYTHON" -m toolchain.cli)
declare -A STATUS
step() {  # step NAME COMMAND...: run, keep its log, remember its exit code
  local name="$1"; shift
  local start=$SECONDS
  "$@" > "$WORK/$name.log" 2>&1
  STATUS[$name]=$?
  echo "[$name] exit ${STATUS[$name]} in $((SECONDS - start)) s (log: $WORK/$name.log)"
}

"$PYTHON" - <<'EOF' || exit 2
import torch
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}); cuda usable: {torch.cuda.is_available()}"
      + (f"; {torch.cuda.get_device_name(0)}, bf16 {torch.cuda.is_bf16_supported()}" if torch.cuda.is_available() else ""))
EOF
# The default recipe with its base checkpoint in the work folder, so the base is pretrained here too.
sed "s#^\(  checkpoint:\).*#\1 $WORK/base.pt#" recipes/basicmotions-ttlora.yaml > "$WORK/recipe.yaml"

step tests "$PYTHON" -m pytest -q -p no:cacheprovider -m "not slow" -rs $TESTS
step adapt "${EDGETOOL[@]}" adapt "$WORK/recipe.yaml" --device "$DEVICE" --precision "$PRECISION" --out "$WORK/run" --quiet
step fuse-export "${EDGETOOL[@]}" fuse-export "$WORK/run" --out "$WORK/engine"
step verify "${EDGETOOL[@]}" verify "$WORK/engine" --engine onnxruntime --iterations 100
step bench "${EDGETOOL[@]}" bench "$WORK/recipe.yaml" --methods full,ttlora --seeds 1 --device "$DEVICE" \
  --precision "$PRECISION" --out "$WORK/bench" --quiet
step bench-fp32 "${EDGETOOL[@]}" bench "$WORK/recipe.yaml" --methods full,ttlora --seeds 1 --device "$DEVICE" \
  --precision fp32 --out "$WORK/bench-fp32" --quiet

echo "--- summary ($WORK)"
tail -n 3 "$WORK/tests.log"
"$PYTHON" - "$WORK" <<'EOF'
import json, sys
from pathlib import Path

work = Path(sys.argv[1])
def read(path):
    try:
        return json.loads((work / path).read_text())
    except (OSError, ValueError):
        return None

m = read("run/metrics.json")
if m:
    d = m["device"]
    print(f"adapt: {d['name']} ({d['type']}, {d['precision']}, TF32 in effect {d['tf32_in_effect']}, cudnn.allow_tf32 "
          f"{d['cudnn_allow_tf32']}, matmul.allow_tf32 {d['matmul_allow_tf32']}), torch {d['torch']} CUDA {d['torch_cuda']}")
    print(f"adapt: macro-F1 {m['f1_before']:.3f} -> {m['f1_after']:.3f}, steps to target {m['steps_to_target']}, "
          f"{m['train_seconds']:.1f} s for {m['steps']} steps, skipped fp16 steps {m['skipped_steps']}, "
          f"peak memory {m['peak_memory_bytes'] / 2**20:.2f} MiB ({m['peak_memory_source']})")
v = read("engine/verify_report.json")
if v:
    print(f"verify (onnxruntime): failed checks {v.get('failed_checks')}")
for name in ("bench", "bench-fp32"):
    b = read(f"{name}/bench.json")
    if b:
        dev = b["meta"]["device"]
        for r in b["rows"]:
            print(f"{name} [{dev['precision']}]: {r['method']:7s} F1 {r['f1_mean']:.3f}  "
                  f"{1000 * r['wall_seconds_per_step_mean']:.2f} ms/step ({r['step_time_vs_full']:.2f}x full)  "
                  f"peak {r['peak_memory_bytes_mean'] / 2**20:.2f} MiB ({r['peak_memory_vs_full']:.2f}x full)")
EOF
failed=0
for name in tests adapt fuse-export bench bench-fp32; do
  [ "${STATUS[$name]}" -eq 0 ] || failed=1
done
# verify: exit 1 for a failed latency check alone is timing noise on a shared machine, not a failure here
if [ "${STATUS[verify]}" -ne 0 ]; then
  "$PYTHON" -c "import json,sys; r=json.load(open(sys.argv[1])); sys.exit(any(not c.startswith('latency.') for c in r['failed_checks']))" \
    "$WORK/engine/verify_report.json" 2>/dev/null || failed=1
fi
echo "smoke: $([ $failed -eq 0 ] && echo PASSED || echo FAILED)"
exit $failed

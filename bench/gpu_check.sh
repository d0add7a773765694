#!/usr/bin/env bash
# One-shot GPU validation of zerocore's CUDA ops (issue 5), under 8 minutes on one H100:
#   1. builds the op libraries (cpu_adam, buckets, cuda_buckets, cuda_adam) through zerocore.ops.build;
#   2. runs the bucket and FusedAdam tests (CUDA-marked ones included: they run, not skip, on a GPU);
#   3. runs the CUDA benchmarks: bucket pack/unpack vs torch.cat / _foreach_copy_ and fused Adam vs torch fused
#      AdamW and the composed mixed path, each beside the measured device-to-device copy bandwidth;
#   4. prints a short table last: stage status, then the targets (issue 5) against what was measured.
# Needs torch (CUDA build), nvcc matching torch's CUDA major version, ninja, pybind11, pytest, pytest-benchmark;
# installs nothing. Usage: bench/gpu_check.sh [results dir]   (default: $OUT/gpu_check, else /tmp/zerocore_gpu_check)
# Everything printed also goes to <results dir>/gpu_check.log; paste the final table into bench/results/gpu.md.
set -uo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
RESULTS=${1:-${OUT:+$OUT/gpu_check}}
RESULTS=${RESULTS:-/tmp/zerocore_gpu_check}
mkdir -p "$RESULTS"
exec > >(tee "$RESULTS/gpu_check.log") 2>&1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}

declare -a SUMMARY
stage() {  # stage NAME TIMEOUT_S COMMAND...: runs it, records status and seconds, never aborts the script
  local name=$1 limit=$2
  shift 2
  echo
  echo "=== $name (limit ${limit}s): $*"
  local started=$SECONDS
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  local status=ok
  [ $rc -eq 124 ] && status="TIMEOUT" || { [ $rc -ne 0 ] && status="FAILED (rc $rc)"; }
  SUMMARY+=("| $name | $status | $((SECONDS - started)) |")
  return $rc
}

echo "zerocore gpu_check $(date -u +%FT%TZ) in $PWD, results in $RESULTS"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.memory --format=csv || true
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
"$CUDA_HOME/bin/nvcc" --version | tail -n 2

stage "build ops" 330 python -c "
import time, zerocore.ops as O
for name in ('cpu_adam', 'buckets', 'cuda_buckets', 'cuda_adam'):
    t = time.time(); O.build(name, verbose=False); print(f'built {name} in {time.time() - t:.0f}s', flush=True)
"
stage "tests" 240 python -m pytest -q -p no:cacheprovider -ra --junitxml="$RESULTS/tests.xml" \
  tests/test_ops_buckets.py tests/test_optim_fused_adam.py
stage "bench buckets" 120 python bench/bench_buckets.py --device cuda --out "$RESULTS/bench_buckets.md"
stage "bench fused adam" 180 python bench/bench_fused_adam.py --out "$RESULTS/bench_fused_adam.md"

echo
for f in "$RESULTS/bench_buckets.md" "$RESULTS/bench_fused_adam.md"; do [ -f "$f" ] && { echo; cat "$f"; }; done
echo
echo "| stage | status | seconds |"
echo "|---|---|---|"
printf '%s\n' "${SUMMARY[@]}"
echo
python - "$RESULTS" <<'EOF'
# The targets of issue 5 against the tables above (rows are markdown, columns as the benches print them).
import os, sys
results = sys.argv[1]

def rows(name):
    path = os.path.join(results, name)
    if not os.path.exists(path):
        return []
    return [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in open(path) if line.startswith("| ") and not line.startswith("| case") and
            not line.startswith("| params")]

print("| target | measured | met |")
print("|---|---|---|")
adam = [r for r in rows("bench_fused_adam.md") if r[1] == "zerocore mixed"]
if adam:
    largest = adam[-1]
    share, speedup = float(largest[4].rstrip("%")), float(largest[5].rstrip("x"))
    print(f"| fused mixed Adam >= 85% of copy bandwidth at 28 B/param ({largest[0]}) | {share:.0f}% | "
          f"{'yes' if share >= 85 else 'NO'} |")
    print(f"| fused mixed Adam >= 1.5x torch composed mixed ({largest[0]}) | {speedup:.2f}x | "
          f"{'yes' if speedup >= 1.5 else 'NO'} |")
else:
    print("| fused Adam | no result | NO |")
packs = [r for r in rows("bench_buckets.md") if r[1] == "zerocore"]
if packs:
    worst = min(packs, key=lambda r: float(r[4].rstrip("%")))
    share = float(worst[4].rstrip("%"))
    print(f"| bucket pack/unpack within 10% of copy bandwidth (worst: {worst[0]}) | {share:.0f}% | "
          f"{'yes' if share >= 90 else 'NO'} |")
else:
    print("| bucket pack | no result | NO |")
EOF

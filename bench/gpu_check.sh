#!/usr/bin/env bash
# One-shot GPU validation of zerocore's CUDA ops (issue 5), under 8 minutes on one H100:
#   1. builds the op libraries (cpu_adam, buckets, cuda_buckets, cuda_adam; and aio, whose pinned host buffers
#      the offload tests use: optional, offload falls back to torch's pinned memory without it) through
#      zerocore.ops.build;
#   2. runs the bucket and FusedAdam tests (CUDA-marked ones included: they run, not skip, on a GPU), then, as a
#      stage of its own (a hang there cannot cost the op tests' verdict), tests/test_zero_cuda.py: ZeroOptimizer's
#      CUDA path at world size 1 on one-rank NCCL and gloo groups (fp32, bf16, CPU offload, accounting);
#   3. runs the CUDA benchmarks: bucket pack/unpack vs torch.cat / _foreach_copy_ and fused Adam vs torch fused
#      AdamW and the composed mixed path, each beside the measured device-to-device copy bandwidth;
#   4. prints a short table last: stage status, with the passed / failed / skipped / xfailed counts of each test
#      file (from the stages' JUnit reports), then the targets (issue 5) against what was measured.
# Needs torch (CUDA build), nvcc matching torch's CUDA major version, ninja, pybind11, pytest, pytest-benchmark;
# installs nothing, and zerocore need not be installed (PYTHONPATH points at this checkout). nvcc is found as the
# op builder finds it ($CUDA_HOME if set, else /usr/local/cuda, else PATH); $PYTHON picks the interpreter
# (default python3). Every stage has its own time limit and all of them together stay under an overall budget
# (ZEROCORE_GPU_CHECK_BUDGET_S, default 450 s), so the whole script ends within 8 minutes even if a stage hangs.
# Usage: bench/gpu_check.sh [results dir]   (default: $OUT/gpu_check, else /tmp/zerocore_gpu_check)
# Everything printed also goes to <results dir>/gpu_check.log; paste the final table into bench/results/gpu.md.
set -uo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
RESULTS=${1:-${OUT:+$OUT/gpu_check}}
RESULTS=${RESULTS:-/tmp/zerocore_gpu_check}
mkdir -p "$RESULTS"
rm -f "$RESULTS/tests.xml" "$RESULTS/tests_zero.xml"   # so that a report left by an earlier run is never counted
exec > >(tee "$RESULTS/gpu_check.log") 2>&1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
PY=${PYTHON:-python3}
DEADLINE=$((SECONDS + ${ZEROCORE_GPU_CHECK_BUDGET_S:-450}))

declare -a SUMMARY
stage() {  # stage NAME TIMEOUT_S COMMAND...: runs it, records status and seconds, never aborts the script
  local name=$1 limit=$2
  shift 2
  local left=$((DEADLINE - SECONDS))
  [ "$limit" -gt "$left" ] && limit=$left
  echo
  if [ "$limit" -lt 15 ]; then
    echo "=== $name: SKIPPED, the overall time budget is spent"
    SUMMARY+=("| $name | SKIPPED (no time left) | 0 |")
    return 1
  fi
  echo "=== $name (limit ${limit}s): $*"
  local started=$SECONDS
  timeout --kill-after=5 "$limit" "$@"
  local rc=$?
  local status=ok
  [ $rc -eq 124 ] && status="TIMEOUT" || { [ $rc -ne 0 ] && status="FAILED (rc $rc)"; }
  SUMMARY+=("| $name | $status | $((SECONDS - started)) |")
  return $rc
}

echo "zerocore gpu_check $(date -u +%FT%TZ) in $PWD, results in $RESULTS"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.memory --format=csv || true
timeout 60 "$PY" -c "
import torch
from zerocore.ops import toolchain as T
print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())
print('nvcc', T.nvcc_version(), 'at', T.cuda_home()[0], '| arch', T.cuda_arch_list())
" || true

# The libraries compile in parallel (each in its own child process and cache folder). aio is optional: without
# it the offload tests' host buffers come from torch's pinned allocator (zerocore/zero/memory.py host_empty).
stage "build ops" 200 "$PY" -c "
import sys, time, zerocore.ops as O
from concurrent.futures import ThreadPoolExecutor
REQUIRED, OPTIONAL = ('cpu_adam', 'buckets', 'cuda_buckets', 'cuda_adam'), ('aio',)
def build(name):
    t = time.time()
    try:
        O.build(name, verbose=False)
        return f'built {name} in {time.time() - t:.0f}s'
    except Exception as e:
        optional = ' (optional)' if name in OPTIONAL else ''
        return f'FAILED {name}{optional} after {time.time() - t:.0f}s: {e}'
with ThreadPoolExecutor(len(REQUIRED + OPTIONAL)) as pool:
    results = list(pool.map(build, REQUIRED + OPTIONAL))
print('\n'.join(results), flush=True)
sys.exit(any(r.startswith('FAILED') and not r.split(' after ')[0].endswith('(optional)') for r in results))
"
stage "tests" 150 "$PY" -m pytest -q -p no:cacheprovider -ra --junitxml="$RESULTS/tests.xml" \
  tests/test_ops_buckets.py tests/test_optim_fused_adam.py
# -rA: the parity tests print their measured errors (for tightening their tolerances) even when they pass.
stage "tests zero (cuda)" 90 "$PY" -m pytest -q -p no:cacheprovider -rA --junitxml="$RESULTS/tests_zero.xml" \
  tests/test_zero_cuda.py
stage "bench buckets" 45 "$PY" bench/bench_buckets.py --device cuda --out "$RESULTS/bench_buckets.md"
stage "bench fused adam" 75 "$PY" bench/bench_fused_adam.py --out "$RESULTS/bench_fused_adam.md"

echo
for f in "$RESULTS/bench_buckets.md" "$RESULTS/bench_fused_adam.md"; do [ -f "$f" ] && { echo; cat "$f"; }; done
echo
echo "| stage | status | seconds |"
echo "|---|---|---|"
printf '%s\n' "${SUMMARY[@]}"
# One more row per test file: its counts from the stages' JUnit reports (seconds: the sum of its tests' times).
"$PY" - "$RESULTS" <<'EOF'
import os, sys
import xml.etree.ElementTree as ET
results = sys.argv[1]
reports = {"tests.xml": ["tests/test_ops_buckets.py", "tests/test_optim_fused_adam.py"],
           "tests_zero.xml": ["tests/test_zero_cuda.py"]}
KINDS = ("passed", "failed", "errors", "skipped", "xfailed")

def file_of(case):
    # pytest's classname: "tests.test_x" or "tests.test_x.TestClass" (a collection error: empty, name = module)
    parts = (case.get("classname") or case.get("name") or "").split(".")
    for i, p in enumerate(parts):
        if p.startswith("test_"):
            return "/".join(parts[:i + 1]) + ".py"
    return "/".join(parts) or "?"

for report, files in reports.items():
    path = os.path.join(results, report)
    try:
        cases = list(ET.parse(path).getroot().iter("testcase"))
    except (OSError, ET.ParseError):
        for f in files:
            print(f"| tests: {f} | no JUnit report ({report}: pytest did not finish) | - |")
        continue
    counts = {f: dict.fromkeys(KINDS, 0) for f in files}
    seconds = dict.fromkeys(files, 0.0)
    for case in cases:
        f = file_of(case)
        counts.setdefault(f, dict.fromkeys(KINDS, 0))
        seconds[f] = seconds.get(f, 0.0) + float(case.get("time") or 0)
        tags = {child.tag: child for child in case}
        if "failure" in tags:
            kind = "failed"
        elif "error" in tags:
            kind = "errors"
        elif "skipped" in tags:
            kind = "xfailed" if tags["skipped"].get("type") == "pytest.xfail" else "skipped"
        else:
            kind = "passed"
        counts[f][kind] += 1
    for f, c in counts.items():
        status = ("FAILED: " if c["failed"] + c["errors"] else "ok: ") + ", ".join(f"{c[k]} {k}" for k in KINDS)
        print(f"| tests: {f} | {status} | {seconds[f]:.0f} |")
EOF
echo
"$PY" - "$RESULTS" <<'EOF'
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

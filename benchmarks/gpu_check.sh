#!/usr/bin/env bash
# One-shot GPU verification of vlmlabel (issue 12): install what the image lacks from wheels (no network), run
# the test suite on CUDA, run `vlmlabel bench` for ViT-B-32 and ViT-L-14 in bf16 on raw HDF5, JPEG HDF5 and
# LeRobot video (model-only, end to end, naive script), then `vlmlabel bench --scorer vlm` on a random-weight
# judge of Qwen3-VL-2B's full size in bf16 (benchmarks/full_size_vlm.py; end to end, model alone, naive generate
# loop), and write OUT/gpu_check.json and OUT/gpu_check.md (card, driver, torch/open_clip versions, every
# command). Meant to finish in under 10 minutes on one GPU.
#
#   benchmarks/gpu_check.sh [--wheels DIR] [--out DIR] [--dry-run]
#
# --wheels DIR  wheels made by benchmarks/build_wheels.sh (default: wheels/ when it exists; none with --dry-run),
#               installed with pip --no-index into a private folder put on PYTHONPATH (the image stays as it is)
# --out DIR     where the JSON, the table, pytest's log and the bench logs go (default: $OUT, else gpu-check/)
# --dry-run     on a CPU-only machine: the GPU tests only (they skip), tiny model, tiny data; checks that
#               this script still works (tests/test_gpu_check.py runs it)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
command="benchmarks/gpu_check.sh $*"
wheels=""
out=${OUT:-gpu-check}
dry_run=""
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) wheels=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --dry-run) dry_run=--dry-run; shift ;;
    *) echo "gpu_check: unknown argument $1 (use --wheels DIR, --out DIR, --dry-run)" >&2; exit 2 ;;
  esac
done
[ -z "$wheels" ] && [ -z "$dry_run" ] && [ -d wheels ] && wheels=wheels  # the dry run installs only if asked
mkdir -p "$out"
out=$(cd "$out" && pwd)
start=$(date +%s)
note() { echo "gpu_check: [$(( $(date +%s) - start ))s] $*"; }

# 1. What the image lacks, from the wheels; vlmlabel itself from this checkout (also as the `vlmlabel` command).
site=$(mktemp -d /tmp/vlmlabel-site.XXXXXX)
trap 'rm -rf "$site"' EXIT  # the installed wheels: nothing left behind
if [ -n "$wheels" ]; then
  note "installing $(ls "$wheels"/*.whl | wc -l) wheels from $wheels into $site"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
    "$wheels"/*.whl
fi
export PYTHONPATH="$root:$site${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$site/bin"
printf '#!/bin/sh\nexec python3 -m vlmlabel "$@"\n' > "$site/bin/vlmlabel"
chmod +x "$site/bin/vlmlabel"
export PATH="$site/bin:$PATH" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
python3 -c "import open_clip, ftfy, datasets, av, simplejpeg, h5py, typer, vlmlabel" || {
  echo "gpu_check: a package vlmlabel needs is missing; add it to benchmarks/build_wheels.sh" >&2; exit 1; }
if [ -z "$dry_run" ]; then
  python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: no CUDA GPU visible')"
fi
nvidia-smi || true

# 2. The test suite with the GPU visible (the dry run: the GPU tests alone, which skip on a CPU).
pytest_args=(-q -p no:cacheprovider --junitxml "$out/pytest.xml")
if [ -n "$dry_run" ]; then
  pytest_args+=(tests/test_gpu.py)
elif python3 -c "import xdist" 2>/dev/null; then
  pytest_args+=(-n 8 --dist loadfile)
fi
pytest_command="python3 -m pytest ${pytest_args[*]}"
note "$pytest_command"
set +e
python3 -m pytest "${pytest_args[@]}" 2>&1 | tee "$out/pytest.log" | tail -n 25
tests_status=${PIPESTATUS[0]}
set -e
note "tests finished with exit status $tests_status"

# 3. The benchmarks, the JSON and the table.
set +e
python3 benchmarks/gpu_check.py --out "$out" --junit "$out/pytest.xml" --pytest-command "$pytest_command" \
  --command "$command" $dry_run
bench_status=$?
set -e
rm -rf "$out/data" "$site"
note "done: $out/gpu_check.json, $out/gpu_check.md"
[ "$tests_status" -eq 0 ] && [ "$bench_status" -eq 0 ]

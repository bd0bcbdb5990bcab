#!/usr/bin/env bash
# Run the client checks against one vlmlabel source.
#   tools/clients/run_all.sh                 # the working tree of this repository
#   tools/clients/run_all.sh --rev a44db9f   # a committed revision (git archive into a temporary folder, read-only)
#   tools/clients/run_all.sh --src DIR       # any source tree holding vlmlabel/
#   CHECKS="minari d3rlpy" tools/clients/run_all.sh    # a subset (default: minari d3rlpy lerobot lerobot_rabc datasets)
# Results: tools/clients/results/<client>.json (CLIENTS_RESULTS overrides). Exit 1 if any check failed.
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
VENVS=${VENVS:-/work/venvs}
SRC="$REPO"
SNAP=""
while [ $# -gt 0 ]; do
  case "$1" in
    --rev) SNAP=$(mktemp -d /tmp/vlmlabel-src-XXXXXX)
           git -C "$REPO" archive "$2" | tar -x -C "$SNAP" || exit 2
           echo "$(git -C "$REPO" log -1 --format='%h %s' "$2" | cut -c1-150)" > "$SNAP/SNAPSHOT_COMMIT"
           SRC="$SNAP"; shift 2 ;;
    --src) SRC=$(cd "$2" && pwd); shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
export VLMLABEL_SRC="$SRC"
export CLIENTS_RESULTS=${CLIENTS_RESULTS:-$HERE/results}
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
status=0
for check in ${CHECKS:-minari d3rlpy lerobot lerobot_rabc datasets}; do
  case "$check" in
    lerobot|lerobot_rabc|datasets) py="$VENVS/lerobot312/bin/python" ;;
    *)       py="$VENVS/clients311/bin/python" ;;
  esac
  echo "===== $check ($py, vlmlabel from $SRC)"
  "$py" "$HERE/check_$check.py" || status=1
done
echo "===== summary"
for check in ${CHECKS:-minari d3rlpy lerobot lerobot_rabc datasets}; do
  python3 - "$CLIENTS_RESULTS/$check.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"{r['client']:8s} passed {r['passed']:3d}  failed {r['failed']:2d}  vlmlabel {r['info']['vlmlabel'].get('commit', '?')[:60]}")
for x in r["results"]:
    if x["status"] == "FAIL":
        print(f"   FAIL {x['check']}: {x['detail'][:300]}")
PY
done
[ -n "$SNAP" ] && rm -rf "$SNAP"
exit $status

#!/usr/bin/env bash
# Commit a bench's run files as they land, one commit per run, so a grid that takes hours survives the session:
#   bash benchmarks/commit_runs.sh benchmarks/results/validation &
# Run from the repository root; it commits only the run files and the generated pages they change (README.md and
# docs/, rebuilt by benchmarks/report.py, so a committed run never leaves a stale page behind; other staged work, and
# a page with edits of its own before the rebuild, is left alone) and stops when the file STOP appears in the bench
# directory (or when killed).
set -u
dir="$1"
while [ ! -e "$dir/STOP" ]; do
  for f in $(git ls-files --others --exclude-standard -- "$dir/runs" | grep '\.json$'); do
    msg=$(python3 - "$f" <<'PY'
import json, sys
path = sys.argv[1]
r = json.load(open(path))
h = r.get("headline", {})
acc = h.get("accuracy")
name = path.split("/runs/", 1)[1].removesuffix(".json")
print(f"bench: {name}: harmful {h.get('harmful_score', float('nan')):.1f}, acc "
      f"{'n/a' if acc is None else format(acc, '.1f')}, over-refusal {h.get('over_refusal', float('nan')):.1f}")
PY
)
    for _ in 1 2 3 4 5; do  # retried: another git command may hold the index for a moment
      git add -- "$f" 2>/dev/null && git commit -q -m "$msg" --only -- "$f" 2>/dev/null && break
      sleep 3
    done
    landed=1
  done
  if [ "${landed:-0}" = 1 ]; then
    landed=0
    edited=$(git diff --name-only -- README.md docs)  # someone's work in progress: never swept into this commit
    if .venv/bin/python benchmarks/report.py >/dev/null; then
      pages=$(git diff --name-only -- README.md docs | grep -v -x -F "${edited:-/}")
      [ -n "$pages" ] && git commit -q -m "docs: regenerated from the runs that landed" --only -- $pages
    fi
  fi
  sleep 60
done

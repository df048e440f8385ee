#!/usr/bin/env bash
# Records what the eap binary writes for a fixed set of commands, so that a refactoring can be
# checked to change no result (scripts/compare_outputs.py compares two recordings).
#
#   scripts/record_outputs.sh BINARY OUT_DIR
#
# Covers: `eap attribute` on every committed fixture model (EAP, EAP-IG, clean-corrupted; zero,
# mean and mean-positional ablation), `eap circuit` and `eap evaluate` on one of them, `eap acdc`
# on every planted model (single τ with its step log, a sweep, the hybrid) and on fixture models
# (the incremental ACDC state on real architectures), and `eap` with no arguments.
# Wall times are recorded too; the comparison ignores them.
set -euo pipefail
bin=$(realpath "$1")
out=$2
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
out=$(realpath "$out")
fixtures="$root/tests/fixtures/models"

# Token-id datasets that fit every fixture (ids below 50, the smallest output vocabulary):
# 5 examples of 7 tokens, one of 5 tokens (two chunks of different lengths); data-equal.jsonl
# holds the first five (mean-positional ablation needs equal lengths).
data="$out/data.jsonl"
equal="$out/data-equal.jsonl"
python3 - "$data" "$equal" <<'EOF'
import json, sys
rows = []
for i in range(6):
    n = 7 if i < 5 else 5
    clean = [(i * 7 + 3 * p + 1) % 50 for p in range(n)]
    corrupted = list(clean)
    corrupted[1] = (corrupted[1] + 11) % 50
    corrupted[3] = (corrupted[3] + 23) % 50
    rows.append({"clean": clean, "corrupted": corrupted,
                 "answer": (i * 5 + 2) % 50, "wrong": (i * 5 + 9) % 50})
with open(sys.argv[1], "w") as f:
    for r in rows:
        f.write(json.dumps(r) + "\n")
with open(sys.argv[2], "w") as f:
    for r in rows[:5]:
        f.write(json.dumps(r) + "\n")
EOF

run() { # name, then the command's arguments
    local name=$1
    shift
    (cd "$out" && "$bin" "$@" >"$out/$name.stdout" 2>"$out/$name.stderr") || {
        echo "FAILED: $name: $*" >&2
        cat "$out/$name.stderr" >&2
        exit 1
    }
}

for dir in "$fixtures"/*/; do
    m=$(basename "$dir")
    run "attr-$m-eap" attribute --model "$dir" --data "$data" --out "attr-$m-eap.json" --batch-size 2 --json
    run "attr-$m-ig" attribute --model "$dir" --data "$data" --method eap-ig --ig-steps 3 --out "attr-$m-ig.json" --json
    run "attr-$m-cc" attribute --model "$dir" --data "$data" --method clean-corrupted --out "attr-$m-cc.json" --json
    run "attr-$m-zero" attribute --model "$dir" --data "$data" --ablation zero --metric kl --out "attr-$m-zero.json" --json
    run "attr-$m-mean" attribute --model "$dir" --data "$data" --ablation mean --metric prob-diff --out "attr-$m-mean.json" --json
    run "acdc-$m" acdc --model "$dir" --data "$data" --threshold 0.002 --metric kl --batch-size 2 --out "acdc-$m.json" --no-progress
done
m=gpt2_hf
run "circuit-$m" circuit --scores "attr-$m-eap.json" --top-n 30 --out "circuit-$m.json" --dot "circuit-$m.dot"
run "evaluate-$m" evaluate --model "$fixtures/$m" --data "$data" --circuit "circuit-$m.json" --json
run "evaluate-$m-meanpos" evaluate --model "$fixtures/$m" --data "$equal" --circuit "circuit-$m.json" --ablation mean-positional --json
run "attr-$m-meanpos" attribute --model "$fixtures/$m" --data "$equal" --ablation mean-positional --out "attr-$m-meanpos.json" --json

for p in induction greater-than weighted-vote; do
    run "acdc-planted-$p" acdc --planted "$p" --threshold 0.5 --metric logit-diff --out "acdc-planted-$p.json" --no-progress
    run "acdc-planted-$p-kl" acdc --planted "$p" --threshold 0.01 --out "acdc-planted-$p-kl.json" --no-progress
    run "hybrid-planted-$p" acdc --planted "$p" --threshold 0.5 --metric logit-diff --prune-with eap --keep 20 --out "hybrid-planted-$p.json" --no-progress
    run "sweep-planted-$p" acdc --planted "$p" --thresholds 0.01,0.1,1 --metric logit-diff --out "sweep-planted-$p.json" --no-progress
done
run main-job
echo "recorded $(ls "$out" | wc -l) files in $out"

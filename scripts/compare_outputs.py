#!/usr/bin/env python3
"""Compares two recordings of scripts/record_outputs.sh (standard library only).

    python3 scripts/compare_outputs.py BEFORE_DIR AFTER_DIR [--rtol 1e-6]

JSON and JSONL files are compared value by value: numbers must agree to `rtol` relative to the
largest magnitude among the numbers of the same array (a float-summation difference), every
other value exactly. Wall times, rates and paths are ignored. Text files (DOT, stdout) are
compared line by line with the numbers in them held to the same tolerance, lines that report
wall times skipped. Prints each difference and exits 1 if there is any, 0 otherwise.
"""

import json
import math
import re
import sys
from pathlib import Path

IGNORED_KEYS = {"seconds", "passes_per_second", "build_seconds", "model", "command", "elapsed"}
# ACDC checkpoints record the run's identity since issue 13 (format version 2): their
# fingerprint and version differ from older recordings by design; the mask, scores, metrics and
# counts are still compared.
CHECKPOINT_KEYS = {"fingerprint", "version"}
TIME_LINE = re.compile(r"(\d+(\.\d+)? ?(s|ms)\b)|passes/s|total .* s$|built in")
NUMBER = re.compile(r"[-+]?\d+\.?\d*(?:[eE][-+]?\d+)?")


def close(a, b, scale, rtol):
    if a == b:
        return True
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return abs(a - b) <= rtol * max(scale, abs(a), abs(b), 1e-30)


def compare(a, b, path, rtol, diffs, scale=0.0):
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            diffs.append(f"{path}: keys differ: {sorted(set(a) ^ set(b))[:10]}")
        # Scores of one file share one scale: the largest |score| in that object.
        nums = [abs(v) for v in a.values() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        nested = [abs(v.get("score")) for v in a.values()
                  if isinstance(v, dict) and isinstance(v.get("score"), (int, float))]
        local = max(nums + nested + [scale])
        for k in sorted(set(a) & set(b)):
            if k in IGNORED_KEYS:
                continue
            compare(a[k], b[k], f"{path}.{k}", rtol, diffs, local)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            diffs.append(f"{path}: lengths {len(a)} vs {len(b)}")
            return
        nums = [abs(v) for v in a if isinstance(v, (int, float)) and not isinstance(v, bool)]
        local = max(nums + [scale])
        for i, (x, y) in enumerate(zip(a, b)):
            compare(x, y, f"{path}[{i}]", rtol, diffs, local)
    elif isinstance(a, bool) or isinstance(b, bool) or isinstance(a, str) or a is None:
        if a != b:
            diffs.append(f"{path}: {a!r} vs {b!r}")
    elif isinstance(a, (int, float)) and isinstance(b, (int, float)):
        if not close(float(a), float(b), scale, rtol):
            diffs.append(f"{path}: {a!r} vs {b!r}")
    elif a != b:
        diffs.append(f"{path}: {a!r} vs {b!r}")


def compare_text(a, b, name, rtol, diffs):
    la = [l for l in a.splitlines() if not TIME_LINE.search(l)]
    lb = [l for l in b.splitlines() if not TIME_LINE.search(l)]
    if len(la) != len(lb):
        diffs.append(f"{name}: {len(la)} vs {len(lb)} lines")
        return
    for i, (x, y) in enumerate(zip(la, lb)):
        if x == y:
            continue
        nx, ny = NUMBER.findall(x), NUMBER.findall(y)
        if NUMBER.sub("#", x) != NUMBER.sub("#", y) or len(nx) != len(ny) or not all(
                close(float(p), float(q), 0.0, max(rtol, 1e-4)) for p, q in zip(nx, ny)):
            diffs.append(f"{name}:{i + 1}: {x!r} vs {y!r}")


def main():
    args = sys.argv[1:]
    rtol = 1e-6
    if "--rtol" in args:
        i = args.index("--rtol")
        rtol = float(args[i + 1])
        del args[i:i + 2]
    before, after = Path(args[0]), Path(args[1])
    diffs = []
    files = sorted(p.relative_to(before) for p in before.rglob("*") if p.is_file() and p.name != "DONE")
    other = sorted(p.relative_to(after) for p in after.rglob("*") if p.is_file() and p.name != "DONE")
    for missing in sorted(set(files) ^ set(other)):
        diffs.append(f"{missing}: only in one recording")
    compared = 0
    for rel in files:
        if not (after / rel).exists() or rel.suffix in {".stderr", ".html", ".svg"}:
            continue
        a, b = (before / rel).read_text(), (after / rel).read_text()
        compared += 1
        if rel.suffix == ".json":
            ja, jb = json.loads(a), json.loads(b)
            if rel.name.endswith(".acdc-checkpoint.json"):
                for key in CHECKPOINT_KEYS:
                    ja.pop(key, None)
                    jb.pop(key, None)
            compare(ja, jb, str(rel), rtol, diffs)
        elif rel.suffix == ".jsonl":
            la, lb = a.splitlines(), b.splitlines()
            if len(la) != len(lb):
                diffs.append(f"{rel}: {len(la)} vs {len(lb)} lines")
            for i, (x, y) in enumerate(zip(la, lb)):
                compare(json.loads(x), json.loads(y), f"{rel}:{i + 1}", rtol, diffs)
        else:
            try:  # `--json` output is JSON on stdout
                ja, jb = json.loads(a), json.loads(b)
            except ValueError:
                compare_text(a, b, str(rel), rtol, diffs)
            else:
                compare(ja, jb, str(rel), rtol, diffs)
    for d in diffs[:200]:
        print(d)
    print(f"{compared} files compared, {len(diffs)} differences")
    sys.exit(1 if diffs else 0)


if __name__ == "__main__":
    main()

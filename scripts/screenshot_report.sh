#!/usr/bin/env bash
# Renders an eap HTML report to a PNG with headless Chromium, to check by eye that every
# picture shows and reads well.
#
#   scripts/screenshot_report.sh REPORT.html OUT.png [WIDTH,HEIGHT]
#
# Needs Chromium (Debian: apt-get install -y chromium). A demo report with all four pictures
# on made-up data comes from:
#   cargo test --release --lib report::tests::write_demo_report -- --ignored
# which writes /tmp/eap_demo_report.html (or $EAP_DEMO_REPORT).
set -euo pipefail

if [[ $# -lt 2 || $# -gt 3 ]]; then
    echo "usage: $0 REPORT.html OUT.png [WIDTH,HEIGHT]" >&2
    exit 2
fi
report=$1
out=$2
size=${3:-1200,3000}

if [[ ! -f $report ]]; then
    echo "$0: $report: no such file" >&2
    exit 1
fi
browser=""
for candidate in chromium chromium-browser google-chrome; do
    if command -v "$candidate" >/dev/null 2>&1; then
        browser=$candidate
        break
    fi
done
if [[ -z $browser ]]; then
    echo "$0: no Chromium found; install it with: apt-get install -y chromium" >&2
    exit 1
fi

# Absolute paths: Chromium resolves both against its own working directory.
report_abs=$(cd "$(dirname "$report")" && pwd)/$(basename "$report")
out_dir=$(cd "$(dirname "$out")" && pwd)
out_abs=$out_dir/$(basename "$out")
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT

"$browser" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync \
    --hide-scrollbars --user-data-dir="$profile" \
    --screenshot="$out_abs" --window-size="$size" "file://$report_abs" \
    >/dev/null 2>&1

if [[ ! -s $out_abs ]]; then
    echo "$0: chromium wrote no screenshot to $out_abs" >&2
    exit 1
fi
echo "$out_abs"

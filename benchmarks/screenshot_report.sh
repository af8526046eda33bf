#!/usr/bin/env bash
# Screenshot an analyze report the way a person sees it (headless Chromium).
# usage: benchmarks/screenshot_report.sh OUTDIR/analyze.EPOCH/report.html shot.png [WIDTHxHEIGHT]
# Needs chromium (Debian: apt-get install chromium). tests/analysis/test_report_browser.py
# runs the same command on a report whose verdict is known and checks the banner's colour.
set -euo pipefail
report=$(realpath "$1"); out=$(realpath -m "$2"); size=${3:-1280x2000}
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars \
  --window-size="${size/x/,}" --screenshot="$out" "file://$report" >/dev/null 2>&1
echo "wrote $out"

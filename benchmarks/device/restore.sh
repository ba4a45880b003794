#!/bin/bash
# Here, after a `device` run: move back what benchmarks/device/stage.sh moved to /tmp/devhold (as it was, uncommitted
# changes included).
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -d /tmp/devhold ] || { echo "nothing to restore: no /tmp/devhold"; exit 0; }
(cd /tmp/devhold && find . -type f) | while read -r f; do mkdir -p "$(dirname "$f")"; mv "/tmp/devhold/$f" "$f"; done
rm -rf /tmp/devhold
git status --short

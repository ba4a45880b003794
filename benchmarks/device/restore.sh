#!/bin/bash
# Here, after a `device` run: put back what benchmarks/device/stage.sh moved out (from git) and drop /tmp/devhold.
set -euo pipefail
cd "$(dirname "$0")/../.."
git checkout -- training benchmarks/results Resources SlicerVoxelMorph/SlicerVoxelMorphLib/bundled
rm -rf /tmp/devhold
git status --short

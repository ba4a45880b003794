#!/bin/bash
# Here, before a `device` run (a lent GPU; see benchmarks/results/gpu_2026-12-04/README.md): the tree that travels is
# capped at 64 MiB and the GPU machine has no SimpleITK. This puts SimpleITK's wheel and an LPBA40 subset (atlas, S35
# and S38) in .devrun/ (ignored; name it in `carry`) and moves the tracked training checkpoints, logs and benchmark
# results out of the tree to /tmp/devhold. Undo with benchmarks/device/restore.sh right after the run.
set -euo pipefail
cd "$(dirname "$0")/../.."
data=${1:-../shared/data/LPBA40}
grep -qx "/.devrun/" .git/info/exclude || echo "/.devrun/" >> .git/info/exclude
rm -rf .devrun && mkdir -p .devrun/LPBA40/train .devrun/LPBA40/label
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .devrun SimpleITK==2.5.7
cp "$data/fixed.nii.gz" .devrun/LPBA40/
cp "$data"/label/S01.* .devrun/LPBA40/label/
for s in S35 S38; do cp "$data"/label/$s.* .devrun/LPBA40/label/; cp "$data"/train/$s.* .devrun/LPBA40/train/; done

git ls-files training benchmarks/results Resources/Screenshots SlicerVoxelMorph/SlicerVoxelMorphLib/bundled/synth.pt \
  | grep -v /COMMAND$ | while read -r f; do mkdir -p "/tmp/devhold/$(dirname "$f")"; mv "$f" "/tmp/devhold/$f"; done
tree=$( (git ls-files -z; git ls-files -z --others --exclude-standard) | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1 \
  || true)  # du names the moved files missing
extra=$(du -sb .devrun | cut -f1)
echo "travels: $(( (tree + extra) / 1048576 )) MiB of 64 (tree $((tree / 1048576)), .devrun $((extra / 1048576)))"

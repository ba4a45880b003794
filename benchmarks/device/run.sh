#!/bin/bash
# There (the GPU machine), from the repository root: `bash benchmarks/device/run.sh` with carry [".devrun"], timeout_s ~540.
# 1. the test suite with CUDA visible (per-test timeout, failures named in $OUT/pytest.log), 2. whole CLI calls on
# the GPU (benchmarks/lpba40.py, S35 and S38), 3. training throughput of training/synth_fine's recipe with one
# drawing thread and with 8 drawing processes (`wait` column of $OUT/train_*.csv).
cd "$(dirname "$0")/../.." || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir .devrun/*.whl || exit 1
export PYTHONPATH=$PWD/SlicerVoxelMorph PYTHONUNBUFFERED=1
nvidia-smi -L
echo "== pytest $(date +%T)"
# 8 workers of 2 threads (16 x 16 threads oversubscribed the cores in the first try); stage.sh leaves synth.pt
# behind and nibabel is not there: the tests that need them are left out
OMP_NUM_THREADS=2 ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=2 timeout 230 python3 -m pytest -q -n 8 -p no:cacheprovider \
  -p no:benchmark --timeout 90 --tb=short -rf --continue-on-collection-errors --ignore Testing/test_geometry.py \
  --deselect Testing/test_slicer_module.py::test_every_bundled_file_is_installed_by_cmake_and_by_pip \
  -k "not nibabel and not freesurfer" Testing > "$OUT/pytest.log" 2>&1
grep -E "^FAILED|^ERROR|passed|failed" "$OUT/pytest.log" | tail -15
echo "== lpba40 timing $(date +%T)"
timeout 120 python3 benchmarks/lpba40.py --data .devrun/LPBA40 --subjects S35,S38 --skip-ants --repeats 2 \
  --threads 16 --out /tmp/bench > /dev/null 2>&1
cp /tmp/bench/results.md "$OUT/lpba40_gpu.md" && sed -n 5,12p /tmp/bench/results.md
D=.devrun/LPBA40
for workers in 0 8; do
  echo "== training, --workers $workers $(date +%T)"
  timeout 80 python3 -m SlicerVoxelMorphLib.cli train --images $D/train --labels $D/label \
    --atlas $D/fixed.nii.gz --atlas-labels $D/label/S01.delineation.structure.label.nii.gz --val-subjects S38 \
    --init-model SlicerVoxelMorph/SlicerVoxelMorphLib/bundled/synth_cascade.pt --residual-stage --fine-stage \
    --synth-fraction 0.7 --known-fraction 0.3 --field-weight 0.1 --csf-expansion 0.5 --tissue-weight 1 \
    --iterations 150 --lr 1e-4 --val-every 1000 --checkpoint-every 1000 --threads 16 --seed 23 --device cuda \
    --workers $workers --quiet --out /tmp/train$workers > /dev/null 2>&1
  cp /tmp/train$workers/log.csv "$OUT/train_workers$workers.csv" 2>/dev/null
  awk -F, 'NR > 51 {w += $3; n++} END {if (n) printf "steps %s s in all; mean wait %.3f s over the last %d\n", $2, w / n, n}' \
    /tmp/train$workers/log.csv
done
date +%T

#!/usr/bin/env bash
# The GPU benchmark, for a machine with JAX and/or PyTorch on its GPU but no TensorFlow (and no network).
# From the repository root, with Keras and its pure-Python needs carried as wheels in .whl/ if missing there:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#       keras==3.15.1 namex optree ml-dtypes rich absl-py h5py markdown-it-py mdurl pygments
#   bash benchmarks/gpu.sh            # writes benchmarks/results/gpu.json and the README table
set -euo pipefail
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD"
fi
backends=$(python3 -c "import importlib.util as u; print(','.join(b for b in ('jax', 'torch') if u.find_spec(b)))")
python3 -m benchmarks.run --skip-features --backends "$backends" --precisions float32,mixed_bfloat16 --layouts grouped,copies \
    --fused "${FUSED:-8}" --steps "${STEPS:-50}" --label gpu "$@"

#!/usr/bin/env bash
# The GPU benchmark, for a machine with JAX and/or PyTorch on its GPU but no TensorFlow, librosa or soundfile
# (and no network). Keras and its needs that such a machine lacks travel as wheels in .whl/ (ignored by git):
# keras, namex and optree; absl-py, h5py, ml-dtypes, rich, packaging, numpy and typing-extensions (optree's) are
# there already, and carrying another version of them would shadow the machine's (jax uses ml-dtypes). Carry
# one too only if the `import keras` check below says so.
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#       --platform manylinux2014_x86_64 -d .whl keras==3.15.1 namex optree
# Then, from the repository root:
#   bash benchmarks/gpu.sh                     # writes benchmarks/results/gpu.json and the README table
#   STEPS=30 FUSED=8 LIMIT=540 LAYOUTS=grouped,copies bash benchmarks/gpu.sh --backends torch --models maic
# Every measurement is saved as it is made, and the whole run stops after LIMIT seconds (a device session's
# command has 10 minutes), keeping what it measured; the results files are copied to $OUT where it is set.
set -euo pipefail
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD"
fi
# PyTorch first: its measurements need no compilation, so they finish first when LIMIT cuts the run short.
backends=$(python3 -c "import importlib.util as u; print(','.join(b for b in ('torch', 'jax') if u.find_spec(b)))")
if ! KERAS_BACKEND="${backends%%,*}" python3 -c "import keras" 2>/tmp/keras-import.log; then
    tail -3 /tmp/keras-import.log
    echo "Keras cannot be imported: carry it and the missing package above as wheels in .whl/ (see this script's header)" >&2
    exit 1
fi
status=0
timeout "${LIMIT:-540}" python3 -m benchmarks.run --skip-features --skip-pipeline --skip-ray --backends "$backends" \
    --precisions float32,mixed_bfloat16 --layouts "${LAYOUTS:-grouped}" --fused "${FUSED:-8}" --steps "${STEPS:-30}" \
    --label gpu "$@" || status=$?
if [ -n "${OUT:-}" ]; then  # first: what was measured comes back whatever happens next
    cp benchmarks/results/*.json "$OUT"/
fi
# The README's tables from what was measured, also after a time-out (or at home: python -m benchmarks.run --table-only)
python3 -m benchmarks.run --table-only || status=$?
exit "$status"

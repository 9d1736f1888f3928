#!/usr/bin/env bash
# The prepared GPU suite (benchmarks/gpu_suite.py) on a bare GPU machine, results into $OUT.
#
# The H200 image has torch, triton, peft, accelerate, matplotlib, nvidia-ml-py, but not
# diffusers, deepspeed or bitsandbytes. Carry them as wheels in .whl/ (see the device
# README), built or downloaded on the development machine, for example:
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
#       diffusers==0.42.1 importlib_metadata hjson pydantic pydantic_core annotated_types typing_inspection
#   DS_BUILD_OPS=0 python -m pip wheel --no-deps --no-build-isolation -w .whl deepspeed==0.19.8   # sdist only
#   (bitsandbytes is optional: without it the memory part uses AdamW and says so)
# Then:  bash benchmarks/gpu_suite.sh            (extra arguments go to gpu_suite.py)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# apo_fast itself: an editable install maps kernels/ to apo_fast.kernels; gpu_suite.py maps it
# by hand when this fails (no network or no setuptools).
$PY -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1 || true
for mod in torch triton diffusers peft deepspeed; do
  $PY -c "import $mod" 2>/dev/null || echo "gpu_suite.sh: python module '$mod' is missing; the parts that need it will fail" >&2
done
OUT_DIR=${OUT:-runs/gpu_suite}
# The suite keeps itself inside --budget-s (440 s by default); this is only a backstop.
exec timeout 560 $PY benchmarks/gpu_suite.py --out "$OUT_DIR" "$@"

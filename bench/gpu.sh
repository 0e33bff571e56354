#!/usr/bin/env bash
# The GPU check of skipdiff's training loop and of one search trial of each kind: one GPU, under 12 minutes.
#
#   bash bench/gpu.sh                      # on a machine with a GPU and skipdiff's dependencies
#
# Runs bench/gpu_throughput.py (images/s of our loop, a diffusers-examples loop and the bare step, at 32x32
# RGB and 64x64x4 latents, fp32 / bf16 / bf16 + torch.compile) and writes its JSON, stamped with the date
# and the device name, to bench/results/gpu-<date>-<device>.json (commit that file).
#
# A machine without internet (the lent H200 has torch, accelerate and transformers but not diffusers,
# datasets or torch-fidelity) needs those as wheels in .whl/ first; on a machine with pip access run
#   bash bench/gpu.sh --download-wheels     # fills .whl/ for Python 3.12, manylinux x86-64
# and carry .whl/ along; this script installs them into /tmp/site when diffusers is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if [[ "${1:-}" == "--download-wheels" ]]; then
    mkdir -p .whl
    for spec in "diffusers==0.42.1" "datasets==5.2.0" "torch-fidelity==0.4.0" "dill" "multiprocess" \
                "optuna==5.1.0" "sqlalchemy" "alembic" "colorlog" "Mako" "greenlet"; do
        $PYTHON -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            --platform any -d .whl "$spec"
    done
    exit 0
fi

if ! $PYTHON -c "import diffusers, datasets, torch_fidelity" 2>/dev/null; then
    [[ -d .whl ]] || { echo "diffusers/datasets/torch-fidelity missing and no .whl/ (see the header)" >&2; exit 2; }
    $PYTHON -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"  # skipdiff from this checkout

device=$($PYTHON -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')" | tr ' /' '__')
mkdir -p bench/results
out="bench/results/gpu-$(date +%Y-%m-%d)-${device}.json"
timeout 470 $PYTHON bench/gpu_throughput.py "$@" > "$out.tmp"
mv "$out.tmp" "$out"
cat "$out"
echo "wrote $out" >&2
# One search trial of each kind (bench/search_trial.py): what a trial costs on this GPU.
search_out="bench/results/gpu-search-$(date +%Y-%m-%d)-${device}.json"
if timeout 240 $PYTHON bench/search_trial.py > "$search_out.tmp"; then mv "$search_out.tmp" "$search_out"; cat "$search_out"; fi

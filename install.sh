#!/usr/bin/env bash
# Set up hyperopt_torch with its recipes, benchmarks and tests on a fresh machine.
#
# torch is installed first and pinned to 2.13.0, so an installed torch 2.13.0
# (CPU or CUDA build) is kept rather than replaced by another release.  The pin
# does not choose the build: where no torch is installed, pip's default index
# gives the CUDA build (several GB of wheels).  On a CPU-only machine install
# the CPU build first, then run this script:
#   python -m pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
# torchvision 0.28.0 is the release paired with torch 2.13.0; --no-deps stops it
# from replacing that torch.
set -euo pipefail
cd "$(dirname "$0")"
PIP=(python -m pip install --disable-pip-version-check --no-input)

"${PIP[@]}" torch==2.13.0 numpy
"${PIP[@]}" --no-deps torchvision==0.28.0
"${PIP[@]}" pillow tqdm matplotlib pytest
"${PIP[@]}" -e .
python -c "import torch, hyperopt_torch; print('hyperopt_torch', hyperopt_torch.__version__, 'on torch', torch.__version__)"

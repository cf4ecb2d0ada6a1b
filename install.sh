#!/usr/bin/env bash
# Set up hyperopt_torch with its recipes, benchmarks and tests on a fresh machine.
#
# torch is installed first and pinned: a bare "torch" requirement (or a range
# admitting newer releases) pulls several GB of CUDA wheels on a machine that
# has no torch yet.  torchvision 0.28.0 is the release paired with torch 2.13.0;
# --no-deps stops it from replacing that torch.
set -euo pipefail
cd "$(dirname "$0")"
PIP=(python -m pip install --disable-pip-version-check --no-input)

"${PIP[@]}" torch==2.13.0 numpy
"${PIP[@]}" --no-deps torchvision==0.28.0
"${PIP[@]}" pillow tqdm matplotlib pytest
"${PIP[@]}" -e .
python -c "import torch, hyperopt_torch; print('hyperopt_torch', hyperopt_torch.__version__, 'on torch', torch.__version__)"

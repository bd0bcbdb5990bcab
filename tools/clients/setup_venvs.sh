#!/usr/bin/env bash
# Build the two verification venvs the client checks run in. Never installs into the project interpreter.
#   clients311: Python 3.11 with --system-site-packages (sees the project's torch, h5py, open_clip), + minari[create], d3rlpy
#   lerobot312: Python 3.12 (LeRobot needs >= 3.12), + lerobot[dataset] (pulls its own torch from PyPI)
# Pip's cap in /etc/xdg/pip (torch<=2.14.1) is respected, not removed.
set -euo pipefail
VENVS=${VENVS:-/work/venvs}
PY311=${PY311:-/root/.pyenv/versions/3.11.7/bin/python}
PY312=${PY312:-/root/.pyenv/versions/3.12.1/bin/python}
mkdir -p "$VENVS"
if [ ! -x "$VENVS/clients311/bin/python" ]; then
  "$PY311" -m venv --system-site-packages "$VENVS/clients311"
fi
# d3rlpy 2.8.1 pins gymnasium==1.0.0: it is installed inside the venv and shadows the project's gymnasium there only.
"$VENVS/clients311/bin/pip" install "minari[create]" d3rlpy
if [ ! -x "$VENVS/lerobot312/bin/python" ]; then
  "$PY312" -m venv "$VENVS/lerobot312"
fi
"$VENVS/lerobot312/bin/pip" install --upgrade pip
"$VENVS/lerobot312/bin/pip" install "lerobot[dataset]"
"$VENVS/clients311/bin/pip" list 2>/dev/null | grep -iE '^(minari|d3rlpy|gymnasium|torch|h5py|numpy) '
"$VENVS/lerobot312/bin/pip" list 2>/dev/null | grep -iE '^(lerobot|torch|datasets|pyarrow|av|numpy|torchcodec) '

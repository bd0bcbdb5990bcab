#!/usr/bin/env bash
# Download, here (where PyPI is reachable), the wheels that benchmarks/gpu_check.sh installs on a GPU machine
# without network: what vlmlabel and its tests need beyond a PyTorch image (torch, torchvision, numpy, h5py,
# pyarrow, pandas, matplotlib, timm, huggingface-hub, safetensors, typer, rich, pytest are expected there).
#
#   benchmarks/build_wheels.sh [DIR] [PYTHON_VERSION]      # default: wheels/ for CPython 3.12, manylinux x86-64
#
# The versions are those this repository is tested with. Each is fetched with --no-deps: the list names every
# package the image lacks. To carry a package the image has in an unsuitable version (e.g. pyarrow < 24 for
# datasets 5), add it to PACKAGES; keep the folder well under 64 MiB (av is the largest, ~35 MiB).
set -euo pipefail
dir=${1:-wheels}
python_version=${2:-3.12}
PACKAGES=(
  open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.7.0          # open_clip and its text cleaner
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19          # Hugging Face datasets and what it pins
  av==18.1.0                                                 # LeRobot video decoding
  simplejpeg==1.9.0                                          # JPEG decoding on the CPU
  gymnasium==1.4.0 farama-notifications==0.0.6               # tests/test_gym.py
  transformers==5.25.0 tokenizers==0.23.3 regex==2026.5.9    # the VLM judge (vlmlabel[vlm]) and its bench
)
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1; do
  platforms+=(--platform "${tag}_x86_64")
done
mkdir -p "$dir"
python3 -m pip download --no-deps --only-binary=:all: --python-version "$python_version" --implementation cp \
  "${platforms[@]}" -d "$dir" "${PACKAGES[@]}"
du -ch "$dir"/*.whl | tail -1

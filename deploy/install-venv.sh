#!/bin/sh
# Installs the service from its wheel into a fresh virtual environment, exactly as the Docker
# image does (and as tests/deploy/test_wheel_install.py does): serving dependencies only, no
# torch, no training code.
#   deploy/install-venv.sh VENV WHEEL cpu|gpu CONSTRAINTS
# gpu: onnxruntime-gpu with CUDA 13 and cuDNN 9 from pip (the nvidia-* wheels);
# cpu: the small CPU-only onnxruntime of the same version in its place.
# CONSTRAINTS: the project's constraints.txt, so the image gets the versions the tests passed with.
set -eu
venv="$1"
wheel="$2"
flavour="$3"
constraints="$4"
python3 -m venv "$venv"
pip="$venv/bin/pip"
case "$flavour" in
  gpu) "$pip" install --no-cache-dir --disable-pip-version-check -c "$constraints" "${wheel}[cuda]" ;;
  cpu)
    "$pip" install --no-cache-dir --disable-pip-version-check -c "$constraints" "$wheel"
    if "$venv/bin/python" -c "import importlib.metadata as m; m.version('onnxruntime-gpu')" 2>/dev/null; then
      version=$("$venv/bin/python" -c "import importlib.metadata as m; print(m.version('onnxruntime-gpu'))")
      "$pip" uninstall --yes --disable-pip-version-check onnxruntime-gpu
      "$pip" install --no-cache-dir --disable-pip-version-check "onnxruntime==$version"
    fi
    ;;
  *) echo "flavour must be cpu or gpu, not $flavour" >&2; exit 2 ;;
esac
# The distribution also carries the training package; serving never imports it.
rm -rf "$venv"/lib/python*/site-packages/training
find "$venv" -name '__pycache__' -type d -prune -exec rm -rf {} +

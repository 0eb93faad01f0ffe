#!/usr/bin/env bash
# Install everything timm-dbp needs on a fresh Debian machine: Fashion-MNIST (Debian package), the pinned
# torch / torchvision / timm / codecarbon of constraints.txt, and this package (editable) with its test, examples
# bench and energy extras.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq dataset-fashion-mnist
fi
python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[test,examples,bench,energy]'

#!/usr/bin/env bash
# Fashion-MNIST for `hmd bench table5` / the `fashion-mnist:DIR` source, from Debian's
# dataset-fashion-mnist package (the four standard idx files, gzipped). Cached: does nothing when
# the files are already there. Prints the folder to pass as fashion-mnist:DIR.
set -euo pipefail
DIR=/usr/share/datasets/fashion-mnist
have() {
  for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
    [ -f "$DIR/$f.gz" ] || [ -f "$DIR/$f" ] || return 1
  done
}
if ! have; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get install -y dataset-fashion-mnist >&2 || { $SUDO apt-get update >&2 && $SUDO apt-get install -y dataset-fashion-mnist >&2; }
  # where the package put them (the path above on Debian/Ubuntu today)
  DIR=$(dirname "$(dpkg -L dataset-fashion-mnist | grep -m1 'train-images-idx3-ubyte')")
  have || { echo "dataset-fashion-mnist installed, but no idx files found in $DIR" >&2; exit 1; }
fi
echo "$DIR"

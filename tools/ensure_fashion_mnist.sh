#!/usr/bin/env bash
# Fashion-MNIST offline: Debian's package dataset-fashion-mnist installs the four IDX files under
# /usr/share/datasets/fashion-mnist/, where nc_lib.data finds them; install it where we can (root + apt-get).
DEBIAN_DIR=/usr/share/datasets/fashion-mnist
RAW_DIR="${NC_DATA_DIR:-data}/FashionMNIST/raw"
have_files() {  # $1: folder; true if it holds the four files, plain or .gz
  for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
    [ -f "$1/$f" ] || [ -f "$1/$f.gz" ] || return 1
  done
}
if have_files "$DEBIAN_DIR" || have_files "$RAW_DIR"; then exit 0; fi
if [ -n "$NC_FASHION_MNIST_DIR" ] && { have_files "$NC_FASHION_MNIST_DIR" || have_files "$NC_FASHION_MNIST_DIR/FashionMNIST/raw"; }; then exit 0; fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "Installing Debian's dataset-fashion-mnist (30 MB) ..."
  if (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) >/tmp/nc-fashion-mnist.log 2>&1; then
    exit 0
  fi
  echo "warning: apt-get could not install dataset-fashion-mnist (see /tmp/nc-fashion-mnist.log)."
fi
echo "note: Fashion-MNIST not found; run 'sudo apt-get install dataset-fashion-mnist', or put its four IDX files (.gz or plain) in $RAW_DIR/ or in a folder named by NC_FASHION_MNIST_DIR."
exit 0

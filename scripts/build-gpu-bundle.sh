#!/usr/bin/env bash
# Builds the vLLM 0.26 bundle for the GPU machine (see ../shared/gpu/README.md) plus what this
# project imports there beyond the GPU image: the text front end, voice strings and audio encoders.
# Then carry the parts one per call and run: BUNDLE_PARTS=<n> bash .gpu-bundle/device-setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.gpu-bundle/' .git/info/exclude 2>/dev/null || echo /.gpu-bundle/ >> .git/info/exclude
bash ../shared/gpu/build-vllm-bundle.sh .gpu-bundle \
  pybase16384==0.3.9 cffi pycparser wetext==0.1.8 kaldifst==1.8.3 contractions textsearch anyascii \
  pyahocorasick num2words==0.5.14 cn2an==0.5.24 av==18.1.0 soundfile==0.14.0
# Two pure-Python dependencies exist only as source distributions (no wheel for the bundle's
# --only-binary download): ship their files from this machine's environment, unpacked beside.
sp=$("${CHATTTS_VENV:-.venv}/bin/python" -c 'import docopt, os; print(os.path.dirname(docopt.__file__))')
tar cJf .gpu-bundle/extras-py.tar.xz -C "$sp" docopt.py proces

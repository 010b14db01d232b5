# Source on a bare GPU host (PyTorch only; repository root) to run the cuda flavor there: installs what it lacks.
# It changes that Python environment (numpy 1.26 in place of numpy 2, a .pth, the server): use a disposable host or venv.
export PYTHONUNBUFFERED=1
G=$PWD/.gpu  # staged by perf/gpu_host/stage.sh
SITE=$(python3 -c 'import sysconfig;print(sysconfig.get_paths()["purelib"])')
if [ ! -x "$SITE/pytriton/tritonserver/bin/tritonserver" ]; then
  tar -C "$SITE" -xJf "$G/pytriton-min.tar.xz" || echo "SETUP: pytriton unpack failed"
fi
# pytriton 0.7.0's python backend stub reads numpy arrays with the numpy 1 layout: numpy 2 outputs arrive empty
if [ ! -e "$SITE/numpy/.medseg-126" ]; then
  rm -rf "$SITE"/numpy "$SITE"/numpy-*.dist-info "$SITE"/numpy.libs && tar -C "$SITE" -xJf "$G/numpy126.tar.xz" || echo "SETUP: numpy failed"
fi
if [ ! -e /tmp/site/.done ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$G"/whl/*.whl || echo "SETUP: wheels failed"
  touch /tmp/site/.done
fi
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/clients:$PWD
M=model_repository/ct_segmenter/1
[ -e $M/model.onnx ] || xz -dc "$G/model.onnx.xz" > $M/model.onnx
[ -e $M/provenance.json ] || cp "$G/provenance.json" $M/provenance.json
mkdir -p .perf_tools/bin /tmp/gpulib
[ -x .perf_tools/bin/perf_analyzer ] || { xz -dc "$G/perf_analyzer.xz" > .perf_tools/bin/perf_analyzer; chmod +x .perf_tools/bin/perf_analyzer; }
[ -e /tmp/gpulib/libb64.so.0d ] || cp "$G/libb64.so.0d" /tmp/gpulib/
CUDART=$(ls "$SITE"/nvidia_pytriton.libs/libcudart-*.so.12* | head -1)
ln -sf "$CUDART" /tmp/gpulib/libcudart.so.12
LIBPY=$(find / -xdev -name 'libpython3.12.so.1.0' 2>/dev/null | head -1)
[ -n "$LIBPY" ] && ln -sf "$LIBPY" /tmp/gpulib/libpython3.12.so.1.0
export LD_LIBRARY_PATH=/tmp/gpulib:${LD_LIBRARY_PATH:-}
# the python backend's stubs see the venv's site-packages, not PYTHONPATH: a .pth as an editable install would
printf '%s\n' /tmp/site "$PWD/src" "$PWD/clients" "$PWD" > "$SITE/zz-medseg-gpu.pth"
# the image's scipy is built for numpy 2 and names np.long / np.ulong (numpy 1.26 has them as int_ / uint)
grep -q "medseg shim" "$SITE/numpy/__init__.py" || printf '\n# medseg shim (GPU test host only): scipy built for numpy 2 names these\nlong = int_\nulong = uint\n' >> "$SITE/numpy/__init__.py"

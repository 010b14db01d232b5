# After `source perf/gpu_host/setup.sh`: probe, the gpu tests, the server tests on the cuda flavor, the cuda bench.
# Env: GPU_T, SRV_T (pytest time limits, s), BENCH_T (bench time limit; unset: no bench); results under $OUT.
source perf/gpu_host/setup.sh
OUT=${OUT:-/tmp/medseg-gpu}; mkdir -p "$OUT"
{ nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; python3 -V; nproc
  python3 -c "import torch,grpc,google.protobuf as pb,numpy,onnxruntime;print('torch',torch.__version__,torch.cuda.is_available(),'grpc',grpc.__version__,'pb',pb.__version__,'numpy',numpy.__version__,'ort',onnxruntime.__version__)"
  echo "LIBPY=$LIBPY"; ldd "$SITE"/pytriton/tritonserver/python_backend_stubs/3.12/triton_python_backend_stub | grep -i "not found\|python"
  ldd .perf_tools/bin/perf_analyzer | grep "not found"
  python3 -c "import tritonclient.grpc, pydicom, highdicom, nibabel, monai; print('imports ok')"; } > $OUT/probe.txt 2>&1
cat $OUT/probe.txt
T0=$SECONDS
timeout ${GPU_T:-200} python3 -m pytest -p no:cacheprovider -q -rA -m gpu --basetemp=/tmp/pt1 tests/test_torch_ops.py tests/test_flavors.py tests/test_build_trt.py > $OUT/gpu-tests.txt 2>&1
echo "gpu tests rc=$? in $((SECONDS-T0)) s"; grep -E "passed|failed|error|Dice|SKIPPED|FAILED|Error" $OUT/gpu-tests.txt | tail -25
T0=$SECONDS
MEDSEG_TEST_FLAVOR=cuda timeout ${SRV_T:-200} python3 -m pytest -p no:cacheprovider -q -rA --basetemp=/tmp/pt2 tests/test_server.py > $OUT/server-tests.txt 2>&1
echo "server tests rc=$? in $((SECONDS-T0)) s"; grep -E "passed|failed|error|SKIPPED|FAILED|Error" $OUT/server-tests.txt | tail -25
tar czf $OUT/logs.tgz $(find /tmp/pt1 /tmp/pt2 -name '*.log' 2>/dev/null) 2>/dev/null
if [ -n "${BENCH_T:-}" ]; then
  T0=$SECONDS
  timeout $BENCH_T python3 -m perf.bench --flavor cuda --max-concurrency 6 --out /tmp/bench > $OUT/bench.txt 2>&1
  echo "bench rc=$? in $((SECONDS-T0)) s"; tail -c 3000 $OUT/bench.txt
  tar czf $OUT/bench.tgz -C /tmp bench 2>/dev/null
fi

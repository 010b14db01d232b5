# The whole GPU check in one device call of at most ~8 minutes, after `perf/gpu_host/stage.sh` here:
#   bash perf/gpu_host/run.sh        (on the GPU host, repository root; it sources perf/gpu_host/setup.sh)
# In order: probe, the gpu tests, the cuda bench (its report with the GPU targets table, perf_analyzer 1..16 over
# gRPC, system and CUDA shared memory, the whole command, MONAI on the same GPU), the segmenter's knobs
# (perf.segmenter_variants), the server tests on the cuda flavor. Each step has its own time limit (s):
# GPU_T, BENCH_T, VAR_T, SRV_T; results under $OUT (copy $OUT/results/<gpu>/ into perf/results/). Instances per
# GPU (1 vs 2 of every model, perf_analyzer 1..16) need a second call: BENCH_ARGS="--instances 2" BENCH_T=420.
source perf/gpu_host/setup.sh
OUT=${OUT:-/tmp/medseg-gpu}; mkdir -p "$OUT/results"
{ nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; python3 -V; nproc
  python3 -c "import torch,grpc,google.protobuf as pb,numpy,onnxruntime;print('torch',torch.__version__,torch.cuda.is_available(),'grpc',grpc.__version__,'pb',pb.__version__,'numpy',numpy.__version__,'ort',onnxruntime.__version__)"
  echo "LIBPY=$LIBPY"; ldd "$SITE"/pytriton/tritonserver/python_backend_stubs/3.12/triton_python_backend_stub | grep -i "not found\|python"
  ldd .perf_tools/bin/perf_analyzer | grep "not found"
  python3 -c "import tritonclient.grpc, pydicom, highdicom, nibabel, monai; print('imports ok')"; } > $OUT/probe.txt 2>&1
cat $OUT/probe.txt
step() {  # name, time limit, command...: run it, keep its output, print its verdict and tail
  local name=$1 limit=$2; shift 2; local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  echo "== $name rc=$? in $((SECONDS-t0)) s (limit $limit)"; grep -E "passed|failed|error|SKIPPED|FAILED|Error|met" "$OUT/$name.txt" | tail -20
}
step gpu-tests "${GPU_T:-60}" python3 -m pytest -p no:cacheprovider -q -rA -m gpu --basetemp=/tmp/pt1 \
  tests/test_torch_ops.py tests/test_flavors.py tests/test_build_trt.py
step bench "${BENCH_T:-260}" python3 -m perf.bench --flavor cuda --max-concurrency 16 --out "$OUT/results" ${BENCH_ARGS:-}
step variants "${VAR_T:-60}" python3 -m perf.segmenter_variants --budget-s 30 --out "$OUT/results"
MEDSEG_TEST_FLAVOR=cuda step server-tests "${SRV_T:-60}" python3 -m pytest -p no:cacheprovider -q -rA --basetemp=/tmp/pt2 \
  -x tests/test_server.py
tar czf $OUT/logs.tgz $(find /tmp/pt1 /tmp/pt2 -name '*.log' 2>/dev/null) 2>/dev/null
ls -R "$OUT/results" | head -30

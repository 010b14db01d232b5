# medseg: `make demo` and `make test` on a fresh machine; everything else is built on demand.
SHELL := /bin/bash
PY := .venv/bin/python
STAMP := .venv/.installed-stamp
ONNX := model_repository/ct_segmenter/1/model.onnx
WEIGHTS := export/weights/ct_liver_unet.fp16.pt export/weights/manifest.json

.PHONY: venv sysdeps perf-tools realct artifacts configs demo test test-unit test-server test-slow soak lint bench bench-node bench-full accuracy weights nnunet-fixture monai-bundle-fixture clean

# Debian tools the tests use as oracles: dciodvfy validates every DICOM object we write,
# dcmtk's dcmcjpeg makes JPEG-lossless series (no Python encoder exists), dcm2niix is the geometry oracle
# libb64 is the one system library the perf_analyzer binary needs; nginx is the tenants' gateway (tested on loopback)
# orthanc (1.10, /usr/sbin/Orthanc) is the real PACS the DICOM node's tests talk to (tests/orthanc.py)
sysdeps:
	@{ command -v dciodvfy && command -v dcmcjpeg && command -v dcm2niix && command -v nginx \
	  && { command -v Orthanc || test -x /usr/sbin/Orthanc; } \
	  && /sbin/ldconfig -p | grep -q libb64.so.0d; } >/dev/null || { if [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && apt-get install -y -qq dicom3tools dcmtk dcm2niix libb64-0d nginx-light orthanc) >/dev/null; \
	  else echo "missing: sudo apt-get install dicom3tools dcmtk dcm2niix libb64-0d nginx-light orthanc"; fi; }

# perf_analyzer: the binary inside the tritonclient 2.48.0 wheel (the newest one that runs on glibc 2.36)
PERF_ANALYZER := .perf_tools/bin/perf_analyzer
perf-tools: $(PERF_ANALYZER)
$(PERF_ANALYZER): | $(STAMP)
	rm -rf .perf_tools/wheel && mkdir -p .perf_tools/bin .perf_tools/wheel
	$(PY) -m pip download --quiet --no-deps "tritonclient==2.48.0" -d .perf_tools/wheel
	$(PY) -m zipfile -e .perf_tools/wheel/tritonclient-2.48.0-*.whl .perf_tools/wheel
	install -m 755 .perf_tools/wheel/tritonclient-2.48.0.data/data/bin/perf_analyzer $@
	rm -rf .perf_tools/wheel

# Real CT for the tests (never training data): TotalSegmentator's test reference files (a DICOM series,
# CT and MR NIfTIs with their labels), Apache-2.0 licensed (Wasserthal et al., github.com/wasserth/TotalSegmentator),
# taken from its source distribution on PyPI (sha256 pinned) into the git-ignored cache; only
# tests/reference_files/ is kept. `make realct REALCT=/some/dir` fetches it elsewhere.
REALCT ?= .cache/realct
# the tests read the real CT where it was fetched
PYTEST = MEDSEG_REALCT=$(abspath $(REALCT)) $(PY) -m pytest
REALCT_SDIST := totalsegmentator-2.18.0.tar.gz
REALCT_SHA256 := 5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03
realct: $(REALCT)/reference_files/.extracted-stamp
$(REALCT)/reference_files/.extracted-stamp: | $(STAMP)
	rm -rf $(REALCT)/sdist $(REALCT)/reference_files.partial
	$(PY) -m pip download --quiet --no-deps --no-binary totalsegmentator -d $(REALCT)/sdist totalsegmentator==2.18.0
	echo "$(REALCT_SHA256)  $(REALCT)/sdist/$(REALCT_SDIST)" | sha256sum --check --quiet
	mkdir -p $(REALCT)/reference_files.partial
	tar -xzf $(REALCT)/sdist/$(REALCT_SDIST) --no-same-owner -C $(REALCT)/reference_files.partial --strip-components=3 \
	  totalsegmentator-2.18.0/tests/reference_files/
	rm -rf $(REALCT)/reference_files $(REALCT)/sdist
	touch $(REALCT)/reference_files.partial/.extracted-stamp
	mv $(REALCT)/reference_files.partial $(REALCT)/reference_files

venv: $(STAMP)
$(STAMP): pyproject.toml clients/pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned: the CPU build (a GPU host installs its own beforehand)
	$(PY) -m pip install --quiet "torch==2.13.0"
	# the thin client first (clients/, its own distribution), then the server side that depends on it; a stale ./medseg.egg-info of the
	# former one-distribution layout would hide the server's commands from `medseg`
	rm -rf medseg.egg-info
	$(PY) -m pip install --quiet -e ./clients -e ".[dev]"
	touch $(STAMP)

# ONNX export (checked against PyTorch) + provenance, rebuilt when the weights change
artifacts: $(ONNX)
$(ONNX): $(WEIGHTS) export/export_onnx.py $(STAMP)
	OMP_NUM_THREADS=2 $(PY) -m export.export_onnx

configs: $(STAMP)
	$(PY) -m medseg.serving.configgen

demo: $(STAMP) $(ONNX)
	$(PY) -m medseg_client.cli demo --out demo_out

lint: $(STAMP)
	$(PY) -m ruff check src clients export tests perf model_repository
	$(PY) -m mypy

test: $(STAMP) $(ONNX) sysdeps $(PERF_ANALYZER) realct lint
	$(PYTEST)

test-unit: $(STAMP) $(ONNX) sysdeps realct
	$(PYTEST) -m "not server and not slow"

test-server: $(STAMP) $(ONNX) sysdeps $(PERF_ANALYZER) realct
	$(PYTEST) -m server

test-slow: $(STAMP) $(ONNX) realct
	$(PYTEST) -m slow -o addopts="-ra"

# 30 minutes at 70% of the measured capacity (cpu flavor); figures to perf/results/soak/
soak: $(STAMP) $(ONNX)
	$(PY) -m perf.soak

# the short benchmark with the whole `medseg segment` command on two 512 x 512 x 300 files (about 11 min on 2 cores),
# then the imported models against their own predictors (about 15 min);
# `make bench-full` sweeps sizes, concurrency and instances
bench: $(STAMP) $(ONNX) sysdeps $(PERF_ANALYZER) realct
	$(PY) -m perf.bench --readme
	$(PY) -m perf.imported --readme

# the PACS node from receipt to result behind Debian's Orthanc (perf/results/<machine>/node.md; ~5 min on 2 cores)
bench-node: $(STAMP) $(ONNX) sysdeps realct
	$(PY) -m perf.node

bench-full: $(STAMP) $(ONNX) sysdeps $(PERF_ANALYZER)
	$(PY) -m perf.bench --full --out perf/results/full

# the acceptance run (a few minutes on 2 cores): phantoms, scans without a liver, TotalSegmentator's real CT, judged
# through the embedded server by `medseg evaluate`; reports to perf/results/<machine>/accuracy/, its table into README.md
accuracy: $(STAMP) $(ONNX) realct
	$(PY) -m export.evaluate --realct $(REALCT)/reference_files --readme

# retrain the shipped weights in the two stages recorded in export/weights/manifest.json (about 70 min on 2 CPU
# cores; minutes on a GPU), starting from the v1 model's convolutions (export/weights/v1/, its own manifest):
# whole-body phantoms with hard negatives, then tumor emphasis with lesion synthesis. Then `python -m export.froc`
# chooses the tumor operating point. Training data are phantoms only: the real CT of `make realct` never is.
weights: $(STAMP)
	$(PY) -m export.train --init export/weights/v1/ct_liver_unet.fp16.pt --epochs 24 --lr 1e-3 --synthetic-tumors 0.3 \
	  --out .cache/stage1
	$(PY) -m export.train --init .cache/stage1/ct_liver_unet.fp16.pt --epochs 20 --lr 5e-4 --class-ratios 1 1 3 \
	  --ce-weights 1 1 2 --synthetic-tumors 0.5 --out export/weights

# the nnU-Net v2 results folder the importer's tests and bench use (committed under tests/fixtures/nnunet): phantoms
# planned, preprocessed and trained by nnU-Net's own code with shrunk plans (about 20 min on 2 CPU cores)
nnunet-fixture: $(STAMP)
	OMP_NUM_THREADS=2 $(PY) -m export.nnunet_fixture

# the MONAI bundle the importer's tests and bench use (committed under tests/fixtures/monai_bundle): phantoms through
# the bundle's own preprocessing, its MONAI UNet trained here (about 15 min on 2 CPU cores)
monai-bundle-fixture: $(STAMP)
	OMP_NUM_THREADS=2 $(PY) -m export.monai_bundle_fixture

clean:
	rm -rf demo_out .cache .pytest_cache .mypy_cache .ruff_cache .triton_backends .perf_tools medseg.egg-info

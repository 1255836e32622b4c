# Two commands set up a fresh machine: `make demo` (the main job) and `make test`.
# Both create .venv when missing and install the system packages they need.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip -q --disable-pip-version-check
STAMP := $(VENV)/.hygeia-installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_PACKAGES := dcmtk dicom3tools orthanc orthanc-dicomweb rabbitmq-server pixelmed-apps default-jre-headless libb64-0d

.PHONY: demo test venv system-deps clean

venv: $(STAMP)

# torch==2.13.0 FIRST (a CPU build on local disk); a bare `torch` would pull GBs of CUDA packages.
$(STAMP): pyproject.toml tests/example_plugin/pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install torch==2.13.0
	$(PIP) install -e ".[serving,text,generative,pacs,molecules,test,bench]"
	# NVIDIA perf_analyzer (benchmarks/serving.py --perf-analyzer) into $(VENV)/bin, from the tritonclient
	# 2.51.0 wheel (the embedded server's release); it needs libb64-0d (system-deps) and the bench extra.
	$(PY) benchmarks/serving.py --install-perf-analyzer || echo "warning: perf_analyzer not installed (only benchmarks/serving.py --perf-analyzer needs it)"
	# MOSES data + metrics: molsets pins pomegranate (no longer builds), so no deps; fcd_torch ships ChemNet.
	$(PIP) install --no-deps molsets==0.3.1 fcd_torch==1.0.7
	$(PIP) install -e tests/example_plugin
	$(PY) -c "import numpy; assert numpy.__version__ < '2', numpy.__version__"
	@touch $@

system-deps:
	@missing=""; for c in dciodvfy dsrdump dsr2html storescu Orthanc java; do command -v $$c >/dev/null || missing=1; done; [ -f /usr/share/java/pixelmed.jar ] || missing=1; \
	 [ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || missing=1; \
	 [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || missing=1; \
	 [ -f /usr/lib/x86_64-linux-gnu/libb64.so.0d ] || missing=1; \
	 if [ -n "$$missing" ]; then \
	   $(SUDO) apt-get update -qq && \
	   DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $(APT_PACKAGES) >/dev/null; \
	 fi

demo: $(STAMP) system-deps
	$(PY) -m hygeia demo --out out/demo

test: $(STAMP) system-deps
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) out

# The two commands of the quick start: `make run` (the main job) and `make test` (the suite).
# Everything is installed into .venv by this file; llama-cpp-python compiles llama.cpp once
# (pip caches the wheel), then the native expert cache is built against its headers.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0

.PHONY: llama-server install run test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml CMakeLists.txt $(wildcard csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "llama-cpp-python==0.3.36" "scikit-build-core>=0.10" "pybind11>=2.12"
	$(PY) -m pip install --quiet --no-build-isolation -e ".[test]"
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m cluster demo

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) -m cluster bench engine

llama-server: $(STAMP)  # llama.cpp's own server, the anchor of `bench serving` (not needed otherwise)
	scripts/build-llama-server.sh $(VENV)

clean:
	rm -rf build $(VENV) models

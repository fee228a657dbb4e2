# syntax=docker/dockerfile:1
# The image every Ray pod of the Expert Sniper Cluster runs (k8s/*.yaml: head, workers, RayJob
# submitter, model loader): Python 3.11, llama.cpp via llama-cpp-python, Ray with Serve, and
# this project installed as a regular (non-editable) package with its native expert cache.
#
#   docker build -t sniper-cluster:0.1.0 .
#
# The install follows the Makefile: llama-cpp-python (which compiles llama.cpp) and the build
# backend first, then the project with --no-build-isolation, so that cluster._native is
# compiled against the headers of exactly the llama.cpp it runs with.
FROM python:3.11-slim-bookworm

# The Ray release; KubeRay's `rayVersion` in k8s/*.yaml must name the same one.
ARG RAY_VERSION=2.60.0
ARG LLAMA_CPP_PYTHON_VERSION=0.3.36
# llama.cpp builds for the build machine's CPU by default (-march=native), which can crash with
# SIGILL on another node. Build for x86-64-v3 (AVX2/FMA/F16C, Haswell or Zen and later) instead;
# override for other fleets, e.g. --build-arg LLAMA_CMAKE_ARGS="-DGGML_NATIVE=ON" when the
# image is built on the machine type it runs on.
ARG LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# build-essential, cmake, git: compile llama.cpp and cluster._native.
# wget: KubeRay's exec health probes call it.
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential cmake git wget \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app

RUN --mount=type=cache,target=/root/.cache/pip \
    CMAKE_ARGS="${LLAMA_CMAKE_ARGS}" pip install \
        "llama-cpp-python==${LLAMA_CPP_PYTHON_VERSION}" "scikit-build-core>=0.10" "pybind11>=2.12"

RUN --mount=type=cache,target=/root/.cache/pip \
    pip install "ray[serve]==${RAY_VERSION}"

# Build from a scratch copy that is deleted afterwards: a `cluster/` source tree left in the
# working directory would take precedence over the installed package for every
# `python -m cluster` started there.
COPY pyproject.toml CMakeLists.txt README.md /tmp/sniper-src/
COPY csrc /tmp/sniper-src/csrc
COPY cluster /tmp/sniper-src/cluster
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --no-build-isolation /tmp/sniper-src \
    && rm -rf /tmp/sniper-src \
    && cd / && python -c "import cluster.engine.cache, llama_cpp, ray; print('ok', ray.__version__, llama_cpp.__version__)"

# Ray's own images run as uid 1000 too; nothing here needs root (no cgroup writes: on
# Kubernetes the pod's memory limit bounds each node, not --node-memory-mb).
# /app is the working directory of drivers started in the pod (reports, prompt files).
RUN useradd --create-home --uid 1000 --shell /bin/bash ray && chown ray:ray /app
USER 1000
ENV HOME=/home/ray

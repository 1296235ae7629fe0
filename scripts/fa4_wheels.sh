#!/usr/bin/env bash
# FlashAttention 4 (flash-attn-4: CuTe DSL kernels, with a Hopper (sm90) forward) and its
# dependencies, for trying it on the device, which has no network. Its CuTe DSL library
# wheel alone is 92 MB, past one call's 64-MiB carry, so the wheels are laid out for two
# calls, each carrying one half (the big wheel is split in two; /tmp on the device keeps
# the first half while the machine stays warm, as the ffmpeg unpack does):
#
#   bash scripts/fa4_wheels.sh                        # here: fills .fa4/a and .fa4/b (git-excluded)
#   run(carry=[".fa4/a"]):  mkdir -p /tmp/fa4 && cp .fa4/a/* /tmp/fa4/
#   run(carry=[".fa4/b"]):  cp .fa4/b/* /tmp/fa4/ && (cd /tmp/fa4 && cat part-* > "$(cat BIG_NAME)" && rm part-*) &&
#       python3 -m pip install -q --no-index --no-deps --target /tmp/fa4site /tmp/fa4/*.whl &&
#       PYTHONPATH=/tmp/fa4site:$PWD python3 scripts/gpu_cfm_attn_packed.py
#
# (the attention benchmark needs only torch: .whl is not carried in those calls)
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.fa4/' .git/info/exclude 2>/dev/null || echo '/.fa4/' >> .git/info/exclude
rm -rf .fa4 /tmp/fa4-big && mkdir -p .fa4/a .fa4/b /tmp/fa4-big
dl() {
  local dest=$1; shift
  python3 -m pip download -q --pre --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$dest" "$@"
}
dl .fa4/b flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 \
  nvidia-cutlass-dsl-libs-core==4.8.1 "cuda-bindings>=13,<14" cuda-pathfinder "protobuf>=4.21.12,<7" \
  "apache-tvm-ffi>=0.1.11,<0.2" torch-c-dlpack-ext quack-kernels
dl /tmp/fa4-big nvidia-cutlass-dsl-libs-cu13==4.8.1
big=$(ls /tmp/fa4-big/*.whl)
basename "$big" > .fa4/b/BIG_NAME
split -b 52m "$big" .fa4/a/part-
mv .fa4/a/part-ab .fa4/b/
du -sh .fa4/a .fa4/b

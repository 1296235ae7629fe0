# Sourced at the start of a device run: the carried wheels, the carried ffmpeg (if unpacked
# by an earlier call into /tmp/ffmpeg), the full-size random checkpoint in /tmp/ttsbatch-full.
# A later call on the same warm machine need not carry .whl again (its carry is then free
# for something else): /tmp/site keeps what the first call installed.
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
  touch /tmp/site/.installed
elif [ ! -f /tmp/site/.installed ]; then
  echo "gpu_prelude: no .whl carried and none installed on this machine"; return 1
fi
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PATH=/tmp/site/bin:$PATH
# FlashAttention 4, if two earlier calls installed it (scripts/fa4_wheels.sh): its CuTe DSL
# packages' .pth is not read from a --target install, so they go on the path by name
[ -d /tmp/fa4site ] && export PYTHONPATH=$PYTHONPATH:/tmp/fa4site:/tmp/fa4site/nvidia_cutlass_dsl/dsl_packages
# The device has no ffmpeg and a carry is limited to 64 MiB (.whl alone is ~44 MB), so the
# binary (.ffmpeg/ffmpeg.xz, ~50 MB, not in git; made here with `xz -T2 -6 -c .venv/lib/python3*/site-packages/
# imageio_ffmpeg/binaries/ffmpeg-* > .ffmpeg/ffmpeg.xz`) is unpacked by a call of its own just before:
#   python3 -c "import lzma,shutil,os; shutil.copyfileobj(lzma.open('.ffmpeg/ffmpeg.xz'), open('/tmp/ffmpeg','wb')); os.chmod('/tmp/ffmpeg',0o755)"
# A machine idle for 30 s is given back, and /tmp with it: make the two calls back to back.
# ttsbatch finds ffmpeg through imageio_ffmpeg (its wheel carries a 170 MB binary): a stub
# module that names /tmp/ffmpeg stands in for it.
if [ -x /tmp/ffmpeg ]; then
  export IMAGEIO_FFMPEG_EXE=/tmp/ffmpeg
  mkdir -p /tmp/site/imageio_ffmpeg
  printf 'import os\n\ndef get_ffmpeg_exe():\n    return os.environ.get("IMAGEIO_FFMPEG_EXE", "/tmp/ffmpeg")\n' > /tmp/site/imageio_ffmpeg/__init__.py
else echo "gpu_prelude: no /tmp/ffmpeg: book runs will stop at once"; fi
[ -f /tmp/ttsbatch-full/.done ] || {
  python3 -c "from ttsbatch.engine.model import write_random_checkpoint as w; w('/tmp/ttsbatch-full','full',seed=0)" && touch /tmp/ttsbatch-full/.done
}

# Sourced at the start of a device run: the carried wheels, the carried ffmpeg (if unpacked
# by an earlier call into /tmp/ffmpeg), the full-size random checkpoint in /tmp/ttsbatch-full.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PATH=/tmp/site/bin:$PATH
[ -x /tmp/ffmpeg ] && export IMAGEIO_FFMPEG_EXE=/tmp/ffmpeg
[ -f /tmp/ttsbatch-full/.done ] || {
  python3 -c "from ttsbatch.engine.model import write_random_checkpoint as w; w('/tmp/ttsbatch-full','full',seed=0)" && touch /tmp/ttsbatch-full/.done
}

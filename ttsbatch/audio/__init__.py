"""Audio after the model: watermark (Perth), stitch chunks into a track, export and decode.

Submodules are imported directly (``from ttsbatch.audio.watermark import Watermarker``);
nothing here pulls torch until a Watermarker is constructed.
"""

"""Engines: model loading, voice conditioning, and synthesis (stock reference path first).

Everything here imports torch and chatterbox lazily, so the CLI starts fast.
"""

import threading

# Held while a CUDA graph is captured, and by any other thread around its own GPU work (the
# store worker's Perth watermarking): a CUDA call from another thread during a capture
# invalidates the capture ("operation not permitted when stream is capturing").
capture_lock = threading.RLock()

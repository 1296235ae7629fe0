"""Engines: model loading, voice conditioning, and synthesis (stock reference path first).

Everything here imports torch and chatterbox lazily, so the CLI starts fast.
"""

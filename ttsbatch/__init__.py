"""ttsbatch: books and subtitles to watermarked speech with Chatterbox."""
__version__ = "0.1.0"

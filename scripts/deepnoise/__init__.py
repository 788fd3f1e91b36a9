"""DeepNoise-style cell-image classification for RxRx1-like screens."""

__version__ = "0.1.0"

"""Batched inference: a dynamic batcher, tiling of large frames, and the worker loop."""

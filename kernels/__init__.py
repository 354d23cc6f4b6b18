"""Gather convolutions: compute only the kept channels of a gated layer.

``reference`` holds the PyTorch versions (the CPU runtime, and the ground truth for the
tests); ``gather_conv`` holds the Triton kernels for CUDA GPUs; ``dispatch`` picks one.
"""

"""Gather convolutions: compute only the kept channels of a gated layer.

``reference`` holds the PyTorch versions (the CPU runtime, and the ground truth for the
tests); ``gather_conv`` holds the Triton convolution kernels for CUDA GPUs; ``gate_index``
the Triton kernel that turns a block's two gates into kept-index lists on the device;
``dispatch`` picks Triton or PyTorch for a device. ``cpu_gate`` (C source ``cpu_gate.c``,
compiled on first use) is the CPU path's host step: pool, gates, kept lists and weight gathers
of a block in one call, with CompactBottleneck's NumPy path as its reference.
"""

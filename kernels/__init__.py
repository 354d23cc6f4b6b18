"""Executing a gated block on its kept channels: one contract, three backends.

``block`` holds the contract (:class:`~dynprune.kernels.block.CompactBlock`); ``reference`` the
PyTorch backend, which is the specification of the others; ``cpu_blocks`` (C source
``cpu_blocks.c``, compiled on first use) the compiled CPU backend; ``triton_block`` the Triton
backend, built from ``gate_index`` (both gates and their kept lists in one launch) and
``gather_conv`` (the gather convolutions); ``dispatch`` chooses a backend and says why.
"""

"""Triton kernels, each beside its PyTorch reference. Not built yet (see the README)."""

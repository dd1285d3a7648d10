"""Triton kernels (forward and backward) for blip_fast's hot ops."""

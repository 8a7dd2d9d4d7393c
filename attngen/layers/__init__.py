"""Learnable torch modules around generated kernels (the NSA layer)."""

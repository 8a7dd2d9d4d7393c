"""Float64 oracles: dense attention (dense) and Native Sparse Attention (nsa)."""

from attngen.reference.dense import attention_reference

__all__ = ["attention_reference"]

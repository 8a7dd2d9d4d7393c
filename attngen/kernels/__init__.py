"""Spec-independent Triton kernels, imported by generated modules and tested directly.

Each module holds @triton.jit kernels and the Python wrappers that check arguments, pick tiles and
launch them; everything a spec decides is an argument. Each imports attngen.runtime before triton
(it selects Triton's CPU interpreter when there is no GPU).

  nsa_topn      NSA block selection: compressed scores -> selection-block scores -> top-n, fused
  nsa_selected  NSA attention over the selected blocks: forward, dQ, dK/dV (deterministic)
  merge         LSE merge of partial attention results (split-KV decoding, context parallelism)
"""

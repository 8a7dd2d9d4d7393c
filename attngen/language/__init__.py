"""The spec language: the YAML reader (spec) and the mask / score_mod expressions (expr)."""

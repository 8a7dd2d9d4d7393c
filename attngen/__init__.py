"""attngen: YAML attention specs -> specialised, verified Triton FlashAttention-2 modules."""

__version__ = "0.1.0"

__all__ = ["attention_reference", "load_spec", "Spec", "SpecError", "__version__"]


def __getattr__(name):
    # Lazy, so that generated modules importing attngen.runtime load neither yaml nor the generator.
    if name == "attention_reference":
        from attngen.reference.dense import attention_reference

        return attention_reference
    if name in ("load_spec", "Spec", "SpecError"):
        from attngen.language import spec as spec

        return getattr(spec, name)
    raise AttributeError(f"module 'attngen' has no attribute {name!r}")

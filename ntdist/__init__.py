"""ntdist: distributed training and Neuron Transplantation fusion of neural-network ensembles.

    from ntdist import concat, fuse
    fused = fuse([model_a, model_b], method="nt", schedule="recursive")
"""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy, so `ntdist --help` and the launcher start-up do not import the fusion stack.
    if name in ("concat", "fuse"):
        from ntdist import fusion
        return getattr(fusion, name)
    raise AttributeError(f"module 'ntdist' has no attribute '{name}'")


__all__ = ["concat", "fuse", "__version__"]

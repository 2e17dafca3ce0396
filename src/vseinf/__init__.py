"""vseinf: VSE∞ visual semantic embedding with the Generalized Pooling Operator."""

import os

# Reproducible CPU arithmetic. MKL (and OpenMP, if asked to) would otherwise pick a thread count per
# call from the machine's load, and a different count sums in a different order: two runs, or a run
# and its resume, would differ in the last bits whenever something else shares the cores. The
# libraries read these when torch loads, so a program that imports torch before vseinf must set them
# itself. cuBLAS needs its workspace fixed for deterministic GEMMs (read when CUDA starts).
os.environ.setdefault("MKL_DYNAMIC", "FALSE")
os.environ.setdefault("OMP_DYNAMIC", "FALSE")
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

__version__ = "0.1.0"


def load_model(*args, **kwargs):
    """Load a trained VSE∞ model (the bundled one when called without arguments).

    See :func:`vseinf.model.load_model`.
    """
    from .model import load_model as _load_model

    return _load_model(*args, **kwargs)


__all__ = ["load_model", "__version__"]

"""vseinf: VSE∞ visual semantic embedding with the Generalized Pooling Operator."""

__version__ = "0.1.0"


def load_model(*args, **kwargs):
    """Load a trained VSE∞ model (the bundled one when called without arguments).

    See :func:`vseinf.model.load_model`.
    """
    from .model import load_model as _load_model

    return _load_model(*args, **kwargs)


__all__ = ["load_model", "__version__"]

"""Which model made a gallery's embeddings: embeddings of two models are comparable only when both
the configuration and the weights are the same (:func:`same_model`)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_identity(model) -> dict:
    """What makes two models' embeddings comparable: config hash + weights hash (+ where it came from)."""
    from ..model import bundled_name  # lazy: see vseinf.search

    ckpt = getattr(model, "checkpoint_path", None)
    config = None
    if ckpt is not None and (Path(ckpt) / "config.json").is_file():
        # The model section as the checkpoint stores it, not as this version of vseinf parses it:
        # a field added to ModelConfig later (with a default) must not make old indexes unusable.
        try:
            config = json.loads((Path(ckpt) / "config.json").read_text()).get("model")
        except (OSError, ValueError, AttributeError):
            config = None
    if not isinstance(config, dict):
        config = dataclasses.asdict(model.config)
    config_hash = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    weights_file = Path(ckpt) / "model.safetensors" if ckpt is not None else None
    if weights_file is not None and weights_file.is_file():
        weights_hash = _sha256_file(weights_file)[:16]
    else:  # a model built in memory: hash its tensors
        h = hashlib.sha256()
        for name, tensor in sorted(model.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        weights_hash = h.hexdigest()[:16]
    return {
        "checkpoint": None if ckpt is None else str(Path(ckpt).resolve()),
        # the bundled model's name: found again by name when the package moves (a reinstall)
        "bundled": bundled_name(ckpt),
        "config_hash": config_hash,
        "weights_hash": weights_hash,
        "embed_dim": int(model.config.embed_dim),
    }


def same_model(a: dict | None, b: dict | None) -> bool:
    return bool(a and b) and a.get("config_hash") == b.get("config_hash") and \
        a.get("weights_hash") == b.get("weights_hash")


# ---------------------------------------------------------------------------------------------
# Reading the gallery: image folders and captions files

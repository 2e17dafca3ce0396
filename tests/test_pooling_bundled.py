"""The bundled model through its GPOs: it loads unchanged and embeds exactly as it did.

``bundled_embeddings.safetensors`` holds the bundled model's embeddings of three synthetic images
and three captions, computed before GPO was split into the ``vseinf.pooling`` package. Any change
to pooling (or to the model around it) that alters a state-dict key or an embedding by more than
1e-6 fails here. Regenerate only when a change of the embeddings is intended:

    PYTHONPATH=src python tests/test_pooling_bundled.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from vseinf.model import BUNDLED_DIR

GOLDEN = Path(__file__).with_name("bundled_embeddings.safetensors")
CAPTIONS = ["a dog runs on the grass", "two people ride bicycles down a busy street at night", "a child"]


def synthetic_images() -> list[Image.Image]:
    """Three deterministic photos-to-be: upsampled random colour blobs of different sizes."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(3):
        small = rng.integers(0, 256, (6 + i, 5 + 2 * i, 3), dtype=np.uint8)
        out.append(Image.fromarray(small).resize((240 + 16 * i, 200), Image.BILINEAR))
    return out


def bundled_embeddings() -> dict[str, torch.Tensor]:
    from vseinf.model import load_model

    model = load_model()
    with torch.no_grad():
        return {"images": model.encode_images(synthetic_images()).cpu().contiguous(),
                "captions": model.encode_texts(CAPTIONS).cpu().contiguous()}


@pytest.mark.slow
@pytest.mark.skipif(not (BUNDLED_DIR / "model.safetensors").is_file(), reason="the bundled model is not installed")
def test_bundled_model_embeds_as_before():
    try:
        now = bundled_embeddings()
    except OSError as exc:  # the text backbone (MiniLM) is not in the local Hugging Face cache
        pytest.skip(f"the bundled model's text backbone is unavailable offline ({exc})")
    before = load_file(GOLDEN)
    for key in ("images", "captions"):
        assert now[key].shape == before[key].shape
        assert float((now[key] - before[key]).abs().max()) <= 1e-6, key


if __name__ == "__main__":
    save_file(bundled_embeddings(), GOLDEN)
    print(f"wrote {GOLDEN}")

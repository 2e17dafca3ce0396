"""The bundled model through its GPOs: it loads unchanged and embeds exactly as it did, and its
GPOs — trained, with θ spread over many ranks — take the fast paths exactly like the reference.

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
from vseinf.pooling import GPO, GPOReference, kernels

GOLDEN = Path(__file__).with_name("bundled_embeddings.safetensors")
needs_bundled = pytest.mark.skipif(not (BUNDLED_DIR / "model.safetensors").is_file(),
                                   reason="the bundled model is not installed")
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
@needs_bundled
def test_bundled_model_embeds_as_before():
    try:
        now = bundled_embeddings()
    except OSError as exc:  # the text backbone (MiniLM) is not in the local Hugging Face cache
        pytest.skip(f"the bundled model's text backbone is unavailable offline ({exc})")
    before = load_file(GOLDEN)
    for key in ("images", "captions"):
        assert now[key].shape == before[key].shape
        assert float((now[key] - before[key]).abs().max()) <= 1e-6, key


def bundled_gpo(side: str) -> GPO:
    """The bundled model's GPO on one side (its GPO branch when the pooling is branched, "gpo+max")."""
    state = load_file(BUNDLED_DIR / "model.safetensors")
    prefix = next(p for p in (f"{side}gpool.", f"{side}gpool.branches.0.") if f"{p}gru.weight_ih_l0" in state)
    gpo = GPO()
    gpo.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)
    return gpo


@needs_bundled
@pytest.mark.parametrize("side, n_max", [("image.image_encoder.", 49), ("text.", 20)])
def test_bundled_gpos_fast_path_equals_reference_on_worker_threads(side, n_max, monkeypatch):
    """The bundled GPOs (image: 7×7 grids, size-augmented; text: captions) against GPOReference:
    outputs, θ and all gradients. Tiny tasks and two threads make the CPU path split the batch over
    worker threads, as it does at full size; the thread count is restored afterwards."""
    fast = bundled_gpo(side)
    ref = GPOReference()
    ref.load_state_dict(fast.state_dict(), strict=True)
    theta = fast.coefficients(torch.tensor([n_max]))[0]
    assert theta.max() < 0.5 and theta.min() > 0  # spread, and no rank may be skipped exactly
    monkeypatch.setattr(kernels, "_TASK_ELEMENTS", 64)
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(12, n_max, 32, generator=gen)
    lengths = torch.randint(n_max // 2, n_max + 1, (12,), generator=gen)
    lengths[0] = n_max
    features[torch.arange(n_max) >= lengths.unsqueeze(1)] = float("nan")  # padding must not leak
    probe = torch.randn(12, 32, generator=gen)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        results = []
        for pool in (fast, ref):
            x = features.clone().requires_grad_(True)
            out, weights = pool(x, lengths)
            ((out * probe).sum() + (weights ** 2).sum()).backward()
            results.append((out.detach(), weights.detach(), x.grad, {n: p.grad for n, p in pool.named_parameters()}))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    (out_f, w_f, gx_f, gp_f), (out_r, w_r, gx_r, gp_r) = results
    valid = torch.arange(n_max) < lengths.unsqueeze(1)
    torch.testing.assert_close(out_f, out_r, atol=1e-5, rtol=0)
    torch.testing.assert_close(w_f, w_r, atol=1e-6, rtol=0)
    torch.testing.assert_close(gx_f[valid], gx_r[valid], atol=1e-5, rtol=0)
    assert (gx_f[~valid] == 0).all()
    for name in gp_r:
        torch.testing.assert_close(gp_f[name], gp_r[name], atol=1e-5, rtol=1e-4, msg=name)


if __name__ == "__main__":
    save_file(bundled_embeddings(), GOLDEN)
    print(f"wrote {GOLDEN}")

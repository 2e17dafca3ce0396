"""Retrieval metrics: the counting fast paths against the per-query argsort oracle, protocols,
ensembles, the printed table and input errors."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vseinf.eval import metrics as eval_metrics
from vseinf.eval.ensemble import ensemble_embeddings, ensemble_sims
from vseinf.eval.metrics import (
    METRIC_KEYS,
    evaluate_protocol,
    evaluate_protocol_from_embeddings,
    format_table,
    metrics_from_ranks,
    rank_details,
    rank_details_from_embeddings,
    rank_details_reference,
    retrieval_metrics,
    retrieval_metrics_from_embeddings,
    retrieval_metrics_reference,
)

FIELDS = ("i2t_ranks", "i2t_top1", "t2i_ranks", "t2i_top1")


@pytest.fixture(autouse=True)
def one_thread():
    # The tests use deliberately tiny blocks; on a busy shared CPU, torch's thread pool makes
    # each tiny op wait for descheduled workers. One thread keeps the file fast.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_captions(rng: np.random.Generator, n_images: int, low: int = 1, high: int = 7):
    """text_to_image with 1–7 captions per image, in shuffled order (not grouped by image)."""
    counts = rng.integers(low, high + 1, size=n_images)
    t2i = np.repeat(np.arange(n_images), counts)
    rng.shuffle(t2i)
    return t2i


def assert_same_details(a, b):
    for field in FIELDS:
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)


def assert_same_metrics(a: dict, b: dict):
    assert list(a) == list(METRIC_KEYS) and list(b) == list(METRIC_KEYS)
    for key in METRIC_KEYS:
        assert a[key] == pytest.approx(b[key], abs=1e-9), key


# ---------------------------------------------------------------------------------------------
# Fast paths against the oracle
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 7, 13, 64, 1000])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_sims_fast_path_matches_argsort_oracle(chunk_size, as_tensor):
    rng = np.random.default_rng(chunk_size)
    n_images = 53  # no chunk size above divides it
    t2i = random_captions(rng, n_images)
    sims = rng.standard_normal((n_images, t2i.size)).astype(np.float32)
    ref = rank_details_reference(sims, t2i)
    fast = rank_details(torch.from_numpy(sims) if as_tensor else sims, t2i, chunk_size)
    assert_same_details(fast, ref)
    assert_same_metrics(
        retrieval_metrics(sims, t2i, chunk_size), retrieval_metrics_reference(sims, t2i)
    )


@pytest.mark.parametrize("chunk_size", [4, 17, 4096])
def test_embedding_path_matches_oracle_on_the_full_matrix(chunk_size):
    gen = torch.Generator().manual_seed(chunk_size)
    rng = np.random.default_rng(chunk_size)
    n_images = 41
    t2i = random_captions(rng, n_images)
    img = torch.nn.functional.normalize(torch.randn(n_images, 24, generator=gen), dim=1)
    txt = torch.nn.functional.normalize(torch.randn(t2i.size, 24, generator=gen), dim=1)
    ref = rank_details_reference(img @ txt.T, t2i)
    assert_same_details(rank_details_from_embeddings(img, txt, t2i, chunk_size=chunk_size), ref)
    # numpy inputs and a torch text_to_image work the same way
    fast_np = rank_details_from_embeddings(
        img.numpy(), txt.numpy(), torch.from_numpy(t2i), chunk_size=chunk_size
    )
    assert_same_details(fast_np, ref)


def test_embedding_path_agrees_with_matrix_path_on_correlated_embeddings():
    # Captions close to their image, as after training: ranks are mostly small, which is where
    # an off-by-one in the counting (e.g. a text counting itself) would show.
    gen = torch.Generator().manual_seed(3)
    rng = np.random.default_rng(3)
    n_images = 200
    t2i = random_captions(rng, n_images, 1, 5)
    img = torch.nn.functional.normalize(torch.randn(n_images, 32, generator=gen), dim=1)
    txt = torch.nn.functional.normalize(
        img[torch.from_numpy(t2i)] + 0.1 * torch.randn(t2i.size, 32, generator=gen), dim=1
    )
    via_emb = retrieval_metrics_from_embeddings(img, txt, t2i, chunk_size=33)
    via_sims = retrieval_metrics(img @ txt.T, t2i, chunk_size=33)
    assert_same_metrics(via_emb, via_sims)
    assert_same_metrics(via_sims, retrieval_metrics_reference(img @ txt.T, t2i))
    assert via_emb["i2t_r1"] > 50  # the case above really has many rank-0 queries


@settings(max_examples=40, deadline=None)
@given(
    counts=st.lists(st.integers(1, 4), min_size=1, max_size=6),
    seed=st.integers(0, 2**32 - 1),
    chunk=st.integers(1, 8),
)
def test_fast_paths_match_oracle_on_small_distinct_scores(counts, seed, chunk):
    rng = np.random.default_rng(seed)
    t2i = np.repeat(np.arange(len(counts)), counts)
    rng.shuffle(t2i)
    # A permutation of integers: all scores distinct, so argsort and counting must agree.
    sims = rng.permutation(len(counts) * t2i.size).reshape(len(counts), t2i.size).astype(np.float64)
    assert_same_details(rank_details(sims, t2i, chunk), rank_details_reference(sims, t2i))


def test_read_only_memory_map_is_accepted_without_warnings(tmp_path):
    rng = np.random.default_rng(0)
    t2i = random_captions(rng, 30)
    sims = rng.standard_normal((30, t2i.size)).astype(np.float32)
    path = tmp_path / "sims.npy"
    np.save(path, sims)
    mapped = np.load(path, mmap_mode="r")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = retrieval_metrics(mapped, t2i, chunk_size=8)
    assert_same_metrics(got, retrieval_metrics_reference(sims, t2i))


# ---------------------------------------------------------------------------------------------
# The definitions, checked by hand
# ---------------------------------------------------------------------------------------------


def test_hand_computed_ranks_and_metrics():
    # 2 images; image 0 has texts 0 and 2, image 1 has text 1.
    sims = np.array(
        [[0.1, 0.9, 0.5],   # image 0: text order 1, 2, 0 -> best caption (text 2) at rank 1
         [0.8, 0.2, 0.3]],  # image 1: text order 0, 2, 1 -> its caption (text 1) at rank 2
    )  # fmt: skip
    t2i = [0, 1, 0]
    d = rank_details(sims, t2i)
    np.testing.assert_array_equal(d.i2t_ranks, [1, 2])
    np.testing.assert_array_equal(d.i2t_top1, [1, 0])
    # text 0: image 1 (0.8) beats image 0 (0.1) -> 1; text 1: 0.9 beats 0.2 -> 1;
    # text 2: its image 0 (0.5) beats image 1 (0.3) -> 0
    np.testing.assert_array_equal(d.t2i_ranks, [1, 1, 0])
    np.testing.assert_array_equal(d.t2i_top1, [1, 0, 0])
    m = retrieval_metrics(sims, t2i)
    assert m["i2t_r1"] == 0.0 and m["i2t_r5"] == 100.0
    assert m["i2t_medr"] == 2.0  # median of [1, 2] is 1.5, floor -> 1, + 1
    assert m["i2t_meanr"] == 2.5
    assert m["t2i_r1"] == pytest.approx(100 / 3)
    assert m["t2i_medr"] == 2.0 and m["t2i_meanr"] == pytest.approx(5 / 3)
    assert m["rsum"] == pytest.approx(0 + 100 + 100 + 100 / 3 + 100 + 100)
    assert all(type(v) is float for v in m.values())


def test_medr_floors_the_median_and_meanr_is_one_based():
    m = metrics_from_ranks([0, 1, 2, 3], [0, 0, 0, 9])
    assert m["i2t_medr"] == 2.0 and m["i2t_meanr"] == 2.5
    assert m["t2i_medr"] == 1.0 and m["t2i_meanr"] == pytest.approx(3.25)
    assert m["t2i_r1"] == 75.0 and m["t2i_r5"] == 75.0 and m["t2i_r10"] == 100.0


def test_one_caption_per_image_perfect_scores():
    sims = np.eye(12) + 0.01 * np.random.default_rng(0).random((12, 12))
    m = retrieval_metrics(sims, np.arange(12), chunk_size=5)
    assert m["rsum"] == 600.0 and m["i2t_medr"] == 1.0 and m["t2i_meanr"] == 1.0


def test_image_is_correct_if_any_caption_is_in_top_k():
    # image 0 has 7 captions; only its last one scores high -> image→text rank 0.
    n_other = 20
    t2i = np.array([0] * 7 + list(range(1, n_other + 1)))
    sims = np.full((n_other + 1, t2i.size), 0.0)
    sims[0, :7] = -1.0
    sims[0, 6] = 2.0  # the best caption of image 0
    sims[0, 7:] = np.linspace(0.1, 0.9, n_other)
    sims[1:, 7:] = np.eye(n_other)
    sims[1:, :7] = -5.0
    d = rank_details(sims, t2i)
    assert d.i2t_ranks[0] == 0
    assert list(d.t2i_ranks[:6]) == [0] * 6  # column: image 0 at -1 still beats -5 of the others
    sims[0, 6] = 0.5  # now 11 other texts (0.55 .. 1.0) score above it
    d = rank_details(sims, t2i)
    assert d.i2t_ranks[0] == int(np.sum(np.linspace(0.1, 0.9, n_other) > 0.5))
    assert_same_details(d, rank_details_reference(sims, t2i))


def test_ties_are_broken_by_index_like_a_stable_sort():
    # Constant scores (a collapsed model): every item ties, the lower index ranks first, so
    # the model scores chance-like ranks instead of a perfect table.
    t2i = np.repeat(np.arange(4), 2)
    expected_i2t, expected_t2i = [0, 2, 4, 6], [0, 0, 1, 1, 2, 2, 3, 3]
    d = rank_details(np.zeros((4, 8)), t2i)
    assert d.i2t_ranks.tolist() == expected_i2t and d.t2i_ranks.tolist() == expected_t2i
    assert d.i2t_top1.tolist() == [0] * 4 and d.t2i_top1.tolist() == [0] * 8
    d = rank_details_from_embeddings(np.ones((4, 3)), np.ones((8, 3)), t2i)
    assert d.i2t_ranks.tolist() == expected_i2t and d.t2i_ranks.tolist() == expected_t2i
    assert_same_details(d, rank_details_reference(np.full((4, 8), 3.0), t2i))
    assert retrieval_metrics(np.zeros((4, 8)), t2i)["rsum"] < 600


def tie_heavy(rng: np.random.Generator, n_images: int, n_texts_low: int = 1, high: int = 7):
    """Shuffled captions and scores drawn from three values: most comparisons are ties."""
    t2i = random_captions(rng, n_images, n_texts_low, high)
    sims = rng.integers(0, 3, size=(n_images, t2i.size)).astype(np.float32) / 4
    return sims, t2i


@settings(max_examples=60, deadline=None)
@given(
    n_images=st.integers(1, 12),
    seed=st.integers(0, 2**32 - 1),
    chunk=st.integers(1, 8),
    tile=st.sampled_from([(1, 8), (3, 16), (5, 24), (64, 2040)]),
)
def test_fast_paths_match_oracle_on_tie_heavy_scores(n_images, seed, chunk, tile):
    # Small tiles put tile edges between a query and its correct items, where the tie rule
    # switches from ">=" to ">".
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(eval_metrics, "_TILE_ROWS", tile[0])
        mp.setattr(eval_metrics, "_TILE_COLS", tile[1])
        check_tie_heavy(n_images, seed, chunk)


def check_tie_heavy(n_images: int, seed: int, chunk: int):
    rng = np.random.default_rng(seed)
    sims, t2i = tie_heavy(rng, n_images)
    ref = rank_details_reference(sims, t2i)
    assert_same_details(rank_details(sims, t2i, chunk), ref)
    assert_same_details(rank_details(torch.from_numpy(sims).to(torch.bfloat16), t2i, chunk), ref)
    # Integer embeddings have exact dot products: the same ties, scored block by block.
    img = rng.integers(-1, 2, size=(n_images, 2)).astype(np.float32)
    txt = rng.integers(-1, 2, size=(t2i.size, 2)).astype(np.float32)
    assert_same_details(
        rank_details_from_embeddings(img, txt, t2i, chunk_size=chunk),
        rank_details_reference(img @ txt.T, t2i),
    )


def test_default_tiles_match_oracle_across_tile_edges():
    # More rows and columns than one numpy tile (64 × 2,040), with ties, captions grouped by
    # image as in COCO and shuffled.
    rng = np.random.default_rng(11)
    sims, t2i = tie_heavy(rng, 70, 30, 31)
    for order in (np.sort(t2i), t2i):
        ref = rank_details_reference(sims, order)
        assert_same_details(rank_details(sims, order, chunk_size=50), ref)
        assert_same_metrics(retrieval_metrics(sims, order), ref.metrics())


@pytest.mark.parametrize("exact_positives", [True, False])
def test_device_kernel_matches_oracle(exact_positives):
    # The torch kernel CUDA tensors are counted with, run here on CPU tensors.
    rng = np.random.default_rng(4)
    sims, t2i = tie_heavy(rng, 37)
    ref = rank_details_reference(sims, t2i)
    counter = eval_metrics._RankCounter(
        sims[t2i, np.arange(t2i.size)], t2i, 37, device=torch.device("cpu")
    )
    for start in range(0, 37, 10):
        block = torch.from_numpy(sims[start : start + 10].copy())
        counter.add_block(block, start, 0, exact_positives=exact_positives, what="sims")
    assert_same_details(counter.details(), ref)


# ---------------------------------------------------------------------------------------------
# Protocols
# ---------------------------------------------------------------------------------------------


def test_folds_average_per_fold_tables():
    rng = np.random.default_rng(5)
    n_images = 60
    t2i = random_captions(rng, n_images, 1, 5)
    sims = rng.standard_normal((n_images, t2i.size))
    got = evaluate_protocol(sims, t2i, folds=3, chunk_size=7)
    assert got == evaluate_protocol(sims, t2i, "folds=3", chunk_size=7)
    tables = []
    for f in range(3):
        texts = np.flatnonzero((t2i >= 20 * f) & (t2i < 20 * (f + 1)))
        tables.append(
            retrieval_metrics_reference(sims[20 * f : 20 * (f + 1)][:, texts], t2i[texts] - 20 * f)
        )
    for key in METRIC_KEYS:
        assert got[key] == pytest.approx(np.mean([t[key] for t in tables])), key
    recalls = [f"{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)]
    assert got["rsum"] == pytest.approx(sum(got[k] for k in recalls))
    assert_same_metrics(evaluate_protocol(sims, t2i, "all"), retrieval_metrics(sims, t2i))


def test_coco_protocols_on_5000_images():
    # 5,000 images with one caption each, captions in shuffled order; embeddings of dim 4 keep
    # this cheap. coco1k is five 1K folds, coco5k the whole table.
    gen = torch.Generator().manual_seed(0)
    t2i = torch.randperm(5000, generator=gen)
    img = torch.nn.functional.normalize(torch.randn(5000, 4, generator=gen), dim=1)
    txt = torch.nn.functional.normalize(img[t2i] + 0.3 * torch.randn(5000, 4, generator=gen), dim=1)
    sims = img @ txt.T
    one_k = evaluate_protocol(sims, t2i, "coco1k")
    assert_same_metrics(one_k, evaluate_protocol(sims, t2i, folds=5))
    assert_same_metrics(one_k, evaluate_protocol_from_embeddings(img, txt, t2i, "coco1k"))
    five_k = evaluate_protocol(sims, t2i, "coco5k")
    assert_same_metrics(five_k, retrieval_metrics(sims, t2i))
    assert_same_metrics(five_k, evaluate_protocol_from_embeddings(img, txt, t2i, "COCO5K"))
    # Fewer distractors per query in a 1K fold: recall can only go up.
    assert one_k["t2i_r1"] >= five_k["t2i_r1"] and one_k["rsum"] > five_k["rsum"]


def test_protocol_errors_are_clear():
    sims = np.random.default_rng(0).random((10, 10))
    t2i = np.arange(10)
    with pytest.raises(ValueError, match="coco1k.*5000.*10 images"):
        evaluate_protocol(sims, t2i, "coco1k")
    with pytest.raises(ValueError, match="coco5k"):
        evaluate_protocol(sims, t2i, "coco5k")
    with pytest.raises(ValueError, match="10 images cannot be split into 3"):
        evaluate_protocol(sims, t2i, folds=3)
    with pytest.raises(ValueError, match="unknown protocol"):
        evaluate_protocol(sims, t2i, "flickr")
    with pytest.raises(ValueError, match="folds"):
        evaluate_protocol(sims, t2i, folds=0)
    with pytest.raises(ValueError, match="not both"):
        evaluate_protocol(sims, t2i, "coco1k", folds=5)


# ---------------------------------------------------------------------------------------------
# Ensembles and the table
# ---------------------------------------------------------------------------------------------


def test_ensemble_averages_and_checks_shapes():
    rng = np.random.default_rng(1)
    a, b = rng.random((3, 6)), rng.random((3, 6))
    np.testing.assert_allclose(ensemble_sims([a, b]), (a + b) / 2)
    mixed = ensemble_sims([torch.from_numpy(a), b])
    assert isinstance(mixed, torch.Tensor)
    np.testing.assert_allclose(mixed.numpy(), (a + b) / 2)
    with pytest.raises(ValueError, match=r"list_of_sims\[1\].*\(3, 5\)"):
        ensemble_sims([a, rng.random((3, 5))])
    with pytest.raises(ValueError, match="list_of_sims"):
        ensemble_sims([])


def test_ensemble_embeddings_rank_like_the_weighted_summed_similarities():
    # Two "models" of different widths; integer-valued embeddings make every dot product exact,
    # so the concatenation's scores equal the weighted sum of the matrices bit for bit, ties and all.
    rng = np.random.default_rng(2)
    t2i = random_captions(rng, 30)
    img = [rng.integers(-2, 3, size=(30, d)).astype(np.float32) for d in (3, 5)]
    txt = [rng.integers(-2, 3, size=(t2i.size, d)).astype(np.float32) for d in (3, 5)]
    sims = [i @ t.T for i, t in zip(img, txt)]
    for weights, combined in ((None, ensemble_sims(sims)), ([1.0, 2.0], sims[0] + 2 * sims[1])):
        ens_img, ens_txt = ensemble_embeddings(img, txt, weights)
        assert ens_img.shape == (30, 8) and ens_txt.shape == (t2i.size, 8)
        np.testing.assert_array_equal((ens_img @ ens_txt.T).numpy(), combined)
        assert_same_details(
            rank_details_from_embeddings(ens_img, ens_txt, t2i, chunk_size=7),
            rank_details_reference(combined, t2i),
        )
    one_img, _ = ensemble_embeddings([torch.from_numpy(img[0])], [txt[0]])
    np.testing.assert_array_equal(one_img.numpy(), img[0])


def test_ensemble_embeddings_errors_name_the_field():
    a, t = np.ones((4, 3)), np.ones((6, 3))
    with pytest.raises(ValueError, match="image_embs: is empty"):
        ensemble_embeddings([], [])
    with pytest.raises(ValueError, match="text_embs: has 1 models' embeddings but image_embs has 2"):
        ensemble_embeddings([a, a], [t])
    with pytest.raises(ValueError, match=r"image_embs\[1\]: has 5 images"):
        ensemble_embeddings([a, np.ones((5, 3))], [t, t])
    with pytest.raises(ValueError, match=r"text_embs\[1\]: has dimension 2 but image_embs\[1\] has dimension 3"):
        ensemble_embeddings([a, a], [t, np.ones((6, 2))])
    with pytest.raises(ValueError, match="weights: has 1 entries for 2 models"):
        ensemble_embeddings([a, a], [t, t], [1.0])
    with pytest.raises(ValueError, match="weights: must be finite"):
        ensemble_embeddings([a, a], [t, t], [1.0, float("nan")])


def test_format_table_rows_columns_and_values():
    m = {
        "i2t_r1": 78.5, "i2t_r5": 96.0, "i2t_r10": 98.7, "i2t_medr": 1.0, "i2t_meanr": 2.34,
        "t2i_r1": 61.7, "t2i_r5": 90.3, "t2i_r10": 95.6, "t2i_medr": 1.0, "t2i_meanr": 7.9,
        "rsum": 520.8,
    }  # fmt: skip
    lines = format_table(m).splitlines()
    assert lines[0].split() == ["R@1", "R@5", "R@10", "medr", "meanr"]
    assert lines[1].split() == ["image->text", "78.5", "96.0", "98.7", "1.0", "2.3"]
    assert lines[2].split() == ["text->image", "61.7", "90.3", "95.6", "1.0", "7.9"]
    assert lines[3].split() == ["RSUM", "520.8"]
    del m["rsum"]
    with pytest.raises(ValueError, match="rsum"):
        format_table(m)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "t2i, pattern",
    [
        (np.arange(5), "5 entries but there are 6 texts"),
        (np.array([0, 1, 2, 3, 3, 4]), r"entry 5 is 4, outside the image range \[0, 4\)"),
        (np.array([0, 1, 2, -1, 3, 3]), "entry 3 is -1"),
        (np.array([0, 1, 2, 2, 2, 2]), "image 3 has no caption"),
        (np.zeros(6, dtype=float), "integer"),
        (np.zeros((2, 3), dtype=int), "1-D"),
    ],
)
@pytest.mark.parametrize(
    "evaluate",
    [
        lambda s, t: retrieval_metrics(s, t),
        lambda s, t: retrieval_metrics_reference(s, t),
        lambda s, t: retrieval_metrics_from_embeddings(s[:, :3], s[:3].T.copy(), t),
        lambda s, t: evaluate_protocol(s, t, folds=2),
    ],
)
def test_bad_text_to_image_names_the_field(t2i, pattern, evaluate):
    sims = np.random.default_rng(0).random((4, 6))
    with pytest.raises(ValueError, match="text_to_image") as info:
        evaluate(sims, t2i)
    assert info.match(pattern)


def test_bad_scores_name_the_field():
    with pytest.raises(ValueError, match="sims.*2-D"):
        retrieval_metrics(np.zeros(5), np.arange(5))
    with pytest.raises(ValueError, match="sims.*empty"):
        retrieval_metrics(np.zeros((0, 3)), np.zeros(3, dtype=int))
    nan = np.random.default_rng(0).random((3, 3))
    nan[2, 1] = np.nan
    with pytest.raises(ValueError, match="sims.*NaN"):
        retrieval_metrics(nan, np.arange(3))
    with pytest.raises(ValueError, match="text_emb.*dimension 5.*dimension 4"):
        retrieval_metrics_from_embeddings(np.ones((3, 4)), np.ones((3, 5)), np.arange(3))
    with pytest.raises(ValueError, match="chunk_size"):
        retrieval_metrics(np.eye(3), np.arange(3), chunk_size=0)
    minus_inf = np.eye(3)
    minus_inf[1, 1] = -np.inf
    with pytest.raises(ValueError, match="sims: text 1's score with its own image 1 is -inf"):
        retrieval_metrics(minus_inf, np.arange(3))
    minus_inf[0, 1] = -np.inf  # a negative at -inf is an ordinary score
    minus_inf[1, 1] = 0.5
    assert_same_metrics(retrieval_metrics(minus_inf, np.arange(3)),
                        retrieval_metrics_reference(minus_inf, np.arange(3)))


def test_embedding_path_progress_bar_counts_every_pair_and_changes_nothing(capsys):
    rng = np.random.default_rng(5)
    t2i = random_captions(rng, 23)
    img = rng.standard_normal((23, 8)).astype(np.float32)
    txt = rng.standard_normal((t2i.size, 8)).astype(np.float32)
    quiet = rank_details_from_embeddings(img, txt, t2i, chunk_size=7)
    shown = rank_details_from_embeddings(img, txt, t2i, chunk_size=7, progress=True)
    assert_same_details(shown, quiet)
    err = capsys.readouterr().err
    assert "ranking: 100%" in err  # the bar reached its total: every block was counted

"""Training end to end on a slice of real Flickr8k: recall rises, checkpoints load, runs resume."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vseinf.config import load_config
from vseinf.losses import VSELoss
from vseinf.train import World, epoch_order, train


def slice_config(root, **overrides):
    pairs = {
        "data.path": str(root), "max_train_images": 200, "max_val_images": 100,
        "image_size": 224, "embed_dim": 512, "batch_size": 32, "epochs": 6, "lr_decay_epoch": 5,
        "log_every": 10, "precision": "bf16",
    }
    pairs.update(overrides)
    return load_config(None, [(k, str(v)) for k, v in pairs.items()])


@pytest.fixture(scope="module")
def trained_run(flickr8k_root, tmp_path_factory, session_cache):
    old = os.environ.get("VSEINF_CACHE")
    os.environ["VSEINF_CACHE"] = str(session_cache)
    try:
        run = tmp_path_factory.mktemp("run") / "f8k"
        metrics = train(slice_config(flickr8k_root), run, progress=False)
    finally:
        if old is None:
            os.environ.pop("VSEINF_CACHE")
        else:
            os.environ["VSEINF_CACHE"] = old
    return run, metrics


def test_recall_rises_far_above_chance(trained_run):
    run, metrics = trained_run
    # 100 images × 5 captions: chance RSUM ≈ 3 × (1 + 5 + 10) × 2 ≈ 32
    assert metrics["rsum"] > 150, metrics
    assert metrics["i2t_r10"] > 40 and metrics["t2i_r10"] > 40
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert losses[-1] < losses[0]
    rsums = [r["val"]["rsum"] for r in log if "val" in r]
    assert len(rsums) == 6 and max(rsums) == pytest.approx(metrics["rsum"])


def test_run_directory_layout(trained_run):
    run, metrics = trained_run
    for name in ("config.json", "log.jsonl", "training.png", "metrics.json", "best/model.safetensors",
                 "best/config.json", "best/metrics.json", "last/trainer.safetensors", "last/trainer.json"):
        assert (run / name).is_file(), name
    state = load_file(str(run / "best" / "model.safetensors"))
    # Only trained parts are stored: the frozen CNN and MiniLM come from their packages.
    assert not any(k.startswith(("image.backbone.", "text.bert.")) for k in state)
    assert any(k.startswith("image.image_encoder.gpool.gru") for k in state)
    saved = json.loads((run / "config.json").read_text())
    assert saved["train"]["epochs"] == 6 and saved["model"]["embed_dim"] == 512


def test_checkpoint_loads_and_encodes(trained_run, flickr8k_root):
    import vseinf

    run, metrics = trained_run
    model = vseinf.load_model(run / "best")
    images = sorted((flickr8k_root / "Flicker8k_Dataset").glob("*.jpg"))[:3]
    img = model.encode_images(images)
    txt = model.encode_texts(["a dog runs on the grass", "two people on a beach"])
    assert img.shape == (3, 512) and txt.shape == (2, 512)
    assert torch.allclose(img.norm(dim=1), torch.ones(3), atol=1e-4)
    assert torch.allclose(txt.norm(dim=1), torch.ones(2), atol=1e-4)


def test_eval_command_reproduces_validation_table(trained_run, tmp_path, use_cache):
    run, metrics = trained_run
    out = tmp_path / "m.json"
    proc = subprocess.run([sys.executable, "-m", "vseinf", "eval", "--checkpoint", str(run), "--json", str(out),
                           "--max-images", "100"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "RSUM" in proc.stdout and "image->text" in proc.stdout
    got = json.loads(out.read_text())
    # the same 100 validation images the run chose its best checkpoint on: the same table
    for key in ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r10", "i2t_medr", "rsum"):
        assert got[key] == pytest.approx(metrics[key], abs=1e-6), key


def test_ensemble_of_one_model_twice_equals_the_model(trained_run, use_cache):
    from vseinf.eval import evaluate_checkpoints

    run, _ = trained_run
    one = evaluate_checkpoints([run], split="dev", max_images=100)
    two = evaluate_checkpoints([run, run], split="dev", max_images=100)
    assert two["rsum"] == pytest.approx(one["rsum"])


def assert_same_random_state(run_a, run_b):
    """Both runs ended with the same random streams (torch, augmentation, text), bit for bit: a
    resume that restored them wrongly, or a loader that drew from them, would differ here even
    where the weights barely show it."""
    ta = load_file(str(run_a / "last" / "trainer.safetensors"))
    tb = load_file(str(run_b / "last" / "trainer.safetensors"))
    rng_keys = sorted(k for k in ta if k.startswith("rng."))
    assert rng_keys and rng_keys == sorted(k for k in tb if k.startswith("rng."))
    for key in rng_keys:
        assert torch.equal(ta[key], tb[key]), key
    ja = json.loads((run_a / "last" / "trainer.json").read_text())
    jb = json.loads((run_b / "last" / "trainer.json").read_text())
    assert ja["text_rng"] == jb["text_rng"]


class _Interrupt(Exception):
    pass


def test_killed_run_resumes_to_the_same_weights(flickr8k_root, tmp_path, use_cache, monkeypatch):
    # Weights and random streams are compared bit for bit: a run fixes its CPU thread count, so the
    # kernels sum in the same order in the resumed run as in the uninterrupted one.
    cfg = dict(epochs=3, max_steps_per_epoch=6, save_every=4, lr_decay_epoch=2, max_train_images=120,
               max_val_images=40, precision="fp32")
    full = tmp_path / "full"
    train(slice_config(flickr8k_root, **cfg), full, progress=False)

    killed = tmp_path / "killed"
    calls = {"n": 0}
    original = VSELoss.forward

    def dying_forward(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 11:  # mid-epoch 2, after the step-8 save
            raise _Interrupt()
        return original(self, *a, **k)

    monkeypatch.setattr(VSELoss, "forward", dying_forward)
    with pytest.raises(_Interrupt):
        train(slice_config(flickr8k_root, **cfg), killed, progress=False)
    monkeypatch.setattr(VSELoss, "forward", original)
    with pytest.raises(ValueError, match="--resume"):
        train(slice_config(flickr8k_root, **cfg), killed, progress=False)
    train(slice_config(flickr8k_root, **cfg), killed, resume=True, progress=False)

    a = load_file(str(full / "last" / "model.safetensors"))
    b = load_file(str(killed / "last" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=lambda m, key=key: f"{key}: {m}")
    assert_same_random_state(full, killed)
    ja = json.loads((full / "last" / "trainer.json").read_text())["state"]
    jb = json.loads((killed / "last" / "trainer.json").read_text())["state"]
    assert ja["global_step"] == jb["global_step"] == 18


# `vseinf train` with a test hook: VSELOSS_DIE_AT=N makes the N-th loss call raise, like a kill.
# vseinf is imported before torch, as `python -m vseinf` does.
DYING_TRAIN = """
import os, sys
from vseinf.losses import VSELoss
from vseinf.cli import main

die_at, calls, original = int(os.environ.get("VSELOSS_DIE_AT", "0")), [0], VSELoss.forward

def dying_forward(self, *args, **kwargs):
    calls[0] += 1
    if calls[0] == die_at:
        raise SystemExit(f"killed at loss call {die_at}")
    return original(self, *args, **kwargs)

VSELoss.forward = dying_forward
sys.exit(main(sys.argv[1:]))
"""


def test_reruns_and_resumes_give_the_same_weights_bit_for_bit(flickr8k_root, tmp_path, use_cache):
    """With nothing set in the environment (no MKL_DYNAMIC, no thread counts), two runs of one
    command, and a run killed mid-epoch and resumed, end with the same weights and optimizer
    moments bit for bit: vseinf turns MKL's load-dependent threading off and fixes the thread
    count, so CPU sums keep their order however busy the machine is."""
    launcher = tmp_path / "train.py"
    launcher.write_text(DYING_TRAIN)
    env = {k: v for k, v in os.environ.items()
           if k not in ("MKL_DYNAMIC", "OMP_DYNAMIC", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    # 120 captions / 16 = 7 steps, 4 an epoch; last/ is written at global steps 3, 4, 6 and 8.
    args = ["train", "--data", str(flickr8k_root), "--max_train_images", "24", "--max_val_images", "12",
            "--image_size", "96", "--embed_dim", "64", "--batch_size", "16", "--epochs", "2",
            "--lr_decay_epoch", "1", "--max_steps_per_epoch", "4", "--save_every", "3", "--precision", "fp32",
            "--no-progress"]

    def run(out, die_at=0, resume=False):
        return subprocess.run([sys.executable, str(launcher), *args, "--out", str(out)] + (["--resume"] if resume else []),
                              capture_output=True, text=True, env=dict(env, VSELOSS_DIE_AT=str(die_at)), timeout=600)

    for out in ("first", "second"):
        proc = run(tmp_path / out)
        assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run(tmp_path / "resumed", die_at=8)  # epoch 2, after the step-6 save
    assert proc.returncode != 0 and "killed at loss call 8" in proc.stderr, proc.stderr[-3000:]
    proc = run(tmp_path / "resumed", resume=True)
    assert proc.returncode == 0 and "resuming" in proc.stdout, proc.stderr[-3000:]
    for other in ("second", "resumed"):
        for name in ("model", "trainer"):
            a = load_file(str(tmp_path / "first" / "last" / f"{name}.safetensors"))
            b = load_file(str(tmp_path / other / "last" / f"{name}.safetensors"))
            assert a.keys() == b.keys()
            assert [k for k in a if not torch.equal(a[k], b[k])] == [], (other, name)


def _old_layout(checkpoint):
    """Rewrite a checkpoint as vseinf wrote it while the loss owned InfoNCE's temperature: not in
    the model's tensors, but in the trainer state as ``loss.logit_scale``."""
    from safetensors.torch import save_file

    model = load_file(str(checkpoint / "model.safetensors"))
    scale = model.pop("logit_scale")
    save_file(model, str(checkpoint / "model.safetensors"))
    if (checkpoint / "trainer.safetensors").exists():
        trainer = load_file(str(checkpoint / "trainer.safetensors"))
        save_file({**trainer, "loss.logit_scale": scale}, str(checkpoint / "trainer.safetensors"))


def test_a_run_saved_when_the_loss_held_the_temperature_resumes_and_loads(flickr8k_root, tmp_path, use_cache,
                                                                          monkeypatch):
    cfg = dict(loss="infonce", epochs=2, max_steps_per_epoch=4, save_every=3, lr_decay_epoch=1,
               max_train_images=24, max_val_images=12, image_size=96, embed_dim=64, batch_size=16,
               precision="fp32")
    full = tmp_path / "full"
    train(slice_config(flickr8k_root, **cfg), full, progress=False)
    killed = tmp_path / "killed"
    calls = {"n": 0}
    original = VSELoss.forward

    def dying_forward(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 6:  # epoch 2, after the end-of-epoch-1 save and validation
            raise _Interrupt()
        return original(self, *a, **k)

    monkeypatch.setattr(VSELoss, "forward", dying_forward)
    with pytest.raises(_Interrupt):
        train(slice_config(flickr8k_root, **cfg), killed, progress=False)
    monkeypatch.setattr(VSELoss, "forward", original)
    old_best = tmp_path / "old-best"
    shutil.copytree(killed / "best", old_best)
    _old_layout(old_best)
    _old_layout(killed / "last")
    train(slice_config(flickr8k_root, **cfg), killed, resume=True, progress=False)
    a = load_file(str(full / "last" / "model.safetensors"))
    b = load_file(str(killed / "last" / "model.safetensors"))
    assert a.keys() == b.keys() and "logit_scale" in a
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=lambda m, key=key: f"{key}: {m}")
    import vseinf

    model = vseinf.load_model(old_best)  # the temperature is not needed to embed
    assert model.encode_texts(["a dog"]).shape == (1, 64)


def test_live_image_crops_do_not_depend_on_loader_workers_or_a_resume(flickr8k_root, tmp_path, use_cache,
                                                                      monkeypatch):
    """Fine-tuning the CNN on live images: worker processes decode ahead, yet the crops (seeded by
    seed, rank, epoch and step) and so the weights are those of the single-process run, also after
    a kill and --resume."""
    cfg = dict(finetune_backbone="true", image_size=64, epochs=2, lr_decay_epoch=1, max_steps_per_epoch=4,
               batch_size=8, max_train_images=40, max_val_images=12, save_every=2, embed_dim=64, precision="fp32")
    inline = tmp_path / "inline"
    train(slice_config(flickr8k_root, **cfg, num_workers=0), inline, progress=False)

    workers = tmp_path / "workers"
    calls = {"n": 0}
    original = VSELoss.forward

    def dying_forward(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 7:  # epoch 2 (the CNN training), after the step-6 save
            raise _Interrupt()
        return original(self, *a, **k)

    monkeypatch.setattr(VSELoss, "forward", dying_forward)
    with pytest.raises(_Interrupt):
        train(slice_config(flickr8k_root, **cfg, num_workers=2), workers, progress=False)
    monkeypatch.setattr(VSELoss, "forward", original)
    train(slice_config(flickr8k_root, **cfg, num_workers=2), workers, resume=True, progress=False)

    a = load_file(str(inline / "last" / "model.safetensors"))
    b = load_file(str(workers / "last" / "model.safetensors"))
    assert any(k.startswith("image.backbone.") for k in a)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-5, msg=lambda m, key=key: f"{key}: {m}")
    assert_same_random_state(inline, workers)


def test_image_batches_seed_crops_by_step():
    """Batch k's crops are a function of (seed key, first_step + k): the same batch read from a
    resumed position, or by another worker, is the same tensor; another epoch's differs."""
    from PIL import Image

    from vseinf.data.images import ImageBatches, ImageTransform, image_batch_loader

    class Photos:  # stands in for an ImageDataset: one synthetic photo per index
        def load(self, index, generator=None):
            rng = np.random.default_rng(index)
            img = Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
            return ImageTransform(32, train=True)(img, generator=generator)

    batches = [[0, 1], [2, 3], [4, 5]]
    whole = list(image_batch_loader(ImageBatches(Photos(), batches, seed_key=(0, 0, 1))))
    resumed = list(image_batch_loader(ImageBatches(Photos(), batches[1:], seed_key=(0, 0, 1), first_step=1),
                                      num_workers=2))
    for (x, keep), (y, keep_y) in zip(whole[1:], resumed):
        assert keep == keep_y == [0, 1]
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    other_epoch = list(image_batch_loader(ImageBatches(Photos(), batches, seed_key=(0, 0, 2))))
    assert not torch.equal(whole[0][0], other_epoch[0][0])


def test_epoch_order_shards_disjointly():
    a = epoch_order(1000, 0, 3, World(0, 2), 16)
    b = epoch_order(1000, 0, 3, World(1, 2), 16)
    assert len(a) == len(b) == 496
    assert not set(a) & set(b)
    single = epoch_order(1000, 0, 3, World(0, 1), 32)
    # global batch k of two ranks = single-process batch k
    assert set(single[:32]) == set(a[:16]) | set(b[:16])
    assert np.array_equal(a, epoch_order(1000, 0, 3, World(0, 2), 16))
    assert not np.array_equal(a, epoch_order(1000, 0, 4, World(0, 2), 16))


@pytest.mark.parametrize("argv, message", [
    (["train", "--data", "/nonexistent/data", "--out", "{tmp}/r"], "/nonexistent/data"),
    (["train", "--data", "{tmp}", "--out", "{tmp}/r", "--no_such_key", "1"], "no_such_key"),
    (["train", "--out", "{tmp}/r", "--epochs", "many"], "expected int"),
    (["eval", "--checkpoint", "{tmp}/missing"], "missing"),
])
def test_cli_errors_are_one_line(argv, message, tmp_path):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    proc = subprocess.run([sys.executable, "-m", "vseinf", *argv], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert message in proc.stderr


@pytest.mark.parametrize("overrides", [
    # the CNN frozen in epoch 0, fine-tuned (0.1× lr, BN statistics frozen) from epoch 1, live images
    {"finetune_backbone": "true", "image_size": 96},
    # BiGRU text tower with GloVe initialisation, live tokens with the authors' augmentation
    {"text_encoder": "bigru", "glove": "true", "word_dim": 50},
])
def test_live_paths_train_and_save(flickr8k_root, tmp_path, use_cache, overrides):
    cfg = slice_config(flickr8k_root, max_train_images=40, max_val_images=20, epochs=2, lr_decay_epoch=1,
                       max_steps_per_epoch=3, batch_size=16, **overrides)
    run = tmp_path / "run"
    metrics = train(cfg, run, progress=False)
    assert metrics["rsum"] > 0
    state = load_file(str(run / "last" / "model.safetensors"))
    if overrides.get("finetune_backbone"):
        # the fine-tuned CNN is stored, and it changed from the pretrained weights
        from vseinf.encoders.cnn import build_backbone

        pretrained = build_backbone("mobilenet_v2").state_dict()
        key = "features.18.0.weight"
        assert not torch.equal(state[f"image.backbone.{key}"], pretrained[key])
        assert torch.equal(state["image.backbone.features.18.1.running_mean"], pretrained["features.18.1.running_mean"])
    else:
        assert "text.embed.weight" in state
    import vseinf

    model = vseinf.load_model(run / "best")
    assert model.encode_texts(["a dog"]).shape == (1, 512)


def test_pooling_lr_mult_puts_the_pooling_layers_in_their_own_group():
    """Default (paper): one head group. With ``pooling_lr_mult`` the GPO generators of both towers
    (and only they) train at lr × the multiplier, and the schedule keeps that ratio."""
    from vseinf.encoders.text import Vocabulary
    from vseinf.model import build_model
    from vseinf.train import build_optimizer

    cfg = load_config(None, [("model.image_encoder", "region"), ("model.feature_dim", "16"),
                             ("model.text_encoder", "bigru"), ("model.word_dim", "8"),
                             ("model.embed_dim", "32")])
    model = build_model(cfg.model, vocab=[*Vocabulary.SPECIALS, "dog", "cat"], pretrained=False)
    groups = {g["name"]: g for g in build_optimizer(model, cfg).param_groups}
    assert set(groups) == {"heads"}
    cfg.train.pooling_lr_mult = 10.0
    groups = {g["name"]: g for g in build_optimizer(model, cfg).param_groups}
    assert groups["pooling"]["lr"] == pytest.approx(cfg.train.lr * 10)
    pooling_ids = {id(p) for p in groups["pooling"]["params"]}
    expected = {id(p) for name, p in model.named_parameters() if ".gpool." in name}
    assert pooling_ids == expected and len(expected) > 0
    assert not pooling_ids & {id(p) for p in groups["heads"]["params"]}


def test_a_branched_model_trains_with_one_loss_per_branch_and_saves(flickr8k_root, tmp_path, use_cache, monkeypatch,
                                                                    capsys):
    """`gpo+max` on both sides (the bundled model's recipe): the loss gets the branch count, and the
    saved model embeds two unit halves. A 3-step warm-up is flagged as too short."""
    built = []
    original = VSELoss.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        built.append(self.branches)

    monkeypatch.setattr(VSELoss, "__init__", spy)
    cfg = slice_config(flickr8k_root, max_train_images=40, max_val_images=20, epochs=2, lr_decay_epoch=1,
                       max_steps_per_epoch=3, batch_size=16, image_pooling="gpo+max", text_pooling="gpo+max")
    metrics = train(cfg, tmp_path / "run", progress=False)
    assert built == [2] and metrics["rsum"] > 0
    assert "warning: the warm-up is only 3 steps" in capsys.readouterr().out
    import vseinf

    model = vseinf.load_model(tmp_path / "run" / "best")
    emb = model.encode_texts(["a dog runs", "two people"])
    assert emb.shape == (2, 512)
    halves = emb.reshape(2, 2, 256).norm(dim=-1)
    torch.testing.assert_close(halves, torch.full((2, 2), 2 ** -0.5))


def test_init_from_starts_the_run_from_a_saved_model(trained_run, flickr8k_root, tmp_path, use_cache):
    run, metrics = trained_run
    # With a vanishing lr nothing moves: the new run's validation is the saved model's, to the digit
    # (a run from scratch would score far lower after one step).
    cfg = slice_config(flickr8k_root, epochs=1, lr=1e-12, weight_decay=0, max_steps_per_epoch=1,
                       init_from=str(run / "best"), warmup_epochs=0)
    again = train(cfg, tmp_path / "again", progress=False)
    assert again["rsum"] == pytest.approx(metrics["rsum"], abs=1e-6)
    saved = json.loads((tmp_path / "again" / "config.json").read_text())
    assert saved["train"]["init_from"] == str((run / "best").resolve())


def test_init_from_fine_tunes_the_cnn_of_a_cached_feature_model(trained_run, flickr8k_root, tmp_path, use_cache):
    run, _ = trained_run
    cfg = slice_config(flickr8k_root, max_train_images=40, max_val_images=20, epochs=1, max_steps_per_epoch=2,
                       batch_size=16, image_size=96, finetune_backbone="true", freeze_backbone_epochs=0,
                       warmup_epochs=0, init_from=str(run / "best"))
    train(cfg, tmp_path / "ft", progress=False)
    start = load_file(str(run / "best" / "model.safetensors"))
    state = load_file(str(tmp_path / "ft" / "last" / "model.safetensors"))
    assert "image.backbone.features.18.0.weight" in state  # the CNN trained, so it is stored
    assert "image.backbone.features.18.0.weight" not in start
    # the heads went on from the saved ones (a fresh head would be ~1 away in relative terms)
    key = next(k for k in start if k.startswith("image.") and k.endswith("weight") and start[k].dim() == 2)
    assert (state[key] - start[key]).norm() < 0.1 * start[key].norm()


@pytest.mark.parametrize("train_embeddings", [True, False])
def test_text_fine_tuning_stores_what_it_trained(trained_run, flickr8k_root, tmp_path, use_cache, train_embeddings):
    from vseinf.model import build_model, load_model

    run, _ = trained_run
    cfg = slice_config(flickr8k_root, max_train_images=40, max_val_images=20, epochs=1, max_steps_per_epoch=2,
                       batch_size=16, warmup_epochs=0, lr=1e-3, text_backbone_lr_mult=1, finetune_text="true",
                       text_train_embeddings=str(train_embeddings).lower(), init_from=str(run / "best"))
    train(cfg, tmp_path / "ft", progress=False)
    state = load_file(str(tmp_path / "ft" / "last" / "model.safetensors"))
    pretrained = build_model(cfg).state_dict()
    layer, words = "text.bert.encoder.layer.5.output.dense.weight", "text.bert.embeddings.word_embeddings.weight"
    assert not torch.equal(state[layer], pretrained[layer])  # the transformer trained and is stored
    loaded = load_model(tmp_path / "ft" / "last").state_dict()
    assert torch.equal(loaded[layer], state[layer])
    if train_embeddings:
        assert not torch.equal(state[words], pretrained[words])
    else:  # left at the package's values: not stored, and rebuilt from the package on load
        assert not any(k.startswith("text.bert.embeddings.") for k in state)
        saved = json.loads((tmp_path / "ft" / "last" / "config.json").read_text())
        assert "text.bert.embeddings." in saved["stored_prefixes_skipped"]
        assert torch.equal(loaded[words], pretrained[words])


@pytest.mark.parametrize("override, message", [
    ({"embed_dim": 256}, "model.embed_dim=512"),
    ({"text_pooling": "max"}, "model.text_pooling='gpo'"),
    ({"init_from": "{tmp}/nothing"}, "train.init_from"),
])
def test_init_from_refuses_what_does_not_fit(trained_run, flickr8k_root, tmp_path, use_cache, override, message):
    run, _ = trained_run
    pairs = {"epochs": 1, "max_steps_per_epoch": 1, "init_from": str(run / "best"), **override}
    pairs["init_from"] = pairs["init_from"].replace("{tmp}", str(tmp_path))
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        train(slice_config(flickr8k_root, **pairs), tmp_path / "r", progress=False)

"""Distributed training with torchrun on CPU (gloo): two processes train exactly like one."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

ARGS = ["--max_train_images", "24", "--max_val_images", "12", "--image_size", "96", "--embed_dim", "64",
        "--epochs", "2", "--lr_decay_epoch", "1", "--size_augment", "false", "--log_every", "1",
        "--save_every", "0", "--precision", "fp32"]


# `python -m torch.distributed.run` is torchrun itself, and found wherever torch is importable
# (the torchrun script need not be on PATH).
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def _train(cmd, env):
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def check_two_processes_train_like_one(data_root, tmp_path, env, rtol=1e-4, atol=1e-5, port=29517,
                                       loss="hinge") -> None:
    """`vseinf train` at batch 16 in one process and at batch 8 × 2 ranks under torchrun end with
    the same weights (InfoNCE's learned temperature included) and log the same losses; only rank
    0 writes the log."""
    common = ["--data", str(data_root), *ARGS, "--loss", loss]
    one = tmp_path / "one"
    _train([sys.executable, "-m", "vseinf", "train", "--out", str(one), "--batch_size", "16", "--no-progress",
            *common], env)
    two = tmp_path / "two"
    _train([*TORCHRUN, "--nproc_per_node", "2", "--master_port", str(port), "-m", "vseinf", "train",
            "--out", str(two), "--batch_size", "8", "--no-progress", *common], env)
    a = load_file(str(one / "last" / "model.safetensors"))
    b = load_file(str(two / "last" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=rtol, atol=atol, msg=key)
    # only rank 0 writes: one log line per step, not two; each rank's loss is the global batch's
    losses = [[json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines() if '"loss"' in line]
              for run in (one, two)]
    assert len(losses[0]) == len(losses[1]) > 0
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)


@pytest.mark.parametrize("loss", ["hinge", "infonce"])
def test_two_gloo_processes_equal_one_process(flickr8k_root, tmp_path, use_cache, loss):
    # gloo on the CPU even where GPUs exist (tests/test_cuda.py runs the nccl twin)
    check_two_processes_train_like_one(flickr8k_root, tmp_path,
                                       dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES=""), loss=loss)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_machines_with_their_own_caches_train_like_one_process(flickr8k_root, tmp_path, use_cache):
    """Two torchrun "machines" (--nnodes 2, one process each) whose VSEINF_CACHE is not shared:
    the second builds its own feature caches, the run ends with the one-process weights, and only
    global rank 0 writes (the --out folder is shared, as on a cluster file system)."""
    common = ["--data", str(flickr8k_root), *ARGS, "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    one = tmp_path / "one"
    _train([sys.executable, "-m", "vseinf", "train", "--out", str(one), "--batch_size", "16", *common], env)
    two, port = tmp_path / "two", _free_port()
    node_cache = {0: use_cache, 1: tmp_path / "machine-1-cache"}
    nodes = [subprocess.Popen(
        [*TORCHRUN, "--nnodes", "2", "--node_rank", str(node), "--nproc_per_node", "1",
         "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "vseinf", "train",
         "--out", str(two), "--batch_size", "8", *common],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(env, VSEINF_CACHE=str(node_cache[node]))) for node in (0, 1)]
    outputs = [proc.communicate(timeout=600) for proc in nodes]
    for proc, (out, err) in zip(nodes, outputs):
        assert proc.returncode == 0, out[-2000:] + err[-4000:]
    a = load_file(str(one / "last" / "model.safetensors"))
    b = load_file(str(two / "last" / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
    # machine 1 built its own copy of every cache (train and val, images and text)
    built = sorted(p.name.rsplit("-", 1)[0] for p in (node_cache[1] / "features").iterdir())
    assert len(built) == 4 and not [n for n in built if n.startswith(".")], built
    assert "train:" in outputs[0][0] and "train:" not in outputs[1][0]  # rank 0 alone prints
    steps = [line for line in (two / "log.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(steps) == len([line for line in (one / "log.jsonl").read_text().splitlines() if '"loss"' in line])


def _turns_worker(rank: int, init_file: str, order, fail_rank: int) -> None:
    import torch.distributed as dist

    from vseinf.distributed import World, in_turns

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=4)
    try:
        # two machines: ranks 0, 1 on the first, 2, 3 on the second
        world = World(rank=rank, size=4, local_rank=rank % 2)

        def work():
            order.append(rank)
            if rank == fail_rank:
                raise ValueError(f"rank {rank}: broken data")
            return rank * 10

        try:
            order.append(("result", rank, in_turns(world, "cpu", work, "building the feature caches")))
        except Exception as e:
            order.append(("error", rank, str(e)))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("fail_rank", [-1, 2])
def test_feature_caches_are_built_in_turns_and_a_failure_stops_every_rank(tmp_path, fail_rank):
    """Rank 0 first, then the first process of each other machine, then the rest; an error on
    one rank reaches all of them at once, instead of leaving them waiting for the timeout."""
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        order = manager.list()
        mp.spawn(_turns_worker, args=(str(tmp_path / "init"), order, fail_rank), nprocs=4, join=True)
        order = list(order)
    work = [x for x in order if isinstance(x, int)]
    ends = {x[1]: x for x in order if isinstance(x, tuple)}
    if fail_rank < 0:
        assert work[0] == 0 and work[1] == 2 and sorted(work[2:]) == [1, 3]
        assert ends == {r: ("result", r, r * 10) for r in range(4)}
    else:
        assert work == [0, 2]  # the third turn never starts
        assert ends[2] == ("error", 2, "rank 2: broken data")
        for r in (0, 1, 3):
            assert ends[r][0] == "error" and "another process failed while building the feature caches" in ends[r][2]


# Runs `vseinf train` under torchrun with two test hooks (environment variables, so the same
# script serves the full, the killed and the resumed run): every checkpoint write is recorded with
# the writing rank, and VSELOSS_DIE_AT=N makes the N-th loss call of every rank raise — the same
# step on both ranks, like a job that is killed as a whole.
LAUNCHER = '''
import os, sys
import vseinf.train.loop as train_loop
import vseinf.train.state as train_state
from vseinf.losses import VSELoss
from vseinf.cli import main

rank = os.environ["RANK"]
saves = os.environ["SAVES_LOG"]
original_save = train_state.save_model  # the loop saves best/, the state module last/

def recording_save(model, path, *args, **kwargs):
    with open(saves, "a") as f:
        f.write(f"{rank} {os.path.basename(str(path))}\\n")
    return original_save(model, path, *args, **kwargs)

train_loop.save_model = train_state.save_model = recording_save
die_at = int(os.environ.get("VSELOSS_DIE_AT", "0"))
if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0" and os.environ.get("DIE_ONCE"):
    die_at = 0  # torchrun restarted the job after the kill: this attempt runs to the end
original_forward = VSELoss.forward
calls = [0]

def dying_forward(self, *args, **kwargs):
    calls[0] += 1
    if calls[0] == die_at:
        raise SystemExit(f"rank {rank}: killed at loss call {die_at}")
    return original_forward(self, *args, **kwargs)

VSELoss.forward = dying_forward

if os.environ.get("WEIGHTS_DIR"):  # each rank's weights at every last/ save, as rank<r>.safetensors
    from safetensors.torch import save_file

    original_save_last = train_loop._save_last

    def saving_every_rank(run, state):
        weights = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
        save_file(weights, os.path.join(os.environ["WEIGHTS_DIR"], f"rank{rank}.safetensors"))
        return original_save_last(run, state)

    train_loop._save_last = saving_every_rank
sys.exit(main(sys.argv[1:]))
'''


def test_killed_distributed_run_resumes_to_the_same_weights(flickr8k_root, tmp_path, use_cache):
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER)
    # Size augmentation on: each rank draws its own random drops, so the resumed ranks must get
    # back their own RNG streams, not rank 0's. 120 captions / (8 × 2) = 7 steps per epoch; with
    # save_every 3 the last mid-epoch save before the kill (loss call 11 = global step 11, in
    # epoch 2) is step 9.
    args = [a for a in ARGS if a not in ("--save_every", "0", "--size_augment", "false")]
    common = ["train", "--data", str(flickr8k_root), *args, "--size_augment", "true", "--save_every", "3",
              "--batch_size", "8", "--no-progress"]
    saves = tmp_path / "saves.txt"

    def run(out, die_at=0, resume=False, restarts=0):
        env = dict(os.environ, OMP_NUM_THREADS="1", SAVES_LOG=str(saves), VSELOSS_DIE_AT=str(die_at),
                   CUDA_VISIBLE_DEVICES="", DIE_ONCE="1" if restarts else "")
        cmd = [*TORCHRUN, "--standalone", "--nproc_per_node", "2", "--max_restarts", str(restarts), str(launcher),
               *common, "--out", str(out)]
        flag = ["--resume", "auto"] if resume == "auto" else ["--resume"] if resume else []
        return subprocess.run(cmd + flag, capture_output=True, text=True, env=env, timeout=600)

    full = tmp_path / "full"
    proc = run(full)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    killed = tmp_path / "killed"
    proc = run(killed, die_at=11)
    assert proc.returncode != 0 and "killed at loss call 11" in proc.stderr, proc.stderr[-4000:]
    state = json.loads((killed / "last" / "trainer.json").read_text())["state"]
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (1, 2, 9)
    proc = run(killed, resume=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "resuming" in proc.stdout

    a = load_file(str(full / "last" / "model.safetensors"))
    b = load_file(str(killed / "last" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-5, msg=key)
    ja = json.loads((full / "last" / "trainer.json").read_text())["state"]
    jb = json.loads((killed / "last" / "trainer.json").read_text())["state"]
    assert ja["global_step"] == jb["global_step"] == 14

    # The same kill under `torchrun --max_restarts 1` with `--resume auto`: the first attempt starts
    # the run, torchrun restarts the job by itself, and the second attempt resumes it from step 9.
    restarted = tmp_path / "restarted"
    proc = run(restarted, die_at=11, resume="auto", restarts=1)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "killed at loss call 11" in proc.stderr and "resuming" in proc.stdout
    c = load_file(str(restarted / "last" / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], c[key], rtol=1e-5, atol=1e-5, msg=key)
    # Every checkpoint (last/ and best/, in all three runs) was written by rank 0 alone.
    writers = [line.split() for line in saves.read_text().splitlines()]
    assert writers and {rank for rank, _ in writers} == {"0"}
    assert {name for _, name in writers} == {"last", "best"}


def test_the_ranks_stay_identical_after_the_cnn_is_unfrozen(flickr8k_root, tmp_path, use_cache):
    """Fine-tuning the CNN on live images from epoch 2 on: the ranks crop differently, yet their
    weights, CNN included, stay equal bit for bit (DistributedDataParallel covers the parameters
    that start training mid-run)."""
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER)
    weights = tmp_path / "weights"
    weights.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", SAVES_LOG=str(tmp_path / "saves.txt"),
               WEIGHTS_DIR=str(weights))
    _train([*TORCHRUN, "--standalone", "--nproc_per_node", "2", str(launcher), "train", "--data", str(flickr8k_root),
            *ARGS, "--finetune_backbone", "true", "--image_size", "64", "--batch_size", "8",
            "--max_steps_per_epoch", "3", "--no-progress", "--out", str(tmp_path / "run")], env)
    a = load_file(str(weights / "rank0.safetensors"))
    b = load_file(str(weights / "rank1.safetensors"))
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    from vseinf.encoders.cnn import build_backbone

    pretrained = build_backbone("mobilenet_v2").state_dict()
    assert not torch.equal(a["image.backbone.features.18.0.weight"], pretrained["features.18.0.weight"])


def _skip_worker(rank: int, init_file: str, results) -> None:
    import torch.distributed as dist

    from vseinf.distributed import World
    from vseinf.train.loop import _any_rank_skips

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        world = World(rank=rank, size=2)
        # Rank 1 alone has a batch with no readable image: both ranks must skip that step together.
        results[rank] = (_any_rank_skips(rank == 1, world, True, "cpu"),
                         _any_rank_skips(False, world, True, "cpu"))
    finally:
        dist.destroy_process_group()


def test_a_batch_unreadable_on_one_rank_is_skipped_by_every_rank(tmp_path):
    """A live-image batch whose images all fail to load on one rank must not leave the other rank
    waiting in the gradient all-reduce: the skip decision is shared."""
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_skip_worker, args=(str(tmp_path / "init"), results), nprocs=2, join=True)
        assert dict(results) == {0: (True, False), 1: (True, False)}

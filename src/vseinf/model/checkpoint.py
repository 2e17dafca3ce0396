"""Checkpoints: a directory with ``model.safetensors`` + ``config.json`` (+ ``metrics.json``).

Writes are atomic: a checkpoint is assembled in a temporary sibling directory and swapped in by
renames, so a run killed mid-write leaves the previous checkpoint intact. Training state (optimizer
moments, step counters, RNG) is stored the same way — tensors in safetensors, the rest in JSON — so
resuming never unpickles anything. Importing the authors' released checkpoints (pickles) lives in
:mod:`vseinf.model.convert` and is only done when the user says they trust the file.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
TRAINER_TENSORS = "trainer.safetensors"
TRAINER_STATE = "trainer.json"


# Tensors that older versions saved under another name: old name → current name.
RENAMED_TENSORS = {
    # InfoNCE's learnable temperature belonged to the loss (saved with the trainer state); the model owns it now.
    "loss.logit_scale": "logit_scale",
}


def upgrade_state_dict(state: dict) -> dict:
    """``state`` with the tensors of older checkpoints renamed to the current names (see RENAMED_TENSORS)."""
    return {RENAMED_TENSORS.get(key, key): value for key, value in state.items()}


class CheckpointError(ValueError):
    """A checkpoint directory that is missing, incomplete or of the wrong kind."""


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _contiguous(state: dict) -> dict:
    # safetensors refuses shared or non-contiguous storage; clone what needs it.
    out = {}
    seen = set()
    for key, value in state.items():
        t = value.detach().cpu()
        if not t.is_contiguous() or t.untyped_storage().data_ptr() in seen:
            t = t.contiguous().clone()
        seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


def save_dir_atomic(target: str | Path, write) -> Path:
    """Call ``write(tmp_dir)`` to fill a fresh directory, then swap it into ``target`` atomically."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(tmp)
        for f in tmp.iterdir():  # flush file contents before the rename makes them visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        old = target.with_name(f".{target.name}.old")
        if old.exists():
            shutil.rmtree(old)
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        if old.exists():
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _recover(path: Path) -> Path:
    """If a swap was interrupted between its two renames, the previous checkpoint is at ``.name.old``."""
    if not path.exists():
        old = path.with_name(f".{path.name}.old")
        if old.exists():
            os.replace(old, path)
    return path


def save_checkpoint(path: str | Path, state_dict: dict, config: dict, metrics: dict | None = None,
                    trainer_state: tuple[dict, dict] | None = None) -> Path:
    """Write a checkpoint directory atomically.

    Args:
        path: the directory to (re)write.
        state_dict: model tensors.
        config: the run's full config (JSON-serialisable dict).
        metrics: optional metrics (e.g. the validation table of this checkpoint).
        trainer_state: optional (tensors, json_state) to resume training.
    """

    def write(tmp: Path):
        save_file(_contiguous(state_dict), str(tmp / MODEL_FILE))
        _write_json(tmp / CONFIG_FILE, config)
        if metrics is not None:
            _write_json(tmp / METRICS_FILE, metrics)
        if trainer_state is not None:
            tensors, state = trainer_state
            save_file(_contiguous(tensors), str(tmp / TRAINER_TENSORS))
            _write_json(tmp / TRAINER_STATE, state)

    return save_dir_atomic(path, write)


def read_json(path: Path, what: str) -> dict:
    """The JSON object in ``path``; a missing file, bad JSON or another JSON type is a CheckpointError."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing ({what})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object ({what}), got {_json_type(data)}")
    return data


def _json_type(value) -> str:
    return {list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number",
            type(None): "null"}.get(type(value), type(value).__name__)


def _shape(shape) -> str:
    return "×".join(str(n) for n in shape) if len(shape) else "a scalar"


def check_shapes(expected: dict, state: dict, where: str, config: dict | None = None) -> None:
    """Refuse stored tensors whose shapes differ from the model's, naming the first such tensor.

    Args:
        expected: the model's state dict (name → tensor) that ``state`` is about to be loaded into.
        state: tensors read from the checkpoint.
        where: the checkpoint file, for the message.
        config: the checkpoint's model section; when the stored shape differs only where the model
            has ``embed_dim``, the message says that ``model.embed_dim`` does not match the weights.
    """
    wrong = [k for k, v in state.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    if not wrong:
        return
    more = f" ({len(wrong) - 1} more tensors differ)" if len(wrong) > 1 else ""
    dim = (config or {}).get("embed_dim")
    for key in wrong:  # a wrong embed_dim shows as tensors that differ exactly where the model has it
        got, want = tuple(state[key].shape), tuple(expected[key].shape)
        if dim is None or len(got) != len(want):
            continue
        differ = [i for i in range(len(got)) if got[i] != want[i]]
        stored = {got[i] for i in differ}
        if all(want[i] == dim for i in differ) and len(stored) == 1:
            raise CheckpointError(f"{where}: the weights have embed_dim {stored.pop()} (tensor {key} is "
                                  f"{_shape(got)}) but config.json says model.embed_dim={dim}{more}")
    key = wrong[0]
    raise CheckpointError(f"{where}: tensor {key} has shape {_shape(state[key].shape)}, but the model its "
                          f"config.json describes needs {_shape(expected[key].shape)}{more}")


def load_checkpoint(path: str | Path, map_location: str = "cpu"):
    """Read a checkpoint directory: returns (state_dict, config dict, metrics dict or None)."""
    path = _recover(Path(path))
    if path.is_file() and path.name == MODEL_FILE:
        path = path.parent
    if not path.is_dir():
        if path.is_file():
            raise CheckpointError(f"{path}: a vseinf checkpoint is a directory with {MODEL_FILE} and "
                                  f"{CONFIG_FILE}; to import the authors' .pth files use `vseinf convert`")
        raise CheckpointError(f"{path}: checkpoint directory not found")
    model_file = path / MODEL_FILE
    if not model_file.is_file():
        raise CheckpointError(f"{path}: no {MODEL_FILE} in this directory")
    config = read_json(path / CONFIG_FILE, "the run's config")
    metrics = read_json(path / METRICS_FILE, "metrics") if (path / METRICS_FILE).is_file() else None
    try:
        state = load_file(str(model_file), device=map_location)
    except Exception as exc:
        raise CheckpointError(f"{model_file}: cannot read safetensors ({exc})") from None
    return state, config, metrics


def load_trainer_state(path: str | Path):
    """(tensors, json_state) saved by :func:`save_checkpoint` for resuming, or None if absent."""
    path = _recover(Path(path))
    if not (path / TRAINER_STATE).is_file():
        return None
    return load_file(str(path / TRAINER_TENSORS)), read_json(path / TRAINER_STATE, "trainer state")


def optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Split an optimizer state dict into tensors (for safetensors) and plain JSON."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for name, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{pid}.{name}"] = value
            else:
                scalars[f"{pid}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_flat(optimizer: torch.optim.Optimizer, tensors: dict, state: dict) -> None:
    state_dict: dict = {"state": {}, "param_groups": state["param_groups"]}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            state_dict["state"].setdefault(int(pid), {})[name] = value
    for key, value in state.get("scalars", {}).items():
        pid, name = key.split(".", 1)
        state_dict["state"].setdefault(int(pid), {})[name] = value
    optimizer.load_state_dict(state_dict)

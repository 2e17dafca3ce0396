"""Training a VSE∞ model (``vseinf train``): :func:`train` runs a whole run, resumable and
reproducible, in one process or under torchrun.

    loop.py     the loop, read top to bottom: train() → start_run() → per epoch train_one_epoch()
                (one training_step() per batch) and _end_epoch() (validation, best/ and last/)
    inputs.py   what a batch is made of: the splits, each side's inputs (feature cache or live
                images/tokens), the epoch's caption order across ranks
    optim.py    AdamW with the paper's parameter groups, the step schedule, when the CNN trains
    state.py    the run directory, the resumable last/ checkpoint, RNG streams, fixed threads and
                deterministic kernels
    history.py  log.jsonl and its plot, training.png

Validation uses :mod:`vseinf.eval` (which imports nothing from here); process groups and ranks
come from :mod:`vseinf.distributed` (shared with ``vseinf encode``).
"""

from ..distributed import World
from ..features import uses_image_cache, uses_text_cache
from .history import plot_history
from .inputs import epoch_order
from .loop import train, train_one_epoch
from .optim import build_optimizer
from .state import has_checkpoint

__all__ = ["World", "build_optimizer", "epoch_order", "has_checkpoint", "plot_history", "train", "train_one_epoch",
           "uses_image_cache", "uses_text_cache"]

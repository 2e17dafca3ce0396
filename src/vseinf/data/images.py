"""Image loading, the two image transforms of the paper, and a dataset that survives bad files.

There is no torchvision here (it does not work with every torch build we support): resizing
and cropping use PIL, the tensor conversion uses numpy.

- :func:`load_rgb` opens an image fully (so a truncated file fails here, not later) and raises
  :class:`BadImageError`, naming the file, for anything that is not a readable image.
- :class:`ImageTransform` is the eval transform (resize to S×S, aspect not kept, as the
  paper's 512×512 grid input) or the train transform (random resized crop, scale 0.6–1.0,
  aspect 3/4–4/3, then S×S, and a horizontal flip with p = 0.5).
- :class:`ImageDataset` returns ``None`` for an unreadable image instead of raising, so one bad
  file never ends an epoch; :func:`collate_skip_broken` drops those ``None`` items, and the
  dataset remembers which files were skipped, also across DataLoader worker processes.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset, default_collate, get_worker_info

from .records import CaptionSplit, DataFormatError

log = logging.getLogger(__name__)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BadImageError",
    "ImageDataset",
    "ImageTransform",
    "collate_skip_broken",
    "load_rgb",
    "sample_crop",
    "to_tensor",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BadImageError(ValueError):
    """An image file is missing, empty, truncated or not an image at all.

    Args:
        path: the file.
        reason: what went wrong, in words.
    """

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


def load_rgb(path: str | os.PathLike, exif_transpose: bool = True) -> Image.Image:
    """Opens an image file as an RGB ``PIL.Image``, fully decoded.

    Args:
        path: the file.
        exif_transpose: turn the pixels upright as the EXIF orientation tag says (phone
            photos are often stored sideways with such a tag).

    Raises:
        BadImageError: the file is missing, empty, truncated or not a readable image.
    """
    path = Path(path)
    if not path.is_file():
        raise BadImageError(path, "file not found")
    if path.stat().st_size == 0:
        raise BadImageError(path, "empty file")
    try:
        with Image.open(path) as im:
            # load() decodes every pixel now: PIL is lazy, and a truncated JPEG would otherwise
            # only fail later, inside a transform, with a message that does not name the file.
            im.load()
            if exif_transpose:
                try:
                    im = ImageOps.exif_transpose(im)
                except Exception:  # a corrupt EXIF block: keep the pixels as stored
                    pass
            return im.convert("RGB")
    except Image.DecompressionBombError as e:
        raise BadImageError(path, f"image too large ({e})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        # PIL signals "not an image" and "truncated" as OSError (UnidentifiedImageError is
        # one) and sometimes as SyntaxError/ValueError from a format plug-in.
        raise BadImageError(path, f"not a readable image ({e})") from None


def to_tensor(img: Image.Image, mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """An RGB image as a normalised float32 tensor ``3×H×W``: ``(pixel / 255 − mean) / std``."""
    arr = np.asarray(img.convert("RGB"), dtype=np.float32)  # H×W×3
    x = torch.from_numpy(arr).permute(2, 0, 1).div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return x.sub_(m).div_(s).contiguous()


def sample_crop(width: int, height: int, scale: tuple[float, float] = (0.6, 1.0),
                ratio: tuple[float, float] = (3 / 4, 4 / 3),
                generator: torch.Generator | None = None) -> tuple[int, int, int, int]:
    """Draws a random crop box ``(left, top, w, h)`` covering a random share of the image.

    The crop area is ``scale`` × the image area and its aspect ratio ``w / h`` is log-uniform
    in ``ratio`` (the "random resized crop" of the ImageNet recipes). Up to ten draws are tried;
    if none fits inside the image, the largest centred crop with a ratio in range is used.
    """
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        u = torch.rand(4, generator=generator).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_lo + (log_hi - log_lo) * u[1])
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left = min(int(u[2] * (width - w + 1)), width - w)
            top = min(int(u[3] * (height - h + 1)), height - h)
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


class ImageTransform:
    """PIL image → normalised float tensor ``3×S×S``.

    Args:
        size: the output side S (the paper's grid models use 512).
        train: ``False``: resize the whole image to S×S (aspect ratio not kept, as the paper
            does). ``True``: random resized crop (scale ``crop_scale``, aspect 3/4–4/3) resized
            to S×S, then a horizontal flip with probability 0.5.
        mean: per-channel mean subtracted after scaling pixels to [0, 1].
        std: per-channel standard deviation divided by.
        seed: makes the train transform reproducible. In DataLoader workers each worker
            reseeds with ``seed + worker_id`` so workers do not repeat each other's crops.
            ``None`` (and no ``generator``): torch's global RNG, which DataLoader seeds per
            worker.
        generator: an explicit ``torch.Generator`` to draw from instead of ``seed``.
        crop_scale: the range of the crop's share of the image area.
    """

    def __init__(self, size: int, train: bool, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, seed: int | None = None,
                 generator: torch.Generator | None = None,
                 crop_scale: tuple[float, float] = (0.6, 1.0)) -> None:
        if int(size) <= 0:
            raise ValueError(f"size: must be positive, got {size}")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError("mean/std: need three values each, std > 0")
        if not 0 < crop_scale[0] <= crop_scale[1] <= 1:
            raise ValueError(f"crop_scale: need 0 < low <= high <= 1, got {crop_scale}")
        self.size = int(size)
        self.train = bool(train)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.crop_scale = (float(crop_scale[0]), float(crop_scale[1]))
        self.seed = seed
        self.generator = generator
        if generator is None and seed is not None:
            self.generator = torch.Generator().manual_seed(int(seed))
        self._seeded_worker: int | None = None

    def _rng(self) -> torch.Generator | None:
        info = get_worker_info()
        if info is not None and self.seed is not None and self._seeded_worker != info.id:
            # Each worker holds a copy of this object with the same generator state; without
            # reseeding, every worker would draw the same crops.
            self.generator = torch.Generator().manual_seed(int(self.seed) + info.id)
            self._seeded_worker = info.id
        return self.generator

    def __call__(self, img: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        """Transforms one image; ``generator`` overrides the transform's own randomness."""
        s = self.size
        if not self.train:
            out = img.resize((s, s), Image.BILINEAR)
        else:
            rng = generator if generator is not None else self._rng()
            left, top, w, h = sample_crop(img.width, img.height, self.crop_scale, generator=rng)
            out = img.resize((s, s), Image.BILINEAR, box=(left, top, left + w, top + h))
            if torch.rand(1, generator=rng).item() < 0.5:
                out = out.transpose(Image.FLIP_LEFT_RIGHT)
        return to_tensor(out, self.mean, self.std)

    def __repr__(self) -> str:
        mode = f"train, crop scale {self.crop_scale}" if self.train else "eval"
        return f"ImageTransform(size={self.size}, {mode})"


class ImageDataset(Dataset):
    """Images of a split (or a list of files) as tensors; unreadable files yield ``None``.

    ``dataset[i]`` is ``(tensor 3×S×S, i)``, or ``None`` when the file is missing, empty or not
    a readable image: a warning names the file (once), the file is counted, and the epoch goes
    on. Use ``collate_fn=collate_skip_broken`` in the DataLoader. The record of skipped files
    lives in shared memory, so it is complete with ``num_workers > 0`` too; read it with
    :attr:`skipped` or :meth:`skipped_report`.

    A split none of whose image files exists is an error naming them: the image folder (or the
    paths in the captions file) is wrong, and every batch would otherwise come out empty.

    Args:
        source: a :class:`CaptionSplit` with image files, or a sequence of image paths.
        transform: turns a PIL image into a tensor, e.g. :class:`ImageTransform`.
    """

    def __init__(self, source: CaptionSplit | Sequence[str | os.PathLike],
                 transform: ImageTransform) -> None:
        if isinstance(source, CaptionSplit):
            if source.image_root is None:
                raise ValueError(f"{source.name}: a split of precomputed features has no image "
                                 "files to load")
            self.paths = [source.image_path(i) for i in range(source.n_images)]
            _check_some_image_exists(source, self.paths)
        else:
            self.paths = [Path(p) for p in source]
        self.transform = transform
        # A shared-memory flag per image: workers set it, the main process reads it.
        self._broken = torch.zeros(len(self.paths), dtype=torch.bool).share_memory_()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | None:
        pixels = self.load(index)
        return None if pixels is None else (pixels, index)

    def load(self, index: int, generator: torch.Generator | None = None) -> torch.Tensor | None:
        """Image ``index`` transformed (random crops drawn from ``generator`` when given), or
        ``None`` if the file cannot be read (recorded and warned about once)."""
        path = self.paths[index]
        try:
            img = load_rgb(path)
        except BadImageError as e:
            if not self._broken[index]:
                log.warning("skipping unreadable image %s", e)
                self._broken[index] = True
            return None
        return self.transform(img, generator=generator)

    @property
    def skipped(self) -> list[Path]:
        """The files found unreadable so far, in dataset order."""
        return [self.paths[i] for i in torch.nonzero(self._broken).flatten().tolist()]

    @property
    def n_skipped(self) -> int:
        return int(self._broken.sum())

    def skipped_report(self, limit: int = 5) -> str:
        """E.g. ``"skipped 3 unreadable images: a.jpg, b.jpg, c.jpg"`` (empty when none)."""
        return skipped_report(self.skipped, limit)


def skipped_report(files: Sequence[str | os.PathLike], limit: int = 5) -> str:
    """E.g. ``"skipped 3 unreadable images: a.jpg, b.jpg, c.jpg"`` (empty when none)."""
    if not files:
        return ""
    names = ", ".join(Path(p).name for p in files[:limit])
    more = f", … and {len(files) - limit} more" if len(files) > limit else ""
    noun = "image" if len(files) == 1 else "images"
    return f"skipped {len(files)} unreadable {noun}: {names}{more}"


def _check_some_image_exists(split: CaptionSplit, paths: Sequence[Path]) -> None:
    """Raise when not one of ``paths`` exists (stops at the first that does: one stat, usually)."""
    if not paths or any(p.exists() for p in paths):
        return
    names = ", ".join(split.image_keys[:3]) + (", …" if len(paths) > 3 else "")
    raise DataFormatError(split.image_root, f"none of the {len(paths)} images of {split.name} is here "
                                            f"({names}); is the image folder right?")


def collate_skip_broken(batch: Sequence[object]) -> object | None:
    """``default_collate`` over the items that are not ``None``; ``None`` if none is left.

    With :class:`ImageDataset` a batch becomes ``(images B×3×S×S, indices LongTensor[B])``,
    where ``indices`` says which dataset items survived; a loop should skip a ``None`` batch.
    """
    kept = [item for item in batch if item is not None]
    if not kept:
        return None
    return default_collate(kept)


class ImageBatches(Dataset):
    """Item k = the images of ``batches[k]`` (a sequence of image indices) as ``(pixels B'×3×S×S,
    kept positions)``, or ``(None, [])`` when none of them can be read.

    Training reads it through :func:`image_batch_loader`, so worker processes decode and augment
    the next batches while the model trains on this one. With ``seed_key`` the random crops of
    batch k come from a generator seeded by ``(*seed_key, first_step + k)``: they depend neither on
    the number of workers nor on the step a resumed run starts from.

    Args:
        dataset: the images (with a train or eval transform).
        batches: image indices per batch.
        seed_key: e.g. ``(seed, rank, epoch)``; None: the transform's own randomness.
        first_step: the step number of ``batches[0]`` (a resumed epoch starts mid-way).
    """

    def __init__(self, dataset: ImageDataset, batches: Sequence[Sequence[int]],
                 seed_key: Sequence[int] | None = None, first_step: int = 0) -> None:
        self.dataset = dataset
        self.batches = [[int(i) for i in b] for b in batches]
        self.seed_key = None if seed_key is None else [int(x) for x in seed_key]
        self.first_step = int(first_step)

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, k: int) -> tuple[torch.Tensor | None, list[int]]:
        generator = None
        if self.seed_key is not None:
            seed = np.random.SeedSequence([*self.seed_key, self.first_step + k]).generate_state(1)[0]
            generator = torch.Generator().manual_seed(int(seed))
        items = [self.dataset.load(i, generator=generator) for i in self.batches[k]]
        keep = [j for j, item in enumerate(items) if item is not None]
        if not keep:
            return None, keep
        return torch.stack([items[j] for j in keep]), keep


def image_batch_loader(batches: Dataset, num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """The items of ``batches`` (each already a batch, e.g. :class:`ImageBatches`) in order,
    ``num_workers`` processes decoding ahead (0: in this process, on demand); ``pin_memory`` for
    fast, asynchronous copies to a GPU."""
    # Its own generator: a DataLoader otherwise draws its workers' base seed from torch's global
    # RNG, which would shift the training's other random draws (size augmentation) whenever a
    # loader is created, e.g. at a --resume. The crops do not need it: ImageBatches seeds them.
    return DataLoader(batches, batch_size=None, shuffle=False, num_workers=max(0, int(num_workers)),
                      pin_memory=pin_memory, prefetch_factor=2 if num_workers > 0 else None,
                      generator=torch.Generator().manual_seed(0))


class DecodedImageBatches(Dataset):
    """Item k = batch k of ``images`` (paths or PIL images) decoded and transformed: ``(pixels |
    None, kept positions, skipped as (position, reason))``. Each image is resized by ``transform``
    right after decoding, so a batch of large photos costs S×S pixels each, not their full size.

    Args:
        images: file paths or PIL images.
        transform: e.g. an eval :class:`ImageTransform`.
        batch_size: images per item.
        skip_unreadable: report a file that is not a readable image in ``skipped`` (else raise
            :class:`BadImageError` naming it).
    """

    def __init__(self, images: Sequence, transform, batch_size: int, skip_unreadable: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.images, self.transform, self.batch_size = list(images), transform, batch_size
        self.skip_unreadable = skip_unreadable

    def __len__(self) -> int:
        return (len(self.images) + self.batch_size - 1) // self.batch_size

    def __getitem__(self, k: int):
        pixels, kept, skipped = [], [], []
        for i in range(k * self.batch_size, min((k + 1) * self.batch_size, len(self.images))):
            item = self.images[i]
            try:
                image = item.convert("RGB") if isinstance(item, Image.Image) else load_rgb(item)
                pixels.append(self.transform(image))
                kept.append(i)
            except BadImageError as exc:
                if not self.skip_unreadable:
                    raise
                skipped.append((i, exc.reason))
        return (torch.stack(pixels) if pixels else None), kept, skipped


class ReadAhead:
    """The items of a batch dataset in order, each next one decoded by a thread while the caller
    embeds the current one.

    Besides the overlap, this keeps the per-image tensor work (a few small ops) off the thread that
    runs the model: there torch splits each op between its intra-op threads, and on a busy 2-core
    machine every split waits on a descheduled partner — decoding 64 photos cost 2.6 CPU-s that way
    against 0.1 s on a thread of its own (benchmarks/encode_speed.py measures the whole effect).
    """

    def __init__(self, batches: Dataset):
        self.batches = batches
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="vseinf-decode")

    def __iter__(self):
        n = len(self.batches)
        pending = self.pool.submit(self.batches.__getitem__, 0) if n else None
        for k in range(n):
            item = pending.result()  # an exception raised while decoding surfaces here
            if k + 1 < n:
                pending = self.pool.submit(self.batches.__getitem__, k + 1)
            yield item

    def close(self) -> None:
        """Stop reading ahead (waits for a batch being decoded, never starts another)."""
        self.pool.shutdown(wait=True, cancel_futures=True)


def default_decode_workers(n_images: int, batch_size: int, device) -> int:
    """Decoding processes for embedding images: on a GPU, where decoding is the bottleneck, up to 4
    (leaving a core to feed the GPU); none on a CPU, where the model costs ~15× the decoding and
    workers only compete for its cores (benchmarks/live_images.py), nor for a few batches."""
    if n_images <= 4 * batch_size or torch.device(device).type == "cpu":
        return 0
    return max(0, min(4, (os.cpu_count() or 1) - 1))


def iter_image_batches(images: Sequence, transform, batch_size: int, *, skip_unreadable: bool = True,
                       workers: int = 0, read_ahead: bool = True, pin_memory: bool = False):
    """``images`` (paths or PIL images) decoded and transformed a batch at a time: yields ``(pixels
    | None, kept positions, skipped as (position, reason))`` (see :class:`DecodedImageBatches`).

    ``workers`` processes decode ahead; with none, a thread does (``read_ahead``) or each batch is
    decoded when it is asked for. What runs images through a network loops over this:
    :meth:`vseinf.model.VSEModel.iter_image_batches` and :class:`vseinf.video.extract.FrameExtractor`.
    """
    batches = DecodedImageBatches(images, transform, batch_size, skip_unreadable)
    loader = ReadAhead(batches) if workers == 0 and read_ahead else image_batch_loader(batches, workers, pin_memory)
    try:
        yield from loader
    finally:
        if isinstance(loader, ReadAhead):
            loader.close()

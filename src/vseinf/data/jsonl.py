"""JSON Lines pair files, for images and videos alike: one object a line, e.g.

    {"image": "a.jpg", "caption": "a dog runs", "split": "train"}
    {"video": "video7", "captions": ["a man cooks", "someone is cooking"]}

:func:`vseinf.data.splits.read_pairs_file` reads image pairs with it and
:func:`vseinf.data.video_datasets.read_video_pairs` video pairs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from .records import DataFormatError


def parse_jsonl_pairs(path: Path, lines: Sequence[str], item_keys: Sequence[str] = ("image",)
                      ) -> tuple[list[tuple[str, str, str | None, int]], bool]:
    """The rows (item, caption, split or None, line number) of a JSONL pairs file, and whether any
    row has a split.

    Every non-blank line is an object with the item (an image path or a video id) under the first
    of ``item_keys`` it has, ``caption`` — a string, or a list of strings, one row each (``captions``
    is accepted too) — and an optional ``split`` string. Anything else raises
    :class:`DataFormatError` naming the line.

    Args:
        path: the file, for messages.
        lines: its lines (see :func:`vseinf.data.records.read_lines`).
        item_keys: the item's field and its aliases, e.g. ``("video", "video_id")``.
    """
    rows = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataFormatError(path, f"invalid JSON ({e.msg})", line=lineno) from None
        if not isinstance(obj, dict):
            raise DataFormatError(path, "expected a JSON object", line=lineno)
        item = next((obj[key] for key in item_keys if key in obj), None)
        if not isinstance(item, str) or not item.strip():
            raise DataFormatError(path, f"missing or empty '{item_keys[0]}' string", line=lineno)
        # One caption per row is the format; a list of captions on one row is accepted too.
        caps = obj.get("caption", obj.get("captions"))
        caps = [caps] if isinstance(caps, str) else caps
        if not isinstance(caps, list) or not caps or not all(
                isinstance(c, str) and c.strip() for c in caps):
            raise DataFormatError(path, "missing or empty 'caption' (a string, or a list of "
                                        "strings)", line=lineno)
        split = obj.get("split")
        if split is not None and not isinstance(split, str):
            raise DataFormatError(path, "'split' must be a string", line=lineno)
        rows.extend((item.strip(), c.strip(), split, lineno) for c in caps)
    return rows, any(r[2] is not None for r in rows)

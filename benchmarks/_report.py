"""How every benchmark reports: its JSON document on stdout, and the same in ``--out`` if given."""

from __future__ import annotations

import json
from pathlib import Path


def emit(result: dict, out: str | Path | None) -> None:
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")

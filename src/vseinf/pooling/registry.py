"""Pooling layers by name: ``@register_pooling("name")`` on a class, ``build_pooling(name, dim)`` to make one.

The names are what configs and the command line use ("gpo", "avg", "kmax:20", …).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from .branches import BranchPool

__all__ = ["register_pooling", "build_pooling", "pooling_names"]


@dataclass(frozen=True)
class _Entry:
    cls: type
    needs_dim: bool  # built as cls(dim, **kwargs): the layer has per-dimension parameters
    argument: str | None  # "kmax:K": the integer after the colon is passed as this keyword


_REGISTRY: dict[str, _Entry] = {}
_ALIASES: dict[str, str] = {}


def register_pooling(name: str, *, aliases: tuple[str, ...] = (), needs_dim: bool = False,
                     argument: str | None = None):
    """Class decorator: make the pooling buildable as ``build_pooling(name)``.

    Args:
        name: the registered name (lower case).
        aliases: other names for the same pooling.
        needs_dim: the constructor's first argument is the feature dimension D.
        argument: the name is written ``name:VALUE`` and the positive integer VALUE is passed as
            this keyword (``kmax:20`` → ``KMaxPool(k=20)``).
    """
    def decorate(cls: type) -> type:
        for key in (name, *aliases):
            if key in _REGISTRY or key in _ALIASES:
                raise ValueError(f"pooling name {key!r} is registered twice")
        _REGISTRY[name] = _Entry(cls, needs_dim, argument)
        _ALIASES.update({alias: name for alias in aliases})
        return cls
    return decorate


def pooling_names() -> tuple[str, ...]:
    """The registered names in registration order, an argument shown as its placeholder ("kmax:K")."""
    return tuple(f"{n}:{e.argument.upper()}" if e.argument else n for n, e in _REGISTRY.items())


def build_pooling(name: str, dim: int | None = None, **kwargs) -> nn.Module:
    """Build a pooling layer by name (see :func:`pooling_names`), e.g. "gpo", "avg", "kmax:20".

    Args:
        name: the pooling's name, case and surrounding spaces ignored.
        dim: feature dimension D (needed by the poolings with per-dimension parameters).
        **kwargs: passed to the constructor (e.g. ``d_pe``, ``d_hidden`` for GPO).

    Names joined by "+" ("gpo+max") build a :class:`~vseinf.pooling.branches.BranchPool`: each
    pooling gets an equal slice of the ``dim`` channels.
    """
    if "+" in name:
        parts = [part.strip() for part in name.split("+")]
        if len(parts) < 2 or not all(parts):
            raise ValueError(f"pooling {name!r}: write branches as NAME+NAME, e.g. 'gpo+max'")
        if dim is None or dim % len(parts):
            raise ValueError(f"pooling {name!r} splits the embedding into {len(parts)} equal slices: "
                             f"its dimension must be a multiple of {len(parts)}, got {dim}")
        return BranchPool([build_pooling(part, dim // len(parts), **kwargs) for part in parts], parts)
    key = name.strip().lower()
    base, colon, value = key.partition(":")
    base = _ALIASES.get(base, base)
    entry = _REGISTRY.get(base)
    if entry is None:
        raise ValueError(f"unknown pooling {name!r}; choose one of {', '.join(pooling_names())}")
    if entry.argument:
        placeholder = entry.argument.upper()
        if not value.isdigit():
            raise ValueError(f"{base} pooling is written '{base}:{placeholder}' with a positive integer "
                             f"{placeholder}, got {name!r}")
        kwargs[entry.argument] = int(value)
    elif colon:
        raise ValueError(f"pooling {base!r} takes no ':' argument, got {name!r}")
    if not entry.needs_dim:
        return entry.cls(**kwargs)
    if dim is None:
        raise ValueError(f"pooling {name!r} needs the feature dimension: build_pooling({name!r}, dim)")
    return entry.cls(dim, **kwargs)

"""A small name -> factory registry with helpful errors for unknown names."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from selfkd.errors import ConfigError

T = TypeVar("T")


def close_matches(name: str, choices: list[str]) -> str:
    """Return ``" (did you mean: a, b?)"`` for near misses of ``name``, or ``""``."""
    hits = difflib.get_close_matches(name, choices, n=3, cutoff=0.5)
    return f" (did you mean: {', '.join(hits)}?)" if hits else ""


class Registry(Generic[T]):
    """Maps names (and aliases) to objects, usually classes or factory functions.

    >>> MODELS = Registry("model")
    >>> @MODELS.register("tiny")
    ... def tiny(num_classes: int): ...
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._aliases: dict[str, str] = {}

    def register(self, name: str, *aliases: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            for key in (name, *aliases):
                if key in self._items or key in self._aliases:
                    raise ValueError(f"{self.kind} {key!r} is registered twice")
            self._items[name] = obj
            for alias in aliases:
                self._aliases[alias] = name
            return obj

        return decorator

    def canonical(self, name: str) -> str:
        """The registered name for ``name`` or one of its aliases; ConfigError if unknown."""
        if not isinstance(name, str):
            raise ConfigError(f"{self.kind} name must be a string, got {name!r}")
        if name in self._items:
            return name
        if name in self._aliases:
            return self._aliases[name]
        known = self.names()
        raise ConfigError(
            f"unknown {self.kind} {name!r}{close_matches(name, known + list(self._aliases))}; "
            f"known: {', '.join(known)} (see `selfkd list`)"
        )

    def get(self, name: str) -> T:
        return self._items[self.canonical(name)]

    def __contains__(self, name: object) -> bool:
        return name in self._items or name in self._aliases

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def names(self) -> list[str]:
        return sorted(self._items)

    def describe(self) -> list[tuple[str, str]]:
        """(name, first docstring line) for every entry, sorted by name."""
        rows = []
        for name in self.names():
            doc = (getattr(self._items[name], "__doc__", None) or "").strip().splitlines()
            rows.append((name, doc[0] if doc else ""))
        return rows

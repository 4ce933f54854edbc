"""One small registry class, used for models, methods and datasets."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from segkd.errors import SegkdError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names (and aliases) to builders. Unknown names fail with the closest matches."""

    def __init__(self, kind: str, resolver: Callable[[str], T | None] | None = None) -> None:
        """``resolver(name)`` may answer names that are not listed (a family of names such as ``lraspp-<timm
        encoder>``): an entry, ``None`` when the name is not of its family, or a one-line error of its own."""
        self.kind = kind
        self._items: dict[str, T] = {}
        self._aliases: dict[str, str] = {}
        self._resolver = resolver
        self._resolved: dict[str, T] = {}

    def register(self, name: str, *, aliases: tuple[str, ...] = ()) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            self.add(name, obj, aliases=aliases)
            return obj

        return deco

    def add(self, name: str, obj: T, *, aliases: tuple[str, ...] = ()) -> None:
        if name in self._items or name in self._aliases:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._items[name] = obj
        for alias in aliases:
            self._aliases[alias] = name

    def canonical(self, name: str) -> str:
        """The registered name for ``name`` (resolving aliases); a clear error when unknown."""
        key = name.strip().lower()
        if key in self._items:
            return key
        if key in self._aliases:
            return self._aliases[key]
        if key in self._resolved:
            return key
        if self._resolver is not None and (found := self._resolver(key)) is not None:
            self._resolved[key] = found
            return key
        scored = [(difflib.SequenceMatcher(None, key, c).ratio(), c) for c in list(self._items) + list(self._aliases)]
        close = [c for r, c in sorted(scored, key=lambda rc: (-rc[0], rc[1])) if r >= 0.5][:5]
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(self._items)}"
        raise SegkdError(f"unknown {self.kind} {name!r}{hint}")

    def get(self, name: str) -> T:
        key = self.canonical(name)
        return self._items[key] if key in self._items else self._resolved[key]

    def __contains__(self, name: str) -> bool:
        try:
            self.canonical(name)
        except SegkdError:
            return False
        return True

    def names(self) -> list[str]:
        return list(self._items)

    def aliases(self) -> dict[str, str]:
        return dict(self._aliases)

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

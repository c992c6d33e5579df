"""One kind of registry for everything segbatch chooses by name: models, output writers, export formats
and input kinds.

A :class:`Registry` maps names to entries. :meth:`Registry.register` refuses a name twice (as
torchvision's ``register_model`` does), so two entries can never silently shadow each other; it works
as a call (``MODELS.register("name", entry)``) or as a class decorator (``@WRITERS.register``, which
takes the class's ``name``). :meth:`Registry.get` turns an unknown name into a :class:`ConfigError`
(exit 2) that lists the valid names, so every ``--model``, ``--writers``, ``--format`` error reads alike.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar, overload

from segbatch.errors import ConfigError

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries of one kind by name, in registration order."""

    def __init__(self, kind: str, setting: str):
        self.kind = kind  # what an entry is, in messages: "model", "writer", "export format"
        self.setting = setting  # the setting or flag that names one: the ConfigError's field
        self._entries: dict[str, T] = {}

    @overload
    def register(self, name: str, entry: T) -> T: ...
    @overload
    def register(self, name: T) -> T: ...
    @overload
    def register(self, name: str) -> Callable[[T], T]: ...

    def register(self, name: Any, entry: Any = None) -> Any:
        """``register(name, entry)``; ``@register`` (the class's ``name`` attribute); ``@register(name)``."""
        if not isinstance(name, str):  # @register on a class with a `name`
            return self._add(name.name, name)
        if entry is None:
            return lambda e: self._add(name, e)
        return self._add(name, entry)

    def _add(self, name: str, entry: T) -> T:
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} needs a non-empty name, got {name!r}")
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = entry
        return entry

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            # "model: unknown 'x'", "writers: unknown writer 'x'": the kind is said once.
            what = "unknown" if self.kind == self.setting else f"unknown {self.kind}"
            raise ConfigError(
                self.setting, f"{what} {name!r}", f"valid {self.kind}s: {', '.join(self._entries)}"
            ) from None

    def names(self) -> list[str]:
        return list(self._entries)

    def items(self) -> list[tuple[str, T]]:
        return list(self._entries.items())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._entries)})"

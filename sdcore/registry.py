"""Collecting what plugins register through `register_<things>(register)` hooks."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

import pluggy

from .errors import PluginError

T = TypeVar("T")


class Registry(Generic[T]):
    """Named things registered by plugins, in registration order; duplicate names are a `PluginError`."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._owners: dict[str, str] = {}

    def add(self, name: str, item: T, owner: str = "?") -> None:
        if name in self._items:
            raise PluginError(
                f"{self.kind} {name!r} is registered twice (by {self._owners[name]} and {owner}). "
                "Disable one of the plugins (SDCORE_DISABLE_PLUGINS)."
            )
        self._items[name] = item
        self._owners[name] = owner

    def __getitem__(self, name: str) -> T:
        return self._items[name]

    def get(self, name: str) -> T | None:
        return self._items.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def items(self) -> list[tuple[str, T]]:
        return list(self._items.items())

    def values(self) -> list[T]:
        return list(self._items.values())

    def owner(self, name: str) -> str:
        return self._owners[name]


def collect(hook: Any, pm: pluggy.PluginManager, registry: Registry[Any], name_of: Callable[..., str]) -> None:
    """Call a `register_<things>` hook once per plugin so duplicates can name the plugins involved."""
    for impl in hook.get_hookimpls():  # in registration order (pluggy calls them in reverse)

        def register(*args: Any, _owner: str = impl.plugin_name) -> None:
            registry.add(name_of(*args), args[0] if len(args) == 1 else args, owner=_owner)

        impl.function(**{name: register for name in impl.argnames})

"""Extra-network tags (`<name:arg:...>`): which plugin handles which tag name, and calling them for a job.

Plugins claim tag names through the `register_prompt_tags(register)` hook. The registry of an engine is
built when first needed and rebuilt when `Engine.register` adds plugins. Pure Python; no torch.
"""

from __future__ import annotations

import logging
import re
import threading
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sdcore.errors import PluginError

log = logging.getLogger("sdcore.prompt_language")

_TAG_NAME = re.compile(r"\w+\Z")

Handler = Callable[[list[list[str]], Any], Any]
Check = Callable[[list[list[str]], Any, Any], Any]


class UnknownTagWarning(UserWarning):
    """A prompt uses an extra-network tag that no installed plugin handles; it is removed and ignored."""


@dataclass(frozen=True)
class TagHandler:
    name: str
    handler: Handler
    check: Check | None
    owner: str


class TagRegistry:
    """Tag name → the handler a plugin registered for it."""

    def __init__(self) -> None:
        self._handlers: dict[str, TagHandler] = {}

    def register(self, name: str, handler: Handler, check: Check | None = None, *, owner: str = "?") -> None:
        if not isinstance(name, str) or not _TAG_NAME.match(name):
            raise PluginError(
                f"Prompt tag name {name!r} of {owner} is not valid: use letters, digits and '_' (as in <lora:...>)."
            )
        if not callable(handler):
            raise PluginError(f"The handler of prompt tag {name!r} of {owner} is not callable.")
        if check is not None and not callable(check):
            raise PluginError(f"The check of prompt tag {name!r} of {owner} is not callable.")
        taken = self._handlers.get(name)
        if taken is not None:
            raise PluginError(f"Prompt tag {name!r} is registered twice: by {taken.owner} and by {owner}.")
        self._handlers[name] = TagHandler(name, handler, check, owner)

    def names(self) -> list[str]:
        return sorted(self._handlers)

    def get(self, name: str) -> TagHandler | None:
        return self._handlers.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._handlers

    def unknown(self, networks: Mapping[str, Sequence[Sequence[str]]]) -> list[str]:
        """The tag names in `networks` that nobody handles, in prompt order."""
        return [name for name in networks if name not in self._handlers]

    def describe_unknown(self, unknown: Sequence[str]) -> str:
        known = ", ".join(f"<{n}:...>" for n in self.names()) or "none (no installed plugin handles tags)"
        names = ", ".join(f"<{n}:...>" for n in unknown)
        return (
            f"Unknown extra-network tag {names} in the prompt: it is removed from the text and ignored. "
            f"Tags the installed plugins handle: {known}. Tag names are case-sensitive."
        )


_registries: weakref.WeakKeyDictionary[Any, tuple[tuple[int, ...], TagRegistry]] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def tag_registry(engine: Any) -> TagRegistry:
    """The tag registry of `engine` (built from `register_prompt_tags`, rebuilt when the plugins change)."""
    impls = engine.pm.hook.register_prompt_tags.get_hookimpls()
    key = tuple(id(impl.function) for impl in impls)
    with _lock:
        cached = _registries.get(engine)
        if cached is not None and cached[0] == key:
            return cached[1]
        registry = TagRegistry()
        for impl in impls:

            def register(name: str, handler: Handler, check: Check | None = None, _owner: str = impl.plugin_name) -> None:
                registry.register(name, handler, check, owner=_owner)

            impl.function(register=register)
        _registries[engine] = (key, registry)
        return registry


def _as_lists(args_list: Sequence[Sequence[str]]) -> list[list[str]]:
    return [list(args) for args in args_list]


def check_tags(networks: Mapping[str, Sequence[Sequence[str]]], request: Any, engine: Any) -> list[str]:
    """Submit-time checks: run the `check` of each claimed tag; warn about unclaimed ones. Returns those."""
    registry = tag_registry(engine)
    for name, args_list in networks.items():
        entry = registry.get(name)
        if entry is not None and entry.check is not None:
            entry.check(_as_lists(args_list), request, engine)
    unknown = registry.unknown(networks)
    if unknown:
        message = registry.describe_unknown(unknown)
        log.warning(message)
        warnings.warn(message, UnknownTagWarning, stacklevel=2)
    return unknown


def dispatch_tags(networks: Mapping[str, Sequence[Sequence[str]]], context: Any) -> list[str]:
    """Call the handler of each claimed tag for this batch; record unclaimed ones. Returns those."""
    registry = tag_registry(context.engine)
    for name, args_list in networks.items():
        entry = registry.get(name)
        if entry is not None:
            entry.handler(_as_lists(args_list), context)
    unknown = registry.unknown(networks)
    if unknown:
        log.warning(registry.describe_unknown(unknown))
    return unknown

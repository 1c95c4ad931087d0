"""Plugin loading: one pluggy manager per engine, filled from the `sdcore` entry-point group.

Built-in plugins and third-party plugins arrive by the same route. Loading is deterministic (entry points
sorted by name), strict (two distributions claiming one name, or a hook implementation that matches no spec,
is an error) and controllable from the environment:

- `SDCORE_PLUGINS=a,b`: load only these entry points (allow-list);
- `SDCORE_DISABLE_PLUGINS=a,b`: skip these (block-list);
- `SDCORE_TRACE_PLUGINS=1`: log every hook call and its result to stderr.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import pluggy

from . import hookspecs
from .errors import PluginError

ENTRY_POINT_GROUP = "sdcore"
BUILTIN_DISTRIBUTION = "sdcore"


@dataclass(frozen=True)
class PluginInfo:
    name: str
    version: str | None
    hooks: tuple[str, ...]
    builtin: bool

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "hooks": list(self.hooks), "builtin": self.builtin}


def _env_list(name: str) -> set[str] | None:
    value = os.environ.get(name)
    if value is None:
        return None
    return {item.strip() for item in value.split(",") if item.strip()}


def _entry_points() -> list[metadata.EntryPoint]:
    return sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)


def make_plugin_manager(*, load_entrypoints: bool = True, plugins: list[Any] | None = None) -> pluggy.PluginManager:
    """A fresh manager with sdcore's specs, the core's defaults, the entry-point plugins and `plugins`."""
    from . import defaults

    pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
    pm.add_hookspecs(hookspecs)
    pm.register(defaults, name="sdcore.defaults")
    pm.sdcore_dists = {}  # type: ignore[attr-defined]  # plugin name -> distribution, for `sdcore plugins`
    if load_entrypoints:
        _load_entrypoints(pm)
    for plugin in plugins or []:
        register_plugin(pm, plugin)
    check(pm)
    if os.environ.get("SDCORE_TRACE_PLUGINS") not in (None, "", "0"):
        _enable_tracing(pm)
    return pm


def _load_entrypoints(pm: pluggy.PluginManager) -> None:
    allow = _env_list("SDCORE_PLUGINS")
    block = _env_list("SDCORE_DISABLE_PLUGINS") or set()
    seen: dict[str, str] = {}
    for ep in _entry_points():
        dist_name = ep.dist.name if ep.dist else "?"
        if ep.name in seen and seen[ep.name] != dist_name:
            raise PluginError(
                f"Two distributions provide the sdcore plugin {ep.name!r}: {seen[ep.name]} and {dist_name}. "
                "Uninstall one of them."
            )
        if ep.name in seen:  # the same distribution listed twice (editable installs can do this)
            continue
        seen[ep.name] = dist_name
        if allow is not None and ep.name not in allow:
            continue
        if ep.name in block:
            continue
        try:
            module = ep.load()
        except Exception as exc:
            raise PluginError(f"sdcore plugin {ep.name!r} ({ep.value}) failed to import: {exc}") from exc
        register_plugin(pm, module, name=ep.name)
        pm.sdcore_dists[ep.name] = ep.dist  # type: ignore[attr-defined]


def register_plugin(pm: pluggy.PluginManager, plugin: Any, name: str | None = None) -> str:
    """Register an object with hook implementations; a name already in use raises `PluginError`."""
    name = name or getattr(plugin, "__name__", None) or f"{type(plugin).__name__}-{id(plugin):x}"
    if pm.has_plugin(name) or pm.is_registered(plugin):
        raise PluginError(f"A plugin named {name!r} is already registered.")
    try:
        pm.register(plugin, name=name)
    except ValueError as exc:
        raise PluginError(f"Plugin {name!r} could not be registered: {exc}") from exc
    check(pm)
    return name


def check(pm: pluggy.PluginManager) -> None:
    """Fail loudly on hook implementations that match no spec (usually a misspelled hook name)."""
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"{exc}. Check the hook name against sdcore.hookspecs.") from exc


def _enable_tracing(pm: pluggy.PluginManager) -> None:
    def before(hook_name: str, hook_impls: list[Any], kwargs: dict[str, Any]) -> None:
        names = ", ".join(impl.plugin_name for impl in hook_impls)
        print(f"[sdcore trace] {hook_name}({', '.join(kwargs)}) -> {names}", file=sys.stderr)

    def after(outcome: Any, hook_name: str, hook_impls: list[Any], kwargs: dict[str, Any]) -> None:
        try:
            value = outcome.get_result()
        except BaseException as exc:  # noqa: BLE001 - report what the hook raised
            value = f"raised {type(exc).__name__}: {exc}"
        print(f"[sdcore trace] {hook_name} returned {value!r:.200}", file=sys.stderr)

    pm.add_hookcall_monitoring(before, after)


def plugin_infos(pm: pluggy.PluginManager) -> list[PluginInfo]:
    """What `sdcore plugins` prints: every registered plugin except the core's own defaults."""
    dists: dict[str, Any] = getattr(pm, "sdcore_dists", {})
    infos = []
    for name, plugin in sorted(pm.list_name_plugin(), key=lambda item: item[0]):
        if name == "sdcore.defaults" or plugin is None:
            continue
        hooks = tuple(sorted(caller.name for caller in pm.get_hookcallers(plugin) or []))
        dist = dists.get(name)
        version = dist.version if dist is not None else None
        builtin = dist is not None and dist.name.lower() == BUILTIN_DISTRIBUTION
        infos.append(PluginInfo(name=name, version=version, hooks=hooks, builtin=builtin))
    return infos

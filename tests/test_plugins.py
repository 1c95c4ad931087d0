"""Plugin loading: entry points, strictness, allow/block lists, tracing, and `sdcore plugins`."""

import json
import subprocess
import sys

import pytest

from sdcore import Engine, hookimpl
from sdcore.errors import PluginError
from sdcore.plugins import make_plugin_manager, plugin_infos


def cli(*args, env=None):
    import os

    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "sdcore.cli", *args], capture_output=True, text=True,
                          env=full_env, check=False)


def test_builtin_families_arrive_through_entry_points():
    pm = make_plugin_manager()
    names = {name for name, _ in pm.list_name_plugin()}
    assert {"sd1", "sdxl", "hello"} <= names
    infos = {i.name: i for i in plugin_infos(pm)}
    assert infos["sd1"].builtin is True and infos["sd1"].hooks == ("register_model_families",)
    assert infos["hello"].builtin is False


def test_plugins_json_lists_name_version_hooks_builtin():
    out = cli("plugins", "--json")
    assert out.returncode == 0, out.stderr
    listed = json.loads(out.stdout)
    assert all(set(p) == {"name", "version", "hooks", "builtin"} for p in listed)
    sd1 = next(p for p in listed if p["name"] == "sd1")
    assert sd1["version"] == "0.1.0" and sd1["builtin"] is True


def test_allow_list_and_block_list():
    allow = json.loads(cli("plugins", "--json", env={"SDCORE_PLUGINS": "sd1"}).stdout)
    assert [p["name"] for p in allow] == ["sd1"]
    block = json.loads(cli("plugins", "--json", env={"SDCORE_DISABLE_PLUGINS": "sd1,hello"}).stdout)
    assert "sd1" not in [p["name"] for p in block] and "sdxl" in [p["name"] for p in block]


def test_trace_prints_hook_calls():
    out = cli("--help", env={"SDCORE_TRACE_PLUGINS": "1"})
    assert out.returncode == 0
    line = next(line for line in out.stderr.splitlines() if line.startswith("[sdcore trace] register_commands(cli) ->"))
    assert "hello" in line.split("->")[1].split(", ")


class Misspelled:
    @hookimpl
    def prepare_reqest(self, request):  # the typo is the point
        pass


def test_misspelled_hook_fails_loudly():
    with pytest.raises(PluginError, match="prepare_reqest"):
        Engine(device="cpu", load_entrypoints=False, plugins=[Misspelled()])


def test_duplicate_plugin_name_fails():
    engine = Engine(device="cpu", load_entrypoints=False)
    engine.register(object(), name="mine")
    with pytest.raises(PluginError, match="already registered"):
        engine.register(object(), name="mine")


class DuplicateFamily:
    @hookimpl
    def register_model_families(self, register):
        class Fake:
            name = "sd1"

            def detect(self, source):
                return None

        register(Fake())


def test_duplicate_registration_names_both_plugins():
    with pytest.raises(PluginError, match=r"'sd1' is registered twice \(by sd1 and dup\)"):
        engine = Engine(device="cpu")
        engine.register(DuplicateFamily(), name="dup")


def test_each_engine_has_its_own_plugin_manager():
    a = Engine(device="cpu")
    b = Engine(device="cpu", load_entrypoints=False)
    assert a.pm is not b.pm
    assert "sd1" in a.families and "sd1" not in b.families


def test_plugin_modules_import_fast():
    code = "import time,sys; t=time.perf_counter(); import sdcore_plugins.sd1, sdcore_plugins.sdxl; " \
           "print('torch' in sys.modules, 'diffusers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"], "plugin modules must import torch/diffusers lazily"

"""Install the sdcore Krita plugin into a Krita profile.

    python bridges/krita/install.py [--pykrita ~/.local/share/krita/pykrita] [--no-websockets]

Copies `sdcore_krita.desktop` and the `sdcore_krita` package, vendors the bridge client (`protocol.py`,
`client.py`) and the `websockets` package (from this Python; Krita's embedded Python is 3.11 on Debian 12 and
current Windows/macOS builds use 3.10+, so install from a matching Python) into `sdcore_krita/_vendor`, and
enables the plugin in kritarc. Restart Krita, then Settings > Dockers > sdcore.
"""

from __future__ import annotations

import argparse
import configparser
import shutil
from pathlib import Path

HERE = Path(__file__).resolve().parent
BRIDGES = HERE.parent


def install(pykrita: Path, *, websockets: bool = True, kritarc: Path | None = None) -> Path:
    pykrita.mkdir(parents=True, exist_ok=True)
    shutil.copy2(HERE / "sdcore_krita.desktop", pykrita / "sdcore_krita.desktop")
    target = pykrita / "sdcore_krita"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(HERE / "sdcore_krita", target, ignore=shutil.ignore_patterns("__pycache__", "_vendor"))
    vendor = target / "_vendor" / "sdcore_bridges"
    vendor.mkdir(parents=True)
    (vendor / "__init__.py").write_text("")
    for name in ("protocol.py", "client.py"):
        shutil.copy2(BRIDGES / name, vendor / name)
    if websockets:
        import websockets as ws

        shutil.copytree(Path(ws.__file__).parent, target / "_vendor" / "websockets",
                        ignore=shutil.ignore_patterns("__pycache__"))
    if kritarc is not None:
        config = configparser.ConfigParser()
        config.optionxform = str  # type: ignore[assignment,method-assign]
        if kritarc.exists():
            config.read(kritarc)
        if not config.has_section("python"):
            config.add_section("python")
        config.set("python", "enable_sdcore_krita", "true")
        kritarc.parent.mkdir(parents=True, exist_ok=True)
        with open(kritarc, "w") as f:
            config.write(f, space_around_delimiters=False)
    return target


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pykrita", type=Path, default=Path.home() / ".local/share/krita/pykrita")
    parser.add_argument("--kritarc", type=Path, default=Path.home() / ".config/kritarc")
    parser.add_argument("--no-websockets", action="store_true", help="Krita's Python already has websockets >= 13")
    args = parser.parse_args()
    path = install(args.pykrita, websockets=not args.no_websockets, kritarc=args.kritarc)
    print(f"installed {path}; enabled in {args.kritarc}; restart Krita and open Settings > Dockers > sdcore")

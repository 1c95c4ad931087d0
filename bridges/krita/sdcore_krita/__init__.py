"""sdcore for Krita: a docker that sends the canvas (or the selection, as an inpaint mask) to an sdcore bridge
server and inserts the results as new layers. Install with `python bridges/krita/install.py`."""

import os
import sys

__version__ = "0.1.0"

_here = os.path.dirname(os.path.abspath(__file__))
_vendor = os.path.join(_here, "_vendor")  # websockets and sdcore_bridges' protocol/client, put there by install.py
if os.path.isdir(_vendor) and _vendor not in sys.path:
    sys.path.insert(0, _vendor)

try:
    from krita import DockWidgetFactory, DockWidgetFactoryBase, Krita
except ImportError:  # imported outside Krita (tests of the logic)
    Krita = None

if Krita is not None and os.environ.get("SDCORE_KRITA_NO_UI") != "1":
    from .docker import SdcoreDocker
    from .extension import SdcoreExtension

    _app = Krita.instance()
    _app.addExtension(SdcoreExtension(_app))
    _app.addDockWidgetFactory(DockWidgetFactory("sdcoreDocker", DockWidgetFactoryBase.DockRight, SdcoreDocker))

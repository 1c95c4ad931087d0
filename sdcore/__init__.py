"""sdcore: a small, typed, plugin-based Stable Diffusion automation SDK on diffusers.

    from sdcore import Engine, GenerationRequest
    with Engine() as engine:
        result = engine.generate(GenerationRequest(prompt="a red circle", seed=1))
        result.save("outputs")
"""

__version__ = "0.1.0"

from .engine import Engine  # noqa: E402
from .errors import SdcoreError  # noqa: E402
from .hookspecs import hookimpl  # noqa: E402
from .jobs import (  # noqa: E402
    CancelledEvent,
    ErrorEvent,
    Event,
    Job,
    PreviewEvent,
    ProgressEvent,
    QueuedEvent,
    ResultEvent,
    StartedEvent,
)
from .requests import GenerationRequest, Mode  # noqa: E402
from .results import GenerationResult  # noqa: E402

__all__ = [
    "CancelledEvent", "Engine", "ErrorEvent", "Event", "GenerationRequest", "GenerationResult", "Job", "Mode",
    "PreviewEvent", "ProgressEvent", "QueuedEvent", "ResultEvent", "SdcoreError", "StartedEvent", "hookimpl",
    "__version__",
]

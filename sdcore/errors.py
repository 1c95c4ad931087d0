"""Typed errors. Every error a user can cause is an `SdcoreError` whose message says what to do.

Front ends (CLI, bridge, widgets) show `str(error)` as it is and use `error.code` to tell kinds apart, so the
message is written for a person and the code for a program.
"""

from __future__ import annotations


class SdcoreError(Exception):
    """Base class of every error sdcore raises on purpose."""

    code = "error"

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "type": type(self).__name__, "message": str(self)}


class InvalidRequest(SdcoreError, ValueError):
    """A request field has a value sdcore cannot use."""

    code = "invalid_request"


class ModelNotFound(SdcoreError, FileNotFoundError):
    code = "model_not_found"


class CheckpointError(SdcoreError):
    """A checkpoint file exists but cannot be used (corrupt, truncated, wrong kind of file)."""

    code = "bad_checkpoint"


class UnsafeCheckpoint(CheckpointError):
    """A pickle checkpoint was given without the explicit opt-in."""

    code = "unsafe_checkpoint"


class UnknownModelFamily(CheckpointError):
    code = "unknown_model_family"


class WrongModelType(CheckpointError):
    """The file is a valid checkpoint of another kind (a LoRA, a VAE, an embedding) given where a model was expected."""

    code = "wrong_model_type"


class ImageError(SdcoreError, ValueError):
    """An input image or mask cannot be decoded or does not fit the request."""

    code = "bad_image"


class UnknownSampler(InvalidRequest):
    code = "unknown_sampler"


class PromptError(InvalidRequest):
    """A prompt cannot be parsed. `position` is the 0-based character offset of the problem, when known."""

    code = "bad_prompt"

    def __init__(self, message: str, position: int | None = None):
        super().__init__(message)
        self.position = position


class PluginError(SdcoreError):
    """A plugin is broken: a misspelled hook, a duplicate name, a registration conflict."""

    code = "plugin_error"


class JobCancelled(SdcoreError):
    """Raised inside a job when it is cancelled; `Job.result()` re-raises it."""

    code = "cancelled"


class JobFailed(SdcoreError):
    """`Job.result()` raises this when the job ended in an error that is not an `SdcoreError`."""

    code = "internal_error"

"""The typed request every front end builds: one `GenerationRequest` describes one job.

Requests are plain data (JSON in, JSON out) so the CLI, the websocket bridge, notebooks and scripts all share
one definition and one JSON schema. Images travel as a path, a base64 string or a data URL in JSON, and may
also be `PIL.Image` objects or bytes in Python.
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator, model_validator

from .errors import InvalidRequest

MAX_SIDE = 4096
MAX_STEPS = 500

ImageInput = Annotated[
    Any,
    WithJsonSchema(
        {
            "type": "string",
            "description": "An image: a file path, base64-encoded PNG/JPEG/WEBP, or a data: URL.",
        }
    ),
]


class Mode(str, Enum):
    txt2img = "txt2img"
    img2img = "img2img"
    inpaint = "inpaint"


class MaskedContent(str, Enum):
    """What fills the masked area before denoising (A1111's "Masked content")."""

    original = "original"
    fill = "fill"
    latent_noise = "latent noise"
    latent_nothing = "latent nothing"


class GenerationRequest(BaseModel):
    """Everything needed to make (and later remake) a batch of images."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_enum_values=False)

    prompt: str = Field("", description="The prompt, in the A1111 prompt language when its plugin is on.")
    negative_prompt: str = ""
    model: str | None = Field(None, description="Checkpoint file, diffusers folder or hub id; None = default.")
    config: str | None = Field(None, description="Diffusers config folder for a non-standard architecture.")
    vae: str | None = Field(None, description="Separate VAE file or folder.")
    width: int | None = Field(None, description="Width in pixels, a multiple of 8; None = the model's default.")
    height: int | None = Field(None, description="Height in pixels, a multiple of 8; None = the model's default.")
    steps: int = Field(20, ge=1, le=MAX_STEPS)
    cfg_scale: float = Field(7.0, ge=0.0, le=100.0)
    sampler: str = Field("DPM++ 2M", description="A1111 sampler name, e.g. 'Euler a', 'DPM++ 2M'.")
    schedule_type: str = Field("Automatic", description="'Automatic', 'Karras', 'Exponential', 'SGM Uniform'.")
    seed: int = Field(-1, description="-1 picks a random seed, which the result records.")
    subseed: int = Field(-1, description="Variation seed; -1 picks a random one.")
    subseed_strength: float = Field(0.0, ge=0.0, le=1.0)
    batch_size: int = Field(1, ge=1, le=64, description="Images denoised together.")
    batch_count: int = Field(1, ge=1, le=1000, description="Batches run one after another.")
    clip_skip: int = Field(1, ge=1, le=12)
    mode: Mode | None = Field(None, description="None infers it: mask → inpaint, init image → img2img.")
    init_image: ImageInput | None = None
    mask: ImageInput | None = Field(None, description="White = repaint, black = keep.")
    denoising_strength: float = Field(0.75, ge=0.0, le=1.0)
    mask_blur: int = Field(4, ge=0, le=256)
    inpaint_full_res: bool = Field(False, description="A1111 'Only masked': inpaint a crop around the mask.")
    inpaint_full_res_padding: int = Field(32, ge=0, le=1024)
    masked_content: MaskedContent = MaskedContent.original
    preview_every: int = Field(0, ge=0, description="Send a cheap preview every N steps; 0 = never.")
    options: dict[str, Any] = Field(default_factory=dict, description="Plugin options, by plugin name.")

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, value: int | None, info: Any) -> int | None:
        if value is None:
            return value
        if value < 64 or value > MAX_SIDE:
            raise ValueError(f"{info.field_name} must be between 64 and {MAX_SIDE} pixels, got {value}")
        if value % 8:
            lower, upper = value - value % 8, value - value % 8 + 8
            raise ValueError(f"{info.field_name} must be a multiple of 8, got {value}; use {lower} or {upper}")
        return value

    @field_validator("sampler", "schedule_type")
    @classmethod
    def _not_empty(cls, value: str, info: Any) -> str:
        if not value.strip():
            raise ValueError(f"{info.field_name} must not be empty")
        return value.strip()

    @model_validator(mode="after")
    def _mode_matches_images(self) -> GenerationRequest:
        mode = self.resolved_mode
        if mode in (Mode.img2img, Mode.inpaint) and self.init_image is None:
            raise ValueError(f"mode {mode.value} needs an init_image")
        if mode is Mode.inpaint and self.mask is None:
            raise ValueError("mode inpaint needs a mask (white = repaint)")
        if mode is not Mode.txt2img and self.denoising_strength == 0:
            raise ValueError("denoising_strength 0 leaves the image unchanged; use a strength above 0")
        return self

    @property
    def resolved_mode(self) -> Mode:
        if self.mode is not None:
            return Mode(self.mode)
        if self.mask is not None:
            return Mode.inpaint
        if self.init_image is not None:
            return Mode.img2img
        return Mode.txt2img

    @classmethod
    def parse(cls, data: dict[str, Any] | GenerationRequest) -> GenerationRequest:
        """Validate `data`, turning pydantic's errors into one `InvalidRequest` that says what to change."""
        if isinstance(data, GenerationRequest):
            return data
        from pydantic import ValidationError

        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise InvalidRequest(describe_validation_error(exc)) from None

    def to_json_dict(self) -> dict[str, Any]:
        """JSON-safe form; in-memory images are replaced by a placeholder (use paths to keep them)."""
        data = self.model_dump(mode="python")
        for key in ("init_image", "mask"):
            if data[key] is not None and not isinstance(data[key], str):
                data[key] = f"<{type(data[key]).__name__}>"
        data["mode"] = self.resolved_mode.value
        data["masked_content"] = MaskedContent(self.masked_content).value
        return data


def describe_validation_error(exc: Any, prefix: str = "") -> str:
    """One message listing every invalid field as `path: what is wrong` (`prefix` is prepended to paths)."""
    parts = []
    for err in exc.errors():
        where = prefix + ".".join(str(p) for p in err.get("loc", ())) or "request"
        message = err.get("msg", "invalid").removeprefix("Value error, ")
        if err.get("type") == "extra_forbidden":
            message = "unknown field; see `sdcore schema` for the fields a request takes"
        parts.append(f"{where}: {message}")
    return "Invalid request: " + "; ".join(parts)

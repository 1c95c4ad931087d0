"""The contract between the core and model-family plugins, and the engine's model cache.

A model family (a plugin: `sd1`, `sdxl`, ...) registers a `ModelFamily`. The core inspects a location
(`checkpoints.inspect_model`), asks each family whether it claims it (`detect`), and lets the claiming family
`load` it into a `DiffusionModel`. The core's denoising loop only talks to `DiffusionModel`, so it never knows
which family it runs.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from .checkpoints import ModelSource

if TYPE_CHECKING:
    import torch


@dataclass
class TextEmbedding:
    """The text encoders' output for one prompt text: what the UNet attends to, plus SDXL's pooled vector."""

    embeds: torch.Tensor  # [1, 77 * chunks, D]
    pooled: torch.Tensor | None = None  # [1, P] for SDXL, None for SD 1.x/2.x


@dataclass
class LoadOptions:
    """How to load a model; part of the cache key."""

    config: Path | None = None  # explicit diffusers config folder for non-standard architectures
    vae: Path | None = None  # separate VAE file or folder
    allow_pickle: bool = False
    device: str = "cpu"
    dtype: str = "float32"  # "float32" | "float16" | "bfloat16"

    def cache_key(self, location: str) -> tuple[Any, ...]:
        return (location, str(self.config), str(self.vae), self.device, self.dtype)


@dataclass
class TokenOverride:
    """A vector to use instead of a token's embedding (textual inversion), per text encoder name."""

    vectors: dict[str, torch.Tensor]


class DiffusionModel(ABC):
    """A loaded latent diffusion model, as the denoising loop sees it. Families subclass this."""

    family: str
    variant: str
    unet: Any
    vae: Any
    scheduler_config: dict[str, Any]
    default_size: tuple[int, int] = (512, 512)
    # "Approx cheap" latent -> RGB factors (A1111 sd_vae_approx): rows are latent channels.
    latent_rgb_factors: Sequence[Sequence[float]] = ()

    def __init__(self, source: ModelSource, options: LoadOptions) -> None:
        self.source = source
        self.options = options
        self.name = source.name
        self.hash: str | None = None
        self.vae_name: str | None = options.vae.stem if options.vae else None
        self.vae_hash: str | None = None
        # Plugins keep per-model state here (e.g. LoRA patch bookkeeping), keyed by plugin name.
        self.plugin_state: dict[str, Any] = {}
        self._pipelines: dict[str, Any] = {}
        self.lock = threading.RLock()

    # -- facts the loop needs -------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def is_inpainting(self) -> bool:
        """9-channel UNet: latents + mask + masked-image latents."""
        return int(self.unet.config.in_channels) == 9

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def prediction_type(self) -> str:
        return str(self.scheduler_config.get("prediction_type", "epsilon"))

    # -- text -----------------------------------------------------------------------------------
    @property
    @abstractmethod
    def tokenizer(self) -> Any:
        """The CLIP tokenizer used to split prompts into chunks (same vocabulary for every encoder)."""

    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text` without BOS/EOS and without truncation."""
        return list(self.tokenizer(text, add_special_tokens=False, truncation=False)["input_ids"])

    @abstractmethod
    def encode_token_chunks(
        self,
        chunks: Sequence[Sequence[int | TokenOverride]],
        clip_skip: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Encode chunks of at most 75 tokens each (no BOS/EOS; the family adds them and pads to 77).

        Returns the hidden states `[len(chunks), 77, D]` (D concatenates every text encoder's width) and the
        pooled vector `[len(chunks), P]` (SDXL) or None. `clip_skip` 1 means the last layer, A1111-style.
        """

    def encode_text(self, text: str, clip_skip: int = 1) -> TextEmbedding:
        """Plain encoding of a prompt of any length: 75-token chunks, no prompt syntax.

        The prompt-language plugin replaces this with the A1111 language; this is the fallback that keeps the
        core usable without any plugin.
        """
        ids = self.tokenize(text)
        chunks = [ids[i : i + 75] for i in range(0, len(ids), 75)] or [[]]
        hidden, pooled = self.encode_token_chunks(chunks, clip_skip)
        embeds = hidden.reshape(1, -1, hidden.shape[-1])
        return TextEmbedding(embeds=embeds, pooled=None if pooled is None else pooled[:1])

    # -- UNet conditioning ----------------------------------------------------------------------
    def added_cond_kwargs(
        self, pooled: torch.Tensor | None, width: int, height: int, batch: int, *, negative: bool = False
    ) -> dict[str, Any] | None:
        """Extra UNet conditioning (SDXL: pooled text embeds and size/crop time ids). None for SD 1.x/2.x."""
        return None

    # -- diffusers interop ----------------------------------------------------------------------
    @abstractmethod
    def components(self) -> dict[str, Any]:
        """The diffusers pipeline components (unet, vae, text encoders, tokenizers, scheduler)."""

    @abstractmethod
    def pipeline_class(self, mode: str) -> type:
        """The diffusers pipeline class for `mode` ("txt2img", "img2img", "inpaint")."""

    def pipeline_kwargs(self, mode: str) -> dict[str, Any]:
        """Keyword arguments for `pipeline_class(mode)`; families add pipeline-specific ones."""
        return self.components()

    def pipeline(self, mode: str = "txt2img") -> Any:
        """A diffusers pipeline for `mode` that shares this model's modules (built once, no weights copied)."""
        with self.lock:
            if mode not in self._pipelines:
                cls = self.pipeline_class(mode)
                pipe = cls(**self.pipeline_kwargs(mode))
                pipe.set_progress_bar_config(disable=True)
                self._pipelines[mode] = pipe
            return self._pipelines[mode]

    def to_single_file_state_dict(self) -> dict[str, torch.Tensor]:
        """All weights in the original LDM/A1111 single-file key layout (for merging and sharing)."""
        raise NotImplementedError(f"{self.family} cannot write single-file checkpoints")

    def modules(self) -> dict[str, Any]:
        """The torch modules of this model, by attribute name (unet, vae, text_encoder, ...).

        Read from the instance's attributes rather than `components()`, which may build objects (a scheduler)
        on every call; plugins call this often.
        """
        import torch

        return {k: v for k, v in vars(self).items() if isinstance(v, torch.nn.Module)}

    def memory_bytes(self) -> int:
        total = 0
        for module in self.modules().values():
            total += sum(p.numel() * p.element_size() for p in module.parameters())
        return total


@runtime_checkable
class ModelFamily(Protocol):
    """What a model-family plugin registers through `register_model_families`."""

    name: str

    def detect(self, source: ModelSource) -> str | None:
        """The variant name (e.g. "sd15", "sd2-v", "sdxl-base") if this family claims `source`, else None."""

    def load(self, source: ModelSource, variant: str, options: LoadOptions) -> DiffusionModel:
        """Build the model. Must not reach the network for single files (configs ship with the plugin)."""


@dataclass
class _CacheEntry:
    model: DiffusionModel
    size: int


@dataclass
class ModelCache:
    """Loaded models, least recently used evicted first when their total size passes `budget_bytes`.

    The model just loaded is always kept, even if it alone is over budget.
    """

    budget_bytes: int | None = None
    _entries: OrderedDict[tuple[Any, ...], _CacheEntry] = field(default_factory=OrderedDict)
    _lock: threading.RLock = field(default_factory=threading.RLock)
    on_evict: Callable[[DiffusionModel], None] | None = None

    def get(self, key: tuple[Any, ...]) -> DiffusionModel | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return entry.model

    def peek(self, key: tuple[Any, ...]) -> DiffusionModel | None:
        """The cached model without counting it as used (for plugins that only look)."""
        with self._lock:
            entry = self._entries.get(key)
            return None if entry is None else entry.model

    def put(self, key: tuple[Any, ...], model: DiffusionModel) -> None:
        with self._lock:
            self._entries[key] = _CacheEntry(model, model.memory_bytes())
            self._entries.move_to_end(key)
            self._evict(keep=key)

    def _evict(self, keep: tuple[Any, ...]) -> None:
        if self.budget_bytes is None:
            return
        while self.total_bytes > self.budget_bytes and len(self._entries) > 1:
            oldest = next(iter(self._entries))
            if oldest == keep:
                break
            entry = self._entries.pop(oldest)
            if self.on_evict:
                self.on_evict(entry.model)

    @property
    def total_bytes(self) -> int:
        return sum(e.size for e in self._entries.values())

    def models(self) -> list[DiffusionModel]:
        with self._lock:
            return [e.model for e in self._entries.values()]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

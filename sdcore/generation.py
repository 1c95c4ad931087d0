"""The core generation: prompts → noise → denoising loop → decode, for txt2img, img2img and inpainting.

sdcore runs its own denoising loop over diffusers' components (UNet, scheduler, VAE) instead of calling a
diffusers pipeline, because the pipelines cannot do what users of A1111 expect: per-step prompt schedules,
composable diffusion (AND), A1111 seeds, a cancel that decodes nothing, and hooks at every step. For a plain
prompt the arithmetic is the same as `StableDiffusionPipeline.__call__`, so images match diffusers'.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from PIL import Image

from . import images as imgs
from .conditioning import Conditioning, ScheduledText, StepConditioning
from .errors import ImageError, InvalidRequest
from .models import DiffusionModel, TextEmbedding
from .requests import GenerationRequest, MaskedContent, Mode

if TYPE_CHECKING:
    import torch

    from .engine import Engine
    from .jobs import Job


@dataclass
class Progress:
    """Counts UNet evaluations over a whole job and reports them as `ProgressEvent`s."""

    job: Job | None
    total: int = 0
    done: int = 0
    batch: int = 0

    def add_total(self, steps: int) -> None:
        self.total += steps

    def advance(self, steps: int = 1) -> None:
        from .jobs import ProgressEvent

        self.done += steps
        self.total = max(self.total, self.done)
        if self.job is not None:
            job_id = self.job.id
            self.job.emit(lambda seq: ProgressEvent(job_id, seq, step=self.done, total=self.total, batch=self.batch))


@dataclass
class PreparedImages:
    """The pixel inputs of img2img/inpaint after resizing, cropping and blurring."""

    original: Image.Image  # the init image as given (RGB), for the final composite
    init: Image.Image  # what is encoded: request size (a crop when "only masked")
    mask: Image.Image | None = None  # blurred, request size, for latent blending
    overlay_mask: Image.Image | None = None  # blurred, original size, for the final composite
    crop: tuple[int, int, int, int] | None = None


@dataclass
class GenerationContext:
    """Everything about one batch of a job. Plugins read it and may keep notes in `extra`."""

    engine: Engine
    request: GenerationRequest
    model: DiffusionModel
    seeds: list[int]
    subseeds: list[int]
    width: int
    height: int
    job: Job | None = None
    batch_index: int = 0
    progress: Progress = field(default_factory=lambda: Progress(None))
    infotext_params: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return self.request.steps

    @property
    def batch_size(self) -> int:
        return len(self.seeds)

    @property
    def mode(self) -> Mode:
        return self.request.resolved_mode

    def raise_if_cancelled(self) -> None:
        if self.job is not None:
            self.job.raise_if_cancelled()


@dataclass
class GenerationOutput:
    images: list[Image.Image]
    latents: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class DenoiseState:
    """The mutable state that `before_denoise_step` / `after_denoise_step` hooks see."""

    context: GenerationContext
    scheduler: Any
    step: int
    total_steps: int
    timestep: Any
    latents: torch.Tensor
    conditioning: StepConditioning
    guidance_scale: float
    unet_kwargs: dict[str, Any] = field(default_factory=dict)
    noise_pred: torch.Tensor | None = None


# --- inputs ---------------------------------------------------------------------------------------------


def prepare_images(request: GenerationRequest, width: int, height: int) -> PreparedImages | None:
    """Decode and fit the init image and mask; check that they match."""
    mode = request.resolved_mode
    if mode is Mode.txt2img:
        return None
    original = imgs.to_rgb(imgs.load_image(request.init_image, what="init image"))
    if mode is Mode.img2img:
        return PreparedImages(original=original, init=_fit(original, width, height))
    raw_mask = imgs.to_mask(imgs.load_image(request.mask, what="mask"))
    if raw_mask.size != original.size:
        raise ImageError(
            f"The mask is {raw_mask.width}x{raw_mask.height} but the init image is "
            f"{original.width}x{original.height}; they must be the same size."
        )
    overlay = imgs.blur_mask(raw_mask, request.mask_blur)
    if imgs.mask_bbox(raw_mask) is None:
        raise ImageError("The mask is empty (all black): paint white where the image should change.")
    init, crop = original, None
    if request.inpaint_full_res:
        crop = imgs.crop_region(raw_mask, request.inpaint_full_res_padding, width, height)
        assert crop is not None
        init = original.crop(crop)
        mask_for_latents = overlay.crop(crop)
    else:
        mask_for_latents = overlay
    if request.masked_content is MaskedContent.fill or request.masked_content == MaskedContent.fill.value:
        init = imgs.fill_masked(init, mask_for_latents)
    return PreparedImages(
        original=original,
        init=_fit(init, width, height),
        mask=_fit(mask_for_latents, width, height),
        overlay_mask=overlay,
        crop=crop,
    )


def _fit(image: Image.Image, width: int, height: int) -> Image.Image:
    """A1111 "Just resize"."""
    if image.size == (width, height):
        return image
    return image.resize((width, height), Image.Resampling.LANCZOS)


# --- conditioning ---------------------------------------------------------------------------------------


def plain_conditioning(context: GenerationContext) -> Conditioning:
    """The fallback encoding: prompt and negative prompt as plain text (no prompt syntax)."""
    model, request = context.model, context.request
    positive = model.encode_text(request.prompt, request.clip_skip)
    negative = model.encode_text(request.negative_prompt, request.clip_skip)
    return Conditioning(positive=[ScheduledText.constant(positive)], negative=ScheduledText.constant(negative))


def encode_conditioning(context: GenerationContext) -> Conditioning:
    hook = context.engine.pm.hook
    conditioning = hook.encode_prompts(context=context)
    if conditioning is None:  # every plugin declined, and the core's fallback was disabled
        conditioning = plain_conditioning(context)
    hook.prepare_conditioning(conditioning=conditioning, context=context)
    return conditioning


# --- the loop -------------------------------------------------------------------------------------------


def set_timesteps(scheduler: Any, steps: int, strength: float, device: Any) -> list[Any]:
    """Configure `scheduler` and return the timesteps to run (all of them, or the last `strength` part)."""
    scheduler.set_timesteps(steps, device=device)
    timesteps = scheduler.timesteps
    if strength >= 1.0:
        return list(timesteps)
    order = getattr(scheduler, "order", 1)
    if strength <= 0:
        return []
    # at least one step for any strength above 0 (A1111 would run none and return the input unchanged)
    init_steps = max(1, min(int(steps * strength), steps))
    start = max(steps - init_steps, 0)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start * order)
    return list(timesteps[start * order :])


def _step_accepts_generator(scheduler: Any) -> bool:
    return "generator" in inspect.signature(scheduler.step).parameters


def predict_noise(state: DenoiseState, latent_input: torch.Tensor) -> torch.Tensor:
    """One guided noise prediction: uncond + Σ w_k·cfg·(cond_k − uncond), A1111's composable diffusion."""
    import torch

    context, model = state.context, state.context.model
    cond = state.conditioning
    batch = latent_input.shape[0]
    use_uncond = not (state.guidance_scale <= 1.0 and len(cond.positive) == 1 and cond.positive[0][1] == 1.0)
    texts: list[tuple[TextEmbedding, bool]] = ([(cond.negative, True)] if use_uncond else []) + [
        (embedding, False) for embedding, _ in cond.positive
    ]
    # Texts of equal length share one UNet call (like diffusers); different lengths get separate calls.
    predictions: list[torch.Tensor | None] = [None] * len(texts)
    groups: dict[int, list[int]] = {}
    for index, (embedding, _) in enumerate(texts):
        groups.setdefault(embedding.embeds.shape[1], []).append(index)
    for indices in groups.values():
        hidden = torch.cat([texts[i][0].embeds.expand(batch, -1, -1) for i in indices])
        sample = torch.cat([latent_input] * len(indices))
        added: dict[str, Any] | None = None
        parts = [
            model.added_cond_kwargs(texts[i][0].pooled, context.width, context.height, batch, negative=texts[i][1])
            for i in indices
        ]
        if parts[0] is not None:
            added = {key: torch.cat([p[key] for p in parts if p is not None]) for key in parts[0]}
        kwargs = dict(state.unet_kwargs)
        if added is not None:
            kwargs["added_cond_kwargs"] = added
        output = model.unet(sample, state.timestep, encoder_hidden_states=hidden.to(model.dtype),
                            return_dict=False, **kwargs)[0]
        for position, i in enumerate(output.chunk(len(indices))):
            predictions[indices[position]] = i
    if not use_uncond:
        return predictions[0]  # type: ignore[return-value]
    uncond = predictions[0]
    assert uncond is not None
    if len(cond.positive) == 1:
        (weight_pred, (_, weight)) = predictions[1], cond.positive[0]
        assert weight_pred is not None
        # the exact expression diffusers uses, so plain prompts give diffusers' images bit for bit
        scale = state.guidance_scale * weight
        return uncond + scale * (weight_pred - uncond)
    result = uncond.clone()
    for pred, (_, weight) in zip(predictions[1:], cond.positive, strict=True):
        assert pred is not None
        result = result + (weight * state.guidance_scale) * (pred - uncond)
    return result


def denoise(
    context: GenerationContext,
    *,
    scheduler: Any,
    timesteps: list[Any],
    latents: torch.Tensor,
    conditioning: Conditioning,
    generators: list[Any],
    noise: torch.Tensor | None = None,
    init_latents: torch.Tensor | None = None,
    latent_mask: torch.Tensor | None = None,
    image_conditioning: torch.Tensor | None = None,
) -> torch.Tensor:
    """The denoising loop with hooks, progress, previews and cancellation between steps.

    `latent_mask` (1 = repaint) with `init_latents` and `noise` keeps the unmasked area on the noised original
    at every step (inpainting with an ordinary model). `image_conditioning` is concatenated to the UNet input
    (9-channel inpainting models).
    """
    import torch

    hook = context.engine.pm.hook
    request = context.request
    step_kwargs: dict[str, Any] = {}
    if _step_accepts_generator(scheduler):
        # each image draws its step noise from its own generator (A1111's ImageRNG); DPM++ SDE takes its
        # noise seeds at construction instead (see make_scheduler's noise_seeds)
        step_kwargs["generator"] = generators
    sampling_steps = len(timesteps)
    state = DenoiseState(
        context=context, scheduler=scheduler, step=0, total_steps=sampling_steps, timestep=None,
        latents=latents, conditioning=conditioning.at(0), guidance_scale=request.cfg_scale,
    )
    hook.prepare_latents(state=state)
    latents = state.latents
    # A1111 counts steps of the schedule for prompt editing; 2nd-order samplers evaluate twice per step.
    order = max(1, round(len(timesteps) / max(1, _nominal_steps(context, scheduler, sampling_steps))))
    for index, t in enumerate(timesteps):
        context.raise_if_cancelled()
        step = index // order
        state.step, state.timestep, state.latents = step, t, latents
        state.conditioning = conditioning.at(step)
        state.guidance_scale = request.cfg_scale
        state.unet_kwargs = {}
        hook.before_denoise_step(state=state)
        latent_input = scheduler.scale_model_input(state.latents, t).to(context.model.dtype)
        if image_conditioning is not None:
            latent_input = torch.cat([latent_input, image_conditioning.to(latent_input.dtype)], dim=1)
        # Latents stay float32 between steps whatever the model's dtype (like A1111's k-diffusion loop), so
        # samplers draw their step noise in float32 and a seed gives the same noise in fp16 and fp32.
        noise_pred = predict_noise(state, latent_input).float()
        state.noise_pred = noise_pred
        latents = scheduler.step(noise_pred, t, state.latents, return_dict=False, **step_kwargs)[0]
        if latent_mask is not None and init_latents is not None and noise is not None:
            if index + 1 < len(timesteps):
                keep = scheduler.add_noise(init_latents, noise, torch.tensor([timesteps[index + 1]]))
            else:
                keep = init_latents
            latents = (1 - latent_mask) * keep + latent_mask * latents
        state.latents = latents
        hook.after_denoise_step(state=state)
        latents = state.latents
        context.progress.advance()
        every = request.preview_every
        if every and ((index + 1) % every == 0) and index + 1 < len(timesteps):
            _emit_preview(context, latents, index + 1)
    context.raise_if_cancelled()
    return latents


def _nominal_steps(context: GenerationContext, scheduler: Any, sampling_steps: int) -> int:
    order = getattr(scheduler, "order", 1)
    if order > 1:
        return (sampling_steps + 1) // order
    return sampling_steps


def latent_preview(model: DiffusionModel, latents: torch.Tensor) -> Image.Image:
    """A1111's "Approx cheap" preview: a fixed linear map from latent channels to RGB, no VAE."""
    import torch

    factors = torch.tensor(model.latent_rgb_factors, dtype=torch.float32)
    rgb = torch.einsum("chw,cr->rhw", latents[0].float().cpu(), factors)
    array = ((rgb + 1) / 2).clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(array)


def _emit_preview(context: GenerationContext, latents: torch.Tensor, step: int) -> None:
    from .jobs import PreviewEvent

    if context.job is None or not context.model.latent_rgb_factors:
        return
    image = latent_preview(context.model, latents)
    job_id = context.job.id
    context.job.emit(lambda seq: PreviewEvent(job_id, seq, step=step, image=image))


# --- VAE ------------------------------------------------------------------------------------------------


def vae_encode(model: DiffusionModel, image: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1] → diffusion latents. Uses the posterior's mode so it draws no random numbers."""
    vae = model.vae
    dtype = _vae_dtype(model)
    with _vae_upcast(model):
        posterior = vae.encode(image.to(vae.device, dtype)).latent_dist
        latents = posterior.mode()
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((latents - shift) * vae.config.scaling_factor).to(model.dtype)


def vae_decode(model: DiffusionModel, latents: torch.Tensor) -> list[Image.Image]:
    import numpy as np

    vae = model.vae
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    with _vae_upcast(model):
        decoded = vae.decode(latents.to(_vae_dtype(model)) / vae.config.scaling_factor + shift,
                             return_dict=False)[0]
    # the same arithmetic as diffusers' VaeImageProcessor.postprocess
    array = (decoded / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
    array = (array * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in array]


def _vae_dtype(model: DiffusionModel) -> Any:
    import torch

    if model.vae.dtype == torch.float16 and getattr(model.vae.config, "force_upcast", False):
        return torch.float32
    return model.vae.dtype


class _vae_upcast:
    """SDXL's VAE overflows in fp16 (`force_upcast`): decode in fp32, then put it back."""

    def __init__(self, model: DiffusionModel) -> None:
        import torch

        self.vae = model.vae
        self.active = self.vae.dtype == torch.float16 and getattr(self.vae.config, "force_upcast", False)

    def __enter__(self) -> None:
        import torch

        if self.active:
            self.vae.to(torch.float32)

    def __exit__(self, *exc: object) -> None:
        import torch

        if self.active:
            self.vae.to(torch.float16)


# --- one batch ------------------------------------------------------------------------------------------


def generate_batch(context: GenerationContext) -> GenerationOutput:
    """The core's `run_generation`: one batch of any mode, start to finish."""
    import torch

    with torch.inference_mode():
        return _generate_batch(context)


def _generate_batch(context: GenerationContext) -> GenerationOutput:
    import torch

    from .seeds import create_noise

    request, model, engine = context.request, context.model, context.engine
    prepared = prepare_images(request, context.width, context.height)
    conditioning = encode_conditioning(context)
    context.raise_if_cancelled()

    device = model.device
    scheduler = engine.samplers.make_scheduler(request.sampler, request.schedule_type, model.scheduler_config,
                                               noise_seeds=context.seeds)
    strength = 1.0 if prepared is None else request.denoising_strength
    timesteps = set_timesteps(scheduler, request.steps, strength, device)
    if not timesteps:
        raise InvalidRequest(
            "denoising_strength 0 leaves the image unchanged; use a strength above 0."
        )
    factor = model.vae_scale_factor
    shape = (model.latent_channels, context.height // factor, context.width // factor)
    noise, generators = create_noise(shape, context.seeds, context.subseeds, request.subseed_strength)
    noise = noise.to(device)

    init_latents = latent_mask = image_conditioning = None
    batch = len(context.seeds)
    if prepared is not None:
        init_latents = vae_encode(model, imgs.pil_to_tensor(prepared.init)).float().repeat(batch, 1, 1, 1)
        if prepared.mask is not None:
            small = prepared.mask.resize((shape[2], shape[1]), Image.Resampling.BILINEAR)
            latent_mask = imgs.mask_to_tensor(small).round().to(device)
        content = MaskedContent(request.masked_content)
        if latent_mask is not None and content is MaskedContent.latent_noise:
            init_latents = init_latents * (1 - latent_mask) + noise * latent_mask
        elif latent_mask is not None and content is MaskedContent.latent_nothing:
            init_latents = init_latents * (1 - latent_mask)
        first = torch.tensor([timesteps[0]] * batch, device=device)
        latents = scheduler.add_noise(init_latents, noise, first)
    else:
        latents = noise * scheduler.init_noise_sigma
    if model.is_inpainting:
        image_conditioning = _inpaint_conditioning(model, prepared, context.width, context.height, shape, batch)
        latent_mask_for_loop = None  # the model itself sees the mask
    else:
        latent_mask_for_loop = latent_mask
    latents = denoise(
        context, scheduler=scheduler, timesteps=timesteps, latents=latents, conditioning=conditioning,
        generators=generators, noise=noise, init_latents=init_latents, latent_mask=latent_mask_for_loop,
        image_conditioning=image_conditioning,
    )
    images = vae_decode(model, latents)
    if prepared is not None and prepared.overlay_mask is not None:
        images = [_paste_back(image, prepared) for image in images]
    return GenerationOutput(images=images, latents=latents)


def _inpaint_conditioning(
    model: DiffusionModel, prepared: PreparedImages | None, width: int, height: int,
    shape: tuple[int, int, int], batch: int,
) -> torch.Tensor:
    """9-channel models: the mask and the latents of the image with the masked area blanked."""
    import torch

    if prepared is None or prepared.mask is None:
        # txt2img/img2img on an inpainting model: everything masked, a grey image (A1111 does the same)
        mask = torch.ones(1, 1, height, width)
        pixels = torch.zeros(1, 3, height, width)
    else:
        mask = (imgs.mask_to_tensor(prepared.mask) >= 0.5).float()
        pixels = imgs.pil_to_tensor(prepared.init) * (mask < 0.5)
    masked_latents = vae_encode(model, pixels)
    small_mask = torch.nn.functional.interpolate(mask, size=(shape[1], shape[2]))
    conditioning = torch.cat([small_mask.to(masked_latents.dtype), masked_latents], dim=1)
    conditioning = conditioning.repeat(batch, 1, 1, 1).to(model.device, model.dtype)
    return conditioning


def _paste_back(image: Image.Image, prepared: PreparedImages) -> Image.Image:
    """Put an inpainted image (or crop) back over the original, keeping unmasked pixels exactly."""
    assert prepared.overlay_mask is not None
    if prepared.crop is not None:
        left, top, right, bottom = prepared.crop
        patch = image.resize((right - left, bottom - top), Image.Resampling.LANCZOS)
        full = prepared.original.copy()
        full.paste(patch, (left, top))
        image = full
    elif image.size != prepared.original.size:
        image = image.resize(prepared.original.size, Image.Resampling.LANCZOS)
    return imgs.composite(prepared.original, image, prepared.overlay_mask)


def count_sampling_steps(engine: Engine, request: GenerationRequest, model: DiffusionModel) -> int:
    """How many UNet evaluations one batch takes (for progress totals)."""
    scheduler = engine.samplers.make_scheduler(request.sampler, request.schedule_type, model.scheduler_config)
    strength = 1.0 if request.resolved_mode is Mode.txt2img else request.denoising_strength
    return len(set_timesteps(scheduler, request.steps, strength, "cpu"))


__all__ = [
    "DenoiseState", "GenerationContext", "GenerationOutput", "Progress", "StepConditioning",
    "count_sampling_steps", "denoise", "encode_conditioning", "generate_batch", "latent_preview",
    "plain_conditioning", "predict_noise", "prepare_images", "set_timesteps", "vae_decode", "vae_encode",
]

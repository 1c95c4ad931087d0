"""The Engine: plugins, a model cache, and a FIFO job queue served by one worker thread per engine (device).

Every front end (Python, CLI, websocket bridge, widgets) goes through `Engine.submit(request) -> Job`.
A failing job fails alone: the worker catches everything a job raises and goes on with the next one.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pluggy
from pydantic import BaseModel, ValidationError

from . import __version__
from .checkpoints import ensure_model_file, inspect_model
from .errors import InvalidRequest, ModelNotFound, PluginError, SdcoreError, UnknownModelFamily
from .families import collect_families
from .generation import GenerationContext, Progress, count_sampling_steps, prepare_images
from .jobs import CancelledEvent, Job, QueuedEvent, ResultEvent, StartedEvent
from .models import DiffusionModel, LoadOptions, ModelCache
from .plugins import make_plugin_manager, register_plugin
from .registry import Registry
from .requests import GenerationRequest, Mode, describe_validation_error
from .results import GenerationResult

log = logging.getLogger("sdcore")

MODEL_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin")
_STOP = object()
KEEP_FINISHED_JOBS = 256


def default_device() -> str:
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def native_size(model: DiffusionModel) -> tuple[int, int]:
    """The size a model was trained at: its UNet's sample size times the VAE factor (512 for SD 1.5, 768 for
    SD 2.x 768-v, 1024 for SDXL, 64 for the demo model); the family's default when the config has none."""
    sample = getattr(model.unet.config, "sample_size", None)
    if isinstance(sample, int) and sample > 0:
        side = sample * model.vae_scale_factor
        return side, side
    return model.default_size


class Engine:
    """Loads models, queues jobs and runs them, calling plugins' hooks along the way.

    Args:
        device: "cpu", "cuda", "cuda:1", "mps"; default: the best available.
        dtype: "float32", "float16" or "bfloat16" for model weights.
        default_model: used when a request names no model (else `$SDCORE_MODEL`, else the demo model).
        model_dirs: folders searched when a request names a model by file name.
        model_cache_bytes: memory budget for loaded models; least recently used ones are dropped first.
        plugins: extra objects with hook implementations (a notebook cell, a test).
        load_entrypoints: load the plugins installed in the `sdcore` entry-point group.
        allow_pickle: accept pickle checkpoints (loaded with `weights_only=True`).
    """

    def __init__(
        self,
        *,
        device: str | None = None,
        dtype: str = "float32",
        default_model: str | os.PathLike[str] | None = None,
        model_dirs: Iterable[str | os.PathLike[str]] = (),
        model_cache_bytes: int | None = None,
        plugins: Iterable[Any] = (),
        load_entrypoints: bool = True,
        allow_pickle: bool = False,
    ) -> None:
        if dtype not in ("float32", "float16", "bfloat16"):
            raise InvalidRequest(f"dtype must be float32, float16 or bfloat16, not {dtype!r}")
        self.device = device or default_device()
        self.dtype = dtype
        self.allow_pickle = allow_pickle
        self.default_model = str(default_model) if default_model else os.environ.get("SDCORE_MODEL") or None
        self.model_dirs = [Path(d).expanduser() for d in model_dirs]
        self.pm: pluggy.PluginManager = make_plugin_manager(load_entrypoints=load_entrypoints, plugins=list(plugins))
        self.models = ModelCache(budget_bytes=model_cache_bytes)
        self._load_lock = threading.Lock()
        self._queue: queue.Queue[Any] = queue.Queue()
        self._pending: list[Job] = []
        self._pending_lock = threading.Lock()
        # recent jobs by id for `engine.job(id)`; finished ones beyond KEEP_FINISHED_JOBS are dropped so a
        # long-running server does not keep every image it ever made
        self._jobs: dict[str, Job] = {}
        self._worker: threading.Thread | None = None
        self._closed = False
        self._collect_registrations()

    # -- plugins --------------------------------------------------------------------------------------
    def _collect_registrations(self) -> None:
        from .samplers import SamplerRegistry

        self.families = collect_families(self.pm)
        self.samplers = SamplerRegistry()
        for impl in self.pm.hook.register_samplers.get_hookimpls():  # registration order: built-ins first
            impl.function(register=self.samplers.register)
        self.request_options: Registry[type[BaseModel]] = Registry("Request option")
        for impl in self.pm.hook.register_request_options.get_hookimpls():

            def register(name: str, model: type[BaseModel], _owner: str = impl.plugin_name) -> None:
                if not (isinstance(model, type) and issubclass(model, BaseModel)):
                    raise PluginError(f"Request option {name!r} of {_owner} must be a pydantic model class")
                self.request_options.add(name, model, owner=_owner)

            impl.function(register=register)

    def register(self, plugin: Any, name: str | None = None) -> str:
        """Register an object with hook implementations (e.g. from a notebook) and refresh registrations."""
        name = register_plugin(self.pm, plugin, name)
        self._collect_registrations()
        return name

    # -- requests -------------------------------------------------------------------------------------
    def request_schema(self) -> dict[str, Any]:
        """The JSON schema of `GenerationRequest`, with every registered plugin option under `options`."""
        schema = GenerationRequest.model_json_schema()
        defs = schema.setdefault("$defs", {})
        properties: dict[str, Any] = {}
        for name, model in self.request_options.items():
            sub = model.model_json_schema(ref_template="#/$defs/{model}")
            defs.update(sub.pop("$defs", {}))
            properties[name] = sub
        schema["properties"]["options"] = {
            "type": "object",
            "description": "Plugin options, by plugin name.",
            "properties": properties,
            "additionalProperties": False,
            "default": {},
        }
        return schema

    def validate(self, request: GenerationRequest | dict[str, Any]) -> GenerationRequest:
        """Check a request fully (fields, sampler, plugin options, images) and return it typed."""
        request = GenerationRequest.parse(request).model_copy(deep=False)
        self.samplers.resolve(request.sampler, request.schedule_type)
        options = dict(request.options)
        for name, value in options.items():
            model = self.request_options.get(name)
            if model is None:
                known = ", ".join(sorted(self.request_options)) or "none"
                raise InvalidRequest(f"Unknown option {name!r}; the installed plugins take: {known}.")
            try:
                options[name] = model.model_validate(value.model_dump() if isinstance(value, BaseModel) else value)
            except ValidationError as exc:
                raise InvalidRequest(describe_validation_error(exc, prefix=f"options.{name}.")) from None
        request.options = options
        if request.resolved_mode is not Mode.txt2img:
            prepare_images(request, request.width or 512, request.height or 512)
        self.pm.hook.prepare_request(request=request, engine=self)
        return request

    def option(self, request: GenerationRequest, name: str) -> Any:
        """The typed options of plugin `name` in `request`, or the defaults if the request has none."""
        value = request.options.get(name)
        model = self.request_options.get(name)
        if isinstance(value, BaseModel) or model is None:
            return value
        return model.model_validate(value or {})

    # -- jobs -----------------------------------------------------------------------------------------
    def submit(self, request: GenerationRequest | dict[str, Any]) -> Job:
        """Validate `request` (raising `InvalidRequest` at once if it is bad) and queue it."""
        if self._closed:
            raise SdcoreError("This engine is closed.")
        request = self.validate(request)
        job = Job(request)
        job._on_cancel = self._cancel_queued
        with self._pending_lock:
            self._pending.append(job)
            position = len(self._pending) - 1
            self._jobs[job.id] = job
            self._prune_jobs()
        job.emit(lambda seq: QueuedEvent(job.id, seq, position=position))
        self._ensure_worker()
        self._queue.put(job)
        return job

    def generate(self, request: GenerationRequest | dict[str, Any], timeout: float | None = None) -> GenerationResult:
        """Submit and wait: the images, or the job's error raised here."""
        return self.submit(request).result(timeout)

    def job(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def forget(self, job_id: str) -> bool:
        """Drop a finished job (and its images) from `engine.job(id)`; running or queued jobs stay."""
        with self._pending_lock:
            job = self._jobs.get(job_id)
            if job is None or not job.done:
                return False
            del self._jobs[job_id]
            return True

    def _prune_jobs(self) -> None:
        finished = [job_id for job_id, job in self._jobs.items() if job.done]
        for job_id in finished[: max(0, len(finished) - KEEP_FINISHED_JOBS)]:
            del self._jobs[job_id]

    def queued_jobs(self) -> list[Job]:
        with self._pending_lock:
            return list(self._pending)

    def _cancel_queued(self, job: Job) -> None:
        with self._pending_lock:
            if job in self._pending and job.state.value == "queued":
                self._pending.remove(job)
                job.emit(lambda seq: CancelledEvent(job.id, seq))

    def _ensure_worker(self) -> None:
        if self._worker is None or not self._worker.is_alive():
            self._worker = threading.Thread(target=self._work, name=f"sdcore-worker-{self.device}", daemon=True)
            self._worker.start()

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is _STOP:
                return
            with self._pending_lock:
                if job in self._pending:
                    self._pending.remove(job)
            if job.done:
                continue
            if job.cancel_requested:
                job.emit(lambda seq, j=job: CancelledEvent(j.id, seq))
                continue
            self.run_job(job)

    def run_job(self, job: Job) -> None:
        """Run one job in this thread; every outcome becomes the job's terminal event."""
        from .errors import JobCancelled

        job.emit(lambda seq: StartedEvent(job.id, seq))
        try:
            result = self._execute(job)
        except JobCancelled:
            job.emit(lambda seq: CancelledEvent(job.id, seq))
        except SdcoreError as exc:
            job.fail(exc)
        except Exception as exc:  # noqa: BLE001 - a failing job must not stop the worker
            log.exception("Job %s failed", job.id)
            job.fail(exc)
        else:
            job.emit(lambda seq: ResultEvent(job.id, seq, result=result))
            try:
                self.pm.hook.on_generation_end(result=result, engine=self)
            except Exception:  # noqa: BLE001 - notification hooks must not undo a finished job
                log.exception("on_generation_end failed")

    def _execute(self, job: Job) -> GenerationResult:
        from .metadata import build_infotext
        from .seeds import image_seeds, resolve_seed

        request = job.request
        model = self.load_model(request.model, config=request.config, vae=request.vae)
        job.raise_if_cancelled()
        default_w, default_h = native_size(model)
        seed = resolve_seed(request.seed)
        subseed = resolve_seed(request.subseed) if request.subseed_strength > 0 else None
        resolved = request.model_copy(update={
            "seed": seed, "subseed": request.subseed if subseed is None else subseed,
            "width": request.width or default_w, "height": request.height or default_h,
            "model": request.model or str(model.source.location),
        })
        assert resolved.width is not None and resolved.height is not None
        per_batch = count_sampling_steps(self, resolved, model)
        progress = Progress(job, total=per_batch * resolved.batch_count)
        images, seeds, subseeds, infotexts = [], [], [], []
        for batch in range(resolved.batch_count):
            batch_seeds, batch_subseeds = image_seeds(
                seed, subseed, resolved.batch_size, batch * resolved.batch_size,
                subseed_strength=resolved.subseed_strength,
            )
            progress.batch = batch
            context = GenerationContext(
                engine=self, request=resolved, model=model, seeds=batch_seeds, subseeds=batch_subseeds,
                width=resolved.width, height=resolved.height, job=job, batch_index=batch, progress=progress,
            )
            with model.lock:
                output = self.pm.hook.run_generation(context=context)
            for i, image in enumerate(output.images):
                text = build_infotext(context, index=i)
                image.info["parameters"] = text
                images.append(image)
                infotexts.append(text)
                seeds.append(batch_seeds[i % len(batch_seeds)])
                subseeds.append(batch_subseeds[i % len(batch_subseeds)])
        return GenerationResult(
            images=images, seeds=seeds, subseeds=subseeds, infotexts=infotexts, request=resolved,
            model_name=model.name, model_hash=model.hash,
        )

    # -- models ---------------------------------------------------------------------------------------
    def resolve_model_location(self, name: str | None) -> str:
        """A request's model value → a path or hub id. Bare names are looked up in `model_dirs`."""
        name = name or self.default_model
        if not name:
            from .demo import demo_model_path

            demo = demo_model_path()
            if demo is None:
                raise ModelNotFound("No model given: pass --model PATH (or set SDCORE_MODEL).")
            return str(demo)
        path = Path(name).expanduser()
        if path.exists():
            return str(path)
        for folder in self.model_dirs:
            for candidate in [folder / name, *(folder / f"{name}{s}" for s in MODEL_SUFFIXES)]:
                if candidate.exists():
                    return str(candidate)
        return name

    def available_models(self) -> list[dict[str, Any]]:
        """Model files and diffusers folders found in `model_dirs` (name, path)."""
        found = []
        for folder in self.model_dirs:
            if not folder.is_dir():
                continue
            for entry in sorted(folder.iterdir()):
                if entry.suffix.lower() in MODEL_SUFFIXES or (entry / "model_index.json").is_file():
                    found.append({"name": entry.stem if entry.is_file() else entry.name, "path": str(entry)})
        return found

    def _load_options(self, config: str | None, vae: str | None) -> LoadOptions:
        return LoadOptions(
            config=Path(config).expanduser() if config else None,
            vae=Path(vae).expanduser() if vae else None,
            allow_pickle=self.allow_pickle, device=self.device, dtype=self.dtype,
        )

    def loaded_model(self, request: GenerationRequest) -> DiffusionModel | None:
        """The model `request` would run on if it is already loaded; never loads one (for submit-time checks)."""
        try:
            location = self.resolve_model_location(request.model)
        except SdcoreError:
            return None
        from .demo import demo_config_for

        options = self._load_options(request.config or demo_config_for(location), request.vae)
        return self.models.peek(options.cache_key(location))

    def load_model(
        self, name: str | None = None, *, config: str | None = None, vae: str | None = None
    ) -> DiffusionModel:
        """Load (or take from the cache) the model `name` with an optional config folder and VAE."""
        from .demo import demo_config_for
        from .hashing import model_hash

        location = self.resolve_model_location(name)
        options = self._load_options(config or demo_config_for(location), vae)
        key = options.cache_key(location)
        with self._load_lock:
            cached = self.models.get(key)
            if cached is not None:
                return cached
            if options.config is not None and not (options.config / "model_index.json").is_file():
                raise ModelNotFound(f"Config folder {options.config} has no model_index.json.")
            if options.vae is not None and not options.vae.exists():
                raise ModelNotFound(f"VAE {options.vae} not found.")
            source = inspect_model(location, allow_pickle=self.allow_pickle)
            ensure_model_file(source)
            family, variant = self.detect_family(source)
            model = family.load(source, variant, options)
            if model.hash is None and source.path is not None:
                model.hash = model_hash(source.path)
            if options.vae is not None and options.vae.is_file() and model.vae_hash is None:
                model.vae_hash = model_hash(options.vae)
            self.models.put(key, model)
        self.pm.hook.on_model_loaded(model=model, engine=self)
        return model

    def detect_family(self, source: Any) -> tuple[Any, str]:
        for family in self.families.values():
            variant = family.detect(source)
            if variant:
                return family, variant
        known = ", ".join(self.families) or "none (install a model-family plugin)"
        raise UnknownModelFamily(
            f"{source.location} is not a model any installed family recognises (families: {known}). "
            "If it is a fine-tune with an unusual architecture, pass its diffusers config folder with --config."
        )

    # -- lifetime -------------------------------------------------------------------------------------
    def close(self, wait: bool = True) -> None:
        """Cancel queued jobs and stop the worker after the running job."""
        self._closed = True
        for job in self.queued_jobs():
            job.cancel()
        self._queue.put(_STOP)
        if wait and self._worker is not None and self._worker is not threading.current_thread():
            self._worker.join(timeout=60)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def info(self) -> dict[str, Any]:
        """Facts about this engine for front ends (the bridge handshake, `sdcore info`)."""
        return {
            "version": __version__,
            "device": self.device,
            "dtype": self.dtype,
            "families": list(self.families),
            "samplers": self.samplers.names(),
            "default_model": self.default_model,
            "loaded_models": [m.name for m in self.models.models()],
        }

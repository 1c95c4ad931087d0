"""Checkpoint machinery shared by the Stable Diffusion family plugins (SD 1.x/2.x and SDXL).

This package is a library, not a plugin: it has no entry point and no hooks. The `sd1` and `sdxl` family
plugins (and feature plugins that need SD key layouts, such as LoRA merging) import it; plugins still never
import each other.

What is here:

- key maps between diffusers modules and the original single-file layouts (LDM/SGM `model.diffusion_model.*`
  UNet, `first_stage_model.*` VAE, OpenAI CLIP `*.transformer.text_model.*`, OpenCLIP `*.model.*`), written from
  the module structures and used in both directions, so a file we write loads back bit for bit;
- a fast loader: modules are built on the meta device (no random init), each tensor is read once from the
  file and assigned, converting the dtype on the way;
- CLIP text encoding with A1111 clip skip and per-position input-embedding overrides (textual inversion);
- the A1111 / kohya prediction-type markers (`v_pred`, `ztsnr`).

Heavy imports (torch, diffusers, transformers) happen inside functions: the family modules that detect
checkpoints import this module without paying for them.
"""

from __future__ import annotations

import json
import numbers
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdcore.errors import CheckpointError, InvalidRequest, ModelNotFound, PromptError

if TYPE_CHECKING:
    import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
DTYPES = ("float32", "float16", "bfloat16")
# A1111 (PR #16567/#16569), ComfyUI and Forge read these empty marker tensors in v-prediction / zero-SNR models.
V_PRED_MARKER = "v_pred"
ZTSNR_MARKER = "ztsnr"


# --- small helpers --------------------------------------------------------------------------------------


def torch_dtype(name: str) -> torch.dtype:
    import torch

    if name not in DTYPES:
        raise InvalidRequest(f"dtype {name!r} is not supported; use one of {', '.join(DTYPES)}.")
    return getattr(torch, name)


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing.") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}).") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not hold a JSON object.")
    return data


def read_component_config(folder: Path, component: str) -> dict[str, Any]:
    """`<folder>/<component>/config.json` (or `scheduler_config.json` for the scheduler)."""
    name = "scheduler_config.json" if component == "scheduler" else "config.json"
    return read_json(folder / component / name)


def apply_prediction_markers(scheduler_config: dict[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    """Honour A1111's `v_pred` / `ztsnr` marker keys: v-prediction, zero terminal SNR (trailing timesteps)."""
    keys = set(keys)
    config = dict(scheduler_config)
    if V_PRED_MARKER in keys:
        config["prediction_type"] = "v_prediction"
    if ZTSNR_MARKER in keys:
        config["rescale_betas_zero_snr"] = True
        config["timestep_spacing"] = "trailing"
    return config


def marker_tensors(scheduler_config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The marker keys to write into a single file for this scheduler configuration."""
    import torch

    out = {}
    if scheduler_config.get("prediction_type") == "v_prediction":
        out[V_PRED_MARKER] = torch.zeros(0)
    if scheduler_config.get("rescale_betas_zero_snr"):
        out[ZTSNR_MARKER] = torch.zeros(0)
    return out


def make_scheduler(config: Mapping[str, Any]) -> Any:
    import diffusers

    name = str(config.get("_class_name", "PNDMScheduler"))
    cls = getattr(diffusers, name, None)
    if cls is None or not hasattr(cls, "from_config"):
        raise CheckpointError(f"unknown scheduler class {name!r} in the scheduler config")
    return cls.from_config(dict(config))


def hub_json(repo: str, filename: str) -> dict[str, Any] | None:
    """A small JSON file of a hub repository (from the local cache when offline); None if the repo lacks it."""
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        raise ModelNotFound(f"{repo!r} looks like a hub id, but huggingface_hub is not installed.") from None
    try:
        path = hf_hub_download(repo, filename)
    except EntryNotFoundError as exc:
        if not isinstance(exc, LocalEntryNotFoundError):  # the repo exists but has no such file
            return None
        raise ModelNotFound(
            f"Could not read {filename} of the hub model {repo!r}: it is not in the local hub cache and the hub "
            "cannot be reached (offline?). Download the model and pass its folder or .safetensors file."
        ) from None
    except Exception as exc:  # noqa: BLE001 - hub errors come in many types (offline, 404, auth, network)
        raise ModelNotFound(
            f"Could not read {filename} of the hub model {repo!r} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200] if str(exc) else ''}). Hub ids need network access or a copy in the "
            "local hub cache; otherwise download the model and pass its folder or .safetensors file."
        ) from None
    return read_json(Path(path))


def name_hints_prediction(name: str) -> str | None:
    """SD 2.x checkpoints cannot be told apart by their keys; their file names usually say 512 (ε) or 768 (v)."""
    lowered = name.lower()
    if re.search(r"(?<!\d)768(?!\d)", lowered) or re.search(r"(^|[^a-z])v[-_]?pred", lowered):
        return "v_prediction"
    if re.search(r"(?<!\d)512(?!\d)", lowered) or re.search(r"(^|[^a-z])eps(ilon)?([^a-z]|$)", lowered):
        return "epsilon"
    return None


def metadata_prediction(metadata: Mapping[str, str]) -> str | None:
    """The prediction type declared in safetensors metadata (SAI model spec, kohya), if any."""
    value = metadata.get("modelspec.prediction_type", "").lower()
    if value in ("v", "v_prediction", "v-prediction"):
        return "v_prediction"
    if value in ("epsilon", "eps"):
        return "epsilon"
    arch = metadata.get("modelspec.architecture", "").lower()
    if arch.endswith("-v") or "768-v" in arch:
        return "v_prediction"
    if "v2-512" in arch:
        return "epsilon"
    if metadata.get("ss_v_parameterization", "").lower() == "true":
        return "v_prediction"
    return None


# --- key plans: module key <-> single-file key ------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One module tensor and where it lives in the single file.

    op: "copy"; "conv1x1" (module [o, i] <-> file [o, i, 1, 1]); "T" (transpose);
    "q"/"k"/"v" (a third of OpenCLIP's fused `in_proj_*`, along dim 0).
    """

    module_key: str
    file_key: str
    op: str = "copy"


_RESNET_TO_LDM = (
    ("norm1.", "in_layers.0."),
    ("conv1.", "in_layers.2."),
    ("time_emb_proj.", "emb_layers.1."),
    ("norm2.", "out_layers.0."),
    ("conv2.", "out_layers.3."),
    ("conv_shortcut.", "skip_connection."),
)
_UNET_TOP = {
    "conv_in.": "input_blocks.0.0.",
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "add_embedding.linear_1.": "label_emb.0.0.",
    "add_embedding.linear_2.": "label_emb.0.2.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
}


def _rename_resnet(rest: str) -> str:
    for old, new in _RESNET_TO_LDM:
        if rest.startswith(old):
            return new + rest[len(old) :]
    raise KeyError(rest)


def unet_plan(config: Mapping[str, Any], module_keys: Iterable[str], prefix: str = UNET_PREFIX) -> list[Entry]:
    """Map every diffusers `UNet2DConditionModel` key to its LDM/SGM (`openaimodel.UNetModel`) key."""
    down_types = list(config["down_block_types"])
    up_types = list(config["up_block_types"])
    layers = config["layers_per_block"]
    per_down = [int(layers)] * len(down_types) if isinstance(layers, int) else [int(n) for n in layers]
    per_up = [n + 1 for n in reversed(per_down)]
    down_start = [1 + sum(n + 1 for n in per_down[:b]) for b in range(len(down_types))]
    up_start = [sum(per_up[:u]) for u in range(len(up_types))]
    plan = []
    for key in module_keys:
        parts = key.split(".")
        try:
            if any(key.startswith(p) for p in _UNET_TOP):
                top = next(p for p in _UNET_TOP if key.startswith(p))
                ldm = _UNET_TOP[top] + key[len(top) :]
            elif parts[0] == "down_blocks":
                b, kind = int(parts[1]), parts[2]
                if kind == "resnets":
                    ldm = f"input_blocks.{down_start[b] + int(parts[3])}.0." + _rename_resnet(".".join(parts[4:]))
                elif kind == "attentions":
                    ldm = f"input_blocks.{down_start[b] + int(parts[3])}.1." + ".".join(parts[4:])
                elif kind == "downsamplers" and parts[4] == "conv":
                    ldm = f"input_blocks.{down_start[b] + per_down[b]}.0.op." + ".".join(parts[5:])
                else:
                    raise KeyError(key)
            elif parts[0] == "mid_block":
                kind, i = parts[1], int(parts[2])
                if kind == "resnets":
                    ldm = f"middle_block.{2 * i}." + _rename_resnet(".".join(parts[3:]))
                elif kind == "attentions":
                    ldm = f"middle_block.{2 * i + 1}." + ".".join(parts[3:])
                else:
                    raise KeyError(key)
            elif parts[0] == "up_blocks":
                u, kind = int(parts[1]), parts[2]
                if kind == "resnets":
                    ldm = f"output_blocks.{up_start[u] + int(parts[3])}.0." + _rename_resnet(".".join(parts[4:]))
                elif kind == "attentions":
                    ldm = f"output_blocks.{up_start[u] + int(parts[3])}.1." + ".".join(parts[4:])
                elif kind == "upsamplers" and parts[4] == "conv":
                    slot = 2 if "CrossAttn" in up_types[u] else 1
                    ldm = f"output_blocks.{up_start[u] + per_up[u] - 1}.{slot}.conv." + ".".join(parts[5:])
                else:
                    raise KeyError(key)
            else:
                raise KeyError(key)
        except (KeyError, IndexError, ValueError):
            raise CheckpointError(f"UNet tensor {key!r} has no single-file equivalent (unsupported UNet type).") from None
        plan.append(Entry(key, prefix + ldm))
    return plan


_VAE_TOP = {
    "conv_in.": "conv_in.",
    "conv_out.": "conv_out.",
    "conv_norm_out.": "norm_out.",
}
_VAE_ATTN = {
    "group_norm.": "norm.",
    "to_q.": "q.",
    "to_k.": "k.",
    "to_v.": "v.",
    "to_out.0.": "proj_out.",
}


def vae_plan(config: Mapping[str, Any], module_keys: Iterable[str], prefix: str = VAE_PREFIX) -> list[Entry]:
    """Map every diffusers `AutoencoderKL` key to its LDM (`first_stage_model.*`) key."""
    num_up = len(config["up_block_types"])
    plan = []
    for key in module_keys:
        parts = key.split(".")
        op = "copy"
        try:
            if parts[0] in ("quant_conv", "post_quant_conv"):
                ldm = key
            elif parts[0] in ("encoder", "decoder"):
                side, rest, sub = parts[0], ".".join(parts[1:]), parts[1:]
                top = next((p for p in _VAE_TOP if rest.startswith(p)), None)
                if top is not None:
                    ldm = f"{side}." + _VAE_TOP[top] + rest[len(top) :]
                elif sub[0] == "mid_block" and sub[1] == "resnets":
                    tail = ".".join(sub[3:]).replace("conv_shortcut.", "nin_shortcut.")
                    ldm = f"{side}.mid.block_{int(sub[2]) + 1}.{tail}"
                elif sub[0] == "mid_block" and sub[1] == "attentions" and sub[2] == "0":
                    tail = ".".join(sub[3:])
                    name = next(p for p in _VAE_ATTN if tail.startswith(p))
                    ldm = f"{side}.mid.attn_1." + _VAE_ATTN[name] + tail[len(name) :]
                    if name != "group_norm." and tail.endswith("weight"):
                        op = "conv1x1"
                elif side == "encoder" and sub[0] == "down_blocks":
                    i, kind = int(sub[1]), sub[2]
                    if kind == "resnets":
                        tail = ".".join(sub[4:]).replace("conv_shortcut.", "nin_shortcut.")
                        ldm = f"encoder.down.{i}.block.{int(sub[3])}.{tail}"
                    elif kind == "downsamplers" and sub[4] == "conv":
                        ldm = f"encoder.down.{i}.downsample.conv." + ".".join(sub[5:])
                    else:
                        raise KeyError(key)
                elif side == "decoder" and sub[0] == "up_blocks":
                    i, kind = num_up - 1 - int(sub[1]), sub[2]
                    if kind == "resnets":
                        tail = ".".join(sub[4:]).replace("conv_shortcut.", "nin_shortcut.")
                        ldm = f"decoder.up.{i}.block.{int(sub[3])}.{tail}"
                    elif kind == "upsamplers" and sub[4] == "conv":
                        ldm = f"decoder.up.{i}.upsample.conv." + ".".join(sub[5:])
                    else:
                        raise KeyError(key)
                else:
                    raise KeyError(key)
            else:
                raise KeyError(key)
        except (KeyError, IndexError, ValueError, StopIteration):
            raise CheckpointError(f"VAE tensor {key!r} has no single-file equivalent (unsupported VAE type).") from None
        plan.append(Entry(key, prefix + ldm, op))
    return plan


def _canonical_clip_key(key: str) -> str:
    """transformers >= 5.6 dropped `CLIPTextModel.text_model`; `CLIPTextModelWithProjection` still has it."""
    return key[len("text_model.") :] if key.startswith("text_model.") else key


def clip_plan(module_keys: Iterable[str], prefix: str, file_keys: Iterable[str] | None = None) -> list[Entry]:
    """OpenAI CLIP in transformers layout, e.g. prefix `cond_stage_model.transformer.` (SD 1.x).

    Files are written with `<prefix>text_model.*`; some old merges lack the `text_model.` level, which is read too.
    """
    base = prefix + "text_model."
    if file_keys is not None:
        keys = set(file_keys)
        if base + "embeddings.token_embedding.weight" not in keys and prefix + "embeddings.token_embedding.weight" in keys:
            base = prefix
    plan = []
    for key in module_keys:
        canonical = _canonical_clip_key(key)
        if canonical.startswith("text_projection"):
            raise CheckpointError("a projected CLIP-L text encoder has no single-file equivalent")
        plan.append(Entry(key, base + canonical))
    return plan


_OPENCLIP_TOP = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
    "text_projection.weight": "text_projection",
}
_OPENCLIP_LAYER = {
    "layer_norm1.": "ln_1.",
    "layer_norm2.": "ln_2.",
    "self_attn.out_proj.": "attn.out_proj.",
    "mlp.fc1.": "mlp.c_fc.",
    "mlp.fc2.": "mlp.c_proj.",
}


def openclip_plan(module_keys: Iterable[str], prefix: str) -> list[Entry]:
    """OpenCLIP (`open_clip.CLIP` text tower) layout, e.g. prefix `cond_stage_model.model.` (SD 2.x)."""
    plan = []
    for key in module_keys:
        canonical = _canonical_clip_key(key)
        op = "copy"
        if canonical in _OPENCLIP_TOP:
            ldm = _OPENCLIP_TOP[canonical]
            op = "T" if canonical == "text_projection.weight" else "copy"
        else:
            match = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", canonical)
            if not match:
                raise CheckpointError(f"text encoder tensor {key!r} has no OpenCLIP equivalent")
            layer, rest = match.groups()
            qkv = re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest)
            if qkv:
                op, kind = qkv.groups()
                ldm = f"transformer.resblocks.{layer}.attn.in_proj_{kind}"
            else:
                name = next((p for p in _OPENCLIP_LAYER if rest.startswith(p)), None)
                if name is None:
                    raise CheckpointError(f"text encoder tensor {key!r} has no OpenCLIP equivalent")
                ldm = f"transformer.resblocks.{layer}." + _OPENCLIP_LAYER[name] + rest[len(name) :]
        plan.append(Entry(key, prefix + ldm, op))
    return plan


def identity_plan(module_keys: Iterable[str], file_keys: Iterable[str]) -> list[Entry]:
    """Diffusers/transformers weight files: same names, allowing for the `text_model.` prefix change."""
    available = set(file_keys)
    plan = []
    for key in module_keys:
        for candidate in (key, "text_model." + key, _canonical_clip_key(key)):
            if candidate in available:
                plan.append(Entry(key, candidate))
                break
        else:
            plan.append(Entry(key, key))  # reported as missing by the loader
    return plan


# --- writing ---------------------------------------------------------------------------------------------


def plan_to_file(plan: Sequence[Entry], state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Apply a plan to a module state dict: the tensors under their single-file names (new storage each)."""
    import torch

    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for entry in plan:
        tensor = state[entry.module_key].detach()
        if entry.op in ("q", "k", "v"):
            fused.setdefault(entry.file_key, {})[entry.op] = tensor
        elif entry.op == "conv1x1":
            out[entry.file_key] = tensor.reshape(*tensor.shape, 1, 1).clone()
        elif entry.op == "T":
            out[entry.file_key] = tensor.T.contiguous()
        else:
            out[entry.file_key] = tensor.clone()
    for file_key, parts in fused.items():
        out[file_key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


# --- reading ---------------------------------------------------------------------------------------------


class TensorSource:
    """Tensors of a checkpoint by name: a safetensors file read lazily, or an in-memory state dict."""

    def __init__(self, path: Path | None = None, state_dict: Mapping[str, Any] | None = None) -> None:
        self.path = path
        self._state = state_dict
        self._handle: Any = None
        if state_dict is None:
            from safetensors import safe_open

            try:
                self._handle = safe_open(str(path), framework="pt", device="cpu")
            except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError
                raise CheckpointError(f"{path} could not be read ({exc}). Download it again.") from None
            self._keys = set(self._handle.keys())
        else:
            self._keys = set(state_dict)

    def keys(self) -> set[str]:
        return self._keys

    def __contains__(self, key: str) -> bool:
        return key in self._keys

    def get(self, key: str) -> torch.Tensor:
        if self._state is not None:
            return self._state[key]
        try:
            return self._handle.get_tensor(key)
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(f"{self.path}: tensor {key!r} could not be read ({exc}). Download it again.") from None


def open_tensors(source: Any) -> TensorSource:
    """A `TensorSource` for an `sdcore.checkpoints.ModelSource` (pickle state dicts are already in memory)."""
    if getattr(source, "state_dict", None) is not None:
        return TensorSource(state_dict=source.state_dict)
    return TensorSource(path=source.path)


def build_empty(factory: Callable[[], Any]) -> Any:
    """Build a module without allocating or initialising its weights (meta device)."""
    import torch

    with torch.device("meta"):
        return factory()


def materialize(module: Any, plan: Sequence[Entry], tensors: TensorSource, dtype: torch.dtype, what: str) -> Any:
    """Fill a meta-device module from `tensors` following `plan`; missing or misshaped tensors are errors."""
    shapes = {k: tuple(v.shape) for k, v in module.state_dict(keep_vars=True).items()}
    missing = [e.file_key for e in plan if e.file_key not in tensors]
    if missing:
        sample = ", ".join(sorted(set(missing))[:3])
        raise CheckpointError(
            f"The {what} weights are incomplete: {len(set(missing))} tensors are missing (e.g. {sample}). "
            "The file is damaged or has a different architecture; a non-standard model needs its config folder "
            "(LoadOptions.config / --config)."
        )
    state: dict[str, torch.Tensor] = {}
    cache: dict[str, torch.Tensor] = {}
    for entry in plan:
        if entry.op in ("q", "k", "v"):
            if entry.file_key not in cache:
                cache[entry.file_key] = tensors.get(entry.file_key)
            fused = cache[entry.file_key]
            third = fused.shape[0] // 3
            index = "qkv".index(entry.op)
            tensor = fused[index * third : (index + 1) * third].clone()
        else:
            tensor = tensors.get(entry.file_key)
            if entry.op == "conv1x1" and tensor.ndim == 4:
                tensor = tensor.reshape(tensor.shape[0], tensor.shape[1])
            elif entry.op == "T":
                tensor = tensor.T.contiguous()
        expected = shapes[entry.module_key]
        if tuple(tensor.shape) != expected:
            raise CheckpointError(
                f"The {what} tensor {entry.file_key!r} has shape {tuple(tensor.shape)}, expected {expected}: the "
                "checkpoint does not match the architecture config. Pass the right config folder "
                "(LoadOptions.config / --config) for a non-standard model."
            )
        if tensor.is_floating_point() and tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        elif not tensor.is_contiguous():  # pickled state dicts may hold views
            tensor = tensor.contiguous()
        state[entry.module_key] = tensor
    unknown = set(shapes) - set(state)
    if unknown:
        raise CheckpointError(f"internal error: no source for {what} tensors {sorted(unknown)[:3]}")
    module.load_state_dict(state, strict=True, assign=True)
    _fix_meta_buffers(module)
    module.eval()
    module.requires_grad_(False)
    return module


def _fix_meta_buffers(module: Any) -> None:
    """Recreate non-persistent buffers left on the meta device (CLIP's `position_ids`)."""
    import torch

    for name, buffer in list(module.named_buffers()):
        if buffer.device.type != "meta":
            continue
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        if leaf == "position_ids":
            owner.register_buffer(leaf, torch.arange(buffer.shape[-1]).expand(buffer.shape), persistent=False)
        else:
            raise CheckpointError(f"internal error: cannot initialise buffer {name!r}")


def load_component(
    factory: Callable[[], Any],
    planner: Callable[[Iterable[str]], list[Entry]],
    tensors: TensorSource,
    dtype: torch.dtype,
    what: str,
) -> Any:
    module = build_empty(factory)
    plan = planner(list(module.state_dict().keys()))
    return materialize(module, plan, tensors, dtype, what)


# --- module factories from config dicts -------------------------------------------------------------------


def unet_factory(config: Mapping[str, Any]) -> Callable[[], Any]:
    def make() -> Any:
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel.from_config(dict(config))

    return make


def vae_factory(config: Mapping[str, Any]) -> Callable[[], Any]:
    def make() -> Any:
        from diffusers import AutoencoderKL

        return AutoencoderKL.from_config(dict(config))

    return make


def text_encoder_factory(config: Mapping[str, Any], with_projection: bool = False) -> Callable[[], Any]:
    def make() -> Any:
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        cfg = CLIPTextConfig.from_dict(dict(config))
        return CLIPTextModelWithProjection(cfg) if with_projection else CLIPTextModel(cfg)

    return make


def wants_projection(config: Mapping[str, Any]) -> bool:
    return "CLIPTextModelWithProjection" in (config.get("architectures") or [])


# --- separate VAE files -----------------------------------------------------------------------------------


def load_vae_override(path: Path, config: Mapping[str, Any], dtype: torch.dtype) -> Any:
    """A VAE from a separate file (LDM layout, optionally prefixed; or diffusers layout) or a diffusers folder."""
    from sdcore.checkpoints import PICKLE_SUFFIXES, read_safetensors_header

    path = Path(path).expanduser()
    if path.is_dir():
        from diffusers import AutoencoderKL

        folder = path if (path / "config.json").is_file() else path / "vae"
        if not (folder / "config.json").is_file():
            raise ModelNotFound(f"{path} is a folder but holds no VAE (no config.json, no vae/config.json).")
        try:
            return AutoencoderKL.from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True).eval()
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"The VAE folder {folder} could not be loaded ({exc}).") from None
    if not path.is_file():
        raise ModelNotFound(f"VAE {str(path)!r} not found: no such file or folder.")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        from sdcore.errors import UnsafeCheckpoint

        raise UnsafeCheckpoint(
            f"{path.name} is a pickle file, which can run code when loaded; sdcore loads separate VAEs from "
            ".safetensors files only. Convert it with a trusted tool first."
        )
    read_safetensors_header(path)  # checks the file is whole, with a clear error
    tensors = TensorSource(path=path)
    keys = tensors.keys()
    prefix = ""
    for candidate in (VAE_PREFIX, "vae."):
        if any(k.startswith(candidate + "decoder.") for k in keys):
            prefix = candidate
    if any(k.startswith(prefix + "decoder.up_blocks.") for k in keys):
        planner: Callable[[Iterable[str]], list[Entry]] = lambda mk: [Entry(k, prefix + k) for k in mk]  # noqa: E731
    elif any(k.startswith(prefix + "decoder.up.") for k in keys):
        planner = lambda mk: vae_plan(config, mk, prefix)  # noqa: E731
    else:
        raise CheckpointError(f"{path.name} is not a VAE (no decoder weights found).")
    return load_component(vae_factory(config), planner, tensors, dtype, "VAE")


# --- text encoding ----------------------------------------------------------------------------------------


def chunk_ids(
    chunks: Sequence[Sequence[Any]], encoder: str, pad_id: int, bos_id: int = 49406, eos_id: int = 49407
) -> tuple[list[list[int]], list[tuple[int, int, Any]]]:
    """BOS + tokens + EOS + padding to 77 per chunk; `TokenOverride` entries become (row, position, vector)."""
    rows: list[list[int]] = []
    overrides: list[tuple[int, int, Any]] = []
    for r, chunk in enumerate(chunks):
        if len(chunk) > 75:
            raise PromptError(f"a token chunk holds at most 75 tokens, got {len(chunk)}")
        row = [bos_id]
        for item in chunk:
            if isinstance(item, numbers.Integral):
                row.append(int(item))
                continue
            vectors = getattr(item, "vectors", None)
            if not isinstance(vectors, Mapping):
                raise PromptError(f"token chunks hold token ids or TokenOverride objects, got {type(item).__name__}")
            if encoder not in vectors:
                have = ", ".join(sorted(vectors)) or "none"
                raise PromptError(
                    f"an embedding has no vector for the text encoder {encoder!r} (it has: {have}); it was made for "
                    "another model family."
                )
            overrides.append((r, len(row), vectors[encoder]))
            row.append(0)  # placeholder below EOS so the pooled (argmax) position stays the EOS
        row.append(eos_id)
        row += [pad_id] * (77 - len(row))
        rows.append(row)
    return rows, overrides


def run_clip(
    text_encoder: Any,
    rows: list[list[int]],
    overrides: list[tuple[int, int, Any]],
    hidden_layer: int | None,
    final_layer_norm: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a CLIP text model; returns (hidden states [n, 77, D], pooled/projected output [n, P]).

    `hidden_layer` None takes `last_hidden_state` (after the final layer norm); -k takes `hidden_states[-k]` (the
    output of the k-th layer from the end), then the final layer norm if `final_layer_norm`. Overrides replace the
    input embeddings at their positions, exactly as if the token embedding table held those vectors.
    """
    import torch

    embedding = text_encoder.get_input_embeddings()
    device = embedding.weight.device
    ids = torch.tensor(rows, dtype=torch.long, device=device)
    handle = None
    if overrides:
        width = embedding.weight.shape[-1]
        prepared = []
        for row, pos, vector in overrides:
            vector = torch.as_tensor(vector).reshape(-1)
            if vector.numel() != width:
                raise PromptError(f"an embedding vector has {vector.numel()} values; this text encoder needs {width}")
            prepared.append((row, pos, vector))

        def hook(_module: Any, _args: Any, output: torch.Tensor) -> torch.Tensor:
            output = output.clone()
            for row, pos, vector in prepared:
                output[row, pos] = vector.to(device=output.device, dtype=output.dtype)
            return output

        handle = embedding.register_forward_hook(hook)
    try:
        with torch.no_grad():
            out = text_encoder(input_ids=ids, output_hidden_states=hidden_layer is not None)
    finally:
        if handle is not None:
            handle.remove()
    if hidden_layer is None:
        hidden = out.last_hidden_state
    else:
        hidden = out.hidden_states[hidden_layer]
        if final_layer_norm:
            model = getattr(text_encoder, "text_model", text_encoder)
            with torch.no_grad():
                hidden = model.final_layer_norm(hidden)
    pooled = out.text_embeds if hasattr(out, "text_embeds") and out.text_embeds is not None else out.pooler_output
    return hidden, pooled


def num_layers(text_encoder: Any) -> int:
    return int(text_encoder.config.num_hidden_layers)


def check_clip_skip(clip_skip: int, text_encoder: Any) -> int:
    clip_skip = max(1, int(clip_skip))
    if clip_skip > num_layers(text_encoder):
        raise InvalidRequest(
            f"clip skip {clip_skip} is more than the text encoder's {num_layers(text_encoder)} layers"
        )
    return clip_skip


def signature_kwargs(cls: type, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The subset of `kwargs` that `cls.__init__` accepts."""
    import inspect

    params = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in kwargs.items() if k in params}


# --- whole models: components of a family, loaded from single files or diffusers folders -------------------


@dataclass(frozen=True)
class ComponentSpec:
    """A weight-bearing component and where it lives in a single file.

    kind: "unet", "vae", "clip" (OpenAI CLIP in transformers layout) or "openclip" (OpenCLIP layout).
    """

    name: str
    kind: str
    prefix: str


def component_factory(spec: ComponentSpec, config: Mapping[str, Any]) -> Callable[[], Any]:
    if spec.kind == "unet":
        return unet_factory(config)
    if spec.kind == "vae":
        return vae_factory(config)
    return text_encoder_factory(config, wants_projection(config))


def component_planner(
    spec: ComponentSpec, config: Mapping[str, Any], file_keys: Iterable[str] | None = None
) -> Callable[[Iterable[str]], list[Entry]]:
    if spec.kind == "unet":
        return lambda keys: unet_plan(config, keys, spec.prefix)
    if spec.kind == "vae":
        return lambda keys: vae_plan(config, keys, spec.prefix)
    if spec.kind == "clip":
        return lambda keys: clip_plan(keys, spec.prefix, file_keys)
    return lambda keys: openclip_plan(keys, spec.prefix)


_WHAT = {"unet": "UNet", "vae": "VAE", "text_encoder": "text encoder", "text_encoder_2": "second text encoder"}


def read_configs(folder: Path, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """The component configs of a diffusers (config) folder, by component name (`scheduler` included)."""
    return {name: read_component_config(folder, name) for name in names}


def config_matches(configs: Mapping[str, Mapping[str, Any]], specs: Sequence[ComponentSpec],
                   keys: Mapping[str, tuple[int, ...]]) -> bool:
    """Whether the widths in `configs` fit the tensor shapes of a single file (checked on a few tensors)."""
    for spec in specs:
        config = configs[spec.name]
        if spec.kind == "unet":
            key, expected = spec.prefix + "input_blocks.0.0.weight", int(config["block_out_channels"][0])
        elif spec.kind == "vae":
            key, expected = spec.prefix + "encoder.conv_in.weight", int(config["block_out_channels"][0])
        elif spec.kind == "clip":
            key = spec.prefix + "text_model.embeddings.token_embedding.weight"
            expected = int(config["hidden_size"])
        else:
            key, expected = spec.prefix + "token_embedding.weight", int(config["hidden_size"])
        shape = keys.get(key)
        if shape is None:
            continue  # a missing component (no VAE) is reported by the loader
        if (shape[0] if spec.kind in ("unet", "vae") else shape[-1]) != expected:
            return False
    return True


def load_single_file_components(
    source: Any,
    configs: Mapping[str, Mapping[str, Any]],
    specs: Sequence[ComponentSpec],
    dtype: torch.dtype,
    vae: Path | None = None,
) -> dict[str, Any]:
    """Every component of a single-file checkpoint, built from `configs` (component name -> config dict)."""
    tensors = open_tensors(source)
    modules: dict[str, Any] = {}
    for spec in specs:
        config = configs[spec.name]
        if spec.kind == "vae" and vae is not None:
            modules[spec.name] = load_vae_override(vae, config, dtype)
            continue
        if spec.kind == "vae" and not any(k.startswith(spec.prefix) for k in tensors.keys()):
            raise CheckpointError(
                f"{source.path.name if source.path else source.location} has no VAE weights; pass a VAE file "
                "(LoadOptions.vae / --vae)."
            )
        modules[spec.name] = load_component(
            component_factory(spec, config),
            component_planner(spec, config, tensors.keys()),
            tensors,
            dtype,
            _WHAT[spec.name],
        )
    return modules


_WEIGHT_FILES = {"transformers": ("model.safetensors",), "diffusers": ("diffusion_pytorch_model.safetensors",)}


_PICKLE_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt")


def load_folder_components(
    folder: Path,
    specs: Sequence[ComponentSpec],
    dtype: torch.dtype,
    vae: Path | None = None,
    allow_pickle: bool = False,
) -> dict[str, Any]:
    """Components of a diffusers folder (no network). One `.safetensors` per component loads through the fast
    meta-device path; other layouts (sharded, variants) go through `from_pretrained(local_files_only=True)`.
    Components stored only as pickles (`.bin`) need `allow_pickle` (then read with `weights_only=True`)."""
    from sdcore.errors import UnsafeCheckpoint

    modules: dict[str, Any] = {}
    for spec in specs:
        sub = folder / spec.name
        config = read_component_config(folder, spec.name)
        if spec.kind == "vae" and vae is not None:
            modules[spec.name] = load_vae_override(vae, config, dtype)
            continue
        files = [f for f in sub.iterdir() if f.is_file()] if sub.is_dir() else []
        if not any(f.suffix == ".safetensors" for f in files) and any(f.suffix in _PICKLE_WEIGHTS for f in files):
            if not allow_pickle:
                raise UnsafeCheckpoint(
                    f"{sub} holds its weights only as pickle files, which can run code when loaded. Convert the "
                    "folder to .safetensors, or pass --allow-pickle (allow_pickle=True) to load it with "
                    "weights_only=True."
                )
        library = "diffusers" if spec.kind in ("unet", "vae") else "transformers"
        weights = next((sub / n for n in _WEIGHT_FILES[library] if (sub / n).is_file()), None)
        if weights is not None:
            tensors = TensorSource(path=weights)
            modules[spec.name] = load_component(
                component_factory(spec, config),
                lambda keys, _t=tensors: identity_plan(keys, _t.keys()),
                tensors,
                dtype,
                _WHAT[spec.name],
            )
            continue
        modules[spec.name] = _from_pretrained(spec, config, str(folder), dtype, local_files_only=True)
    return modules


def _from_pretrained(spec: ComponentSpec, config: Mapping[str, Any], location: str, dtype: torch.dtype,
                     local_files_only: bool) -> Any:
    try:
        if spec.kind == "unet":
            from diffusers import UNet2DConditionModel

            return UNet2DConditionModel.from_pretrained(
                location, subfolder=spec.name, torch_dtype=dtype, local_files_only=local_files_only
            ).eval()
        if spec.kind == "vae":
            from diffusers import AutoencoderKL

            return AutoencoderKL.from_pretrained(
                location, subfolder=spec.name, torch_dtype=dtype, local_files_only=local_files_only
            ).eval()
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        cls = CLIPTextModelWithProjection if wants_projection(config) else CLIPTextModel
        return cls.from_pretrained(location, subfolder=spec.name, dtype=dtype, local_files_only=local_files_only).eval()
    except (OSError, ValueError) as exc:
        if local_files_only:
            raise CheckpointError(f"The {_WHAT[spec.name]} in {location} could not be loaded ({exc}).") from None
        raise ModelNotFound(
            f"The hub model {location!r} could not be loaded ({str(exc).splitlines()[0][:200]}). Hub ids need "
            "network access or a complete copy in the local hub cache; otherwise download the model and pass its "
            "folder or .safetensors file."
        ) from None


def load_hub_components(repo: str, specs: Sequence[ComponentSpec], configs: Mapping[str, Mapping[str, Any]],
                        dtype: torch.dtype, vae: Path | None = None) -> dict[str, Any]:
    modules: dict[str, Any] = {}
    for spec in specs:
        if spec.kind == "vae" and vae is not None:
            modules[spec.name] = load_vae_override(vae, configs[spec.name], dtype)
            continue
        modules[spec.name] = _from_pretrained(spec, configs[spec.name], repo, dtype, local_files_only=False)
    return modules


def _standard_tokenizer_pad(sub: Path) -> str | None:
    """The pad token when `sub` holds exactly sdcore's CLIP vocabulary (vocab.json + merges.txt, no extras)."""
    from sdcore.tokenizers import DATA_DIR, PAD_TOKENS

    if (sub / "tokenizer.json").exists() or (sub / "added_tokens.json").exists():
        return None
    try:
        config = json.loads((sub / "tokenizer_config.json").read_text(encoding="utf-8"))
        same = all((sub / n).read_bytes() == (DATA_DIR / n).read_bytes() for n in ("vocab.json", "merges.txt"))
    except (OSError, ValueError):
        return None
    pad = config.get("pad_token")
    pad = pad.get("content") if isinstance(pad, dict) else pad
    if not same or pad not in PAD_TOKENS or config.get("added_tokens_decoder", {}).keys() - {"49406", "49407"}:
        return None
    return str(pad)


def folder_tokenizer(folder: Path | None, subfolder: str, pad_token: str) -> Any:
    """The tokenizer in `folder/subfolder` when there is one, else sdcore's shipped CLIP tokenizer.

    A folder holding exactly sdcore's vocabulary files gets the shared cached tokenizer (no parsing)."""
    from sdcore.tokenizers import clip_tokenizer

    if folder is not None and (folder / subfolder).is_dir():
        sub = folder / subfolder
        standard = _standard_tokenizer_pad(sub)
        if standard is not None:
            return clip_tokenizer(standard)
        if (sub / "tokenizer.json").is_file() or (sub / "vocab.json").is_file():
            from transformers import CLIPTokenizer

            try:
                return CLIPTokenizer.from_pretrained(str(folder), subfolder=subfolder, local_files_only=True)
            except (OSError, ValueError) as exc:
                raise CheckpointError(f"The tokenizer in {sub} could not be loaded ({exc}).") from None
    return clip_tokenizer(pad_token)


def components_to_single_file(modules: Mapping[str, Any], specs: Sequence[ComponentSpec]) -> dict[str, torch.Tensor]:
    """Every component's weights under their single-file names."""
    out: dict[str, torch.Tensor] = {}
    for spec in specs:
        module = modules[spec.name]
        state = module.state_dict()
        config = dict(module.config) if spec.kind in ("unet", "vae") else {}
        out.update(plan_to_file(component_planner(spec, config)(state.keys()), state))
    return out


def move(modules: Mapping[str, Any], device: str) -> None:
    if device and device != "cpu":
        for module in modules.values():
            module.to(device)


def save_pipeline(pipe: Any, path: Path) -> Path:
    """`pipe.save_pretrained(path)` as safetensors, without transformers' per-shard progress bar.

    Standard CLIP tokenizers are written as vocab.json + merges.txt (the layout of the original SD repos), which
    loads 8x faster than transformers 5's tokenizer.json.
    """
    import shutil

    from transformers.utils import logging as hf_logging

    from sdcore.tokenizers import PAD_TOKENS, save_clip_tokenizer

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        pipe.save_pretrained(str(path), safe_serialization=True)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
    for name in ("tokenizer", "tokenizer_2"):
        tokenizer = getattr(pipe, name, None)
        if tokenizer is None or len(tokenizer) != 49408 or tokenizer.pad_token not in PAD_TOKENS:
            continue
        shutil.rmtree(Path(path) / name, ignore_errors=True)
        save_clip_tokenizer(Path(path) / name, tokenizer.pad_token)
    return path

"""Reading LoRA files (kohya/A1111, diffusers/PEFT, LyCORIS LoCon/LoHa/LoKr/full) and their weight deltas.

A file is grouped into `LoraModule`s, one per patched layer, keyed by the layer's name as the file spells it
(`lora_unet_input_blocks_1_1_proj_in`, `unet.down_blocks.0.attentions.0.proj_in`, ...). Each module knows how
to compute its dense weight delta `ΔW` (float32, already multiplied by its own `alpha / rank`); the caller
multiplies by the user's weight and adds it to the layer. Matching names to a model is `patch.py`'s job.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdcore.errors import InvalidRequest

if TYPE_CHECKING:
    import torch


class LoraError(InvalidRequest):
    """A LoRA file cannot be read or does not fit the model."""


# Suffix of a tensor key -> (role, format hint). Longest suffixes first so that `.lora_A.weight` wins.
_SUFFIXES: tuple[tuple[str, str], ...] = (
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".lora_mid.weight", "mid"),
    (".lora_A.default.weight", "down"),
    (".lora_B.default.weight", "up"),
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora_linear_layer.down.weight", "down"),
    (".lora_linear_layer.up.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    (".down.weight", "down"),  # old diffusers attention processors: `...processor.to_q_lora.down.weight`
    (".up.weight", "up"),
    (".alpha", "alpha"),
    (".hada_w1_a", "hada_w1_a"),
    (".hada_w1_b", "hada_w1_b"),
    (".hada_w2_a", "hada_w2_a"),
    (".hada_w2_b", "hada_w2_b"),
    (".hada_t1", "hada_t1"),
    (".hada_t2", "hada_t2"),
    (".lokr_w1", "lokr_w1"),
    (".lokr_w1_a", "lokr_w1_a"),
    (".lokr_w1_b", "lokr_w1_b"),
    (".lokr_w2", "lokr_w2"),
    (".lokr_w2_a", "lokr_w2_a"),
    (".lokr_w2_b", "lokr_w2_b"),
    (".lokr_t2", "lokr_t2"),
    (".diff", "diff"),
    (".diff_b", "diff_b"),
    (".dora_scale", "dora_scale"),
)
_SUFFIXES = tuple(sorted(_SUFFIXES, key=lambda s: -len(s[0])))


def split_key(key: str) -> tuple[str, str] | None:
    """`lora_unet_x.lora_down.weight` -> (`lora_unet_x`, "down"); None for keys that are no LoRA tensor."""
    for suffix, role in _SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


@dataclass
class LoraModule:
    """The tensors that patch one layer."""

    key: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        t = self.tensors
        if "hada_w1_a" in t:
            return "loha"
        if any(k.startswith("lokr_") for k in t):
            return "lokr"
        if "diff" in t:
            return "full"
        return "lora"

    @property
    def alpha(self) -> float | None:
        a = self.tensors.get("alpha")
        return None if a is None else float(a.float().item())

    @property
    def rank(self) -> int | None:
        t = self.tensors
        kind = self.kind
        if kind == "lora":
            return int(t["down"].shape[0])
        if kind == "loha":
            return int(t["hada_w1_b"].shape[0])
        if kind == "lokr":
            if "lokr_w1_b" in t:
                return int(t["lokr_w1_b"].shape[0])
            if "lokr_w2_b" in t:
                return int(t["lokr_w2_b"].shape[0])
        return None

    @property
    def scale(self) -> float:
        """`alpha / rank` (1 when the file has no alpha, or for LoKr with full factors and `.diff`)."""
        alpha, rank = self.alpha, self.rank
        if alpha is None or rank is None:
            return 1.0
        return alpha / rank

    def check(self) -> str | None:
        """Why this module cannot be used, or None."""
        t = self.tensors
        kind = self.kind
        if "dora_scale" in t:
            return "DoRA (dora_scale) is not supported"
        if kind == "lora" and not ("down" in t and "up" in t):
            return "it has no matching lora_down/lora_up pair"
        if kind == "loha" and not all(k in t for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")):
            return "its LoHa tensors are incomplete"
        if kind == "lokr":
            if "lokr_w1" not in t and not ("lokr_w1_a" in t and "lokr_w1_b" in t):
                return "its LoKr w1 factor is incomplete"
            if "lokr_w2" not in t and not ("lokr_w2_a" in t and "lokr_w2_b" in t):
                return "its LoKr w2 factor is incomplete"
        return None

    def out_features(self) -> int:
        t = self.tensors
        kind = self.kind
        if kind == "lora":
            return int(t["up"].shape[0])
        if kind == "loha":  # with Tucker factors, LyCORIS stores w_a as [rank, out]
            return int(t["hada_w1_a"].shape[1 if "hada_t1" in t else 0])
        if kind == "lokr":
            w1 = t["lokr_w1"].shape[0] if "lokr_w1" in t else t["lokr_w1_a"].shape[0]
            w2 = t["lokr_w2"].shape[0] if "lokr_w2" in t else t["lokr_w2_a"].shape[1 if "lokr_t2" in t else 0]
            return int(w1 * w2)
        return int(t["diff"].shape[0])

    def numel(self) -> int:
        """The number of elements of the dense delta (must equal the layer weight's)."""
        t = self.tensors
        kind = self.kind
        if kind == "lora":
            inner = math.prod(t["down"].shape[1:])
            if "mid" in t:
                inner = math.prod(t["down"].shape[1:]) * math.prod(t["mid"].shape[2:])
            return int(t["up"].shape[0] * inner)
        if kind == "loha":
            if "hada_t1" in t:
                return int(t["hada_w1_a"].shape[1] * t["hada_w1_b"].shape[1] * math.prod(t["hada_t1"].shape[2:]))
            return int(t["hada_w1_a"].shape[0] * t["hada_w1_b"].shape[1])
        if kind == "lokr":
            w1 = t["lokr_w1"].numel() if "lokr_w1" in t else t["lokr_w1_a"].shape[0] * t["lokr_w1_b"].shape[1]
            if "lokr_w2" in t:
                w2 = t["lokr_w2"].numel()
            elif "lokr_t2" in t:
                w2 = t["lokr_w2_a"].shape[1] * t["lokr_w2_b"].shape[1] * math.prod(t["lokr_t2"].shape[2:])
            else:
                w2 = t["lokr_w2_a"].shape[0] * t["lokr_w2_b"].shape[1]
            return int(w1 * w2)
        return int(t["diff"].numel())

    def delta(self, shape: tuple[int, ...]) -> torch.Tensor:
        """The dense weight delta in float32 with shape `shape`, including `alpha / rank` (not the user weight)."""
        import torch

        t = {k: v.float() for k, v in self.tensors.items()}
        kind = self.kind
        if kind == "lora":
            down, up = t["down"], t["up"]
            if "mid" in t:  # LoCon with Tucker decomposition (conv layers)
                mid = t["mid"]
                d = torch.einsum("nmkl,in,mj->ijkl", mid, up.flatten(1), down.flatten(1))
            else:
                d = up.flatten(1) @ down.flatten(1)
        elif kind == "loha":
            if "hada_t1" in t:
                d1 = torch.einsum("ijkl,jr,ip->prkl", t["hada_t1"], t["hada_w1_b"], t["hada_w1_a"])
                d2 = torch.einsum("ijkl,jr,ip->prkl", t["hada_t2"], t["hada_w2_b"], t["hada_w2_a"])
                d = d1 * d2
            else:
                d = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
        elif kind == "lokr":
            w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
            if "lokr_w2" in t:
                w2 = t["lokr_w2"]
            elif "lokr_t2" in t:
                w2 = torch.einsum("ijkl,jr,ip->prkl", t["lokr_t2"], t["lokr_w2_b"], t["lokr_w2_a"])
            else:
                w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
            if w2.dim() == 4:
                w1 = w1.reshape(*w1.shape, 1, 1)
            d = torch.kron(w1, w2)
        else:
            d = t["diff"]
        return (d * self.scale).reshape(shape)

    def add_to(self, weight: torch.Tensor, multiplier: float) -> None:
        """`weight += multiplier × ΔW` in place (`weight` is float32); plain LoRAs in one fused matmul-add."""
        t = self.tensors
        if self.kind == "lora" and "mid" not in t and weight.is_contiguous():
            up, down = t["up"], t["down"]
            flat = weight.view(weight.shape[0], -1)
            flat.addmm_(up.flatten(1).to(flat), down.flatten(1).to(flat), alpha=self.scale * multiplier)
            return
        weight.add_(self.delta(tuple(weight.shape)).to(weight.device), alpha=multiplier)

    def bias_delta(self) -> torch.Tensor | None:
        b = self.tensors.get("diff_b")
        return None if b is None else b.float()


@dataclass
class LoraFile:
    """A parsed LoRA file."""

    path: Path
    modules: dict[str, LoraModule]
    metadata: dict[str, str]

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def kinds(self) -> list[str]:
        return sorted({m.kind for m in self.modules.values()})

    @property
    def rank(self) -> int | None:
        """The most common rank of its modules (None for LoKr/full files without one)."""
        ranks = [m.rank for m in self.modules.values() if m.rank is not None]
        return max(set(ranks), key=ranks.count) if ranks else None

    def family_guess(self) -> str | None:
        """Which model family the file was made for, from kohya/modelspec metadata or its key names."""
        meta = self.metadata
        arch = (meta.get("modelspec.architecture") or meta.get("ss_base_model_version") or "").lower()
        if "xl" in arch:
            return "SDXL"
        if re.search(r"(sd|stable-diffusion)[-_]?v?2", arch):
            return "SD 2.x"
        if re.search(r"(sd|stable-diffusion)[-_]?v?1", arch):
            return "SD 1.x"
        keys = self.modules.keys()
        if any(k.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) for k in keys):
            return "SDXL"
        for key, module in self.modules.items():
            if module.kind == "lora" and key.startswith(("lora_te_", "text_encoder.")) and "q_proj" in key:
                width = int(module.tensors["down"].shape[1])
                return {768: "SD 1.x", 1024: "SD 2.x"}.get(width)
        if any("input_blocks_7_1" in k or "input_blocks.7.1" in k for k in keys) and not any(
            "input_blocks_10_" in k for k in keys
        ):
            return "SDXL"
        return None


def read_metadata(path: Path) -> dict[str, str]:
    try:
        with open(path, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            if size <= 0 or size > 100 * 1024 * 1024:
                return {}
            header = json.loads(handle.read(size))
    except (OSError, ValueError):
        return {}
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}


def parse_state_dict(path: Path, state: dict[str, Any], metadata: dict[str, str] | None = None) -> LoraFile:
    """Group a LoRA state dict into modules; raise `LoraError` for files that hold no LoRA tensors."""
    modules: dict[str, LoraModule] = {}
    unknown: list[str] = []
    for key, tensor in state.items():
        split = split_key(key)
        if split is None:
            unknown.append(key)
            continue
        base, role = split
        modules.setdefault(base, LoraModule(base)).tensors[role] = tensor
    if not modules:
        sample = ", ".join(sorted(unknown)[:3]) or "none"
        raise LoraError(
            f"{path} is not a LoRA file sdcore can read: none of its tensors has a LoRA/LyCORIS name "
            f"(lora_down/lora_up, lora_A/lora_B, hada_*, lokr_*, diff); first keys: {sample}."
        )
    # alpha-only or tensor-less groups (e.g. a stray `.alpha`) are not modules
    modules = {k: m for k, m in modules.items() if set(m.tensors) - {"alpha"}}
    for module in modules.values():
        problem = module.check()
        if problem:
            raise LoraError(f"LoRA {path.name}: module {module.key!r} cannot be applied: {problem}.")
    return LoraFile(path=path, modules=modules, metadata=metadata or {})


def read_lora_file(path: Path) -> LoraFile:
    """Read a `.safetensors` LoRA (pickle `.pt`/`.ckpt` files are loaded with `weights_only=True`)."""
    path = Path(path)
    if not path.is_file():
        raise LoraError(f"LoRA file {path} does not exist.")
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
            metadata = read_metadata(path)
        else:
            import torch

            state = torch.load(str(path), map_location="cpu", weights_only=True)
            metadata = {}
            if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
                state = state["state_dict"]
    except LoraError:
        raise
    except Exception as exc:  # noqa: BLE001 - any reader failure becomes a clear request error
        raise LoraError(f"LoRA file {path} could not be read ({type(exc).__name__}: {exc}).") from None
    if not isinstance(state, dict):
        raise LoraError(f"LoRA file {path} does not hold a state dict.")
    return parse_state_dict(path, state, metadata)

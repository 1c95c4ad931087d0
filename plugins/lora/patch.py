"""Matching LoRA modules to a model's layers, checking them, and patching/restoring weights in place.

Patching adds `weight × ΔW` to each touched layer's weight (computed in float32 from a saved copy of the
original, cast once to the model dtype). The originals of only the touched layers are kept in
`model.plugin_state["lora"]` and copied back with `copy_`, so the base weights afterwards are bit-identical.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .formats import LoraError, LoraFile, LoraModule

if TYPE_CHECKING:
    import torch

TE_COMPONENTS = ("text_encoder", "text_encoder_2")


@dataclass
class Target:
    component: str  # "unet", "text_encoder", "text_encoder_2"
    module_name: str
    module: Any

    @property
    def is_text(self) -> bool:
        return self.component in TE_COMPONENTS


@dataclass
class LoraState:
    """Per-model bookkeeping (in `model.plugin_state["lora"]`)."""

    index: dict[str, Target] | None = None
    # (component, layer name) -> (layer, {parameter name: original tensor})
    originals: dict[tuple[str, str], tuple[Any, dict[str, torch.Tensor]]] = field(default_factory=dict)
    applied: list[tuple[str, float, float]] = field(default_factory=list)
    text_revision: int = 0  # bumped whenever text-encoder weights change (prompt-encoding caches)


def lora_state(model: Any) -> LoraState:
    state = model.plugin_state.get("lora")
    if not isinstance(state, LoraState):
        state = model.plugin_state["lora"] = LoraState()
    return state


def _underscored(name: str) -> str:
    return name.replace(".", "_")


def _canonical_clip(name: str) -> str:
    return name[len("text_model.") :] if name.startswith("text_model.") else name


def _patchable(module: Any) -> Iterable[tuple[str, Any]]:
    import torch

    for name, sub in module.named_modules():
        if name and isinstance(sub, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv1d)):
            yield name, sub


def build_index(model: Any) -> dict[str, Target]:
    """Every name a LoRA file may use for a patchable layer of `model` -> the layer."""
    from sdcore_plugins import sdcommon

    modules = model.modules()
    index: dict[str, Target] = {}
    unet = modules.get("unet")
    if unet is not None:
        names = dict(_patchable(unet))
        ldm: dict[str, str] = {}
        for name in names:
            try:
                (entry,) = sdcommon.unet_plan(dict(unet.config), [name + ".weight"], prefix="")
                ldm[name] = entry.file_key[: -len(".weight")]
            except Exception:  # noqa: BLE001 - layers without an LDM name are matched by diffusers names only
                continue
        for name, sub in names.items():
            target = Target("unet", name, sub)
            index["lora_unet_" + _underscored(name)] = target
            index["unet." + name] = target
            if name in ldm:
                index["lora_unet_" + _underscored(ldm[name])] = target
    has_two = modules.get("text_encoder_2") is not None
    for component, kohya in (("text_encoder", "lora_te1_" if has_two else "lora_te_"), ("text_encoder_2", "lora_te2_")):
        encoder = modules.get(component)
        if encoder is None:
            continue
        for name, sub in _patchable(encoder):
            canonical = _canonical_clip(name)
            target = Target(component, name, sub)
            index[kohya + _underscored("text_model." + canonical)] = target
            index[f"{component}.{canonical}"] = target
            index[f"{component}.text_model.{canonical}"] = target
    return index


def _normalise(key: str) -> str:
    """Old diffusers attention-processor names -> module names; PEFT's `base_model.model.` prefix dropped."""
    key = key.replace("base_model.model.", "")
    for proc, real in (
        ("processor.to_q_lora", "to_q"), ("processor.to_k_lora", "to_k"), ("processor.to_v_lora", "to_v"),
        ("processor.to_out_lora", "to_out.0"), ("to_out_lora", "to_out.0"),
    ):
        key = key.replace(proc, real)
    return key


def describe_model(model: Any) -> str:
    return f"{model.name} ({model.family}, variant {model.variant})"


@dataclass
class Resolved:
    lora: LoraFile
    te: float
    unet: float
    pairs: list[tuple[LoraModule, Target]]


def resolve(model: Any, lora: LoraFile, te: float, unet: float) -> Resolved:
    """Match every module of `lora` to a layer of `model`, checking shapes; raise `LoraError` before any change."""
    state = lora_state(model)
    if state.index is None:
        state.index = build_index(model)
    index = state.index
    pairs: list[tuple[LoraModule, Target]] = []
    unmatched: list[str] = []
    wrong_shape: list[str] = []
    for key, module in lora.modules.items():
        target = index.get(_normalise(key))
        if target is None:
            unmatched.append(key)
            continue
        weight = target.module.weight
        if module.numel() != weight.numel() or module.out_features() != weight.shape[0]:
            wrong_shape.append(f"{key} (LoRA {module.out_features()} outputs/{module.numel()} values, "
                               f"layer {tuple(weight.shape)})")
            continue
        pairs.append((module, target))
    if unmatched or wrong_shape:
        guess = lora.family_guess()
        made_for = f"It looks made for {guess}" if guess else "It was made for another model architecture"
        what = []
        if unmatched:
            what.append(f"{len(unmatched)} of its {len(lora.modules)} modules match no layer of the model "
                        f"(e.g. {', '.join(sorted(unmatched)[:3])})")
        if wrong_shape:
            what.append(f"{len(wrong_shape)} have the wrong shape (e.g. {wrong_shape[0]})")
        raise LoraError(
            f"LoRA {lora.path.name} does not fit model {describe_model(model)}: {'; '.join(what)}. "
            f"{made_for}; use a LoRA trained for {model.family} models, or load a model of the LoRA's family. "
            "No weights were changed."
        )
    return Resolved(lora, te, unet, pairs)


def restore(model: Any) -> None:
    """Put back the original weights of every patched layer (bit for bit) and forget them."""
    state = lora_state(model)
    if not state.originals:
        state.applied = []
        return
    import torch

    touched_text = False
    with torch.no_grad():
        for (component, _name), (module, params) in state.originals.items():
            for pname, original in params.items():
                getattr(module, pname).data.copy_(original)
            touched_text = touched_text or component in TE_COMPONENTS
    state.originals.clear()
    state.applied = []
    if touched_text:
        state.text_revision += 1


def apply(model: Any, resolved: Sequence[Resolved]) -> bool:
    """Restore the model, then patch it with every LoRA in `resolved` (each with its own weights).

    Each touched layer's original weight is saved first; the sum `W + Σ weight × ΔW` is accumulated in float32
    and cast once to the layer's dtype. Returns whether a text-encoder weight changed.
    """
    import torch

    restore(model)
    state = lora_state(model)
    work: dict[tuple[str, str, str], tuple[Any, torch.Tensor]] = {}

    def accumulator(target: Target, pname: str) -> torch.Tensor:
        key = (target.component, target.module_name, pname)
        if key not in work:
            param = getattr(target.module, pname)
            _, saved = state.originals.setdefault((target.component, target.module_name), (target.module, {}))
            saved[pname] = param.detach().clone()
            # float32 layers are updated in place (the original is saved); others accumulate in a float32 copy
            acc = param.data if param.dtype == torch.float32 else saved[pname].float()
            work[key] = (param, acc)
        return work[key][1]

    touched_text = False
    with torch.no_grad():
        for item in resolved:
            for module, target in item.pairs:
                mult = item.te if target.is_text else item.unet
                if mult == 0:
                    continue
                module.add_to(accumulator(target, "weight"), mult)
                bias = module.bias_delta()
                if bias is not None and target.module.bias is not None:
                    accumulator(target, "bias").add_(bias.to(target.module.bias.device), alpha=mult)
                touched_text = touched_text or target.is_text
        for param, acc in work.values():
            if acc is not param.data:
                param.data.copy_(acc.to(param.dtype))
    state.applied = [(r.lora.name, r.te, r.unet) for r in resolved]
    if touched_text:
        state.text_revision += 1
    return touched_text

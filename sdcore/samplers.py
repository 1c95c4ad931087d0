"""A1111 sampler and schedule-type names, mapped to diffusers schedulers.

Users, saved PNGs and Civitai pages name samplers the A1111 way (`DPM++ 2M` with schedule type `Karras`,
or the older combined `DPM++ 2M Karras`); diffusers has scheduler classes with keyword switches. This
module is the dictionary between the two, and the place that says clearly when a name has no diffusers
equivalent instead of quietly running something else (A1111 silently falls back to its first sampler).

A scheduler is always built from the model's own scheduler config (`from_config`), so what the model
defines (betas, `prediction_type`, `rescale_betas_zero_snr`, `steps_offset`, ...) is kept and only the
sampler's and schedule type's switches are laid on top.

Schedule types follow A1111 v1.10: "Automatic" means the sampler's own default schedule (Karras for
`DPM++ 2M`, `DPM++ SDE`, `DPM2` and `DPM2 a`; Exponential for `DPM++ 2M SDE` and `DPM++ 3M SDE`; for the
others the scheduler as the model config sets it up). Karras and Exponential schedules span the model's
full sigma range, as A1111's do, so they use `timestep_spacing="linspace"` even when the model config says
"leading" (SDXL's does, which would otherwise start Karras from a lower sigma than A1111).
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sdcore.errors import InvalidRequest, PluginError, UnknownSampler

if TYPE_CHECKING:
    from diffusers import SchedulerMixin

__all__ = [
    "AUTOMATIC",
    "BUILTIN_SAMPLERS",
    "SCHEDULE_TYPES",
    "UNSUPPORTED_A1111_SAMPLERS",
    "Sampler",
    "SamplerRegistry",
    "describe",
    "schedule_kwargs",
]

AUTOMATIC = "Automatic"
SCHEDULE_TYPES: tuple[str, ...] = ("Automatic", "Karras", "Exponential", "SGM Uniform")
"""Schedule types sdcore can build, by their A1111 labels."""

# Other spellings A1111 accepts for each schedule type (its scheduler `name`s and aliases), lower-cased.
_SCHEDULE_ALIASES: dict[str, str] = {
    "automatic": "Automatic",
    "karras": "Karras",
    "exponential": "Exponential",
    "sgm uniform": "SGM Uniform",
    "sgm_uniform": "SGM Uniform",
    "sgmuniform": "SGM Uniform",
}

# A1111 schedule types diffusers has no equivalent for; named in errors so users know it is not a typo.
_UNSUPPORTED_SCHEDULES = (
    "Uniform",
    "Polyexponential",
    "KL Optimal",
    "Align Your Steps",
    "Simple",
    "Normal",
    "DDIM",
    "Beta",
)

# The sigma-schedule switches diffusers schedulers take; only one of them may be on at a time.
_SIGMA_FLAGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")

UNSUPPORTED_A1111_SAMPLERS: dict[str, str] = {
    "DPM++ 2S a": "diffusers has no ancestral single-step DPM-Solver++ scheduler",
    "DPM fast": "diffusers has no DPM-Solver fast scheduler",
    "DPM adaptive": "diffusers has no adaptive-step DPM-Solver scheduler",
    "Restart": "diffusers has no Restart sampler",
}
"""A1111 samplers that have no diffusers scheduler, with the reason given in the error message."""


@dataclass(frozen=True)
class Sampler:
    """One A1111 sampler and how to build it in diffusers.

    Attributes:
        name: the canonical A1111 name, written into infotexts (`Euler a`, `DPM++ 2M`).
        scheduler_class: the diffusers scheduler class name (`DPMSolverMultistepScheduler`).
        scheduler_kwargs: switches laid over the model's scheduler config (`algorithm_type`, ...).
        schedule_types: the schedule types this sampler can run with; "Automatic" should always be one.
        aliases: other names that select it (A1111's `k_` names); matched case-insensitively.
        requires: pip packages the scheduler needs beyond diffusers (`scipy`, `torchsde`).
        default_schedule: what "Automatic" means for it (A1111 v1.10's per-sampler default scheduler).
        uses_ensd: A1111 writes `ENSD` into the infotext for it (it draws step noise, eta defaults to 1).
        noise_seed_kwarg: the scheduler argument that takes one noise seed per image, for samplers whose
            step noise does not come from the generator (DPM++ SDE's Brownian tree).
    """

    name: str
    scheduler_class: str
    scheduler_kwargs: dict[str, Any]
    schedule_types: tuple[str, ...]
    aliases: tuple[str, ...] = ()
    requires: tuple[str, ...] = ()
    default_schedule: str = AUTOMATIC
    uses_ensd: bool = False
    noise_seed_kwarg: str | None = None

    def __post_init__(self) -> None:
        for schedule in (*self.schedule_types, self.default_schedule):
            if schedule not in SCHEDULE_TYPES:
                raise PluginError(
                    f"sampler {self.name!r} names schedule type {schedule!r}; known schedule types: "
                    f"{', '.join(SCHEDULE_TYPES)}"
                )
        if AUTOMATIC not in self.schedule_types:
            raise PluginError(f"sampler {self.name!r} must support the 'Automatic' schedule type")

    def effective_schedule(self, schedule_type: str) -> str:
        """The schedule actually used for `schedule_type`: "Automatic" becomes `default_schedule`."""
        return self.default_schedule if schedule_type == AUTOMATIC else schedule_type

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description (for `sdcore samplers --json` and the A1111 `/samplers` route)."""
        return {
            "name": self.name,
            "aliases": list(self.aliases),
            "schedule_types": list(self.schedule_types),
            "default_schedule": self.default_schedule,
            "scheduler_class": self.scheduler_class,
            "scheduler_kwargs": dict(self.scheduler_kwargs),
            "requires": list(self.requires),
        }


def schedule_kwargs(schedule_type: str) -> dict[str, Any]:
    """The scheduler switches of a concrete schedule type ("Automatic" adds none).

    Karras and Exponential turn their sigma flag on and the other flags off (diffusers refuses two at once,
    and a model config may already carry one), and span the full sigma range (`linspace`). SGM Uniform is
    diffusers' "trailing" spacing with default sigmas.
    """
    off = dict.fromkeys(_SIGMA_FLAGS, False)
    if schedule_type == "Karras":
        return {**off, "use_karras_sigmas": True, "timestep_spacing": "linspace"}
    if schedule_type == "Exponential":
        return {**off, "use_exponential_sigmas": True, "timestep_spacing": "linspace"}
    if schedule_type == "SGM Uniform":
        return {**off, "timestep_spacing": "trailing"}
    return {}


_ALL = SCHEDULE_TYPES
_NO_SIGMA_SCHEDULES = ("Automatic", "SGM Uniform")

BUILTIN_SAMPLERS: tuple[Sampler, ...] = (
    Sampler("Euler a", "EulerAncestralDiscreteScheduler", {}, _NO_SIGMA_SCHEDULES,
            aliases=("k_euler_a", "k_euler_ancestral"), uses_ensd=True),
    Sampler("Euler", "EulerDiscreteScheduler", {}, _ALL, aliases=("k_euler",)),
    Sampler("LMS", "LMSDiscreteScheduler", {}, _ALL, aliases=("k_lms",), requires=("scipy",)),
    Sampler("Heun", "HeunDiscreteScheduler", {}, _ALL, aliases=("k_heun",)),
    Sampler("DPM2", "KDPM2DiscreteScheduler", {}, _ALL, aliases=("k_dpm_2",), default_schedule="Karras"),
    Sampler("DPM2 a", "KDPM2AncestralDiscreteScheduler", {}, _ALL, aliases=("k_dpm_2_a",),
            default_schedule="Karras", uses_ensd=True),
    Sampler("DPM++ 2M", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2},
            _ALL, aliases=("k_dpmpp_2m",), default_schedule="Karras"),
    Sampler("DPM++ SDE", "DPMSolverSDEScheduler", {}, _ALL, aliases=("k_dpmpp_sde",), requires=("torchsde",),
            default_schedule="Karras", noise_seed_kwarg="noise_sampler_seed"),
    Sampler("DPM++ 2M SDE", "DPMSolverMultistepScheduler",
            {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "solver_type": "midpoint"},
            _ALL, aliases=("k_dpmpp_2m_sde",), default_schedule="Exponential"),
    Sampler("DPM++ 2M SDE Heun", "DPMSolverMultistepScheduler",
            {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "solver_type": "heun"},
            _ALL, aliases=("k_dpmpp_2m_sde_heun",), default_schedule="Exponential"),
    Sampler("DPM++ 3M SDE", "DPMSolverMultistepScheduler",
            {"algorithm_type": "sde-dpmsolver++", "solver_order": 3},
            _ALL, aliases=("k_dpmpp_3m_sde",), default_schedule="Exponential"),
    Sampler("DDIM", "DDIMScheduler", {}, _NO_SIGMA_SCHEDULES),
    Sampler("PLMS", "PNDMScheduler", {"skip_prk_steps": True}, _NO_SIGMA_SCHEDULES),
    Sampler("UniPC", "UniPCMultistepScheduler", {"solver_order": 3, "solver_type": "bh1"}, _ALL),
    Sampler("LCM", "LCMScheduler", {}, _NO_SIGMA_SCHEDULES, aliases=("k_lcm",)),
)  # fmt: skip
"""The samplers sdcore ships. UniPC uses A1111's defaults (order 3, bh1) rather than diffusers' (2, bh2)."""


def _fold(name: str) -> str:
    """Case- and space-insensitive lookup key: `euler  A` and `Euler a` are the same sampler."""
    return " ".join(name.split()).casefold()


def _missing_packages(packages: Iterable[str]) -> list[str]:
    return [p for p in packages if importlib.util.find_spec(p) is None]


class SamplerRegistry:
    """The samplers an engine knows, looked up by A1111 name, alias or legacy combined name.

    Plugins add samplers through `register` (the `register_samplers` hook); names and aliases are unique
    regardless of case. Lookups are case-insensitive but always report the canonical name, because that
    is what goes into the infotext.
    """

    def __init__(self, samplers: Iterable[Sampler] = ()) -> None:
        self._samplers: dict[str, Sampler] = {}
        self._lookup: dict[str, Sampler] = {}
        for sampler in samplers:
            self.register(sampler)

    @classmethod
    def with_builtins(cls) -> SamplerRegistry:
        """A registry holding `BUILTIN_SAMPLERS`."""
        return cls(BUILTIN_SAMPLERS)

    def register(self, sampler: Sampler) -> None:
        """Add a sampler; a name or alias already taken (ignoring case) is a `PluginError`."""
        if not isinstance(sampler, Sampler):
            raise PluginError(f"register_samplers expects sdcore.samplers.Sampler objects; got {sampler!r}")
        for label in (sampler.name, *sampler.aliases):
            taken = self._lookup.get(_fold(label))
            if taken is not None:
                raise PluginError(
                    f"cannot register sampler {sampler.name!r}: the name {label!r} is already taken by "
                    f"sampler {taken.name!r}"
                )
        keys = {_fold(label) for label in (sampler.name, *sampler.aliases)}
        self._samplers[sampler.name] = sampler
        for key in keys:
            self._lookup[key] = sampler

    def names(self) -> list[str]:
        """Canonical sampler names in registration order."""
        return list(self._samplers)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and _fold(name) in self._lookup

    def __iter__(self) -> Iterator[Sampler]:
        return iter(self._samplers.values())

    def __len__(self) -> int:
        return len(self._samplers)

    def get(self, name: str) -> Sampler:
        """The sampler called `name` (or one of its aliases), ignoring case.

        Raises `UnknownSampler` listing every known name; for an A1111 sampler diffusers cannot run, the
        message says so and why.
        """
        sampler = self._lookup.get(_fold(name)) if isinstance(name, str) else None
        if sampler is not None:
            return sampler
        known = ", ".join(self.names())
        for a1111_name, reason in UNSUPPORTED_A1111_SAMPLERS.items():
            if isinstance(name, str) and _fold(a1111_name) == _fold(name):
                raise UnknownSampler(
                    f"sampler {a1111_name!r} is an A1111 sampler that sdcore cannot run ({reason}); "
                    f"choose one of: {known}"
                )
        raise UnknownSampler(f"unknown sampler {name!r}; known samplers: {known}")

    def _split_combined(self, name: str) -> tuple[Sampler, str] | None:
        """A legacy combined name (`DPM++ 2M Karras`, `dpm++ 2m sde exponential`) as (sampler, schedule)."""
        folded = _fold(name)
        for alias, schedule in _SCHEDULE_ALIASES.items():
            suffix = " " + alias
            if folded.endswith(suffix):
                sampler = self._lookup.get(folded[: -len(suffix)])
                if sampler is not None:
                    return sampler, schedule
        return None

    @staticmethod
    def _schedule_label(schedule_type: str | None) -> str:
        if schedule_type is None or not schedule_type.strip():
            return AUTOMATIC
        label = _SCHEDULE_ALIASES.get(_fold(schedule_type))
        if label is None:
            unsupported = [s for s in _UNSUPPORTED_SCHEDULES if _fold(s) == _fold(schedule_type)]
            what = (
                "is an A1111 schedule type diffusers has no equivalent for" if unsupported else "is unknown"
            )
            raise InvalidRequest(
                f"schedule type {schedule_type!r} {what}; known schedule types: {', '.join(SCHEDULE_TYPES)}"
            )
        return label

    def resolve(self, name: str, schedule_type: str | None = AUTOMATIC) -> tuple[Sampler, str]:
        """The sampler and canonical schedule-type label for an A1111 sampler name and schedule type.

        Handles legacy combined names: `DPM++ 2M Karras` is `DPM++ 2M` with `Karras`. A combined name with a
        different explicit schedule type (`DPM++ 2M Karras` + `Exponential`) is refused rather than guessed.
        The label returned is the one requested ("Automatic" stays "Automatic", as A1111 records it);
        `Sampler.effective_schedule` gives the schedule actually used. A schedule type the sampler cannot
        run is an `InvalidRequest` naming the sampler and the schedule types it supports.
        """
        label = self._schedule_label(schedule_type)
        sampler = self._lookup.get(_fold(name)) if isinstance(name, str) else None
        if sampler is None and isinstance(name, str):
            combined = self._split_combined(name)
            if combined is not None:
                sampler, from_name = combined
                if label not in (AUTOMATIC, from_name):
                    raise InvalidRequest(
                        f"sampler {name!r} already names schedule type {from_name!r}, which contradicts the "
                        f"schedule type {label!r} also given; give sampler {sampler.name!r} and one schedule type"
                    )
                label = from_name
        if sampler is None:
            sampler = self.get(name)  # raises UnknownSampler with the list of names
        if label not in sampler.schedule_types:
            raise InvalidRequest(
                f"sampler {sampler.name!r} cannot use schedule type {label!r}; it supports: "
                f"{', '.join(sampler.schedule_types)}"
            )
        return sampler, label

    def scheduler_kwargs(self, name: str, schedule_type: str | None = AUTOMATIC) -> dict[str, Any]:
        """The keyword arguments laid over the model's scheduler config for this sampler and schedule."""
        sampler, label = self.resolve(name, schedule_type)
        return {**sampler.scheduler_kwargs, **schedule_kwargs(sampler.effective_schedule(label))}

    def make_scheduler(
        self,
        name: str,
        schedule_type: str | None,
        base_config: Mapping[str, Any],
        *,
        noise_seeds: Sequence[int] | None = None,
    ) -> SchedulerMixin:
        """Build the diffusers scheduler for an A1111 sampler + schedule type from the model's config.

        `base_config` is the model's own scheduler config (`pipeline.scheduler.config` or the dict of its
        `scheduler_config.json`); everything it defines is kept and the sampler's switches are applied on
        top with `SchedulerClass.from_config(base_config, **kwargs)`.

        `noise_seeds` (one per image, usually the image seeds) seeds the step noise of samplers that do not
        draw it from a generator: DPM++ SDE's Brownian tree, as A1111 does for batch-size-independent
        results. Other samplers ignore it.

        Raises `InvalidRequest` naming the pip package to install when an optional dependency is missing.
        """
        sampler, label = self.resolve(name, schedule_type)
        missing = _missing_packages(sampler.requires)
        if missing:
            raise InvalidRequest(
                f"sampler {sampler.name!r} needs the Python package(s) {', '.join(missing)}, which are not "
                f"installed; install them with: pip install {' '.join(missing)}"
            )
        kwargs = {**sampler.scheduler_kwargs, **schedule_kwargs(sampler.effective_schedule(label))}
        if noise_seeds is not None and sampler.noise_seed_kwarg is not None:
            kwargs[sampler.noise_seed_kwarg] = [int(s) for s in noise_seeds]
        diffusers = importlib.import_module("diffusers")
        scheduler_cls = getattr(diffusers, sampler.scheduler_class, None)
        if scheduler_cls is None:
            raise InvalidRequest(
                f"sampler {sampler.name!r} needs diffusers' {sampler.scheduler_class}, which this diffusers "
                f"version ({diffusers.__version__}) does not have"
            )
        try:
            # Keep diffusers' private keys (`_use_default_values` lets from_config tell the model's real
            # settings from the previous class's defaults, which must not carry over to another class).
            return scheduler_cls.from_config(dict(base_config), **kwargs)
        except ImportError as exc:  # diffusers' placeholder classes raise this when a backend is missing
            raise InvalidRequest(
                f"sampler {sampler.name!r} cannot be built: {exc}; install the missing package with pip"
            ) from exc
        except (ValueError, NotImplementedError) as exc:
            raise InvalidRequest(
                f"sampler {sampler.name!r} with schedule type {label!r} does not work with this model's "
                f"scheduler config: {exc}"
            ) from exc

    def describe(self) -> list[dict[str, Any]]:
        """Every sampler as a JSON-ready dict: name, aliases, schedule types, scheduler class, ..."""
        return [sampler.to_dict() for sampler in self._samplers.values()]


def describe(registry: SamplerRegistry | None = None) -> list[dict[str, Any]]:
    """`registry.describe()`, or that of the built-in samplers when no registry is given."""
    return (registry or SamplerRegistry.with_builtins()).describe()

"""Conditioning: which text embeddings the UNet sees at each step.

A1111's model, which every prompt feature fits into:

- a prompt is one or more sub-prompts (`AND`), each with a guidance weight;
- each sub-prompt has a schedule: a list of `(until_step, embedding)`; at 0-based step `i` the first entry
  with `until_step >= i` is used (prompt editing `[a:b:when]` and alternation `[a|b]` produce such schedules);
- the negative prompt has a schedule too (weight 1).

Guidance then combines `uncond + sum_k(w_k * cfg * (cond_k - uncond))` (composable diffusion).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .models import TextEmbedding


@dataclass
class ScheduledText:
    """One sub-prompt: its weight and its per-step schedule of embeddings (sorted by `until_step`)."""

    schedule: list[tuple[int, TextEmbedding]]
    weight: float = 1.0

    def at(self, step: int) -> TextEmbedding:
        for until, embedding in self.schedule:
            if step <= until:
                return embedding
        return self.schedule[-1][1]

    @classmethod
    def constant(cls, embedding: TextEmbedding, weight: float = 1.0) -> ScheduledText:
        return cls(schedule=[(1 << 30, embedding)], weight=weight)


@dataclass
class StepConditioning:
    """The texts for one step: the sub-prompts with their weights, and the negative."""

    positive: list[tuple[TextEmbedding, float]]
    negative: TextEmbedding


@dataclass
class Conditioning:
    positive: list[ScheduledText]
    negative: ScheduledText
    # free-form facts for infotext and plugins (e.g. the parsed prompt), keyed by plugin name
    extra: dict[str, object] = field(default_factory=dict)

    def at(self, step: int) -> StepConditioning:
        return StepConditioning(
            positive=[(text.at(step), text.weight) for text in self.positive],
            negative=self.negative.at(step),
        )

"""Token grounding: a training loss on the UNet's cross-attention maps (after TokenCompose, Wang et al. 2024).

A small model trained from scratch learns colour and shape from captions quickly but not position: a convolution
cannot tell left from right except through its zero padding, and nothing in the diffusion loss points the
cross-attention queries at that. With a mask of where the subject is, the grounding loss asks every cross-attention
layer to put each grounded token's attention (normalised over the image) inside the mask:
`1 - sum(attention * mask)` per token, averaged over tokens and layers. The words of a position phrase then attend
where the phrase says, which teaches the queries where they are. It is a training-only change: the architecture
and its weights' layout stay SD's, so the model loads wherever SD 1.x does.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F


class RecordingAttnProcessor:
    """Plain attention (diffusers' classic `AttnProcessor` maths) that, while `maps` is a list, appends each
    cross-attention layer's probabilities averaged over heads: [batch, height*width, tokens]."""

    def __init__(self) -> None:
        self.maps: list[torch.Tensor] | None = None

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args: Any, **kwargs: Any) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        cross = encoder_hidden_states is not None
        batch_size, sequence_length, _ = (hidden_states if not cross else encoder_hidden_states).shape
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(attn.head_to_batch_dim(query), key, attention_mask)
        if cross and self.maps is not None:
            self.maps.append(probs.view(batch_size, attn.heads, *probs.shape[1:]).mean(dim=1))
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@contextmanager
def recording_cross_attention(unet: Any) -> Iterator[RecordingAttnProcessor]:
    """Install a recorder on every cross-attention layer (`attn2`) of `unet`; the previous processors come back
    on exit, so a saved or sampled model is exactly as before."""
    previous = dict(unet.attn_processors)
    recorder = RecordingAttnProcessor()
    unet.set_attn_processor({name: recorder if ".attn2." in name else processor
                             for name, processor in previous.items()})
    try:
        yield recorder
    finally:
        unet.set_attn_processor(previous)


def grounding_token_ids(tokenizer: Any, words: Sequence[str]) -> torch.Tensor:
    """The token ids of `words` (every piece of each word as CLIP's BPE splits it)."""
    ids: set[int] = set()
    for word in words:
        ids.update(tokenizer(word, add_special_tokens=False).input_ids)
    return torch.tensor(sorted(ids), dtype=torch.long)


def grounding_loss(maps: Sequence[torch.Tensor], token_ids: torch.Tensor, grounded: torch.Tensor,
                   masks: torch.Tensor) -> torch.Tensor:
    """Mean of `1 - attention inside the mask` over every grounded token of every sample with a mask, in every
    recorded layer. `token_ids` [B, T] are the samples' tokens, `grounded` [G] the ids to ground, `masks`
    [B, 1, H, W] in 0..1 (all zero for a sample without a mask: pass only samples that have one). Zero when no
    token is grounded."""
    select = torch.isin(token_ids, grounded)  # [B, T]
    if not bool(select.any()) or not maps:
        return torch.zeros(())
    losses = []
    for probs in maps:  # [B, HW, T]
        side = int(round(probs.shape[1] ** 0.5))
        inside = F.adaptive_avg_pool2d(masks.float(), side).flatten(1)  # [B, HW]: share of each cell in the mask
        spatial = probs / probs.sum(dim=1, keepdim=True).clamp_min(1e-8)  # each token's attention over the image
        share = (spatial * inside.unsqueeze(-1)).sum(dim=1)  # [B, T]
        losses.append((1.0 - share)[select].mean())
    return torch.stack(losses).mean()

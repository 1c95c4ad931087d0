"""Prompt encoding the way A1111 does it: 75-token chunks, BREAK, emphasis, textual inversion, AND, caching.

What A1111 (`modules/sd_hijack_clip.py`, `sd_emphasis.py`, `prompt_parser.py`) does, and this module repeats:

1. Each scheduled text is split into emphasis runs (`parser.parse_prompt_attention`); each run is tokenized on
   its own. Tokens are packed into chunks of 75. When a chunk is full and the last comma is at most 20 tokens
   back, the tokens after that comma move to the next chunk. A `BREAK` run closes the chunk. A textual-
   inversion embedding (matched by its tokenized name inside one run) is never split across chunks.
2. Each chunk becomes BOS + 75 + EOS (padded) and is encoded by the text encoder(s) on its own
   (`DiffusionModel.encode_token_chunks`, with the request's clip skip); the chunks are concatenated.
3. Emphasis "Original": per chunk index, over the texts of one sub-prompt's schedule encoded together, take
   the mean, multiply every token's vector by its weight, and rescale to the old mean. For SDXL each text
   encoder's part is restored separately (A1111 runs the two encoders as separate embedders). "No norm"
   skips the rescale, "Ignore" parses but uses weight 1, "None" does not parse emphasis at all.
4. All texts of one sub-prompt's schedule get the same number of chunks (shorter ones are padded with empty
   chunks); AND sub-prompts of different lengths are padded by repeating their last vector. The negative
   prompt is not padded to the positive's length (A1111's default; separate UNet calls) unless the request
   asks for A1111's "Pad conds" or "Pad conds v0".
5. SDXL: the pooled embedding is clip_g's pooled output of the first chunk; an empty negative prompt is
   encoded as zeros (A1111's `force_zero_negative_prompt`).

Encodings are cached per model (in `model.plugin_state["prompt_language"]`), at two levels: the raw text-
encoder output of each distinct 75-token chunk, and the finished embeddings of each sub-prompt schedule. The
keys hold the clip skip, the emphasis mode, the texts or token ids, and a "text-encoder revision" that LoRA
and embedding plugins change when they change what the text encoder computes (see `model_state`).

Module import does not import torch; the functions that need it import it.
"""

from __future__ import annotations

import functools
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sdcore.errors import PromptError

from . import parser

if TYPE_CHECKING:
    import torch

    from sdcore.conditioning import Conditioning
    from sdcore.models import DiffusionModel, TextEmbedding

__all__ = [
    "CHUNK_LENGTH",
    "COMMA_BACKTRACK",
    "EMPHASIS_MODES",
    "Chunk",
    "EmbeddingSlot",
    "EncodingCache",
    "PromptEncoder",
    "count_tokens",
    "encode_context",
    "model_state",
    "tokenize_line",
]

CHUNK_LENGTH = 75
"""Tokens per chunk, without BOS and EOS (A1111's `chunk_length`)."""

COMMA_BACKTRACK = 20
"""A1111's `comma_padding_backtrack` default: how far back a comma may be to move the text after it."""

EMPHASIS_MODES = ("Original", "No norm", "Ignore", "None")
"""A1111's `emphasis` setting values."""

STATE_KEY = "prompt_language"
REVISION_KEY = "text_encoder_revision"
EMBEDDINGS_KEY = "embeddings"
CACHE_BYTES_KEY = "cache_bytes"
DEFAULT_CACHE_BYTES = 256 * 1024 * 1024

_SECOND_ORDER_SCHEDULERS = frozenset(
    {"HeunDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler", "DPMSolverSDEScheduler"}
)


# ---------------------------------------------------------------------------------------------------
# Tokens and chunks
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EmbeddingSlot:
    """Vector `index` of the textual-inversion embedding `name`, standing where a token id would."""

    name: str
    index: int


Token = int | EmbeddingSlot


@dataclass(frozen=True)
class Chunk:
    """One chunk of at most 75 tokens (no BOS/EOS), with the emphasis weight of each."""

    tokens: tuple[Token, ...] = ()
    multipliers: tuple[float, ...] = ()

    def __len__(self) -> int:
        return len(self.tokens)


EMPTY_CHUNK = Chunk()

# An embedding lookup: first token id of a name -> [(token ids of the name, name, number of vectors)],
# longest names first (A1111's `ids_lookup`).
EmbeddingLookup = Mapping[int, Sequence[tuple[tuple[int, ...], str, int]]]


def tokenize_line(
    runs: Iterable[tuple[str, float]],
    tokenize: Callable[[str], Sequence[int]],
    comma_id: int | None,
    embeddings: EmbeddingLookup | None = None,
    backtrack: int = COMMA_BACKTRACK,
) -> list[Chunk]:
    """A1111's `tokenize_line`: emphasis runs → chunks of at most 75 tokens.

    - A run `("BREAK", -1.0)` closes the current chunk (an empty chunk too: BREAK at the start, or two in a
      row, give a chunk of padding only).
    - When a chunk holds 75 tokens and the next token is not a comma, and the chunk's last comma is at most
      `backtrack` tokens from its end, the tokens after that comma move to the next chunk (0 turns it off).
    - Embedding names (`embeddings`) are matched on token ids inside one run; their vectors stay in one chunk.
    - The last chunk is kept if it has tokens or is the only one, so "" gives one empty chunk and a trailing
      BREAK adds nothing.

    Deviation from A1111: when the comma backtrack moves an embedding's vectors to the next chunk, they move
    with their vectors; A1111 leaves the vectors behind (they land on padding) and encodes token 0 instead.
    """
    chunks: list[Chunk] = []
    tokens: list[Token] = []
    mults: list[float] = []
    last_comma = -1

    def next_chunk() -> None:
        nonlocal tokens, mults, last_comma
        chunks.append(Chunk(tuple(tokens), tuple(mults)))
        tokens, mults, last_comma = [], [], -1

    for text, weight in runs:
        if text == "BREAK" and weight == -1:
            next_chunk()
            continue
        ids = list(tokenize(text)) if text else []
        position = 0
        while position < len(ids):
            token = ids[position]
            if token == comma_id:
                last_comma = len(tokens)
            elif (
                backtrack
                and len(tokens) == CHUNK_LENGTH
                and last_comma != -1
                and len(tokens) - last_comma <= backtrack
            ):
                cut = last_comma + 1
                moved_tokens, moved_mults = tokens[cut:], mults[cut:]
                tokens, mults = tokens[:cut], mults[:cut]
                next_chunk()
                tokens, mults = moved_tokens, moved_mults
            if len(tokens) == CHUNK_LENGTH:
                next_chunk()

            found = _find_embedding(ids, position, embeddings) if embeddings else None
            if found is None:
                tokens.append(token)
                mults.append(weight)
                position += 1
                continue
            name_length, name, vectors = found
            if vectors > CHUNK_LENGTH:
                raise PromptError(
                    f"The embedding {name!r} has {vectors} vectors; a chunk holds at most {CHUNK_LENGTH}."
                )
            if len(tokens) + vectors > CHUNK_LENGTH:
                next_chunk()
            tokens.extend(EmbeddingSlot(name, i) for i in range(vectors))
            mults.extend([weight] * vectors)
            position += name_length

    if tokens or not chunks:
        next_chunk()
    return chunks


def _find_embedding(
    ids: Sequence[int], position: int, lookup: EmbeddingLookup
) -> tuple[int, str, int] | None:
    for name_ids, name, vectors in lookup.get(ids[position], ()):
        if tuple(ids[position : position + len(name_ids)]) == name_ids:
            return len(name_ids), name, vectors
    return None


def comma_token_id(tokenizer: Any) -> int | None:
    """The id of `,</w>` in a CLIP tokenizer (267), or None if it has none."""
    convert = getattr(tokenizer, "convert_tokens_to_ids", None)
    if callable(convert):
        value = convert(",</w>")
        unk = getattr(tokenizer, "unk_token_id", None)
        if isinstance(value, int) and value != unk:
            return value
    return None


def entry_runs(entry: Mapping[str, Any], emphasis: str) -> list[tuple[str, float]]:
    """The emphasis runs of one schedule entry of `parse_prompt`'s output, for an emphasis mode.

    "None" does not parse emphasis at all (the text is one run, brackets and BREAK are literal).
    """
    if emphasis == "None":
        return [(entry["text"], 1.0)]
    return [(str(text), float(weight)) for text, weight in entry["chunks"]]


def check_emphasis(emphasis: str) -> str:
    if emphasis not in EMPHASIS_MODES:
        raise PromptError(f"Unknown emphasis mode {emphasis!r}; use one of: {', '.join(EMPHASIS_MODES)}.")
    return emphasis


# ---------------------------------------------------------------------------------------------------
# Per-model state and the cache
# ---------------------------------------------------------------------------------------------------


def model_state(model: DiffusionModel) -> dict[str, Any]:
    """This plugin's entry in `model.plugin_state`, created on first use. Other plugins use two keys:

    - `"text_encoder_revision"`: any hashable value, 0 at first. Every cached encoding is keyed on it, so a
      plugin that changes what the text encoder computes (a text-encoder LoRA patched in or out, new weights)
      must change it: bump an integer, or set a value that describes the patch and put the old value back
      when restoring, which makes the encodings cached before the patch valid again.
    - `"embeddings"`: textual inversions, `{name: {encoder_name: tensor [vectors, width]}}`, with the
      encoder names `DiffusionModel.encode_token_chunks` expects in `TokenOverride.vectors` ("clip_l" for
      SD 1.x, "clip_h" for SD 2.x, "clip_l" and "clip_g" for SDXL). A name is recognised in a prompt as A1111
      does: by its token ids, inside one emphasis run. Adding, removing or replacing an entry is noticed;
      changing a tensor in place needs a revision change.

    `"cache_bytes"` sets the cache budget of this model (default 256 MiB).
    """
    state = model.plugin_state.get(STATE_KEY)
    if state is None:
        state = model.plugin_state.setdefault(STATE_KEY, {})
    state.setdefault(REVISION_KEY, 0)
    state.setdefault(EMBEDDINGS_KEY, {})
    state.setdefault(CACHE_BYTES_KEY, DEFAULT_CACHE_BYTES)
    if "_cache" not in state:
        state["_cache"] = EncodingCache()
    if "_tokens" not in state:
        state["_tokens"] = _TokenCache()
    return state


def _nbytes(value: Any) -> int:
    total = 0
    stack = [value]
    while stack:
        item = stack.pop()
        if item is None:
            continue
        if hasattr(item, "element_size") and hasattr(item, "numel"):
            total += item.element_size() * item.numel()
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif isinstance(item, GroupResult):
            stack.append(item.embeddings)
        elif hasattr(item, "embeds"):
            stack.extend([item.embeds, getattr(item, "pooled", None)])
    return total


class EncodingCache:
    """A least-recently-used map with a budget in bytes (of the tensors in its values)."""

    def __init__(self) -> None:
        self._entries: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> Any:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[0]

    def put(self, key: Hashable, value: Any, budget: int) -> None:
        size = _nbytes(value)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            if size > budget:
                return
            self._entries[key] = (value, size)
            self._bytes += size
            while self._bytes > budget and self._entries:
                _, (_, dropped) = self._entries.popitem(last=False)
                self._bytes -= dropped

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    @property
    def bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)


class _TokenCache:
    """Token ids of emphasis runs (tokenizing is the slow part of a cached encode); bounded."""

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self._ids: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        self._lock = threading.Lock()

    def tokenize(self, tokenize: Callable[[str], Sequence[int]], text: str) -> tuple[int, ...]:
        with self._lock:
            ids = self._ids.get(text)
            if ids is not None:
                self._ids.move_to_end(text)
                return ids
        ids = tuple(int(i) for i in tokenize(text))
        with self._lock:
            self._ids[text] = ids
            while len(self._ids) > self.size:
                self._ids.popitem(last=False)
        return ids


def _embedding_fingerprint(embeddings: Mapping[str, Any]) -> tuple[tuple[str, int], ...]:
    return tuple(sorted((str(name), id(value)) for name, value in embeddings.items()))


def _vector_count(value: Any) -> int:
    counts = set()
    for tensor in value.values():
        shape = tuple(getattr(tensor, "shape", ()))
        counts.add(1 if len(shape) <= 1 else int(shape[0]))
    if len(counts) != 1:
        raise PromptError("An embedding has a different number of vectors for each text encoder.")
    return counts.pop()


def embedding_lookup(
    embeddings: Mapping[str, Mapping[str, Any]], tokenize: Callable[[str], Sequence[int]]
) -> dict[int, list[tuple[tuple[int, ...], str, int]]]:
    """A1111's `ids_lookup`: first token id of each embedding name → (ids, name, vectors), longest first."""
    lookup: dict[int, list[tuple[tuple[int, ...], str, int]]] = {}
    for name, value in embeddings.items():
        ids = tuple(int(i) for i in tokenize(name))
        if not ids:
            continue
        lookup.setdefault(ids[0], []).append((ids, name, _vector_count(value)))
    for entries in lookup.values():
        entries.sort(key=lambda e: len(e[0]), reverse=True)
    return lookup


# ---------------------------------------------------------------------------------------------------
# The encoder
# ---------------------------------------------------------------------------------------------------


@dataclass
class GroupResult:
    """The finished embeddings of one sub-prompt's schedule texts, and the embeddings it used."""

    embeddings: dict[str, TextEmbedding]
    used_embeddings: tuple[str, ...] = ()


@dataclass
class PromptEncoder:
    """Encodes scheduled prompt texts for one model, with A1111's chunking and emphasis, through the cache."""

    model: DiffusionModel
    clip_skip: int = 1
    emphasis: str = "Original"
    backtrack: int = COMMA_BACKTRACK
    batch_size: int = 32
    state: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        check_emphasis(self.emphasis)
        self.state = model_state(self.model)
        embeddings = self.state[EMBEDDINGS_KEY]
        self._embeddings_fp = _embedding_fingerprint(embeddings)
        self._revision = self.state[REVISION_KEY]
        self._cache: EncodingCache = self.state["_cache"]
        self._budget = int(self.state.get(CACHE_BYTES_KEY, DEFAULT_CACHE_BYTES))
        self._comma = comma_token_id(self.model.tokenizer)
        if self._comma is None:
            ids = self.model.tokenize(",")
            self._comma = ids[0] if len(ids) == 1 else None
        self._lookup: EmbeddingLookup | None = None
        if embeddings:
            cached = self.state.get("_lookup")
            if cached is not None and cached[0] == self._embeddings_fp:
                self._lookup = cached[1]
            else:
                self._lookup = embedding_lookup(embeddings, self._tokenize)
                self.state["_lookup"] = (self._embeddings_fp, self._lookup)

    # -- tokens -------------------------------------------------------------------------------------
    def _tokenize(self, text: str) -> tuple[int, ...]:
        return self.state["_tokens"].tokenize(self.model.tokenize, text)

    def chunks(self, runs: Iterable[tuple[str, float]]) -> list[Chunk]:
        return tokenize_line(runs, self._tokenize, self._comma, self._lookup, self.backtrack)

    # -- raw chunk encodings ------------------------------------------------------------------------
    def _chunk_key(self, chunk: Chunk) -> tuple[Any, ...]:
        embeddings = self.state[EMBEDDINGS_KEY]
        used = sorted({(t.name, id(embeddings.get(t.name))) for t in chunk.tokens if isinstance(t, EmbeddingSlot)})
        return ("chunk", self._revision, self.clip_skip, chunk.tokens, tuple(used))

    def _override_tokens(self, chunk: Chunk) -> list[Any]:
        from sdcore.models import TokenOverride

        embeddings = self.state[EMBEDDINGS_KEY]
        entries: list[Any] = []
        for token in chunk.tokens:
            if isinstance(token, EmbeddingSlot):
                value = embeddings[token.name]
                vectors = {}
                for encoder, tensor in value.items():
                    vectors[encoder] = tensor.reshape(-1) if tensor.dim() == 1 else tensor[token.index]
                entries.append(TokenOverride(vectors=vectors))
            else:
                entries.append(token)
        return entries

    def raw(self, chunks: Sequence[Chunk]) -> dict[tuple[Token, ...], tuple[torch.Tensor, torch.Tensor | None]]:
        """The text encoders' output (hidden [77, D], pooled [P] or None) of each distinct chunk, cached."""
        found: dict[tuple[Token, ...], tuple[torch.Tensor, torch.Tensor | None]] = {}
        missing: dict[tuple[Token, ...], Chunk] = {}
        for chunk in chunks:
            if chunk.tokens in found or chunk.tokens in missing:
                continue
            value = self._cache.get(self._chunk_key(chunk))
            if value is None:
                missing[chunk.tokens] = chunk
            else:
                found[chunk.tokens] = value
        todo = list(missing.values())
        for start in range(0, len(todo), self.batch_size):
            batch = todo[start : start + self.batch_size]
            hidden, pooled = self.model.encode_token_chunks([self._override_tokens(c) for c in batch], self.clip_skip)
            for i, chunk in enumerate(batch):
                value = (hidden[i].clone(), None if pooled is None else pooled[i].clone())
                found[chunk.tokens] = value
                self._cache.put(self._chunk_key(chunk), value, self._budget)
        return found

    # -- emphasis -----------------------------------------------------------------------------------
    def _widths(self, width: int) -> list[int]:
        """The width of each text encoder's part of the hidden states (SDXL: [clip_l, clip_g])."""
        widths = getattr(self.model, "text_encoder_widths", None)
        if widths is None:
            widths = []
            for name in ("text_encoder", "text_encoder_2"):
                encoder = getattr(self.model, name, None)
                size = getattr(getattr(encoder, "config", None), "hidden_size", None)
                if encoder is not None and size is not None:
                    widths.append(int(size))
        widths = [int(w) for w in widths]
        return widths if widths and sum(widths) == width else [width]

    def _emphasise(
        self, hidden: list[torch.Tensor], multipliers: list[Sequence[float]], counts: list[int]
    ) -> list[torch.Tensor]:
        """Apply the emphasis mode to chunk index i of a group: `hidden[k]` [77, D] of distinct text k,
        which occurs `counts[k]` times in the schedule A1111 encodes as one batch."""
        import torch

        if self.emphasis in ("Ignore", "None") or all(m == 1.0 for ms in multipliers for m in ms):
            return hidden
        dtype = hidden[0].dtype
        z = torch.stack(hidden).float()  # [K, 77, D]
        weights = torch.ones(z.shape[0], z.shape[1], dtype=torch.float32, device=z.device)
        for k, ms in enumerate(multipliers):
            if ms:
                weights[k, 1 : 1 + len(ms)] = torch.tensor(ms, dtype=torch.float32)
        weighted = z * weights[..., None]
        if self.emphasis == "Original":
            count = torch.tensor(counts, dtype=torch.float64, device=z.device)
            factors = []
            start = 0
            for width in self._widths(z.shape[-1]):
                part = slice(start, start + width)
                start += width
                # the mean of the batch A1111 encodes (duplicates included), per text encoder
                old = (z[..., part].double().mean(dim=(1, 2)) * count).sum() / count.sum()
                new = (weighted[..., part].double().mean(dim=(1, 2)) * count).sum() / count.sum()
                factors.append((old / new).float().expand(width))
            weighted = weighted * torch.cat(factors)
        return [t.to(dtype) for t in weighted.unbind(0)]

    # -- groups -------------------------------------------------------------------------------------
    def encode_group(
        self, entries: Sequence[tuple[str, Sequence[tuple[str, float]]]], *, zero_if_empty: bool = False
    ) -> GroupResult:
        """Encode the schedule texts of one sub-prompt (`(text, runs)` per schedule entry, duplicates
        included, as A1111 encodes them in one batch). Returns the embedding of each distinct text.

        `zero_if_empty`: all texts empty → zero embeddings (SDXL's empty negative prompt).
        """
        from sdcore.models import TextEmbedding

        texts = tuple(text for text, _ in entries)
        key = ("group", self._revision, self._embeddings_fp, self.clip_skip, self.emphasis, self.backtrack,
               zero_if_empty, texts)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        runs = {}
        for text, text_runs in entries:
            runs.setdefault(text, text_runs)
        counts = Counter(texts)
        distinct = list(runs)
        chunked = {text: self.chunks(runs[text]) for text in distinct}
        length = max(len(c) for c in chunked.values())
        for text in distinct:
            chunked[text] = chunked[text] + [EMPTY_CHUNK] * (length - len(chunked[text]))
        raw = self.raw([c for text in distinct for c in chunked[text]])
        used = sorted({t.name for cs in chunked.values() for c in cs for t in c.tokens if isinstance(t, EmbeddingSlot)})

        import torch

        parts: dict[str, list[torch.Tensor]] = {text: [] for text in distinct}
        for i in range(length):
            hidden = [raw[chunked[text][i].tokens][0] for text in distinct]
            multipliers = [chunked[text][i].multipliers for text in distinct]
            for text, z in zip(distinct, self._emphasise(hidden, multipliers, [counts[t] for t in distinct]),
                               strict=True):
                parts[text].append(z)
        result: dict[str, TextEmbedding] = {}
        zero = zero_if_empty and all(text == "" for text in distinct)
        for text in distinct:
            embeds = torch.cat(parts[text], dim=0).unsqueeze(0)
            pooled = raw[chunked[text][0].tokens][1]
            pooled = None if pooled is None else pooled.unsqueeze(0)
            if zero:
                embeds = torch.zeros_like(embeds)
                pooled = None if pooled is None else torch.zeros_like(pooled)
            result[text] = TextEmbedding(embeds=embeds, pooled=pooled)
        group = GroupResult(result, tuple(used))
        self._cache.put(key, group, self._budget)
        return group


# ---------------------------------------------------------------------------------------------------
# Whole prompts: parse, encode, conditioning
# ---------------------------------------------------------------------------------------------------


def sampler_step_multiplier(engine: Any, request: Any) -> int:
    """2 for second-order samplers (Heun, DPM2, DPM2 a, DPM++ SDE), else 1: A1111 schedules prompts over
    `steps × 2` model calls for them (`SamplerData.total_steps`), and counts steps per model call."""
    try:
        sampler, _ = engine.samplers.resolve(request.sampler, request.schedule_type)
    except Exception:  # noqa: BLE001 - the core reports a bad sampler itself
        return 1
    name = sampler.scheduler_class
    if name in _SECOND_ORDER_SCHEDULERS:
        return 2
    try:
        import diffusers

        order = int(getattr(getattr(diffusers, name), "order", 1))
    except Exception:  # noqa: BLE001 - a plugin's scheduler class diffusers does not know
        order = 1
    return 2 if order >= 2 else 1


def parse_pair(
    prompt: str,
    negative_prompt: str,
    steps: int,
    hires_steps: int | None = None,
    *,
    old_timeline: bool = False,
    strict: bool = True,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """`parse_prompt` and `parse_negative_prompt` of a request's prompts, remembered for the last 256 pairs
    (submit-time validation and the job parse the same prompts). The dicts are shared: do not change them."""
    return _parse_pair(prompt, negative_prompt, int(steps), None if hires_steps is None else int(hires_steps),
                       bool(old_timeline), bool(strict))


@functools.lru_cache(maxsize=256)
def _parse_pair(
    prompt: str, negative_prompt: str, steps: int, hires_steps: int | None, old_timeline: bool, strict: bool
) -> tuple[dict[str, Any], dict[str, Any]]:
    positive = parser.parse_prompt(prompt, steps, hires_steps, use_old_timeline=old_timeline, strict=strict)
    negative = parser.parse_negative_prompt(
        negative_prompt, steps, hires_steps, use_old_timeline=old_timeline, strict=strict
    )
    return positive, negative


def _pad_last(embedding: TextEmbedding, length: int) -> TextEmbedding:
    """Repeat the last vector up to `length` tokens (A1111's `stack_conds` and "Pad conds v0")."""
    import torch

    from sdcore.models import TextEmbedding

    embeds = embedding.embeds
    if embeds.shape[1] >= length:
        return TextEmbedding(embeds=embeds[:, :length], pooled=embedding.pooled)
    extra = embeds[:, -1:].expand(embeds.shape[0], length - embeds.shape[1], embeds.shape[2])
    return TextEmbedding(embeds=torch.cat([embeds, extra], dim=1), pooled=embedding.pooled)


def _pad_with(embedding: TextEmbedding, empty: torch.Tensor, repeats: int) -> TextEmbedding:
    """Append `repeats` copies of the empty-prompt chunk (A1111's "Pad conds")."""
    import torch

    from sdcore.models import TextEmbedding

    pad = empty.to(embedding.embeds).repeat(embedding.embeds.shape[0], repeats, 1)
    return TextEmbedding(embeds=torch.cat([embedding.embeds, pad], dim=1), pooled=embedding.pooled)


def _map_schedule(schedule: list[tuple[int, TextEmbedding]], change: Callable[[TextEmbedding], TextEmbedding]):
    memo: dict[int, TextEmbedding] = {}
    out = []
    for until, embedding in schedule:
        if id(embedding) not in memo:
            memo[id(embedding)] = change(embedding)
        out.append((until, memo[id(embedding)]))
    return out


def uses_emphasis_brackets(*parsed: Mapping[str, Any]) -> bool:
    """A1111's test for writing `Emphasis: <mode>`: a scheduled text contains `(` or `[`."""
    return any(
        "(" in entry["text"] or "[" in entry["text"]
        for p in parsed
        for sub in p["subprompts"]
        for entry in sub["schedule"]
    )


def encode_parsed(
    model: DiffusionModel,
    positive: Mapping[str, Any],
    negative: Mapping[str, Any],
    *,
    clip_skip: int = 1,
    emphasis: str = "Original",
    pad_conds: bool = False,
    pad_conds_v0: bool = False,
) -> tuple[Conditioning, dict[str, Any]]:
    """The `Conditioning` of a parsed prompt and negative prompt (from `parse_prompt`/`parse_negative_prompt`),
    and facts for the infotext (`padded`, `padded_v0`, `used_embeddings`)."""
    from sdcore.conditioning import Conditioning, ScheduledText

    encoder = PromptEncoder(model, clip_skip=max(1, int(clip_skip)), emphasis=emphasis)
    used: set[str] = set()

    def schedule_of(sub: Mapping[str, Any], zero_if_empty: bool = False) -> list[tuple[int, TextEmbedding]]:
        entries = [(entry["text"], entry_runs(entry, emphasis)) for entry in sub["schedule"]]
        group = encoder.encode_group(entries, zero_if_empty=zero_if_empty)
        used.update(group.used_embeddings)
        return [(int(entry["until"]), group.embeddings[entry["text"]]) for entry in sub["schedule"]]

    positives = [(schedule_of(sub), float(sub["weight"])) for sub in positive["subprompts"]]
    zero_negative = bool(getattr(model, "zero_empty_negative_prompt", model.family == "sdxl"))
    negative_schedule = schedule_of(negative["subprompts"][0], zero_if_empty=zero_negative)

    # AND: sub-prompts of different lengths are padded by repeating their last vector (A1111's stack_conds).
    longest = max(e.embeds.shape[1] for schedule, _ in positives for _, e in schedule)
    positives = [
        (_map_schedule(schedule, lambda e: _pad_last(e, longest)) if any(
            e.embeds.shape[1] != longest for _, e in schedule) else schedule, weight)
        for schedule, weight in positives
    ]
    facts: dict[str, Any] = {"padded": False, "padded_v0": False}
    uncond_length = max(e.embeds.shape[1] for _, e in negative_schedule)
    if pad_conds_v0 and uncond_length != longest:
        negative_schedule = _map_schedule(negative_schedule, lambda e: _pad_last(e, longest))
        facts["padded_v0"] = True
    elif pad_conds and uncond_length != longest:
        empty = encoder.encode_group([("", [("", 1.0)])]).embeddings[""].embeds
        repeats = (longest - uncond_length) // empty.shape[1]
        if repeats > 0:
            negative_schedule = _map_schedule(negative_schedule, lambda e: _pad_with(e, empty, repeats))
            facts["padded"] = True
        elif repeats < 0:
            positives = [(_map_schedule(s, lambda e: _pad_with(e, empty, -repeats)), w) for s, w in positives]
            facts["padded"] = True
    facts["used_embeddings"] = sorted(used)
    conditioning = Conditioning(
        positive=[ScheduledText(schedule=schedule, weight=weight) for schedule, weight in positives],
        negative=ScheduledText(schedule=negative_schedule, weight=1.0),
    )
    return conditioning, facts


def encode_context(context: Any, options: Any) -> Conditioning:
    """The `encode_prompts` implementation: parse the request's prompts, encode them, note facts for later."""
    request, model, engine = context.request, context.model, context.engine
    extra = context.extra
    multiplier = sampler_step_multiplier(engine, request)
    schedule_steps = int(request.steps) * multiplier
    first_pass = extra.get("hires_first_pass_steps")
    steps, hires = (int(first_pass), schedule_steps) if first_pass else (schedule_steps, None)
    positive, negative = parse_pair(
        request.prompt, request.negative_prompt, steps, hires,
        old_timeline=options.old_timeline, strict=options.strict,
    )
    conditioning, facts = encode_parsed(
        model, positive, negative, clip_skip=request.clip_skip, emphasis=options.emphasis,
        pad_conds=options.pad_conds, pad_conds_v0=options.pad_conds_v0,
    )
    info = extra.setdefault(STATE_KEY, {})
    info.update(
        conditioning=conditioning,
        schedule_steps=schedule_steps,
        step_multiplier=multiplier,
        parsed=positive,
        negative_parsed=negative,
        emphasis=options.emphasis,
        uses_emphasis=uses_emphasis_brackets(positive, negative),
        **facts,
    )
    conditioning.extra[STATE_KEY] = {"parsed": positive, "negative_parsed": negative,
                                     "schedule_steps": schedule_steps}
    return conditioning


# ---------------------------------------------------------------------------------------------------
# Token counts for front ends
# ---------------------------------------------------------------------------------------------------


def count_tokens(
    prompt: str,
    model: DiffusionModel | None = None,
    *,
    steps: int = 20,
    negative: bool = False,
    emphasis: str = "Original",
    strict: bool = False,
) -> list[int]:
    """The number of tokens in each 75-token chunk of `prompt` (what UIs show as "42/75"), as A1111 counts.

    Like A1111's token counter, this counts the longest text the prompt can become: tags removed, AND split
    (positive prompts), every schedule entry tokenized; the chunks of the one with most tokens are returned.
    `model` adds its textual-inversion embeddings; without one, the CLIP tokenizer every SD model shares is
    used. Parse problems raise `PromptError` only where A1111 itself fails, unless `strict`.
    """
    check_emphasis(emphasis)
    if negative:
        parsed = parser.parse_negative_prompt(prompt, steps, strict=strict)
    else:
        parsed = parser.parse_prompt(prompt, steps, strict=strict)
    if model is not None:
        encoder = PromptEncoder(model, emphasis=emphasis)
        chunker: Callable[[list[tuple[str, float]]], list[Chunk]] = encoder.chunks
    else:
        from sdcore.tokenizers import clip_tokenizer

        tokenizer = clip_tokenizer()
        comma = comma_token_id(tokenizer)

        def tokenize(text: str) -> list[int]:
            return list(tokenizer(text, add_special_tokens=False, truncation=False)["input_ids"])

        def chunker(runs: list[tuple[str, float]]) -> list[Chunk]:
            return tokenize_line(runs, tokenize, comma)

    best: list[int] = [0]
    best_total = -1
    seen: set[str] = set()
    for sub in parsed["subprompts"]:
        for entry in sub["schedule"]:
            if entry["text"] in seen:
                continue
            seen.add(entry["text"])
            counts = [len(c) for c in chunker(entry_runs(entry, emphasis))]
            total = CHUNK_LENGTH * (len(counts) - 1) + counts[-1]  # A1111's token_count
            if total > best_total:
                best, best_total = counts, total
    return best

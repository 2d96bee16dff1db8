"""Streaming generation: prefill, a decode loop over a preallocated KV cache, events out.

One batch holds several requests (each with its own mode, sampling options and seed). Cache rows:
request r decodes its conditional stream in row r; a request that guides its images
(classifier-free guidance) owns one or two extra rows, used only while it draws an image. At
`<boi>` those rows are reset and prefilled with their short contexts (`<bos> <boi>`, and for the
two-scale guidance of a context that holds images `<bos> images-so-far <boi>`: the prompt's and
those generated earlier in the document, as Chameleon's `InBatchInstructCFG` streams see them) in the
same forward call that feeds `<boi>` to the conditional row, whose cache is kept: the prompt is
never re-run.

Every step is one `model.decode` call over all cache rows with per-row token counts `n_new`
(0 for idle rows), one batched logit pipeline (guidance, repetition penalty, modality mask,
temperature / top-k / top-p / min-p) and one per-row seeded draw.

A row drawing an image with `image_parallel` K > 1 feeds its newest code and up to K - 1 drafts in
that same call (its guidance streams feed the same window), and takes every code speculative
decoding accepts (speculative.py: the same distribution as one code a step); the cache rows then
drop the rejected drafts, so they hold exactly the accepted sequence. The image's first code (after
`<boi>`, nothing to draft from yet) and `<eoi>` are drawn as one token a step; so is text.
"""

from __future__ import annotations

import codecs
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from PIL import Image

from interleaf.errors import InterleafError
from interleaf.sampling import logits as L
from interleaf.sampling import speculative as S
from interleaf.sampling.events import Document, Done, Event, ImageDone, ImageProgress, ImageStart, TextDelta
from interleaf.sampling.params import SamplingParams
from interleaf.sampling.prompt import Prompt, check_text_items, encode_prompt, prompt_segments
from interleaf.sampling.state import SequenceState
from interleaf.tokenizer.image import to_pil

DEFAULT_TEXT_TOKENS = 256


@dataclass(frozen=True)
class Request:
    """One sequence to generate: a prompt and how to sample it (its own seed included)."""

    prompt: Prompt
    params: SamplingParams = SamplingParams()


# ---- guidance contexts -----------------------------------------------------------------------
def image_context(ids: Sequence[int], vocab) -> list[int]:
    """The image-only context of a sequence: `<bos>`, its `<boi> codes <eoi>` spans, then `<boi>`."""
    out, inside = [vocab.bos_id], False
    for t in ids:
        inside = inside or t == vocab.boi_id
        if inside:
            out.append(int(t))
        if t == vocab.eoi_id:
            inside = False
    return out + [vocab.boi_id]


# ---- rows --------------------------------------------------------------------------------------
@dataclass
class Row:
    """A request being decoded: its state machine, generator, cache rows and output so far."""

    index: int
    params: SamplingParams
    state: SequenceState
    generator: torch.Generator
    prompt_ids: list[int]
    guide_rows: list[int]  # cache rows for the guidance streams (as many as its images may use)
    guide_contexts: list[list[int]]  # the current image's streams, [uncond] or [cond_image, uncond]: set at <boi>
    document: Document
    utf8: codecs.IncrementalDecoder = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))
    codes: list[int] = field(default_factory=list)  # codes of the image being drawn
    seconds: float = 0.0
    window: S.Window | None = None  # drafts fed after the newest code (image_parallel > 1, drawing an image)
    fresh: torch.Tensor | None = None  # (V,) proposal for codes no pass has predicted yet: the last pass's last p

    @property
    def guiding(self) -> bool:
        """Whether this row's next token is an image code drawn with guidance."""
        return bool(self.guide_contexts) and self.state.in_image

    @property
    def streams(self) -> list[int]:
        """The cache rows of the current image's guidance streams, in `guide_contexts` order."""
        return self.guide_rows[: len(self.guide_contexts)]

    def sampling(self) -> tuple[float, int, float, float]:
        """(temperature, top_k, top_p, min_p) for the next token's modality."""
        p = self.params
        if self.state.in_image:
            return p.image_temperature, p.image_top_k, p.image_top_p, p.image_min_p
        return p.temperature, p.top_k, p.top_p, p.min_p

    def draws(self) -> torch.Generator | None:
        """The generator of the next token's draw; None when it is greedy."""
        return self.generator if self.sampling()[0] > 0 else None

    def penalty(self) -> float:
        """Repetition penalty for the next token (text only)."""
        return 1.0 if self.state.in_image else self.params.repetition_penalty

    def guidance_scales(self) -> tuple[float, float]:
        """(text scale, image scale) of this row's guidance; both 1 when it is not guiding."""
        if not self.guiding:
            return 1.0, 1.0
        s = self.params.cfg_scale
        return s, image_scale(self.params) if len(self.guide_contexts) == 2 else s


def image_scale(p: SamplingParams) -> float:
    """The guidance scale toward the prompt's images (the cfg scale unless set apart)."""
    return p.cfg_scale if p.image_cfg_scale is None else p.image_cfg_scale


def guidance_contexts(p: SamplingParams, ids: list[int], vocab) -> list[list[int]]:
    """Contexts of the guidance streams of an image drawn after `ids` (the sequence so far): none,
    [uncond] or, when `ids` hold images and the two scales differ, [cond_image, uncond]."""
    if p.mode == "text":
        return []
    uncond = [vocab.bos_id, vocab.boi_id]
    if vocab.boi_id in ids and image_scale(p) != p.cfg_scale:
        return [image_context(ids, vocab), uncond]
    return [uncond] if p.cfg_scale != 1 else []


def guide_row_count(p: SamplingParams, prompt_ids: list[int], vocab) -> int:
    """Cache rows a request's guidance needs: the streams of its image that uses the most."""
    counts = [len(guidance_contexts(p, prompt_ids, vocab))]
    if p.mode == "interleaved" and p.max_images > 1:  # an image drawn earlier joins the context of the next
        counts.append(len(guidance_contexts(p, [vocab.boi_id, vocab.eoi_id], vocab)))
    return max(counts)


def default_max_new_tokens(p: SamplingParams, tokens_per_image: int) -> int:
    """Budget when none is given: the image for image mode, else 256 text tokens plus the images."""
    if p.max_new_tokens is not None:
        return p.max_new_tokens
    image = tokens_per_image + 2
    if p.mode == "image":
        return image
    if p.mode == "interleaved":
        return DEFAULT_TEXT_TOKENS + p.max_images * image
    return DEFAULT_TEXT_TOKENS


def check_pipe(pipe, requests: Sequence[Request]) -> None:
    """Raise InterleafError when the model cannot serve these requests."""
    if any(r.params.mode != "text" for r in requests):
        if pipe.vqgan is None:
            raise InterleafError("this model directory has no VQ-GAN, so it cannot draw images")
        if not pipe.vqgan.config.has_decoder:
            raise InterleafError("this model's VQ-GAN has no decoder weights, so it cannot draw images")
    for r in requests:
        r.params.check_model(pipe)


def make_rows(pipe, requests: Sequence[Request]) -> tuple[list[Row], int]:
    """Encode every request; return the rows and the number of cache rows."""
    vocab, max_len = pipe.vocab, pipe.model.args.max_seq_len
    n = vocab.tokens_per_image
    rows, next_free = [], len(requests)
    for i, req in enumerate(requests):
        p = req.params
        ids = encode_prompt(pipe, req.prompt)
        if len(ids) >= max_len:
            raise InterleafError(f"prompt is {len(ids)} tokens; the model's context is {max_len}")
        state = SequenceState(p.mode, n, max_len, default_max_new_tokens(p, n), p.max_images, length=len(ids))
        if p.mode == "image" and not state.can_start_image():
            raise InterleafError(
                f"prompt is {len(ids)} tokens; an image needs {n + 2} more and the context is {max_len}"
            )
        contexts = guidance_contexts(p, ids, vocab)  # the first image's
        n_guide = guide_row_count(p, ids, vocab)
        guide = list(range(next_free, next_free + n_guide))
        next_free += n_guide
        gen = torch.Generator(device=_device(pipe)).manual_seed(p.seed)
        rows.append(Row(i, p, state, gen, ids, guide, contexts, Document(prompt=prompt_segments(req.prompt))))
    return rows, next_free


def _device(pipe) -> torch.device:
    return next(pipe.model.parameters()).device


# ---- one forward step ----------------------------------------------------------------------------
@torch.no_grad()
def forward_feeds(model, cache, feeds: dict[int, list[int]], n_rows: int, device, last: int = 1) -> torch.Tensor:
    """Append each cache row's new tokens; return the logits after each row's `last` last ones (B, last, V).

    Rows missing from `feeds` take no token (their logits are garbage and unused).
    """
    width = max(len(f) for f in feeds.values())
    rows = [feeds.get(r, []) for r in range(n_rows)]
    tokens = torch.tensor([f + [0] * (width - len(f)) for f in rows], device=device)  # (B, T) right-padded
    n_new = torch.tensor([len(f) for f in rows], device=device)  # (B,)
    if last == 1:
        return model.decode(tokens, cache, n_new, last_only=True)[:, None]  # (B, 1, V)
    return model.decode(tokens, cache, n_new, last_n=last)  # (B, last, V)


@torch.no_grad()
def next_tokens(live: Sequence[Row], logits: torch.Tensor, masks: torch.Tensor, seen: torch.Tensor | None) -> list[int]:
    """One token for each live row from the step's logits (cache rows, V)."""
    device = logits.device
    idx = [r.index for r in live]
    rows = torch.tensor(idx, device=device)
    x = logits[: len(idx)] if idx == list(range(len(idx))) else logits[rows]  # (R, V) conditional
    if any(r.guiding for r in live):
        x = guide(x, live, logits)
    penalty = [r.penalty() for r in live]
    if seen is not None and any(p != 1 for p in penalty):
        x = L.apply_repetition_penalty(x, seen[rows], torch.tensor(penalty, device=device))
    allowed = masks[torch.tensor([int(r.state.allowed()) for r in live], device=device)]  # (R, V)
    x = L.apply_mask(x, allowed)
    temperature, *filters = zip(*(r.sampling() for r in live))
    filters = L.Filters(*(torch.tensor(v, device=device) for v in filters)) if L.needs_filter(*filters) else None
    return L.sample(x, torch.tensor(temperature, device=device), [r.generator for r in live], filters).tolist()


@torch.no_grad()
def window_codes(row: Row, logits: torch.Tensor, masks: torch.Tensor) -> tuple[list[int], int]:
    """The codes a row drawing in parallel takes from one pass (its accepted drafts, then one new
    code) and the number of drafts it rejected. `logits` (cache rows, m, V): the pass's last m."""
    n = len(row.window)
    x = logits[row.index, -(n + 1) :]  # (n + 1, V): the code after the newest token, after each draft
    if row.guiding:  # the guided logits at every window position, as `guide` makes them for one
        cond_image, uncond = guide_streams(row)
        u, ci = logits[uncond, -(n + 1) :], logits[cond_image, -(n + 1) :]
        scales = [torch.full((n + 1,), s, device=x.device) for s in row.guidance_scales()]
        x = L.cfg_combine_two_scale(x, ci, u, *scales)
    x = L.apply_mask(x, masks[L.Allowed.IMAGE])  # every window position is a code of this image
    p = S.token_distribution(x, *row.sampling())  # (n + 1, V)
    accepted, new = S.verify(p, row.window.drafts, row.window.q, row.draws())
    codes = row.window.drafts[:accepted].tolist() + [new]
    row.window, row.fresh = row.window.advance(p, accepted, row.draws()), p[-1]
    return codes, n - accepted


def add_drafts(row: Row, feeds: dict[int, list[int]], vocab_size: int) -> None:
    """Append a row's window of drafts to what it and its guidance streams take next, when it draws
    an image in parallel; otherwise forget its window."""
    st = row.state
    left = st.tokens_per_image - st.codes_done  # codes still to draw; the window predicts at most that many
    if row.params.image_parallel == 1 or st.finished or not st.in_image or left == 0:
        row.window = row.fresh = None
        return
    if row.window is None:  # just after <boi>: nothing to draft from before the first code's pass
        row.window = S.Window.empty(vocab_size, row.generator.device)
    if row.fresh is not None:
        row.window = row.window.top_up(min(row.params.image_parallel, left) - 1, row.fresh, row.draws())
    drafts = row.window.drafts.tolist()
    for r in (row.index, *row.streams):
        feeds[r] = feeds[r] + drafts


def guide_streams(row: Row) -> tuple[int, int]:
    """The cache rows of a row's prompt-image-conditioned and unconditional streams; a row without
    such a stream uses its own conditional logits in that place (the term vanishes)."""
    if not row.guiding:
        return row.index, row.index
    return (row.streams[0] if len(row.streams) == 2 else row.index), row.streams[-1]


def guide(x: torch.Tensor, live: Sequence[Row], logits: torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance for the rows drawing an image; other rows pass through unchanged."""
    device = x.device
    cond_image, uncond = zip(*(guide_streams(r) for r in live))
    s_text, s_image = zip(*(r.guidance_scales() for r in live))
    u = logits[torch.tensor(uncond, device=device)]  # (R, V)
    ci = logits[torch.tensor(cond_image, device=device)]
    return L.cfg_combine_two_scale(x, ci, u, torch.tensor(s_text, device=device), torch.tensor(s_image, device=device))


# ---- events ------------------------------------------------------------------------------------------
def decode_image(pipe, codes: Sequence[int]) -> tuple[Image.Image, np.ndarray]:
    """Codes of one image (raster order) -> (PIL image, (h, w) code grid)."""
    grid = np.asarray(codes, dtype=np.int64).reshape(pipe.vocab.image_grid)
    with torch.no_grad():
        x = pipe.vqgan.decode_code(torch.from_numpy(grid)[None])  # (1, 3, H, W)
    return to_pil(x[0]), grid


def preview_image(pipe, codes: Sequence[int]) -> Image.Image:
    """A partial image: the codes drawn so far, the rest greyed out."""
    n = pipe.vocab.tokens_per_image
    h, w = pipe.vocab.image_grid
    image, _ = decode_image(pipe, list(codes) + [0] * (n - len(codes)))
    done_rows, done_cols = divmod(len(codes), w)
    cell_h, cell_w = image.height / h, image.width / w
    grey = Image.new("RGB", image.size, (128, 128, 128))
    mask = Image.new("L", image.size, 255)
    mask.paste(0, (0, 0, image.width, int(done_rows * cell_h)))
    mask.paste(0, (0, int(done_rows * cell_h), int(done_cols * cell_w), int((done_rows + 1) * cell_h)))
    return Image.composite(grey, image, mask)


def take_token(pipe, row: Row, token: int, start: float) -> list[Event]:
    """Advance a row's state machine by one token; return the events it causes."""
    kind = row.state.advance(token, pipe.vocab)
    row.document.token_ids.append(token)
    events: list[Event] = []
    n = pipe.vocab.tokens_per_image
    if kind == "text":
        events += _text(row, pipe.text.decode_bytes([token]))
    elif kind == "boi":
        events += _text(row, b"", final=True)
        row.codes = []
        events.append(ImageStart(row.index, row.state.n_images, n))
    elif kind == "code":
        row.codes.append(int(pipe.vocab.id_to_code(np.asarray([token]))[0]))
        every = row.params.preview_every
        preview = (
            preview_image(pipe, row.codes) if every and len(row.codes) % every == 0 and len(row.codes) < n else None
        )
        events.append(ImageProgress(row.index, row.state.n_images, len(row.codes), n, preview))
    elif kind == "eoi":
        image, grid = decode_image(pipe, row.codes)
        row.document.segments.append(image)
        row.document.codes.append(grid)
        events.append(ImageDone(row.index, row.state.n_images - 1, image, grid))
    if row.state.finished:
        events += _text(row, b"", final=True)
        events.append(finish(row, start))
    return events


def _text(row: Row, data: bytes, final: bool = False) -> list[Event]:
    text = row.utf8.decode(data, final=final)  # whole characters only; a split one waits
    if final:
        row.utf8.reset()
    row.document.add_text(text)
    return [TextDelta(row.index, text)] if text else []


def finish(row: Row, start: float) -> Done:
    """The Done event of a row that just finished."""
    row.seconds = time.perf_counter() - start
    n = row.state.n_generated
    return Done(row.index, len(row.prompt_ids), n, row.seconds, n / max(row.seconds, 1e-9), row.document)


def feeds_after(row: Row, token: int, kind_was_boi: bool, vocab) -> dict[int, list[int]]:
    """What each of a row's cache rows takes in the next forward call. At `<boi>` the guidance
    streams start over from the contexts of the whole sequence so far (without that `<boi>`)."""
    if row.state.finished:
        return {}
    feeds = {row.index: [token]}
    if row.guide_rows and kind_was_boi:
        row.guide_contexts = guidance_contexts(row.params, row.prompt_ids + row.document.token_ids[:-1], vocab)
        feeds.update({g: list(ctx) for g, ctx in zip(row.streams, row.guide_contexts)})
    elif row.guiding:
        feeds.update({g: [token] for g in row.streams})
    return feeds


# ---- the loop ----------------------------------------------------------------------------------------
def stream_requests(pipe, requests: Sequence[Request]) -> Iterator[Event]:
    """Decode a batch of requests together; yield their events as tokens are drawn.

    Requests are checked against the model and prompts encoded before this returns, so bad input
    raises here, not at the first `next()`.
    """
    check_pipe(pipe, requests)
    rows, n_cache_rows = make_rows(pipe, requests)
    return decode_loop(pipe, rows, n_cache_rows)


def repetition_seen(pipe, rows: Sequence[Row]) -> torch.Tensor:
    """Bool (R, V): the ids each row's prompt holds, extended by every token drawn in text mode. As in
    transformers' penalty (Meta's sampler), a `<boi>` already in the sequence is penalised too."""
    V, device = pipe.model.args.vocab_size, _device(pipe)
    seen = torch.zeros(len(rows), V, dtype=torch.bool, device=device)
    for r in rows:
        seen[r.index, torch.tensor(r.prompt_ids, device=device)] = True
    return seen


def cache_length(rows: Sequence[Row], tokens_per_image: int) -> int:
    """Cache slots the longest row can use: its prompt and budget (or a guidance context + image)."""
    need = [len(r.prompt_ids) + r.state.max_new_tokens for r in rows]
    need += [len(c) + tokens_per_image for r in rows for c in r.guide_contexts]
    # a guidance context never outgrows its prompt, and an image only starts if it fits
    return min(max(need), rows[0].state.max_len)


def decode_loop(pipe, rows: list[Row], n_cache_rows: int) -> Iterator[Event]:
    """Prefill every prompt, then one forward call per step until all rows finish: each row takes one
    token, a row drawing with a window the codes speculative decoding accepts."""
    model, vocab, device = pipe.model, pipe.vocab, _device(pipe)
    decoder = pipe.compiled or model  # the compiled one-token step (model/compiled.py), or the model
    with torch.no_grad():
        cache = decoder.setup_cache(n_cache_rows, cache_length(rows, vocab.tokens_per_image))
        masks = L.mask_table(vocab, model.args.vocab_size, device)
    seen = repetition_seen(pipe, rows) if any(r.params.repetition_penalty != 1 for r in rows) else None
    start = time.perf_counter()
    feeds = {r.index: r.prompt_ids for r in rows}
    while feeds:
        live = [r for r in rows if not r.state.finished]
        last = 1 + max((len(r.window) for r in live if r.window is not None), default=0)
        logits = forward_feeds(decoder, cache, feeds, cache.batch_size, device, last)  # (B, last, V)
        one = [r for r in live if r.window is None]  # rows taking one token
        drawn = dict(zip((r.index for r in one), next_tokens(one, logits[:, -1], masks, seen) if one else []))
        feeds = {}
        for row in live:
            if row.window is None:
                token = drawn[row.index]
                was_text = not row.state.in_image
                yield from take_token(pipe, row, token, start)
                if seen is not None and was_text:  # text, <boi>: what text mode may draw again
                    seen[row.index, token] = True
                boi = was_text and row.state.in_image
                if boi and row.guide_rows:
                    with torch.no_grad():
                        cache.reset(row.guide_rows)
            else:
                codes, rejected = window_codes(row, logits, masks)
                for token in codes:
                    yield from take_token(pipe, row, token, start)
                if rejected:
                    with torch.no_grad():
                        cache.drop_last([row.index, *row.streams], rejected)
                token, boi = codes[-1], False
            feeds.update(feeds_after(row, token, boi, vocab))
            add_drafts(row, feeds, model.args.vocab_size)


def build_requests(prompt: Prompt, params: SamplingParams, num: int = 1) -> list[Request]:
    """`num` requests for one prompt, seeds `params.seed`, `params.seed + 1`, ..."""
    if num < 1:
        raise InterleafError(f"num must be >= 1, got {num}")
    return [Request(prompt, replace(params, seed=params.seed + i)) for i in range(num)]


def stream(pipe, prompt: Prompt, num: int = 1, **options) -> Iterator[Event]:
    """Generate from one prompt (`num` samples, seeds seed..seed+num-1); yield events as they come.

    `options` are SamplingParams fields; text items of the prompt are always text (see prompt.py).
    """
    check_text_items(prompt)
    return stream_requests(pipe, build_requests(prompt, SamplingParams(**options), num))


def generate(pipe, prompt: Prompt, num: int = 1, **options) -> Document | list[Document]:
    """Like `stream`, collected: the Document (a list of them when num > 1)."""
    docs = collect(stream(pipe, prompt, num, **options))
    return docs if num > 1 else docs[0]


def collect(events: Iterator[Event]) -> list[Document]:
    """Run a stream to its end; return each row's Document in row order."""
    done = {e.row: e.document for e in events if isinstance(e, Done)}
    return [done[i] for i in sorted(done)]

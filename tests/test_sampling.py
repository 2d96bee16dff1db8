"""Sampler pieces without a real model: logit processing, the state machine, events, rendering.

The decode loop runs here against a stand-in model that returns adversarial random logits, since
the point is the invariants (modality, image length, <eoi>, budgets), whatever the model says.
"""

import os
import re
import stat
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from interleaf.errors import InterleafError
from interleaf.sampling import logits as L
from interleaf.sampling.events import Document, Done, ImageDone, ImageProgress, ImageStart, TextDelta
from interleaf.sampling.generate import Request, stream_requests
from interleaf.sampling.params import OptionError, SamplingParams
from interleaf.sampling.render import escape_markdown, write_documents
from interleaf.sampling.state import SequenceState
from interleaf.tokenizer.vocab import Vocabulary

N_TEXT, N_CODES, GRID = 16 + 256, 40, (2, 3)  # byte-level text ids 16..271


@pytest.fixture(scope="module")
def vocab():
    return Vocabulary.build(n_text=N_TEXT, n_codes=N_CODES, image_grid=GRID)


# ---- logits --------------------------------------------------------------------------------------
def test_mask_table_rows(vocab):
    V = vocab.size + 64  # a model may have more logits than the vocabulary: never allowed
    m = L.mask_table(vocab, V)
    image, text = vocab.image_mask(), vocab.text_mask()
    assert m.shape == (len(L.Allowed), V)
    assert not m[:, vocab.size :].any()
    assert torch.equal(m[L.Allowed.IMAGE, : vocab.size], image)
    for a in (L.Allowed.TEXT, L.Allowed.TEXT_OR_IMAGE):
        assert not (m[a, : vocab.size] & image).any()
        assert m[a, vocab.eos_id] and not m[a, vocab.eoi_id] and not m[a, vocab.bos_id] and not m[a, vocab.pad_id]
        assert torch.equal(m[a, : vocab.size] & text, text)
    assert not m[L.Allowed.TEXT, vocab.boi_id] and m[L.Allowed.TEXT_OR_IMAGE, vocab.boi_id]
    assert m[L.Allowed.EOI].nonzero().flatten().tolist() == [vocab.eoi_id]
    assert m[L.Allowed.BOI].nonzero().flatten().tolist() == [vocab.boi_id]


def test_cfg_scale_one_is_exactly_cond_and_formula_otherwise():
    g = torch.Generator().manual_seed(0)
    c, u = torch.randn(6, 50, generator=g) * 30, torch.randn(6, 50, generator=g) * 30
    s = torch.tensor([1.0, 1.0, 3.0, 0.0, 7.5, 1.0])
    out = L.cfg_combine(c, u, s)
    for b in range(6):
        if s[b] == 1:
            assert torch.equal(out[b], c[b])  # bitwise: u + 1·(c − u) would round
        else:
            assert torch.allclose(out[b], u[b] + s[b] * (c[b] - u[b]))
    ci = torch.randn(6, 50, generator=g)
    assert torch.allclose(L.cfg_combine_two_scale(c, ci, u, s, s), out, atol=1e-4)
    ones = torch.ones(6)
    assert torch.equal(L.cfg_combine_two_scale(c, ci, u, ones, ones), c)
    st, si = torch.full((6,), 2.0), torch.full((6,), 1.5)
    ref = u + 1.5 * (ci - u) + 2.0 * (c - ci)
    assert torch.allclose(L.cfg_combine_two_scale(c, ci, u, st, si), ref)


def _ref_filter(row: torch.Tensor, k: int, p: float, m: float = 0.0) -> set[int]:
    order = torch.argsort(row, descending=True, stable=True).tolist()
    if k > 0:
        order = order[:k]
    probs = torch.softmax(row[order], 0).tolist()
    kept, mass = [], 0.0
    for i, q in zip(order, probs):
        kept.append(i)
        mass += q
        if p < 1 and mass >= p - 1e-6:
            break
    full = torch.softmax(row, 0)  # min-p: a ratio to the best id, on the whole distribution
    return {i for i in kept if full[i] >= m * full.max() - 1e-7}


def test_top_k_top_p_min_p_per_row_match_reference():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(10, 64, generator=g) * 3
    k = torch.tensor([0, 1, 5, 0, 10, 64, 3, 0, 0, 8])
    p = torch.tensor([1.0, 1.0, 1.0, 0.5, 0.9, 0.3, 0.99, 1e-6, 1.0, 0.8])
    m = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.1, 0.0, 0.05, 0.3])
    out = L.filter_logits(x, L.Filters(k, p, m))
    for b in range(10):
        kept = set(torch.isfinite(out[b]).nonzero().flatten().tolist())
        assert kept == _ref_filter(x[b], int(k[b]), float(p[b]), float(m[b])), b
        assert torch.equal(out[b][list(kept)], x[b][list(kept)])
        alone = L.filter_logits(x[b : b + 1], L.Filters(k[b : b + 1], p[b : b + 1], m[b : b + 1]))
        assert torch.equal(alone[0], out[b])  # a row's filter does not depend on its neighbours
    assert 1 < len(_ref_filter(x[8], 0, 1.0, 0.05)) < 64  # min-p alone did cut, and kept more than one
    only_best = L.filter_logits(x, L.Filters(torch.zeros_like(k), torch.ones(10), torch.ones(10)))
    assert torch.equal(torch.isfinite(only_best).sum(-1), torch.ones(10, dtype=torch.long))


def test_repetition_penalty_reference():
    x = torch.tensor([[2.0, -2.0, 1.0, -1.0], [2.0, -2.0, 1.0, -1.0]])
    seen = torch.tensor([[True, True, False, False], [True, True, True, True]])
    out = L.apply_repetition_penalty(x, seen, torch.tensor([2.0, 1.0]))
    assert out.tolist() == [[1.0, -4.0, 1.0, -1.0], [2.0, -2.0, 1.0, -1.0]]


def test_sample_greedy_distribution_and_batch_independence():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 6, generator=g)
    gens = [torch.Generator().manual_seed(s) for s in (0, 1, 2)]
    greedy = L.sample(logits, torch.zeros(3), gens)
    assert torch.equal(greedy, logits.argmax(-1))
    # the exponential race draws from softmax(logits / T): compare frequencies over many draws
    n, T = 20000, 0.7
    gens = [torch.Generator().manual_seed(1000 + i) for i in range(n)]  # independent rows
    draws = L.sample(logits[:1].expand(n, 6), torch.full((n,), T), gens)
    counts = torch.bincount(draws, minlength=6).float()
    expected = torch.softmax(logits[0] / T, 0) * n
    chi2 = (((counts - expected) ** 2) / expected).sum().item()
    assert chi2 < 25, (counts, expected)  # 5 degrees of freedom: p ~ 1e-4
    # a row's draws depend on its own generator and logits only
    temps, tk, tp = torch.tensor([1.0, 0.5, 2.0]), torch.tensor([0, 3, 0]), torch.tensor([0.9, 1.0, 0.5])
    tm = torch.tensor([0.0, 0.0, 0.2])
    together = [
        L.sample(logits, temps, [torch.Generator().manual_seed(s) for s in (7, 8, 9)], L.Filters(tk, tp, tm))
        for _ in range(1)
    ]
    for b, s in enumerate((7, 8, 9)):
        one = L.Filters(tk[b : b + 1], tp[b : b + 1], tm[b : b + 1])
        alone = L.sample(logits[b : b + 1], temps[b : b + 1], [torch.Generator().manual_seed(s)], one)
        assert alone.item() == together[0][b].item()


# ---- the state machine under random logits ------------------------------------------------------------
def check_generated(ids, vocab, mode, max_images, prompt_len, max_len, max_new):
    """Independent check of one generated sequence; returns the number of images."""
    n = vocab.tokens_per_image
    assert len(ids) <= max_new and prompt_len + len(ids) <= max_len
    assert all(0 <= t < vocab.size for t in ids)
    if mode == "image":
        assert len(ids) == n + 2 and ids[0] == vocab.boi_id and ids[-1] == vocab.eoi_id
        assert all(vocab.is_image(t) for t in ids[1:-1])
        return 1
    images, i = 0, 0
    while i < len(ids):
        t = ids[i]
        if t == vocab.boi_id:
            assert mode == "interleaved", "image started in text mode"
            block = ids[i + 1 : i + 2 + n]
            assert len(block) == n + 1, "image cut short"
            assert all(vocab.is_image(c) for c in block[:n]) and block[n] == vocab.eoi_id
            images += 1
            i += n + 2
            continue
        assert not vocab.is_image(t) and t != vocab.eoi_id, f"image token outside an image at {i}"
        assert vocab.is_text(t) or t == vocab.eos_id, f"special id {t}"
        if t == vocab.eos_id:
            assert i == len(ids) - 1, "tokens after <eos>"
        i += 1
    assert images <= max_images
    return images


def test_state_machine_never_leaves_its_modality(vocab):
    """Many rows, random modes and budgets, logits biased toward forbidden ids: the invariants hold."""
    rng = np.random.default_rng(0)
    g = torch.Generator().manual_seed(0)
    masks = L.mask_table(vocab, vocab.size)
    n = vocab.tokens_per_image
    rows, specs = [], []
    for _ in range(64):
        mode = ["text", "image", "interleaved"][rng.integers(3)]
        prompt_len = int(rng.integers(1, 12))
        max_len = prompt_len + int(rng.integers(n + 2, 4 * n))
        max_new = int(rng.integers(1, 5 * n)) if mode != "image" else n + 2
        max_images = int(rng.integers(0, 4))
        rows.append(SequenceState(mode, n, max_len, max_new, max_images, length=prompt_len))
        specs.append((mode, max_images, prompt_len, max_len, max_new))
    gens = [torch.Generator().manual_seed(i) for i in range(len(rows))]
    out = [[] for _ in rows]
    images_seen, boi_boundary = 0, 0
    while any(not s.finished for s in rows):
        live = [i for i, s in enumerate(rows) if not s.finished]
        x = torch.randn(len(live), vocab.size, generator=g) * 4
        x[:, vocab.image_mask()] += 3.0 * torch.rand(len(live), 1, generator=g)  # tempt text rows
        x[:, [vocab.boi_id, vocab.eoi_id, vocab.pad_id, vocab.bos_id, 7]] += 6.0  # and everyone
        x[:, vocab.boi_id] += float(rng.choice([0.0, 10.0, 30.0]))  # images often start at the edge
        allowed = masks[torch.tensor([int(rows[i].allowed()) for i in live])]
        temps = torch.tensor([[0.0, 0.5, 1.0, 3.0][rng.integers(4)] for _ in live])
        tk = torch.tensor([int(rng.integers(0, 4)) for _ in live])
        tp = torch.tensor([float(rng.choice([1.0, 0.5, 0.05])) for _ in live])
        tm = torch.tensor([float(rng.choice([0.0, 0.1])) for _ in live])
        filters = L.Filters(tk, tp, tm)
        tokens = L.sample(L.apply_mask(x, allowed), temps, [gens[i] for i in live], filters).tolist()
        for i, t in zip(live, tokens):
            s = rows[i]
            room = min(s.max_len - s.length, s.max_new_tokens - s.n_generated)
            if not s.in_image and s.mode == "interleaved" and room < n + 2:
                assert t != vocab.boi_id
                boi_boundary += 1
            s.advance(t, vocab)
            out[i].append(t)
    for ids, spec in zip(out, specs):
        images_seen += check_generated(ids, vocab, *spec)
    assert images_seen > 10 and boi_boundary > 0  # the test did exercise images and the context edge


def test_state_machine_rejects_forbidden_tokens(vocab):
    s = SequenceState("text", vocab.tokens_per_image, 100, 50, length=3)
    with pytest.raises(RuntimeError):
        s.advance(vocab.boi_id, vocab)
    s = SequenceState("interleaved", vocab.tokens_per_image, 100, 50, length=3)
    s.advance(vocab.boi_id, vocab)
    with pytest.raises(RuntimeError):
        s.advance(20, vocab)  # text inside an image
    # <boi> is banned exactly when a whole image no longer fits
    n = vocab.tokens_per_image
    s = SequenceState("interleaved", n, max_len=10 + n + 2, max_new_tokens=100, length=10)
    assert s.allowed() == L.Allowed.TEXT_OR_IMAGE
    s.advance(20, vocab)
    assert s.allowed() == L.Allowed.TEXT


# ---- the decode loop over a stand-in model -------------------------------------------------------------
class FakeCache:
    def __init__(self, B, max_len):
        self.lengths = torch.zeros(B, dtype=torch.long)
        self.max_len = max_len
        self.batch_size = B
        self.history = [[] for _ in range(B)]

    def reset(self, rows=None):
        for r in range(len(self.history)) if rows is None else rows:
            self.lengths[r] = 0
            self.history[r] = []


class FakeModel(torch.nn.Module):
    """Random logits biased toward whatever is forbidden; checks what the loop feeds it."""

    def __init__(self, vocab, max_seq_len, seed=0, script=None):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.vocab = vocab
        self.args = SimpleNamespace(vocab_size=vocab.size, max_seq_len=max_seq_len)
        self.g = torch.Generator().manual_seed(seed)
        self.script = script  # optional: fixed text token per step (for the UTF-8 test)

    def setup_cache(self, batch_size, max_len, dtype=None):
        self.cache = FakeCache(batch_size, max_len)
        return self.cache

    def decode(self, tokens, cache, n_new=None, last_only=False):
        assert last_only
        B, T = tokens.shape
        for b in range(B):
            k = int(n_new[b])
            cache.history[b] += tokens[b, :k].tolist()
            assert len(cache.history[b]) <= cache.max_len <= self.args.max_seq_len
        cache.lengths += n_new
        x = torch.randn(B, self.args.vocab_size, generator=self.g) * 5
        x[..., self.vocab.image_mask()] += 4.0
        x[..., [self.vocab.boi_id, self.vocab.eoi_id, self.vocab.bos_id]] += 8.0
        if self.script is not None:
            x[:] = -1e4
            for b in range(B):
                h = cache.history[b]
                step = len(h) - self.prompt_len
                x[b, self.script[step] if step < len(self.script) else self.vocab.eos_id] = 0
        return x


class ByteText:
    """Text tokenizer stand-in: id 16 + b is byte b."""

    def encode(self, s):
        return [16 + b for b in s.encode("utf-8")]

    def decode_bytes(self, ids):
        return bytes(i - 16 for i in ids if 16 <= i < 16 + 256)


class FakeVQ:
    config = SimpleNamespace(has_decoder=True)

    def decode_code(self, codes):
        # an image whose pixels are the codes: lets the test check what was decoded
        c = codes.float() / N_CODES * 2 - 1  # (1, h, w)
        return c[:, None].expand(-1, 3, -1, -1)


def fake_pipe(vocab, max_seq_len=64, seed=0, script=None):
    text = ByteText()
    tok = SimpleNamespace(encode=lambda doc, bos=True, eos=False: vocab.encode_document(doc, text.encode, bos, eos))
    return SimpleNamespace(
        model=FakeModel(vocab, max_seq_len, seed, script),
        vocab=vocab,
        text=text,
        tokenizer=tok,
        vqgan=FakeVQ(),
        compiled=None,
    )


def test_decode_loop_invariants_and_events(vocab):
    """A mixed batch (with CFG rows) over random logits: every row obeys its mode, events agree."""
    pipe = fake_pipe(vocab, max_seq_len=40)
    n = vocab.tokens_per_image
    reqs = [
        Request("hello", SamplingParams(mode="text", max_new_tokens=30, seed=1, repetition_penalty=1.3, top_k=5)),
        Request("draw", SamplingParams(mode="image", cfg_scale=3.0, seed=2)),
        Request("mix", SamplingParams(mode="interleaved", max_images=3, cfg_scale=2.0, seed=3, top_p=0.5)),
        Request("mix", SamplingParams(mode="interleaved", max_images=1, cfg_scale=1.0, seed=4, temperature=0)),
        Request("a long prompt " * 2, SamplingParams(mode="interleaved", max_images=5, cfg_scale=4.0, seed=5)),
    ]
    events = list(stream_requests(pipe, reqs))
    cache = pipe.model.cache
    done = {e.row: e for e in events if isinstance(e, Done)}
    assert sorted(done) == list(range(len(reqs)))
    total_images = 0
    for i, r in enumerate(reqs):
        doc = done[i].document
        prompt_len = len(pipe.tokenizer.encode([r.prompt]))
        p = r.params
        max_new = p.max_new_tokens or (n + 2 if p.mode == "image" else 256 + p.max_images * (n + 2))
        total_images += check_generated(doc.token_ids, vocab, p.mode, p.max_images, prompt_len, 40, max_new)
        mine = [e for e in events if getattr(e, "row", None) == i]
        # streamed text between images == the document's text segments
        segs, cur = [], ""
        for e in mine:
            if isinstance(e, TextDelta):
                cur += e.text
            elif isinstance(e, ImageStart) and cur:
                segs.append(cur)
                cur = ""
            elif isinstance(e, ImageDone):
                segs.append(e.image)
        if cur:
            segs.append(cur)
        assert segs == doc.segments
        starts = [e for e in mine if isinstance(e, ImageStart)]
        progress = [e for e in mine if isinstance(e, ImageProgress)]
        assert len(starts) == len(doc.images) == len(doc.codes)
        assert [e.tokens_done for e in progress] == list(range(1, n + 1)) * len(starts)
        for img, grid in zip(doc.images, doc.codes):
            assert grid.shape == GRID
            px = np.asarray(img)[..., 0].astype(float)
            assert np.allclose(px, np.round((grid / N_CODES * 2 - 1 + 1) * 127.5), atol=1)
        assert done[i].n_generated_tokens == len(doc.token_ids)
        assert done[i].n_prompt_tokens == prompt_len
        # the conditional cache row saw the prompt then every generated token but the last
        assert cache.history[i] == pipe.tokenizer.encode([r.prompt]) + doc.token_ids[:-1]
    assert total_images >= 3
    # guidance rows: only <bos> <boi> then the codes of the last image drawn
    guide_rows = range(len(reqs), len(cache.history))
    assert len(guide_rows) == 3  # requests 1, 2 and 4 guide; request 3 has cfg 1 = off
    for g in guide_rows:
        h = cache.history[g]
        assert not h or h[:2] == [vocab.bos_id, vocab.boi_id] and all(vocab.is_image(t) for t in h[2:])
        assert len(h) <= 2 + n


def test_text_deltas_are_whole_characters(vocab):
    """Bytes of multi-byte characters arrive one token at a time; deltas never split them."""
    text = "héllo → 世界 👋!"
    script = [16 + b for b in text.encode("utf-8")]
    pipe = fake_pipe(vocab, max_seq_len=80, script=script)
    pipe.model.prompt_len = len(pipe.tokenizer.encode(["hi"]))
    events = list(stream_requests(pipe, [Request("hi", SamplingParams(max_new_tokens=60, temperature=0))]))
    deltas = [e.text for e in events if isinstance(e, TextDelta)]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    assert len(deltas) == len(text)  # one delta per character: ASCII at once, others when complete


def test_bad_options_raise_clear_errors(vocab):
    pipe = fake_pipe(vocab, max_seq_len=20)
    bad = [
        (dict(cfg_scale=-1.0), "cfg_scale must be a number in"),
        (dict(top_p=0.0), "top_p must be a number in"),
        (dict(top_p=1.5), "top_p"),
        (dict(temperature=-0.1), "temperature"),
        (dict(mode="video"), "mode must be one of text, image, interleaved, got 'video'"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
    ]
    for kwargs, message in bad:
        with pytest.raises(OptionError, match=re.escape(message)):
            SamplingParams(**kwargs)
    with pytest.raises(InterleafError, match="context"):
        stream_requests(pipe, [Request("a much longer prompt than fits")])
    with pytest.raises(InterleafError, match="image needs"):
        stream_requests(pipe, [Request("twelve chars", SamplingParams(mode="image"))])  # 13 + 8 > 20
    # a value only the model can judge is refused where the sampler meets the model
    too_few = SamplingParams(mode="image", max_new_tokens=vocab.tokens_per_image + 1)
    with pytest.raises(OptionError, match=f"max_new_tokens must be at least {vocab.tokens_per_image + 2}"):
        stream_requests(pipe, [Request("x", too_few)])


def test_render_writes_complete_files_atomically(tmp_path, vocab, monkeypatch):
    img = Image.new("RGB", (8, 8), (200, 10, 10))
    doc = Document(segments=["A red <square> & more\n", img, " the end"], prompt=["draw it"])
    out = write_documents(tmp_path / "out", [doc])
    md = out.markdown.read_text()
    assert "A red \\<square> \\& more" in md and "![image-0-0.png](image-0-0.png)" in md
    assert [p.name for p in out.images] == ["image-0-0.png"]
    assert np.array_equal(np.asarray(Image.open(out.images[0])), np.asarray(img))
    page = out.html.read_text()
    assert "&lt;square&gt; &amp; more" in page and page.count("data:image/png;base64,") == 1
    # an interrupt while writing leaves the previous files intact and no temp files
    import interleaf.sampling.render as R

    def boom(blocks):
        raise KeyboardInterrupt

    monkeypatch.setattr(R, "to_html", boom)
    with pytest.raises(KeyboardInterrupt):
        write_documents(tmp_path / "out", [Document(segments=["other"])])
    assert out.html.read_text() == page
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]


HOSTILE_MARKDOWN = (
    "# heading\n*stars* and _under_ `code` ~~struck~~ 2*3*4 snake_case\n[link](x) ![img](evil.png) <https://a.b>\n"
    "<script>alert(1)</script> &amp; &copy; \\* back\\slash\\\n1. one\n2) two\n- dash\n+ plus\n> quote\n"
    "| a | b |\n|---|---|\n---\n===\n   # indented heading\ntwo trailing spaces  \n\tby a tab\n```\n~~~\n<div>\n"
    "\n        code after a blank line?\n***\n[ref]: /url\n[ref]"
)


def commonmark_blocks(text):
    """(tag, text) per block as CommonMark (+ GFM tables, strikethrough) reads it; other syntax as <type>."""
    from markdown_it import MarkdownIt  # comes with the dev extra (transformers -> typer -> rich)

    def inline(children):
        return "".join(
            c.content
            if c.type == "text"
            else "\n"
            if c.type == "hardbreak"
            else f"<image {c.attrs['src']}>"
            if c.type == "image"
            else f"<{c.type}>"
            for c in children
        )

    blocks, tag = [], None
    for tok in MarkdownIt("commonmark").enable(["table", "strikethrough"]).parse(text):
        if tok.type == "inline":
            blocks.append((tag, inline(tok.children)))
        elif tok.type in ("paragraph_open", "heading_open"):
            tag = tok.tag
        elif not tok.type.endswith("_close"):
            blocks.append((f"<{tok.type}>", tok.content))  # a list, quote, table, rule, code or HTML block
    return blocks


def test_markdown_shows_prompt_and_text_literally(tmp_path):
    img = Image.new("RGB", (4, 4))
    doc = Document(segments=[HOSTILE_MARKDOWN, img, " after "], prompt=[HOSTILE_MARKDOWN, img])
    md = write_documents(tmp_path, [doc]).markdown.read_text()
    paragraphs = [("p", p) for p in HOSTILE_MARKDOWN.split("\n\n")]  # a blank line still splits paragraphs
    assert commonmark_blocks(md) == [
        ("h1", "interleaf"),
        ("h2", "Prompt"),
        *paragraphs,
        ("p", "<image prompt-1.png>"),
        ("h2", "Output"),
        *paragraphs,
        ("p", "<image image-0-0.png>"),
        ("p", " after "),
    ]
    assert "![prompt-1.png](prompt-1.png)" in md and "![image-0-0.png](image-0-0.png)" in md


def test_markdown_escapes_only_what_could_be_syntax():
    plain = "A red circle, 3.5 cm (50%) - left of it! 'Quotes' \"too\"? a@b.c {x} $y$ /z/ + 1 = 2 # 3"
    assert escape_markdown(plain) == plain
    assert (
        escape_markdown("# *a* _b_ `c` [d](e) <f> &g; h|i ~j~ k\\")
        == "\\# \\*a\\* \\_b\\_ \\`c\\` \\[d\\](e) \\<f> \\&g; h\\|i \\~j\\~ k\\\\"
    )
    assert (
        escape_markdown("- a\n+ b\n> c\n10. d\n2) e\n---\n===")
        == "\\- a\\\n\\+ b\\\n\\> c\\\n10\\. d\\\n2\\) e\\\n\\---\\\n\\==="
    )
    assert escape_markdown("    code\nhard  \n\tx\t\n \n\r\nend") == "&#32;   code\\\nhard &#32;\\\n&#9;x&#9;\n\n\nend"


def test_render_into_an_earlier_output_keeps_one_set_of_files(tmp_path):
    red, blue = Image.new("RGB", (8, 8), (200, 10, 10)), Image.new("RGB", (8, 8), (10, 10, 200))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "image-7-7.png").write_bytes(b"the user's own file")  # no document.md yet: kept
    write_documents(out_dir, [Document(segments=["two", red, blue]), Document(segments=["one", red])])
    assert {p.name for p in out_dir.glob("image-*")} == {
        "image-0-0.png",
        "image-0-1.png",
        "image-1-0.png",
        "image-7-7.png",
    }
    out = write_documents(out_dir, [Document(segments=["now one", blue])])  # the earlier PNGs go
    assert sorted(p.name for p in out_dir.iterdir()) == ["document.html", "document.md", "image-0-0.png"]
    assert out.images == [out_dir / "image-0-0.png"]
    assert np.array_equal(np.asarray(Image.open(out.images[0])), np.asarray(blue))


def test_written_files_get_the_usual_permissions(tmp_path):
    # a temp file is created 0600; the renamed result must not keep that
    from interleaf.utils import atomic_path, write_json

    old = os.umask(0o022)
    try:
        write_json(tmp_path / "a.json", {})
        with atomic_path(tmp_path / "b.bin") as tmp:
            tmp.write_bytes(b"x")
        write_documents(tmp_path / "out", [Document(segments=["x", Image.new("RGB", (4, 4))])])
    finally:
        os.umask(old)
    for path in [tmp_path / "a.json", tmp_path / "b.bin", *(tmp_path / "out").iterdir()]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_option_bounds():
    SamplingParams(seed=-(2**63))  # torch takes negative seeds, and so does the sampler
    SamplingParams(seed=2**64 - 1, temperature=0, image_temperature=1e-4, cfg_scale=1e3)
    for options, message in [
        (dict(seed=2**64), r"seed must be an integer in \[-2\^63, 2\^64 - 1\]"),
        (dict(temperature=float("inf")), "temperature must be a number in"),
        (dict(temperature=1e-5), r"temperature must be a number in \[0.0001, 10000\] or 0 \(greedy\), got 1e-05"),
        (dict(repetition_penalty=1e5), "repetition_penalty must be a number in"),
        (dict(image_cfg_scale=1e4), r"image_cfg_scale must be a number in \[0, 1000\]"),
        (dict(top_k=1.5), "top_k must be an integer"),
        (dict(top_k=True), "top_k must be an integer"),
        (dict(cfg_scale="strong"), "cfg_scale must be a number"),
    ]:
        with pytest.raises(OptionError, match=message):
            SamplingParams(**options)

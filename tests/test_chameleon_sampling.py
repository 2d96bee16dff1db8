"""Sampling a converted Chameleon release as Meta's sampler does (tests/chameleon_layouts.py writes it).

References are Meta's own definitions, recomputed here from the release's token names: its text,
image and special ids (`VocabInfo`: a name starting with "<", other than "<" itself, is special),
its text step (allowed ids, then transformers' repetition penalty, temperature and top-p) and its
image step (`InBatchInstructCFG` over three full passes: the whole sequence, its image tokens with
`<bos>`/`<boi>`/`<eoi>` only, and `<bos> <boi>`, then image ids only, temperature, top-p).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")

from chameleon_layouts import TEXTS, write_meta_release  # noqa: E402
from test_readme import AUTHORS_WAY, python_blocks, section  # noqa: E402
from test_serve import LiveServer, sse_events  # noqa: E402

import interleaf  # noqa: E402
from interleaf import cli  # noqa: E402
from interleaf.errors import InterleafError  # noqa: E402
from interleaf.model.args import ModelArgs  # noqa: E402
from interleaf.model.convert import CHAMELEON_SAMPLING  # noqa: E402
from interleaf.model.transformer import Transformer  # noqa: E402
from interleaf.pipeline import Interleaf  # noqa: E402
from interleaf.sampling import generate as G  # noqa: E402
from interleaf.sampling import logits as L  # noqa: E402
from interleaf.sampling.state import SequenceState  # noqa: E402
from interleaf.serve import create_app  # noqa: E402
from interleaf.tokenizer.text import train_bpe  # noqa: E402
from interleaf.tokenizer.vocab import Vocabulary  # noqa: E402

# "</" is learned as a BPE piece from these: a name Meta's rule counts as special though it is no <…> token
HTML = ("close it with </b> and </i>", "</p> ends a paragraph")
SPECIALS = ("<reserved08706>", "<reserved08707>", "<sentinel:0>", "<image>")
EOT = "<reserved08706>"
N_CODES = 64  # tokens per image: 8x8 codes


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models are all per-op overhead
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    """name -> converted model directory: "plain", "draws" (opens images by itself), "no_eot"."""
    kinds = {"plain": {}, "draws": {"boi_bias": True}, "no_eot": {"specials": ("<reserved08707>",)}}
    cache = {}

    def get(name):
        if name not in cache:
            root = tmp_path_factory.mktemp(name)
            write_meta_release(root / "src", texts=TEXTS + HTML, **{"specials": SPECIALS, **kinds[name]})
            assert cli.main(["convert", "from-meta", str(root / "src"), str(root / "out")]) == 0
            cache[name] = root / "out"
        return cache[name]

    return get


def meta_ids(out) -> tuple[set[int], set[int], set[int], dict[str, int]]:
    """(text, image, special) ids as Meta's VocabInfo takes them from the tokenizer, and its names."""
    names = json.loads((out / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"]
    image = {i for n, i in names.items() if n.startswith("IMGIMG")}
    special = {i for n, i in names.items() if n.startswith("<") and n != "<"}
    return set(names.values()) - image - special, image, special, names


def allowed(masks: torch.Tensor, row: L.Allowed) -> set[int]:
    return set(torch.nonzero(masks[row]).flatten().tolist())


# ---- text mode: every special name but the mode's own is masked ---------------------------------
def test_text_mode_allows_exactly_metas_text_ids(releases):
    out = releases("plain")
    text, image, special, names = meta_ids(out)
    pipe = interleaf.load(out)
    vocab = pipe.vocab
    masks = L.mask_table(vocab, pipe.model.args.vocab_size)
    eos, boi = names["</s>"], names["<racm3:break>"]
    assert allowed(masks, L.Allowed.TEXT) == text | {eos}
    assert allowed(masks, L.Allowed.TEXT_OR_IMAGE) == text | {eos, boi}
    # the masked named ids are exactly the special names other than the mode's own, and the image codes
    named = set(names.values())
    assert named - allowed(masks, L.Allowed.TEXT) == (special - {eos}) | image
    assert named - allowed(masks, L.Allowed.TEXT_OR_IMAGE) == (special - {eos, boi}) | image
    assert {"</", "<", EOT, "<sentinel:0>", "<reserved08707>"} <= set(names)
    assert names["</"] in special and names["<"] in text  # Meta's rule, not only <…>-shaped names
    assert len(special) >= 10 and not allowed(masks, L.Allowed.TEXT) & special - {eos}
    # ids beyond the tokenizer's names are padding: never sampled either
    assert vocab.n_text == max(named) + 1 < vocab.size and not masks[:, vocab.n_text :].any()
    # recorded compactly in vocab.json, and read back
    stored = json.loads((out / "vocab.json").read_text())
    assert len(stored["other_specials"]) < len(vocab.other_specials) and stored["specials"]["<eot>"] == names[EOT]
    assert Vocabulary.load(out).other_specials == vocab.other_specials == sorted(special - set(vocab.specials.values()))


def favour(model, ids, by: float = 40.0):
    """`model.decode` whose logits favour `ids` by `by` (adversarial logits)."""
    decode, bias = model.decode, torch.zeros(model.args.vocab_size)
    bias[sorted(ids)] = by

    def biased(*args, **kwargs):
        return decode(*args, **kwargs) + bias

    return biased


def test_no_special_id_is_ever_sampled_in_text_mode(releases, monkeypatch):
    out = releases("plain")
    text, image, special, names = meta_ids(out)
    pipe = interleaf.load(out, dtype="float32")
    eos, boi = names["</s>"], names["<racm3:break>"]
    unnamed = set(range(pipe.model.args.vocab_size)) - set(names.values())
    favoured = (special | unnamed) - {eos, boi}
    monkeypatch.setattr(pipe.model, "decode", favour(pipe.model, favoured))
    with torch.no_grad():
        first = pipe.model.decode(torch.tensor([[names["<s>"]]]), pipe.model.setup_cache(1, 4), last_only=True)[0]
    assert int(first.argmax()) in favoured  # the bias wins where nothing masks it
    for seed in range(4):
        for mode, may in (("text", {eos}), ("interleaved", {eos, boi})):
            doc = pipe.generate("the quick", mode=mode, max_new_tokens=40, seed=seed, temperature=1.0, top_p=1.0)
            drawn = doc.token_ids if mode == "text" else doc.token_ids[: (doc.token_ids + [boi]).index(boi) + 1]
            assert drawn and set(drawn) <= text | may, (mode, seed, set(drawn) - text - may)


def test_a_native_vocabulary_keeps_its_own_specials(monkeypatch):
    """Negative control: in a native vocabulary "</" is text (its specials are its 16 slots), so the
    same adversarial logits do draw it, and never a special slot."""
    torch.manual_seed(0)
    text = train_bpe(list(TEXTS + HTML) * 4, vocab_size=300, min_frequency=1)
    piece = text.token_to_id("</")
    vocab = Vocabulary.build(text.vocab_size, 16, (2, 2))
    model = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=vocab.size, multiple_of=32)).eval()
    pipe = Interleaf(model, vocab, text)
    slots = set(range(16)) - {vocab.eos_id}
    monkeypatch.setattr(model, "decode", favour(model, slots | {piece}))
    drawn = pipe.generate("close", mode="text", max_new_tokens=20, temperature=1.0, top_p=1.0).token_ids
    assert piece is not None and piece in drawn and not set(drawn) & slots
    assert vocab.other_specials == [] and vocab.eot_id == vocab.specials["<reserved_0>"]


# ---- the end of a turn ---------------------------------------------------------------------------
@pytest.fixture
def fed_prompts(monkeypatch):
    """The prompt ids the sampler encodes, call by call (CLI and server alike go through it)."""
    seen, encode = [], G.encode_prompt

    def recording(pipe, prompt):
        seen.append(encode(pipe, prompt))
        return seen[-1]

    monkeypatch.setattr(G, "encode_prompt", recording)
    return seen


def post(pipe, **fields) -> list[tuple[str, dict]]:
    import httpx

    with LiveServer(create_app(pipe, model_name="chameleon")) as live:
        with httpx.Client(base_url=live.url, timeout=30) as client:
            return list(sse_events(client.post("/api/generate", json=fields)))


def test_end_of_turn_is_reserved08706_in_python_cli_and_http(releases, fed_prompts, tmp_path):
    out = releases("plain")
    names = meta_ids(out)[3]
    pipe = interleaf.load(out)
    words = pipe.text.encode("What is it?")
    want = [names["<s>"], *words, names[EOT]]
    assert G.encode_prompt(pipe, ["What is it?", interleaf.END_OF_TURN]) == want
    doc = pipe.generate(["What is it?", interleaf.END_OF_TURN], max_new_tokens=3)
    assert doc.prompt == ["What is it?", interleaf.END_OF_TURN] and fed_prompts == [want, want]
    argv = ["generate", str(out), "--prompt", "What is it?<eot>", "--max-new-tokens", "3", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    events = post(pipe, prompt="What is it?<eot>", mode="text", max_new_tokens=3, seed=0)
    assert events[-1][0] == "done" and fed_prompts == [want] * 4
    # where an image goes, in the text of a prompt: "<image>" and "<eot>" in one parser
    Image.new("RGB", (16, 16), (200, 30, 30)).save(tmp_path / "in.png")
    argv = ["caption", str(out), str(tmp_path / "in.png"), "--prompt", "<eot>Yes.", "--max-new-tokens", "2"]
    assert cli.main(argv) == 0
    tail = [names["<eoss>"], names[EOT], *pipe.text.encode("Yes.")]
    got = fed_prompts[-1]
    assert got[:2] == [names["<s>"], names["<racm3:break>"]] and got[-len(tail) :] == tail
    assert len(got) == 2 + N_CODES + len(tail)


def test_a_vocabulary_without_an_end_of_turn_refuses_it(releases, fed_prompts, capsys, tmp_path):
    out = releases("no_eot")
    pipe = interleaf.load(out)
    message = "this model's vocabulary has no end-of-turn token"
    with pytest.raises(InterleafError, match=message):
        pipe.generate(["hi", interleaf.END_OF_TURN], max_new_tokens=2)
    capsys.readouterr()
    assert cli.main(["generate", str(out), "--prompt", "hi<eot>", "--out", str(tmp_path / "doc")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and not (tmp_path / "doc").exists()
    events = post(pipe, prompt="hi<eot>", mode="text", max_new_tokens=2)
    assert [n for n, _ in events] == ["queued", "start", "error"] and message in events[-1][1]["message"]
    assert pipe.generate("hi<eot>", max_new_tokens=2).prompt == ["hi<eot>"]  # a str in Python is text


# ---- guidance: the image-only stream sees the whole document so far -------------------------------
@pytest.fixture
def fed(monkeypatch):
    """Every forward call's feeds: {cache row: ids}."""
    calls, forward = [], G.forward_feeds

    def recording(model, cache, feeds, *rest):
        calls.append({r: list(f) for r, f in feeds.items()})
        return forward(model, cache, feeds, *rest)

    monkeypatch.setattr(G, "forward_feeds", recording)
    return calls


def image_only(seq, image, names) -> list[int]:
    """Meta's image-conditioned stream of a sequence (`_split_inputs_for_cfg`)."""
    keep = image | {names["<s>"], names["<racm3:break>"], names["<eoss>"]}
    return [t for t in seq if t in keep]


@pytest.mark.parametrize(
    "prompt_image, scales, streams",
    [
        (False, (3.0, 1.2), [1, 2]),  # the second image's context holds the first
        (True, (3.0, 1.2), [2, 2]),
        (True, (3.0, 3.0), [1, 1]),  # equal scales: plain guidance, u + s(c - u)
        (False, (3.0, 3.0), [1, 1]),
        (True, (1.0, 1.0), [0, 0]),  # no guidance
    ],
)
def test_image_only_stream_sees_the_images_so_far(releases, fed, tmp_path, prompt_image, scales, streams):
    out = releases("draws")
    text, image, special, names = meta_ids(out)
    pipe = interleaf.load(out, dtype="float32")
    picture = Image.new("RGB", (16, 16), (30, 200, 30))
    prompt = ([interleaf.Image(picture)] if prompt_image else []) + ["a red circle", interleaf.END_OF_TURN]
    cfg, image_cfg = scales
    doc = pipe.generate(prompt, mode="interleaved", max_images=2, max_new_tokens=2 * (N_CODES + 2) + 4, seed=2,
                        cfg_scale=cfg, image_cfg_scale=image_cfg)  # fmt: skip
    assert len(doc.images) == 2
    prompt_ids = fed[0][0]
    seq = prompt_ids + doc.token_ids
    bois = [len(prompt_ids) + i for i, t in enumerate(doc.token_ids) if t == names["<racm3:break>"]]
    # the call after each <boi> prefills the guidance rows (cache rows 1 and 2) with their contexts
    prefills = [calls for calls in fed if calls.get(0) == [names["<racm3:break>"]]]
    assert len(prefills) == 2 and [len(p) - 1 for p in prefills] == streams
    for at, feeds in zip(bois, prefills):
        contexts = [feeds[r] for r in sorted(feeds) if r != 0]
        if len(contexts) == 2:
            assert contexts[0] == image_only(seq[: at + 1], image, names)
        if contexts:
            assert contexts[-1] == [names["<s>"], names["<racm3:break>"]]
    if streams[1] == 2:  # the second image's image-only context holds the first image, as drawn
        first = seq[bois[0] : seq.index(names["<eoss>"], bois[0]) + 1]
        assert len(first) == N_CODES + 2 and prefills[1][1][-len(first) - 1 : -1] == first
    for feeds in fed:  # while drawing, every stream takes the same token
        assert len({tuple(f) for f in feeds.values() if len(f) == 1}) <= 1


# ---- Chameleon's sampling.yaml is Meta's sampler -------------------------------------------------
@torch.no_grad()
def metas_step(model, seq, codes, kind, sets, names, opts) -> torch.Tensor:
    """Meta's processed logits (V,) for the next token after `seq` (`codes`: of the image being drawn)."""
    from transformers import RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopPLogitsWarper

    text, image = sets

    def full(ids):
        return model(torch.tensor([ids]))[:, -1].float()  # (1, V)

    def allow_only(x, ids):
        keep = torch.full_like(x, float("-inf"))
        keep[:, sorted(ids)] = x[:, sorted(ids)]
        return keep

    ids = torch.tensor([seq])
    if kind == L.Allowed.IMAGE:
        c, ci = full(seq), full(image_only(seq, image, names))
        u = full([names["<s>"], names["<racm3:break>"], *codes])
        x = u + opts["image_cfg_scale"] * (ci - u) + opts["cfg_scale"] * (c - ci)  # InBatchInstructCFG
        x = allow_only(x, image)
        temperature, top_p = opts["image_temperature"], opts["image_top_p"]
    else:
        may = {names["</s>"]} | ({names["<racm3:break>"]} if kind == L.Allowed.TEXT_OR_IMAGE else set())
        x = allow_only(full(seq), text | may)
        x = RepetitionPenaltyLogitsProcessor(opts["repetition_penalty"])(ids, x)
        temperature, top_p = opts["temperature"], opts["top_p"]
    x = TemperatureLogitsWarper(temperature)(ids, x)
    return TopPLogitsWarper(top_p)(ids, x)[0]


@pytest.mark.parametrize("name, max_new", [("plain", N_CODES + 20), ("draws", 2 * (N_CODES + 2) + 12)])
def test_chameleon_sampling_yaml_is_metas_sampler(releases, monkeypatch, name, max_new):
    """Every step of an interleaved generation with the converted directory's sampling.yaml draws from
    exactly the distribution Meta's sampler computes from the same sequence, by full passes."""
    out = releases(name)
    text, image, special, names = meta_ids(out)
    pipe = interleaf.load(out, dtype="float32")
    assert pipe.sampling_defaults == CHAMELEON_SAMPLING
    ours, sample = [], L.sample

    def recording(logits, temperature, generators, filters=None):
        scaled = logits.float() / temperature.unsqueeze(-1)
        ours.append((L.filter_logits(scaled, filters) if filters is not None else scaled)[0])
        return sample(logits, temperature, generators, filters)

    monkeypatch.setattr(L, "sample", recording)
    prompt = [interleaf.Image(Image.new("RGB", (16, 16), (30, 30, 200))), "the quick", interleaf.END_OF_TURN]
    doc = pipe.generate(prompt, mode="interleaved", max_images=2, max_new_tokens=max_new, seed=5)
    prompt_ids = G.encode_prompt(pipe, prompt)
    state = SequenceState("interleaved", N_CODES, pipe.model.args.max_seq_len, max_new, 2, length=len(prompt_ids))
    codes, kinds = [], []
    for step, token in enumerate(doc.token_ids):
        kind = state.allowed()
        kinds.append(kind)
        got = ours[step]
        if kind == L.Allowed.EOI:  # Meta closes the image itself: only <eoss> may come
            assert torch.isfinite(got).nonzero().flatten().tolist() == [names["<eoss>"]]
        else:
            seq = prompt_ids + doc.token_ids[:step]
            want = metas_step(pipe.model, seq, codes, kind, (text, image), names, CHAMELEON_SAMPLING)
            assert torch.equal(torch.isfinite(got), torch.isfinite(want)), (step, kind)
            finite = torch.isfinite(want)
            torch.testing.assert_close(got[finite], want[finite], rtol=1e-4, atol=1e-4)
        codes = [] if state.advance(token, pipe.vocab) == "boi" else codes + [token] if state.in_image else codes
    assert len(ours) == len(doc.token_ids)
    if name == "draws":  # both images, three streams each, and text after them
        assert kinds.count(L.Allowed.IMAGE) == 2 * N_CODES and kinds[-1] == L.Allowed.TEXT
    else:  # <boi> is allowed (and penalised: the prompt holds one) while an image fits
        assert kinds.count(L.Allowed.TEXT_OR_IMAGE) >= 10
    assert np.isfinite([float(torch.logsumexp(g, 0)) for g in ours]).all()


# ---- README's "Prompting and sampling as the authors do", as written ------------------------------
def test_readme_prompting_as_the_authors_do(releases, fed_prompts, tmp_path, monkeypatch):
    """Its Python block, unchanged, with converted random releases where README's models are (on
    this machine's CPU: `device` is the one thing changed)."""
    blocks = python_blocks(section(AUTHORS_WAY))
    assert len(blocks) == 1
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "anole-7b").symlink_to(releases("draws"))
    (tmp_path / "models" / "chameleon-7b").symlink_to(releases("plain"))
    monkeypatch.chdir(tmp_path)
    load = interleaf.load
    monkeypatch.setattr(interleaf, "load", lambda directory, device, dtype: load(directory, "cpu", dtype))
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    names = meta_ids(releases("plain"))[3]
    apple, boat, seen = namespace["apple"], namespace["boat"], namespace["seen"]
    assert len(apple.images) == 1 and Image.open("apple.png").size == (16, 16) and len(boat.images) == 3
    assert [ids[-1] for ids in fed_prompts] == [names[EOT]] * 3  # every prompt ended its turn
    assert fed_prompts[2][:2] == [names["<s>"], names["<racm3:break>"]] and not seen.images

"""Parallel image decoding (`image_parallel` K > 1) in the real sampler, against sequential decoding.

Small random models, in memory: greedy codes equal the sequential ones token for token (many models,
windows, with and without guidance); sampled images follow the model's exact distribution (a tiny
model whose images are 4 codes of a 4-code book, so every image's probability is computed by full
forward passes), and a wrong acceptance rule fails the same test; the KV cache after an image
equals the sequential run's; a caption decoded beside a parallel drawing is the caption decoded
alone; ImageProgress counts every accepted code in order; bad windows are one line at the boundary.
"""

import itertools

import numpy as np
import pytest
import torch
from scipy.stats import chisquare
from test_generate import SENTENCES, run_cli

from interleaf.model.args import ModelArgs
from interleaf.model.cache import KVCache
from interleaf.model.transformer import Transformer
from interleaf.pipeline import Interleaf, save_model_dir
from interleaf.sampling import generate as G
from interleaf.sampling import logits as L
from interleaf.sampling import speculative as S
from interleaf.sampling.events import Done, ImageDone, ImageProgress, ImageStart
from interleaf.sampling.params import OptionError, SamplingParams
from interleaf.tokenizer.text import train_bpe
from interleaf.tokenizer.vocab import Vocabulary
from interleaf.tokenizer.vqgan import VQConfig, VQModel

MAX_LEN = 96
VERIFY = S.verify  # the acceptance rule itself, whatever a test puts in its place


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def text():
    return train_bpe(SENTENCES * 4, vocab_size=300, min_frequency=1)


def vqgan(resolution: int, n_codes: int, ch_mult=(1, 2)) -> VQModel:
    """A random VQ-GAN with a (resolution / 2^(len(ch_mult) - 1))^2 code grid."""
    torch.manual_seed(0)
    cfg = dict(ch=8, ch_mult=list(ch_mult), num_res_blocks=1, attn_resolutions=[], mid_attn=False, z_channels=8)
    return VQModel(VQConfig(resolution=resolution, norm_groups=4, n_embed=n_codes, embed_dim=4, **cfg))


def make_pipe(
    text, vq, seed=0, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, sharp=40.0, boi=0.0, max_len=MAX_LEN
) -> Interleaf:
    """A random Transformer over `text` + `vq`'s codes; `sharp` scales the output head (logit spread),
    `boi` > 0 makes <boi> likely in text (interleaved documents then hold images)."""
    vocab = Vocabulary.build(text.vocab_size, vq.config.n_embed, vq.grid)
    args = ModelArgs(
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        vocab_size=vocab.size,
        multiple_of=32,
        max_seq_len=max_len,
        qk_norm="layernorm",
    )
    model = Transformer(args, seed=seed).eval()
    with torch.no_grad():
        model.output.weight.mul_(sharp)  # greedy choices are not near-ties
        # a shared direction in every embedding shows up in every hidden state: align <boi> with it
        direction = torch.randn(dim, generator=torch.Generator().manual_seed(seed))
        model.tok_embeddings.weight.add_(0.01 * direction * (boi > 0))
        if boi > 0:
            model.output.weight[vocab.boi_id] = (
                boi * direction / direction.norm() * model.output.weight.norm(dim=1).mean()
            )
    return Interleaf(model, vocab, text, vq)


@pytest.fixture(scope="module")
def pipe(text):
    return make_pipe(text, vqgan(8, 48))  # 4x4 = 16 codes per image, 48 codes


def ids(doc) -> list[int]:
    return list(doc.token_ids)


class Spy:
    """Counts the model's forward passes, the drafts accepted and those rolled back out of the cache."""

    def __init__(self, monkeypatch, pipe):
        self.passes, self.accepted, self.rejected = 0, 0, 0
        decode, drop = pipe.model.decode, KVCache.drop_last

        def counted(*a, **k):
            self.passes += 1
            return decode(*a, **k)

        def dropped(cache, rows, n):
            self.rejected += n
            drop(cache, rows, n)

        def verified(p, drafts, q, generator):
            accepted, new = VERIFY(p, drafts, q, generator)
            self.accepted += accepted
            return accepted, new

        monkeypatch.setattr(pipe.model, "decode", counted)
        monkeypatch.setattr(S, "verify", verified)
        monkeypatch.setattr(KVCache, "drop_last", dropped)


# ---- greedy: the same codes, token for token ---------------------------------------------------
MODELS = [
    dict(seed=0),
    dict(seed=1, dim=32, n_layers=1, n_heads=2, n_kv_heads=1),
    dict(seed=2, dim=48, n_layers=3, n_heads=4, n_kv_heads=4),
    dict(seed=3, sharp=10.0),
]


@pytest.mark.parametrize("spec", MODELS, ids=lambda s: f"seed{s['seed']}")
def test_greedy_parallel_equals_greedy_sequential(text, monkeypatch, spec):
    p = make_pipe(text, vqgan(8, 48), **spec)
    spy = Spy(monkeypatch, p)
    for cfg, prompt in itertools.product((1.0, 3.0), ("a red circle", "two green triangles")):
        base = dict(mode="image", temperature=0, image_temperature=0, cfg_scale=cfg)
        sequential = ids(G.generate(p, prompt, **base))
        assert len(sequential) == p.vocab.tokens_per_image + 2
        for k in (2, 3, 5, 16):
            assert ids(G.generate(p, prompt, image_parallel=k, **base)) == sequential, (cfg, prompt, k)
    assert spy.rejected > 0  # windows were fed and rolled back (whole windows taken: the tests below)


def test_greedy_interleaved_with_two_images_and_text_after(text, monkeypatch):
    """Text stays one token a step, the second image guides with two streams (an image is in its
    context), and the text after the images continues from the same cache."""
    p = make_pipe(text, vqgan(8, 48), seed=1, boi=0.6)
    base = dict(mode="interleaved", temperature=0, image_temperature=0, cfg_scale=2.0, image_cfg_scale=1.5)
    base.update(max_images=2, max_new_tokens=90)
    sequential = ids(G.generate(p, "a red circle", **base))
    n = p.vocab.tokens_per_image
    assert sequential.count(p.vocab.eoi_id) == 2 and sequential[0] != p.vocab.boi_id  # text before the images
    assert len(sequential) > 2 * (n + 2) + 10  # and after them
    for k in (2, 4, 7):
        spy = Spy(monkeypatch, p)
        assert ids(G.generate(p, "a red circle", image_parallel=k, **base)) == sequential, k
        assert spy.passes < len(sequential)  # some pass took several codes
        monkeypatch.undo()


# ---- sampling: the same distribution ------------------------------------------------------------
@torch.no_grad()
def exact_images(p: Interleaf, prompt: str, cfg: float, temperature: float, top_k: int) -> dict:
    """Probability of every image (its code ids) as sequential sampling draws it, by full forward passes."""
    vocab, model = p.vocab, p.model
    cond = p.tokenizer.encode(G.prompt_segments(prompt), bos=True, eos=False) + [vocab.boi_id]
    uncond = [vocab.bos_id, vocab.boi_id]
    image = L.mask_table(vocab, model.args.vocab_size)[L.Allowed.IMAGE]
    n = vocab.tokens_per_image
    dist = {}  # prefix of codes -> (V,) distribution of the next code
    for i in range(n):
        prefixes = list(itertools.product(vocab.image_ids, repeat=i))
        x = model(torch.tensor([cond + list(c) for c in prefixes]))[:, -1]  # (P, V)
        if cfg != 1:
            u = model(torch.tensor([uncond + list(c) for c in prefixes]))[:, -1]
            x = u + cfg * (x - u)
        probs = S.token_distribution(L.apply_mask(x, image[None]), temperature, top_k, 1.0)
        dist.update(zip(prefixes, probs))
    return {
        c: float(np.prod([dist[c[:i]][c[i]] for i in range(n)])) for c in itertools.product(vocab.image_ids, repeat=n)
    }


def chi_square_p(samples: list[tuple], exact: dict) -> float:
    """p-value of the counts of `samples` against `exact`; images expected fewer than 5 times are pooled."""
    counts = {s: 0 for s in exact}
    for s in samples:
        counts[s] += 1
    assert sum(counts[s] for s in exact if exact[s] == 0) == 0, "drew an image of probability 0"
    n = len(samples)
    big = [s for s in exact if exact[s] * n >= 5]
    observed = [counts[s] for s in big] + [n - sum(counts[s] for s in big)]
    expected = np.array([exact[s] for s in big] + [1 - sum(exact[s] for s in big)]) * n
    return chisquare(observed, expected * n / expected.sum()).pvalue


def always_accept(p, drafts, q, generator):
    """A wrong rule: every draft is accepted (the codes then follow the stale drafts' q, not p)."""
    n = drafts.shape[0]
    return n, int(S.draw(p[n : n + 1], generator)[0])


def residual_is_p(p, drafts, q, generator):
    """A wrong rule: the first rejected draft is replaced by a draw from p, not from max(0, p - q)."""
    accepted, _ = VERIFY(p, drafts, q, generator)
    return accepted, int(S.draw(p[accepted : accepted + 1], generator)[0])


@pytest.mark.parametrize("cfg, top_k, wrong", [(1.0, 0, always_accept), (2.0, 3, residual_is_p)])
def test_sampled_images_follow_the_model_and_a_wrong_rule_does_not(text, monkeypatch, cfg, top_k, wrong):
    p = make_pipe(text, vqgan(4, 4), seed=1, sharp=6.0)  # 2x2 = 4 codes per image, 4 codes: 256 images
    exact = exact_images(p, "a red circle", cfg, 1.0, top_k)
    opts = dict(mode="image", image_temperature=1.0, image_top_k=top_k, cfg_scale=cfg)
    n = 1200

    def images(k: int, seed: int) -> list[tuple]:
        docs = G.generate(p, "a red circle", num=n, image_parallel=k, seed=seed, **opts)
        return [tuple(d.token_ids[1:-1]) for d in docs]

    # the pixels are not under test: skip the VQ-GAN's decoder (the codes still come out in the Document)
    monkeypatch.setattr(G, "decode_image", lambda pipe, codes: (None, np.asarray(codes)))
    assert chi_square_p(images(1, 0), exact) > 1e-3  # the test's own reference: sequential sampling
    spy = Spy(monkeypatch, p)
    assert chi_square_p(images(4, 10**6), exact) > 1e-3
    assert spy.accepted > 0 and spy.rejected > 0  # both branches of the rule were taken
    monkeypatch.setattr(S, "verify", wrong)
    assert chi_square_p(images(4, 2 * 10**6), exact) < 1e-6  # negative control: the test tells a wrong rule


# ---- the cache holds exactly the accepted sequence ----------------------------------------------
def run_keeping_cache(monkeypatch, p, prompt, **opts):
    """(Document, the KV cache at the end of the run)."""
    made = []
    setup = p.model.setup_cache

    def keep(*a, **k):
        made.append(setup(*a, **k))
        return made[-1]

    monkeypatch.setattr(p.model, "setup_cache", keep)
    doc = G.generate(p, prompt, **opts)
    monkeypatch.undo()
    return doc, made[0]


@pytest.mark.parametrize("mode", ["image", "interleaved"])
def test_cache_after_an_image_equals_the_sequential_runs(text, monkeypatch, mode):
    p = make_pipe(text, vqgan(8, 48), seed=1, boi=0.6)
    opts = dict(mode=mode, temperature=0, image_temperature=0, cfg_scale=3.0, max_new_tokens=60)
    doc_1, cache_1 = run_keeping_cache(monkeypatch, p, "a red circle", **opts)
    spy = Spy(monkeypatch, p)
    doc_k, cache_k = run_keeping_cache(monkeypatch, p, "a red circle", image_parallel=5, **opts)
    assert spy.rejected > 0  # rolled back, so the comparison covers the roll-back
    assert ids(doc_k) == ids(doc_1) and p.vocab.eoi_id in ids(doc_1)
    assert cache_k.lengths.tolist() == cache_1.lengths.tolist()
    for row, n in enumerate(cache_1.lengths.tolist()):
        assert n > 0
        torch.testing.assert_close(cache_k.k[:, row, :, :n], cache_1.k[:, row, :, :n], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(cache_k.v[:, row, :, :n], cache_1.v[:, row, :, :n], rtol=1e-4, atol=1e-5)


# ---- batches and events -------------------------------------------------------------------------
def test_a_caption_beside_a_parallel_drawing_is_the_caption_alone(pipe):
    """A text row keeps one token a step beside a row drawing windows of codes; each row's output
    (sampled, from its own seed) is what it is alone."""
    caption = G.Request("two green triangles", SamplingParams(mode="text", max_new_tokens=30, temperature=0.8, seed=3))
    drawing = G.Request("a red circle", SamplingParams(mode="image", image_parallel=4, cfg_scale=2.0, seed=5))
    together = G.collect(G.stream_requests(pipe, [caption, drawing]))
    alone = [G.collect(G.stream_requests(pipe, [r]))[0] for r in (caption, drawing)]
    assert [ids(d) for d in together] == [ids(d) for d in alone]
    assert len(ids(together[0])) == 30 and pipe.vocab.eoi_id in ids(together[1])


def test_image_progress_counts_each_accepted_code_in_order(pipe, monkeypatch):
    spy = Spy(monkeypatch, pipe)
    events = list(G.stream(pipe, "a red circle", num=2, mode="image", image_parallel=6, cfg_scale=2.0, seed=1))
    n = pipe.vocab.tokens_per_image
    assert spy.accepted > 0 and spy.passes == 3 + n - spy.accepted  # prefill, <boi>, <eoi>, the codes not accepted
    for row in (0, 1):
        mine = [e for e in events if e.row == row]
        kinds = [type(e) for e in mine]
        assert kinds == [ImageStart] + [ImageProgress] * n + [ImageDone, Done]
        progress = [e for e in mine if isinstance(e, ImageProgress)]
        assert [e.tokens_done for e in progress] == list(range(1, n + 1))
        assert all(e.tokens_total == n for e in progress)
        doc = mine[-1].document
        codes = pipe.vocab.id_to_code(np.asarray(ids(doc)[1:-1]))
        assert np.array_equal(doc.codes[0].reshape(-1), codes)


# ---- bad input ----------------------------------------------------------------------------------
def test_a_window_below_one_or_beyond_an_image_is_refused(pipe):
    with pytest.raises(OptionError, match=r"^image_parallel must be an integer in \[1, "):
        SamplingParams(image_parallel=0)
    n = pipe.vocab.tokens_per_image
    G.check_pipe(pipe, [G.Request("x", SamplingParams(mode="image", image_parallel=n))])
    with pytest.raises(OptionError, match=f"^image_parallel must be at most {n} .*, got {n + 1}$"):
        G.check_pipe(pipe, [G.Request("x", SamplingParams(mode="image", image_parallel=n + 1))])


@pytest.mark.parametrize("value, message", [("0", "--image-parallel must be an integer in [1, "),
                                            ("17", "--image-parallel must be at most 16 ")])  # fmt: skip
def test_cli_bad_window_is_one_line(pipe, tmp_path, capsys, value, message):
    model_dir = tmp_path / "model"
    save_model_dir(model_dir, pipe.model, pipe.vocab, pipe.text, pipe.vqgan)
    argv = ["draw", model_dir, "a red circle", "--image-parallel", value, "--out", tmp_path / "out"]
    code, stdout, err = run_cli(capsys, *argv)
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert stdout == "" and not (tmp_path / "out").exists()


# ---- the model's part: logits of each row's last m new tokens -----------------------------------
@torch.no_grad()
def test_decode_last_n_is_the_last_positions_of_the_full_logits(pipe):
    model = pipe.model
    tokens = torch.randint(0, model.args.vocab_size, (3, 5), generator=torch.Generator().manual_seed(0))
    n_new = torch.tensor([5, 2, 1])
    full_cache, last_cache = model.setup_cache(3, 16), model.setup_cache(3, 16)
    for cache in (full_cache, last_cache):  # rows of different lengths before the call
        model.decode(tokens[:, :3], cache, torch.tensor([3, 1, 2]))
    full = model.decode(tokens, full_cache, n_new)  # (3, 5, V)
    last = model.decode(tokens, last_cache, n_new, last_n=3)  # (3, 3, V)
    for b, n in enumerate(n_new.tolist()):
        positions = [max(0, n - 3 + i) for i in range(3)]  # a row with fewer than 3 repeats its first
        torch.testing.assert_close(last[b], full[b, positions], rtol=1e-5, atol=1e-5)


def test_eval_draws_greedily_alike_at_any_window_and_refuses_a_window_beyond_an_image(text, monkeypatch):
    """`interleaf eval image_parallel=K`: greedy drawings (text->image and story steps) score exactly
    as sequential ones, in fewer forward passes; a window beyond an image is refused before any work."""
    from interleaf import evaluate

    vq = vqgan(32, 48, ch_mult=(1, 2, 2, 2))  # the shapes world's smallest images (32 px), 4x4 codes
    pipe = make_pipe(text, vq, max_len=256)  # a story step's prompt holds an image and two sentences

    passes, decode, run, drawn = [0], pipe.model.decode, evaluate._run_requests, []

    def counted(*a, **k):
        passes[0] += 1
        return decode(*a, **k)

    def kept(*a):  # the drawings themselves, not only their scores (which a random model keeps near 0)
        docs = run(*a)
        drawn.extend(d.token_ids for d in docs)
        return docs

    monkeypatch.setattr(pipe.model, "decode", counted)
    monkeypatch.setattr(evaluate, "_run_requests", kept)
    reports = {}
    for k in (1, 4):
        passes[0], drawn = 0, []
        cfg = evaluate.EvalConfig(n_draw=4, n_caption=0, n_loss=0, n_story=2, cfg_scales=[2.0, 1.0],
                                  batch_size=2, image_temperature=0.0, image_parallel=k)  # fmt: skip
        report = evaluate.evaluate(pipe, cfg, progress=False)
        reports[k] = ({key: report[key] for key in ("text_to_image", "story")}, drawn, passes[0])
    assert len(reports[1][1]) == 4 * 2 + 2 and len(set(map(tuple, reports[1][1]))) > 1
    assert reports[4][:2] == reports[1][:2]
    assert reports[4][2] < reports[1][2]  # the window was used
    n = pipe.vocab.tokens_per_image
    monkeypatch.setattr(evaluate, "eval_vqgan", lambda *a: pytest.fail("work before the check"))
    with pytest.raises(OptionError, match=f"^image_parallel must be at most {n} "):
        evaluate.evaluate(pipe, evaluate.EvalConfig(n_draw=1, image_parallel=n + 1), progress=False)

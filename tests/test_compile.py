"""The compiled decode step (model/compiled.py) computes what eager decoding computes.

One model directory (test_generate's tiny model) is loaded twice, eager and with `compile=True`.
The step is compiled once for the whole module, with torch.compile's "aot_eager" backend: the same
capture as inductor's (Dynamo's graph, functionalised by AOTAutograd, the static shapes, the cache
written in place), without generating C++ kernels, which takes ~60 s on a loaded 2-core machine
against ~3 s. `INTERLEAF_TEST_COMPILE_BACKEND=inductor` runs the module with the backend that
`--compile` uses (it passes too); CUDA graphs need a GPU: bench/gpu.sh compares their tokens with
eager's. Every case runs at the same bucket (4 cache rows, the model's 160 slots), so that one
graph serves them all, which the tests also check: no case compiles again.
"""

import os
from dataclasses import replace
from itertools import zip_longest

import numpy as np
import pytest
import torch
from test_generate import MAX_LEN, build_model_dir
from torch._dynamo.utils import counters

import interleaf
from interleaf.cli import main
from interleaf.model.compiled import MIN_BUCKET, CompiledDecode, bucket
from interleaf.sampling import generate as G
from interleaf.sampling.params import SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")
BACKEND = os.environ.get("INTERLEAF_TEST_COMPILE_BACKEND", "aot_eager")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_model_dir(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def eager(model_dir):
    return interleaf.load(model_dir)


@pytest.fixture(scope="module")
def compiled(model_dir):
    """The compiled pipeline, its step compiled (by a first generation) before the tests run."""
    pipe = interleaf.load(model_dir, compile=True)
    assert pipe.compiled.backend == "inductor"  # what users get; the tests' backend replaces it
    pipe.compiled = CompiledDecode(pipe.model, backend=BACKEND)
    before = counters["stats"]["unique_graphs"]
    G.generate(pipe, "a red circle", mode="image", num=2, image_temperature=0, cfg_scale=3.0)
    assert counters["stats"]["unique_graphs"] == before + 1  # one graph, compiled now
    assert pipe.compiled.calls > 0
    return pipe


@pytest.fixture
def one_graph(compiled):
    """Fails the test if it compiled another graph: every case runs at the fixture's shapes."""
    before = counters["stats"]["unique_graphs"]
    yield
    assert counters["stats"]["unique_graphs"] == before


def run(pipe, requests, monkeypatch):
    """Token ids of each request and the number of decode calls of one token per row."""
    widths, forward = [], G.forward_feeds

    def recording(model, cache, feeds, *rest):
        widths.append(max(len(f) for f in feeds.values()))
        return forward(model, cache, feeds, *rest)

    monkeypatch.setattr(G, "forward_feeds", recording)
    docs = G.collect(G.stream_requests(pipe, requests))
    monkeypatch.setattr(G, "forward_feeds", forward)
    return docs, sum(w == 1 for w in widths)


CASES = {
    # a caption row beside a guided drawing (3 cache rows), prompts of different lengths, greedy
    "text+image, greedy": [
        G.Request("a red circle", SamplingParams(mode="text", temperature=0, max_new_tokens=24)),
        G.Request(
            "two green triangles next to a small yellow circle",
            SamplingParams(mode="image", image_temperature=0, cfg_scale=3.0),
        ),
    ],
    # the same with the drawing 4 codes a pass (image_parallel): its windows run eager, the rest compiled
    "text+parallel image, greedy": [
        G.Request("a red circle", SamplingParams(mode="text", temperature=0, max_new_tokens=24)),
        G.Request(
            "two green triangles next to a small yellow circle",
            SamplingParams(mode="image", image_temperature=0, cfg_scale=3.0, image_parallel=4),
        ),
    ],
    # two guided drawings (4 rows), sampled with their own seeds
    "image x2, sampled": [
        G.Request("a blue square", SamplingParams(mode="image", image_temperature=1.0, cfg_scale=2.0, seed=1)),
        G.Request(
            "the big purple square is left of the orange star",
            SamplingParams(mode="image", image_temperature=1.0, image_top_k=20, cfg_scale=2.0, seed=2),
        ),
    ],
    # documents of text and images, guided, sampled (4 rows)
    "interleaved x2, sampled": [
        G.Request(
            "a red circle above",
            SamplingParams(mode="interleaved", temperature=1.0, top_p=1.0, cfg_scale=2.0, max_new_tokens=100, seed=7),
        ),
        G.Request(
            "a tiny white circle",
            SamplingParams(mode="interleaved", temperature=1.0, top_p=0.9, cfg_scale=2.0, max_new_tokens=100, seed=8),
        ),
    ],
}


@pytest.mark.parametrize("case", list(CASES))
def test_compiled_decoding_gives_the_eager_tokens(eager, compiled, one_graph, case, monkeypatch):
    """Same tokens and images with the compiled step as eager; every one-token step ran compiled."""
    requests = CASES[case]
    want, _ = run(eager, requests, monkeypatch)
    calls = compiled.compiled.calls
    got, one_token_steps = run(compiled, requests, monkeypatch)
    assert [d.token_ids for d in got] == [d.token_ids for d in want]
    for g, w in zip(got, want):
        assert [im.tobytes() for im in g.images] == [im.tobytes() for im in w.images]
    assert one_token_steps > 10
    assert compiled.compiled.calls - calls == one_token_steps  # the prefill and <boi> contexts ran eager
    if "greedy" not in case:
        assert sum(len(d.images) for d in got) >= 2  # the comparison covered whole guided images


@torch.no_grad()
def test_compiled_step_logits_equal_eager(eager, compiled, one_graph):
    """One step at the compiled bucket, rows of different lengths and an idle row, against eager's logits."""
    step = compiled.compiled
    cache = step.setup_cache(3, 40)
    assert (cache.batch_size, cache.max_len) == (4, MAX_LEN)
    ref = eager.model.setup_cache(4, MAX_LEN)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 300, (4, 9), generator=g)
    n_prompt = torch.tensor([9, 4, 6, 0])
    for model, c in ((compiled.model, cache), (eager.model, ref)):
        model.decode(prompt, c, n_prompt, last_only=True)
    tokens, n_new = torch.tensor([[11], [22], [33], [44]]), torch.tensor([1, 1, 1, 0])
    calls = step.calls
    got = step.decode(tokens, cache, n_new, last_only=True)
    want = eager.model.decode(tokens, ref, n_new, last_only=True)
    assert step.calls == calls + 1
    torch.testing.assert_close(got[:3], want[:3], atol=1e-4, rtol=1e-5)
    assert torch.equal(cache.lengths, ref.lengths)
    # the control: another row's token changes that row's logits
    assert not torch.allclose(step.decode(tokens.flip(0), cache, n_new, last_only=True)[0], got[0])


def test_the_sampler_uses_the_compiled_steps_output(eager, compiled, monkeypatch):
    """Control: logits from the compiled step pushed toward one code change the image; so the equality
    above compares the compiled step's output, not an eager fallback's."""
    requests = CASES["image x2, sampled"]
    want, _ = run(eager, requests, monkeypatch)
    step = compiled.compiled.step
    code = int(eager.vocab.code_to_id(np.asarray([5]))[0])

    def pushed(*args):
        logits = step(*args).clone()
        logits[:, code] += 50.0
        return logits

    monkeypatch.setattr(compiled.compiled, "step", pushed)
    got, _ = run(compiled, requests, monkeypatch)
    assert [d.token_ids for d in got] != [d.token_ids for d in want]
    assert all(code in d.token_ids for d in got)


def test_interleaved_streams_each_get_their_own_cache(eager, compiled, one_graph):
    """Two generations of one compiled pipeline, advanced in turns, give what each gives alone."""
    first = CASES["image x2, sampled"]
    second = [G.Request(r.prompt, replace(r.params, seed=r.params.seed + 10)) for r in first]
    want = [G.collect(G.stream_requests(eager, reqs)) for reqs in (first, second)]
    events = [[], []]
    for pair in zip_longest(G.stream_requests(compiled, first), G.stream_requests(compiled, second)):
        for i, e in enumerate(pair):
            if e is not None:
                events[i].append(e)
    got = [G.collect(iter(e)) for e in events]
    assert [[d.token_ids for d in docs] for docs in got] == [[d.token_ids for d in docs] for docs in want]


def test_cache_buckets_are_kept_and_reused(compiled):
    """Rows and slots round up to powers of two (slots capped at the context); the same bucket reuses
    the cache, emptied; another bucket replaces it."""
    assert [bucket(n) for n in (1, 2, 3, 4, 5, 9)] == [1, 2, 4, 4, 8, 16]
    assert bucket(10, MIN_BUCKET) == MIN_BUCKET
    step = CompiledDecode(compiled.model, backend="eager")
    a = step.setup_cache(3, 20)
    a.lengths[:] = 7
    held = step.setup_cache(4, 100)  # the same bucket, while `a` is held: a generation still uses it
    assert held is not a and (held.batch_size, held.max_len) == (4, MAX_LEN)
    held.lengths[:] = 5
    kept = id(held)
    del a, held  # the generations are over
    again = step.setup_cache(4, 100)
    assert id(again) == kept and int(again.lengths.sum()) == 0
    del again
    c = step.setup_cache(5, 20)
    assert (c.batch_size, c.max_len) == (8, MAX_LEN)


@pytest.mark.parametrize("command", ["draw", "serve"])
def test_cli_compile_without_a_compiler_is_one_line(model_dir, tmp_path, monkeypatch, capsys, command):
    """--compile where torch.compile cannot build kernels (no C++ compiler for CPU) fails in one line."""
    monkeypatch.setenv("CXX", "no-such-compiler")
    argv = {
        "draw": ["draw", str(model_dir), "a red circle", "--out", str(tmp_path / "o")],
        "serve": ["serve", str(model_dir), "--port", "0"],
    }[command]
    status = main([*argv, "--compile", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert status == 2
    assert err == (
        f"interleaf {command}: error: compile: torch.compile on CPU needs a C++ compiler; "
        "'no-such-compiler' is not found (set CXX)"
    )
    assert not (tmp_path / "o").exists()

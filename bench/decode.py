"""Decoding throughput: interleaf vs transformers' Chameleon `generate` on the same weights.

One run builds a random ~30M-parameter model directory (BPE + VQ-GAN + Transformer), converts it
to a Hugging Face Chameleon directory with `interleaf.model.convert.to_hf`, and measures:

  * tokens/s of interleaf (the full streaming sampler: state machine, masks, events) and of
    `ChameleonForConditionalGeneration.generate`, greedy, batch 1 and batch 8, alternating the two
    so that load from other processes hits both alike (best of --repeats);
  * the weight-streaming bound: bytes of weights read per decoded token over the bandwidth of a
    large matrix-vector product measured in the same run, the fastest of the ways in
    `matvec_products` (a decode step of a small batch cannot beat it: every weight is read once
    per step), and the time of one such product per weight of the model, nothing else;
  * a whole image (all its tokens, classifier-free guidance on: two streams) and a whole caption;
  * with --compile, the same model decoding with its compiled one-token step as well
    (`interleaf.load(DIR, compile=True)`: static shapes, CUDA graphs on GPUs), alternating with
    eager decoding in the same run, after a check that both give the same greedy tokens; and
    the whole image with it. The first call of each shape compiles (not timed: a warm-up);
  * parallel image decoding (`image_parallel` K, speculative Jacobi decoding) on a TRAINED model:
    a small Transformer trained in this run for --image-steps steps on shapes-world caption -> image
    pairs (a random model accepts few drafts), its forward passes per image and image codes/s at
    batch 1 for each K of --windows, with and without guidance, sampled, next to the same
    one-token-per-step weight-streaming bound computed for that model's weights.

    python bench/decode.py                           # CPU, 2 threads, ~30M parameters
    python bench/decode.py --device cuda --dtype bfloat16 --tokens 256
    python bench/decode.py --device cuda --dtype bfloat16 --tokens 256 --compile --no-hf
    python bench/decode.py --only images             # the parallel-image part alone

The output head row of <eos> is zeroed so that greedy rows never stop early (both libraries then
decode exactly --tokens tokens per row). Numbers on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters

SENTENCES = [
    "a red circle above a blue square",
    "two green triangles next to a small yellow circle",
    "the big purple square is left of the orange star",
    "a tiny white circle on a black background",
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weights of both models"
    )
    p.add_argument("--threads", type=int, default=2, help="torch threads (0 = leave as is)")
    p.add_argument("--tokens", type=int, default=128, help="new tokens per row")
    p.add_argument("--prompt", type=int, default=16, help="prompt tokens")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per configuration (best is kept)")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--grid", type=int, default=16, help="image tokens per side (16 -> 256 per image)")
    p.add_argument("--no-hf", action="store_true", help="time interleaf only")
    p.add_argument("--compile", action="store_true", help="also time interleaf with its compiled decode step")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--only", choices=["text", "images"], default=None, help="run one part of the benchmark")
    p.add_argument("--windows", default="1,2,4,8,16", help="image_parallel windows K to time (1 = sequential)")
    p.add_argument("--image-steps", type=int, default=250, help="training steps of the image model")
    p.add_argument("--image-pairs", type=int, default=500, help="caption -> image pairs it is trained on")
    p.add_argument("--image-model", default=None, help="keep the trained image model here; reuse it if there")
    p.add_argument("--image-dim", type=int, default=128)
    p.add_argument("--image-layers", type=int, default=4)
    p.add_argument("--image-grid", type=int, default=8, help="image codes per side of the trained model")
    p.add_argument("--image-codes", type=int, default=128, help="codebook size of the trained model")
    p.add_argument("--image-temperature", type=float, default=1.0, help="image sampling temperature")
    return p.parse_args(argv)


# ---- the model directory ------------------------------------------------------------------------
def small_vqgan(resolution: int, width: int, n_embed: int):
    """A random VQ-GAN of the benchmark's models: 4x downsampling (ch_mult [1, 2, 2]), `width` channels."""
    from interleaf.tokenizer.vqgan import VQConfig, VQModel

    return VQModel(
        VQConfig(
            resolution=resolution,
            ch=width,
            ch_mult=[1, 2, 2],
            num_res_blocks=1,
            attn_resolutions=[],
            mid_attn=False,
            z_channels=width,
            norm_groups=width,
            n_embed=n_embed,
            embed_dim=8,
        )
    )


def build_model_dir(directory: Path, opts) -> Path:
    """Random BPE + VQ-GAN + Transformer written with save_model_dir."""
    from interleaf.model.args import ModelArgs
    from interleaf.model.transformer import Transformer
    from interleaf.pipeline import save_model_dir
    from interleaf.tokenizer.text import train_bpe
    from interleaf.tokenizer.vocab import Vocabulary

    torch.manual_seed(0)
    text = train_bpe(SENTENCES * 4, vocab_size=400, min_frequency=1)
    down = 4  # ch_mult [1, 2, 2]
    vq = small_vqgan(opts.grid * down, 32, opts.vocab - text.vocab_size)
    vocab = Vocabulary.build(text.vocab_size, vq.config.n_embed, vq.grid)
    args = ModelArgs(
        dim=opts.dim,
        n_layers=opts.layers,
        n_heads=8,
        vocab_size=vocab.size,
        multiple_of=128,
        max_seq_len=1024,
        qk_norm="layernorm",
    )
    model = Transformer(args)
    with torch.no_grad():
        model.output.weight[vocab.eos_id] = 0  # logit 0: greedy rows never stop early
    save_model_dir(directory, model, vocab, text, vq)
    return directory


def weight_bytes_per_token(model) -> int:
    """Bytes of weights a decode step reads: everything but the embedding table (one row of it)."""
    skip = model.tok_embeddings.weight
    return sum(p.numel() * p.element_size() for p in model.parameters() if p is not skip or model.args.tie_embeddings)


def matvec_products(w: torch.Tensor) -> dict:
    """y = W x for one (out, in) weight, each way a decode step could compute it (name -> callable).

    "mv": torch.mv on the (out, in) layout, what F.linear runs; "x@wt": the (in, out) layout;
    "split": the (in, out) layout cut into one slice of inputs per thread, a batched matmul,
    summed (interleaf's CPU decode path, interleaf.model.fast.FusedWeight).
    """
    out, n_in = w.shape
    k = torch.get_num_threads()
    x = torch.randn(n_in, device=w.device, dtype=w.dtype)
    wt = w.t().contiguous()
    ways = {"mv": lambda: torch.mv(w, x), "x@wt": lambda: x[None] @ wt}
    if w.device.type == "cpu" and k > 1 and n_in % k == 0:
        xs, ws = x.view(k, 1, n_in // k), wt.view(k, n_in // k, out)
        ways["split"] = lambda: torch.bmm(xs, ws).sum(0)
    return ways


def best_seconds(fn, device, reps: int) -> float:
    best = float("inf")
    for _ in range(reps + 1):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def matvec_bandwidth(device, dtype, mbytes: int = 256, reps: int = 10) -> dict:
    """Bytes/s of y = W x over a W of `mbytes` MB (larger than the caches), each way (name -> bytes/s)."""
    cols = 4096
    rows = mbytes * 2**20 // (cols * torch.tensor([], dtype=dtype).element_size())
    w = torch.randn(rows, cols, device=device, dtype=dtype)
    return {
        name: w.numel() * w.element_size() / best_seconds(fn, device, reps) for name, fn in matvec_products(w).items()
    }


def step_matrices(model) -> list[torch.Tensor]:
    """The weight matrices one decode step reads, concatenated as interleaf's inference path keeps
    them: [wq; wk; wv], wo, [w1; w3], w2 per layer, then the output head."""
    out = []
    for layer in model.layers:
        a, f = layer.attention, layer.feed_forward
        out += [
            torch.cat([a.wq.weight, a.wk.weight, a.wv.weight]),
            a.wo.weight,
            torch.cat([f.w1.weight, f.w3.weight]),
            f.w2.weight,
        ]
    return [w.detach() for w in [*out, model.output.weight]]


def matvec_step_seconds(model, reps: int = 10) -> float:
    """Best time of one matrix-vector product per weight matrix of a decode step, nothing else.

    The matrices of `step_matrices` in a step's order, each shape computed the fastest of the ways in
    `matvec_products`; ways are compared over whole sweeps, so that the weights stream from memory
    as in a step (one weight timed alone would sit in the cache).
    """
    weights = step_matrices(model)
    device = weights[0].device
    ways = [matvec_products(w) for w in weights]
    names = {tuple(w.shape): list(way) for w, way in zip(weights, ways)}
    choice = {shape: "mv" for shape in names}

    def sweep() -> float:
        fns = [way[choice[tuple(w.shape)]] for w, way in zip(weights, ways)]
        return best_seconds(lambda: [fn() for fn in fns], device, reps)

    best = sweep()
    for shape, candidates in names.items():  # one shape at a time, the others as chosen so far
        for name in candidates:
            kept, choice[shape] = choice[shape], name
            t = sweep()
            if t < best:
                best = t
            else:
                choice[shape] = kept
    return best


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# ---- runners -------------------------------------------------------------------------------------
def interleaf_runner(pipe, prompt: str, batch: int, n_tokens: int):
    """Greedy text generation of n_tokens per row through the streaming sampler."""
    from interleaf.sampling.events import Done
    from interleaf.sampling.generate import Request, stream_requests
    from interleaf.sampling.params import SamplingParams

    def run() -> int:
        params = [SamplingParams(mode="text", max_new_tokens=n_tokens, temperature=0, seed=i) for i in range(batch)]
        reqs = [Request(prompt, p) for p in params]
        return sum(e.n_generated_tokens for e in stream_requests(pipe, reqs) if isinstance(e, Done))

    return run


def hf_runner(hf, pipe, prompt: str, batch: int, n_tokens: int, device):
    """transformers' generate on the same ids, greedy, exactly n_tokens per row."""
    ids = torch.tensor([[pipe.vocab.bos_id] + pipe.text.encode(prompt)] * batch, device=device)

    def run() -> int:
        with torch.no_grad():
            out = hf.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n_tokens,
                min_new_tokens=n_tokens,
                do_sample=False,
                pad_token_id=pipe.vocab.pad_id,
            )
        return (out.shape[1] - ids.shape[1]) * out.shape[0]

    return run


def time_alternating(runners: dict, repeats: int, device) -> dict:
    """Run each runner `repeats` times, alternating; seconds and tokens of every run."""
    for fn in runners.values():  # warm-up
        fn()
    runs = {name: [] for name in runners}
    for _ in range(repeats):
        for name, fn in runners.items():
            sync(device)
            t = time.perf_counter()
            n = fn()
            sync(device)
            runs[name].append((time.perf_counter() - t, n))
    return runs


def prompt_text(pipe, length: int) -> str:
    """A text whose prompt (<bos> + text) is about `length` ids."""
    words = " ".join(SENTENCES).split()
    text = ""
    for w in words * 8:
        if 1 + len(pipe.text.encode(text + " " + w)) > length:
            break
        text = (text + " " + w).strip()
    return text


def agreeing_greedy_tokens(pipe, compiled, prompt: str, batch: int, n_tokens: int) -> int:
    """Tokens that eager and compiled greedy decoding draw alike before a row's first difference (the
    fewest over the rows): all of them in float32; half precision rounds differently in fused kernels,
    and a near-tie may then go the other way."""
    from interleaf.sampling.generate import Request, collect, stream_requests
    from interleaf.sampling.params import SamplingParams

    reqs = [
        Request(prompt, SamplingParams(mode="text", max_new_tokens=n_tokens, temperature=0, seed=i))
        for i in range(batch)
    ]
    eager, fast = ([d.token_ids for d in collect(stream_requests(p, reqs))] for p in (pipe, compiled))
    same = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), min(len(x), len(y))) for x, y in zip(eager, fast)]
    return min(same)


def time_image_and_caption(pipe, repeats: int, names=("image", "caption")) -> dict:
    """Seconds for a whole image (CFG 3, sampled) and a whole caption (32 tokens, greedy)."""
    from interleaf.sampling.events import Done, ImageDone

    out = {}
    image = None
    for name in names:
        best = float("inf")
        for r in range(repeats):
            t = time.perf_counter()
            if name == "image":
                events = list(pipe.stream("a red circle", mode="image", cfg_scale=3.0, seed=r))
                image = next(e.image for e in events if isinstance(e, ImageDone))
            else:
                events = list(pipe.stream([image], mode="text", max_new_tokens=32, temperature=0))
            best = min(best, time.perf_counter() - t)
            done = next(e for e in events if isinstance(e, Done))
        out[name] = {"seconds": best, "tokens": done.n_generated_tokens, "prompt_tokens": done.n_prompt_tokens}
    return out


# ---- parallel image decoding on a trained model --------------------------------------------------
def held_out_caption(opts) -> str:
    """A caption of the shapes world that the image model was not trained on."""
    from interleaf.data.shapes import ShapesWorld

    return ShapesWorld(resolution=opts.image_grid * 4, max_shapes=3, seed=0).pair(10**6)[1]


def train_image_model(directory: Path, opts) -> float:
    """Write a small model trained in this run on shapes-world caption -> image pairs to `directory`;
    return the last steps' mean loss. The VQ-GAN is random: it still gives the images' structure as
    codes (a flat background is one code), which is what drafts are accepted on."""
    from interleaf.data.shapes import ShapesWorld
    from interleaf.model.args import ModelArgs
    from interleaf.model.transformer import Transformer
    from interleaf.pipeline import save_model_dir
    from interleaf.tokenizer.multimodal import MultimodalTokenizer
    from interleaf.tokenizer.text import train_bpe
    from interleaf.tokenizer.vocab import Vocabulary

    start = time.perf_counter()
    torch.manual_seed(0)
    world = ShapesWorld(resolution=opts.image_grid * 4, max_shapes=3, seed=0)
    pairs = [world.pair(i) for i in range(opts.image_pairs)]
    text = train_bpe([c for _, c, _ in pairs], vocab_size=400, min_frequency=1)
    vq = small_vqgan(opts.image_grid * 4, 16, opts.image_codes)
    vocab = Vocabulary.build(text.vocab_size, vq.config.n_embed, vq.grid)
    tokenizer = MultimodalTokenizer(vocab, text, vq)
    with torch.no_grad():
        codes = tokenizer.encode_images([image for image, _, _ in pairs])  # batched through the VQ-GAN
    seqs = [tokenizer.encode([caption, c]) for (_, caption, _), c in zip(pairs, codes)]
    args = ModelArgs(
        dim=opts.image_dim,
        n_layers=opts.image_layers,
        n_heads=max(1, opts.image_dim // 64),
        vocab_size=vocab.size,
        multiple_of=64,
        max_seq_len=max(len(s) for s in seqs) + 64,
        qk_norm="layernorm",
    )
    print(f"image model data: {len(seqs)} pairs of up to {max(len(s) for s in seqs)} tokens, "
          f"{time.perf_counter() - start:.0f} s", flush=True)  # fmt: skip
    model = Transformer(args, seed=0).train()
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
    warmup, batch, losses = 30, 16, []
    g = torch.Generator().manual_seed(0)
    for step in range(opts.image_steps):
        for group in optim.param_groups:  # linear warm-up, then cosine to a tenth
            t = max(0.0, (step - warmup) / max(1, opts.image_steps - warmup))
            group["lr"] = 3e-3 * min(1.0, (step + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * t)))
        rows = [seqs[i] for i in torch.randint(len(seqs), (batch,), generator=g).tolist()]
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [vocab.pad_id] * (width - len(r)) for r in rows])  # (B, T)
        targets = torch.tensor([r[1:] + [-100] * (width - len(r) + 1) for r in rows])
        loss = model.loss(ids, targets).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        optim.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % 50 == 0:
            print(f"  step {step + 1}: loss {statistics.mean(losses[-50:]):.2f}", flush=True)
    model.eval()
    save_model_dir(directory, model, vocab, text, vq)
    return statistics.mean(losses[-20:])


def time_parallel_images(pipe, prompt: str, windows: list[int], cfgs: list[float], repeats: int, temperature: float):
    """Per guidance scale and window K: forward passes per image and image codes/s at batch 1 (whole
    images, sampled, seeds 0..repeats-1; the windows alternate so that load hits all alike)."""
    from interleaf.sampling.events import ImageDone

    decode, passes = pipe.model.decode, [0]

    def counted(*a, **k):
        passes[0] += 1
        return decode(*a, **k)

    pipe.model.decode = counted
    n = pipe.vocab.tokens_per_image
    out = {}
    try:
        for cfg in cfgs:
            runs = {k: [] for k in windows}
            for r in range(-1, repeats):  # r = -1: warm-up
                for k in windows:
                    passes[0] = 0
                    t = time.perf_counter()
                    events = pipe.stream(prompt, mode="image", image_parallel=k, cfg_scale=cfg,
                                         image_temperature=temperature, seed=max(r, 0))  # fmt: skip
                    assert sum(isinstance(e, ImageDone) for e in events) == 1
                    if r >= 0:
                        runs[k].append((time.perf_counter() - t, passes[0]))
            out[cfg] = {
                k: {
                    "passes_per_image": statistics.mean(p for _, p in rs),
                    "codes_per_s": n * len(rs) / sum(s for s, _ in rs),
                }
                for k, rs in runs.items()
            }
    finally:
        del pipe.model.decode  # the instance attribute: the class's method again
    return out


def run_parallel_images(opts, device, dtype, bandwidths: dict, results: dict) -> None:
    """Train the image model, time its images for every window, print them next to its bound."""
    import interleaf
    from interleaf.model.args import count_params

    t = time.perf_counter()
    directory = Path(opts.image_model or tempfile.mkdtemp(prefix="interleaf-bench-img-")) / "model"
    if (directory / "model.yaml").exists():
        how = f"reused from {directory}"
    else:
        loss = train_image_model(directory, opts)
        seconds = time.perf_counter() - t
        how = f"trained {opts.image_steps} steps on shapes-world pairs in {seconds:.0f} s (loss {loss:.2f})"
    prompt = held_out_caption(opts)
    pipe = interleaf.load(directory, device=device, dtype=dtype)
    args, n = pipe.model.args, pipe.vocab.tokens_per_image
    print(
        f"image model: {count_params(args) / 1e6:.1f}M params (dim {args.dim}, {args.n_layers} layers, "
        f"vocab {args.vocab_size}), {n} codes per image, {how}; drawing {prompt!r}, image temperature "
        f"{opts.image_temperature:g}"
    )
    windows = [int(k) for k in opts.windows.split(",")]
    timed = time_parallel_images(pipe, prompt, windows, [1.0, 3.0], opts.repeats, opts.image_temperature)
    bandwidths = {name: max(r, bandwidths.get(name, 0.0)) for name, r in matvec_bandwidth(device, dtype).items()}
    bound = max(bandwidths.values()) / weight_bytes_per_token(pipe.model)
    summary = {"bound_codes_per_s": bound, "params": count_params(args), "codes_per_image": n, "by_cfg": {}}
    for cfg, by_k in timed.items():
        best = max(by_k, key=lambda k: by_k[k]["codes_per_s"])
        one = by_k[windows[0]] if 1 not in by_k else by_k[1]
        guidance = f"CFG {cfg:g} (2 streams)" if cfg != 1 else "no guidance"
        for k, m in by_k.items():
            print(
                f"  {guidance}, K={k:2d}: {m['passes_per_image']:6.1f} forward passes per image, "
                f"{m['codes_per_s']:7.1f} image codes/s = {m['codes_per_s'] / bound:.3f}x the bound"
            )
        fewer = one["passes_per_image"] / by_k[best]["passes_per_image"]
        speed = by_k[best]["codes_per_s"] / one["codes_per_s"]
        fraction = by_k[best]["codes_per_s"] / bound
        print(
            f"  {guidance}: best K={best}: {fewer:.2f}x fewer passes per image, {speed:.2f}x the codes/s of K=1, "
            f"{fraction:.3f}x the one-token-per-step bound ({bound:.1f} codes/s)"
        )
        summary["by_cfg"][cfg] = dict(windows=by_k, best=best, fewer_passes=fewer, speedup=speed, fraction=fraction)
    results["parallel_images"] = summary


def main(argv=None) -> int:
    opts = parse_args(argv)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    import interleaf
    from interleaf.model.args import count_params
    from interleaf.pipeline import Interleaf

    device, dtype = torch.device(opts.device), getattr(torch, opts.dtype)
    if opts.only == "images":
        results = {"device": str(device), "threads": torch.get_num_threads()}
        print(f"device {device} ({torch.get_num_threads()} threads), {opts.dtype}")
        run_parallel_images(opts, device, dtype, matvec_bandwidth(device, dtype), results)
        write_results(opts, results)
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="interleaf-bench-"))
    model_dir = build_model_dir(tmp / "model", opts)
    pipe = interleaf.load(model_dir, device=device, dtype=dtype)
    hf = None
    if not opts.no_hf:
        from transformers import ChameleonForConditionalGeneration

        from interleaf.model.convert import to_hf

        to_hf(model_dir, tmp / "hf")
        hf = (
            ChameleonForConditionalGeneration.from_pretrained(tmp / "hf", dtype=dtype, attn_implementation="sdpa")
            .to(device)
            .eval()
        )
        check_same_function(pipe, hf, device)
    compiled = None
    if opts.compile:  # the same model, decoding with the compiled step
        compiled = Interleaf(pipe.model, pipe.vocab, pipe.text, pipe.vqgan, compile=True)

    bytes_per_token = weight_bytes_per_token(pipe.model)
    bandwidths = matvec_bandwidth(device, dtype)
    step = matvec_step_seconds(pipe.model)
    args = pipe.model.args
    print(
        f"device {device} ({torch.get_num_threads()} threads), {opts.dtype}; "
        f"model {count_params(args) / 1e6:.1f}M params "
        f"(dim {args.dim}, {args.n_layers} layers, vocab {args.vocab_size}); prompt {opts.prompt}, "
        f"{opts.tokens} new tokens per row, greedy"
    )
    results = {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "params": count_params(args),
        "weight_bytes_per_token": bytes_per_token,
        "tokens_per_row": opts.tokens,
        "batches": {},
    }
    for batch in [int(b) for b in opts.batches.split(",")]:
        prompt = prompt_text(pipe, opts.prompt)  # the same prompt in every row
        runners = {"interleaf": interleaf_runner(pipe, prompt, batch, opts.tokens)}
        if compiled is not None:
            t = time.perf_counter()
            same = agreeing_greedy_tokens(pipe, compiled, prompt, batch, opts.tokens)  # compiles this batch's step
            print(
                f"batch {batch}: compiled step ready in {time.perf_counter() - t:.1f} s; greedy tokens as eager's: "
                f"{same} of {opts.tokens} before a row's first difference"
            )
            if same < opts.tokens and dtype == torch.float32:
                raise SystemExit("in float32 the compiled step must draw the tokens eager decoding draws")
            runners["interleaf compiled"] = interleaf_runner(compiled, prompt, batch, opts.tokens)
        if hf is not None:
            runners["transformers"] = hf_runner(hf, pipe, prompt, batch, opts.tokens, device)
        runs = time_alternating(runners, opts.repeats, device)
        bandwidths = {name: max(r, bandwidths[name]) for name, r in matvec_bandwidth(device, dtype).items()}
        rates = {name: max(n / s for s, n in rs) for name, rs in runs.items()}
        results["batches"][batch] = {
            "tokens_per_s": rates,
            "median_tokens_per_s": {k: statistics.median(n / s for s, n in rs) for k, rs in runs.items()},
        }
        line = f"batch {batch}: " + ", ".join(f"{k} {v:8.1f} tokens/s" for k, v in rates.items())
        if "transformers" in rates:
            line += f"  ({rates['interleaf'] / rates['transformers']:.2f}x transformers)"
        if "interleaf compiled" in rates:
            line += f"  (compiled {rates['interleaf compiled'] / rates['interleaf']:.2f}x eager)"
        print(line)
        step = min(step, matvec_step_seconds(pipe.model))
    way = max(bandwidths, key=bandwidths.get)
    bandwidth = bandwidths[way]
    bound = bandwidth / bytes_per_token
    results.update(
        matvec_gb_per_s={name: r / 1e9 for name, r in bandwidths.items()},
        bound_tokens_per_s=bound,
        matvec_step_tokens_per_s=1 / step,
    )
    print(
        "matrix-vector bandwidth, 256 MB weight: " + ", ".join(f"{n} {r / 1e9:.1f} GB/s" for n, r in bandwidths.items())
    )
    print(
        f"weight streaming: {bytes_per_token / 1e6:.1f} MB of weights per step / {bandwidth / 1e9:.1f} GB/s "
        f"({way}, best in this run) = {bound:.1f} steps/s bound"
    )
    print(
        f"one matrix-vector product per weight matrix of a step (its shapes, fastest way, best in this run): "
        f"{step * 1e3:.1f} ms = {1 / step:.1f} steps/s"
    )
    b1 = results["batches"].get(1)
    if b1:
        frac = b1["tokens_per_s"]["interleaf"] / bound
        results["batch1_fraction_of_bound"] = frac
        print(f"batch 1: interleaf at {100 * frac:.0f}% of the weight-streaming bound")
    whole = time_image_and_caption(pipe, max(1, opts.repeats - 1))
    results["whole"] = whole
    n = pipe.vocab.tokens_per_image
    print(
        f"whole image ({n} tokens + <boi>/<eoi>, CFG 3 = 2 streams, sampled): {whole['image']['seconds']:.2f} s; "
        f"whole caption (image prompt of {whole['caption']['prompt_tokens']} tokens, "
        f"{whole['caption']['tokens']} tokens, greedy): {whole['caption']['seconds']:.2f} s"
    )
    if compiled is not None:
        time_image_and_caption(compiled, 1, ("image",))  # compiles the image's shape (2 rows)
        image = time_image_and_caption(compiled, max(1, opts.repeats - 1), ("image",))["image"]
        results["whole_compiled"] = {"image": image, "compiled_steps": compiled.compiled.calls}
        print(
            f"whole image, compiled step: {image['seconds']:.2f} s "
            f"({whole['image']['seconds'] / image['seconds']:.2f}x eager); "
            f"CUDA graph skips: {dict(counters['inductor']).get('cudagraph_skips', 0)}"
        )
    if opts.only is None:
        run_parallel_images(opts, device, dtype, bandwidths, results)
    write_results(opts, results)
    return 0


def write_results(opts, results: dict) -> None:
    if opts.json:
        from interleaf.utils import write_json

        write_json(opts.json, results)


@torch.no_grad()
def check_same_function(pipe, hf, device) -> None:
    """Stop if the converted model does not compute the same logits (the comparison would be moot)."""
    ids = torch.tensor([[pipe.vocab.bos_id] + pipe.text.encode(SENTENCES[0])], device=device)
    ours = pipe.model(ids)
    theirs = hf(input_ids=ids).logits.float()
    text = pipe.vocab.text_mask().to(device)  # transformers masks the image ids of its logits
    diff = (ours[..., : text.numel()][..., text] - theirs[..., : text.numel()][..., text]).abs().max().item()
    half = pipe.model.tok_embeddings.weight.dtype != torch.float32
    if diff > (0.25 if half else 1e-3):  # half precision: both round differently
        raise SystemExit(f"converted model differs from interleaf's: max |logit diff| = {diff:.2e}")
    print(f"same weights: max |logit difference| interleaf vs transformers = {diff:.1e}")


if __name__ == "__main__":
    sys.exit(main())

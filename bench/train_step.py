"""Training-step throughput: interleaf vs transformers' Chameleon on the same config, and MFU.

One run builds both models with the same weights (interleaf's, converted; the first losses are
printed side by side as a check that they compute the same function), then times full training
steps (forward, backward, AdamW) in rounds: one matmul-peak sample, one interleaf step, one
transformers step. Alternating spreads load from other processes over all three alike.

    python bench/train_step.py                 # CPU: ~31M parameters, 2 x 512 tokens, fp32
    python bench/train_step.py --compile       # both models with torch.compile'd decoder layers
    python bench/train_step.py --device cuda --dtype bfloat16 --backend xformers --preset 350M --batch 8 \
        --seq 2048 --peak-tflops 989                # MFU against an H100/H200 SXM's dense bf16 peak

Printed: tokens/s of both (median step), their ratio, interleaf's achieved GFLOP/s and its share
of the matmul peak (best n^3 matmul of the run: 2048 on CPU, 8192 on CUDA), and with
--peak-tflops the MFU against that datasheet number. FLOPs per token are
`interleaf.model.args.flops_per_token` (2 per weight, causal attention counted as T/2 keys,
training = 3x forward); "palm" adds the share under PaLM's 6N + 12 L T D convention (attention
not halved). "best step" uses the fastest step instead of the median: less sensitive to other
processes on a shared machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument(
        "--backend", default="auto", choices=["auto", "sdpa", "xformers"], help="interleaf attention backend"
    )
    p.add_argument("--preset", default="bench-30M", help="bench-30M or a named size (interleaf info lists them)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=6, help="timed rounds")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--compile", action="store_true", help="torch.compile each decoder layer of both models")
    p.add_argument("--no-hf", action="store_true", help="time interleaf only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--matmul-size", type=int, default=0, help="n of the n^3 peak matmul (0: 2048 on CPU, 8192 on CUDA)")
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="also print MFU against this datasheet peak (H100/H200 SXM, dense bf16: 989)",
    )
    return p.parse_args(argv)


def model_args(preset: str, seq: int, backend: str):
    from interleaf.model.args import ModelArgs

    common = dict(max_seq_len=max(seq, 512), attention=backend)
    if preset == "bench-30M":  # 31.5M parameters, Chameleon recipe (per-head LayerNorm QK-norm)
        return ModelArgs(dim=768, n_layers=4, n_heads=12, vocab_size=2048, qk_norm="layernorm", **common)
    return ModelArgs.from_name(preset, **common)


def hf_model(args, device, dtype):
    """transformers' ChameleonForConditionalGeneration computing the same function as Transformer(args)."""
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    vq = dict(
        embed_dim=8,
        num_embeddings=64,
        latent_channels=8,
        resolution=16,
        base_channels=32,
        channel_multiplier=[1, 2],
        num_res_blocks=1,
    )  # tiny: never run
    cfg = ChameleonConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.dim,
        intermediate_size=args.ffn_hidden,
        num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads,
        num_key_value_heads=args.n_kv_heads,
        max_position_embeddings=args.max_seq_len,
        rms_norm_eps=args.norm_eps,
        rope_theta=args.rope_theta,
        swin_norm=args.norm_order == "swin",
        vq_config=vq,
        vocabulary_map={"<image>": 3},
        tie_word_embeddings=args.tie_embeddings,
    )
    with torch.device(device):
        model = ChameleonForConditionalGeneration._from_config(cfg, attn_implementation="sdpa", dtype=dtype)
    return model


def copy_weights(model, hf) -> None:
    """Give the transformers model interleaf's weights (HF names, HF RoPE layout)."""
    from interleaf.model.convert import state_dict_to_hf

    missing, unexpected = hf.load_state_dict(state_dict_to_hf(model.state_dict(), model.args), strict=False)
    missing = [k for k in missing if ".vqmodel." not in k]
    if missing or unexpected:
        raise RuntimeError(f"weights do not line up: missing {missing[:3]}, unexpected {unexpected[:3]}")


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    sync(device)
    t, c = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - t, time.process_time() - c


def matmul_rates(a, b, device) -> tuple[float, float]:
    """GFLOP/s of one n x n x n matmul per wall second and per CPU second."""
    wall, cpu = timed(lambda: torch.mm(a, b), device)
    flops = 2 * a.shape[0] ** 3 / 1e9
    return flops / wall, flops / max(cpu, 1e-9)


def optimizer(params, device):
    params = [p for p in params if p.requires_grad]
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, fused=torch.device(device).type in ("cpu", "cuda"))


def interleaf_step(model, opt, x, y):
    def step():
        model.loss(x, y).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def hf_step(model, opt, x):
    def step():
        model(input_ids=x, labels=x).loss.backward()  # transformers shifts the labels itself
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def first_losses(model, hf, x, y) -> tuple[float, float]:
    """Cross-entropy of both models on the benchmark batch, before any step."""
    with torch.no_grad():
        ours = float(model.loss(x, y).ce)
        theirs = float(hf(input_ids=x, labels=x).loss) if hf is not None else float("nan")
    return ours, theirs


def run_rounds(steps: dict, n: int, warmup: int, device, dtype, size: int) -> tuple[dict, list]:
    """Warm up, then n rounds of (matmul samples, one step of each model).

    Returns per model a list of (wall, cpu) seconds per step, and per round the best matmul
    (wall GFLOP/s, cpu GFLOP/s).
    """
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(warmup):
        matmul_rates(a, b, device)
        for fn in steps.values():
            fn()
    times, peaks = {name: [] for name in steps}, []
    for _ in range(n):
        rates = [matmul_rates(a, b, device) for _ in range(2)]
        peaks.append((max(r[0] for r in rates), max(r[1] for r in rates)))
        for name, fn in steps.items():
            times[name].append(timed(fn, device))
    return times, peaks


def main(argv=None) -> int:
    opts = parse_args(argv)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    from interleaf.model.args import count_params, flops_per_token
    from interleaf.model.transformer import Transformer

    device, dtype = torch.device(opts.device), getattr(torch, opts.dtype)
    args = model_args(opts.preset, opts.seq, opts.backend)
    torch.manual_seed(opts.seed)
    model = Transformer(args).to(device=device, dtype=dtype).train()
    tokens = torch.randint(0, args.vocab_size, (opts.batch, opts.seq + 1), device=device)
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    y[:, -1] = -100  # transformers predicts T - 1 tokens per row from T inputs: the same targets
    hf = None
    if not opts.no_hf:
        hf = hf_model(args, device, dtype).train()
        copy_weights(model, hf)
    ours, theirs = first_losses(model, hf, x, y)
    if opts.compile:
        for layer in model.layers:
            layer.compile()
        if hf is not None:
            for layer in hf.model.layers:
                layer.compile()
    steps = {"interleaf": interleaf_step(model, optimizer(model.parameters(), device), x, y)}
    if hf is not None:
        params = [p for n, p in hf.named_parameters() if ".vqmodel." not in n]
        steps["transformers"] = hf_step(hf, optimizer(params, device), x)

    size = opts.matmul_size or (8192 if device.type == "cuda" else 2048)
    times, peaks = run_rounds(steps, opts.steps, opts.warmup + (1 if opts.compile else 0), device, dtype, size)
    peak, cpu_peak = max(p[0] for p in peaks), statistics.median(p[1] for p in peaks)
    n_tok = opts.batch * opts.seq
    fpt = flops_per_token(args, opts.seq)
    palm = fpt + 3 * args.n_layers * 2 * args.dim * opts.seq  # attention over all T keys, not T/2
    print(
        f"device {device} ({torch.get_num_threads()} threads), dtype {opts.dtype}, attention {model.backend(device)}"
        f"{', compiled layers' if opts.compile else ''}; model {opts.preset}: {count_params(args) / 1e6:.1f}M "
        f"parameters, batch {opts.batch} x {opts.seq}"
    )
    print(f"same function: first-step cross-entropy interleaf {ours:.6f}, transformers {theirs:.6f}")
    print(
        f"matmul peak (best {size}^3 of {len(peaks)} rounds): {peak:.1f} GFLOP/s "
        f"(median {statistics.median(p[0] for p in peaks):.1f}); model FLOPs per token (training): {fpt / 1e6:.1f}M"
    )
    rate, cpu_share = {}, {}
    for name, ts in times.items():
        walls = [t[0] for t in ts]
        med, best = statistics.median(walls), min(walls)
        cpu_share[name] = fpt * n_tok / statistics.median(t[1] for t in ts) / 1e9 / cpu_peak
        rate[name] = n_tok / med
        gflops = fpt * n_tok / med / 1e9
        print(
            f"{name:>12}: {med * 1e3:8.1f} ms/step (best {best * 1e3:.1f})  {rate[name]:7.0f} tokens/s  "
            f"{gflops:6.1f} GFLOP/s = {100 * gflops / peak:4.1f}% of peak (best step "
            f"{100 * fpt * n_tok / best / 1e9 / peak:4.1f}%, palm {100 * palm * n_tok / best / 1e9 / peak:4.1f}%)"
        )
    print(
        "per CPU-second (FLOPs per process CPU second vs the matmul's; robust to time-slicing with --threads 1): "
        + ", ".join(f"{name} {100 * v:.1f}%" for name, v in cpu_share.items())
    )
    if opts.peak_tflops:
        print(
            f"MFU against {opts.peak_tflops:g} TFLOP/s: "
            + ", ".join(
                f"{name} {100 * fpt * r / 1e12 / opts.peak_tflops:.1f}% "
                f"(palm {100 * palm * r / 1e12 / opts.peak_tflops:.1f}%)"
                for name, r in rate.items()
            )
        )
    if "transformers" in rate:
        print(f"interleaf / transformers: {rate['interleaf'] / rate['transformers']:.2f}x tokens/s")
    return 0


if __name__ == "__main__":
    from interleaf.errors import InterleafError

    try:
        sys.exit(main())
    except InterleafError as e:  # a config this machine cannot run (xformers on CPU, say): one line
        sys.exit(f"train_step: {e}")

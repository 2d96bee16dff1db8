"""Loader throughput on one CPU core vs the tokens a training step of the tiny model consumes.

The data mimics the tokenized shapes world the `shapes-tiny` config trains on: caption/image
pairs (about 15 text tokens + an 8x8 image = 66 image tokens), interleaved documents (2-4 images
with sentences between) and text-only documents, as token shards of 1,000 documents. The loader
runs exactly as in training (infinite resampled stream, shuffle buffer of 1,000, two-source
mixture with a stage schedule, pair flipping, packing) in this process, pinned to one core, with
the row length and batch sizes of configs/train/shapes-tiny.yaml. The step is a forward +
backward + AdamW step of that config's model on one micro-batch in plain torch on --device
(DeepSpeed only adds work on top).

    python bench/loader.py                      # CPU step
    python bench/loader.py --device cuda        # GPU step (bf16 autocast)

The loader must deliver >= 10x what the step consumes; the script exits 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--seconds", type=float, default=10.0, help="time spent measuring the loader")
    p.add_argument("--steps", type=int, default=5, help="timed training steps")
    p.add_argument("--docs", type=int, default=8000, help="documents in the synthetic shards")
    p.add_argument("--workers", type=int, default=0, help="also measure with DataLoader workers (0: skip)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    return p.parse_args(argv)


def shapes_like_shards(out: Path, vocab, n_docs: int, seed: int) -> None:
    """Token shards with the shapes world's document mix and lengths."""
    from interleaf.training.shards import ShardWriter
    from interleaf.training.tokenize import IMAGE, TEXT, TokenDoc

    rng = np.random.default_rng(seed)

    def text(n):
        return rng.integers(16, vocab.n_text, n).tolist()

    def image():
        return [
            vocab.boi_id,
            *vocab.code_to_id(rng.integers(0, vocab.n_codes, vocab.tokens_per_image)).tolist(),
            vocab.eoi_id,
        ]

    w = ShardWriter(out, "bench", max_count=1000)
    for i in range(n_docs):
        kind = i % 3
        parts = (
            [text(int(rng.integers(8, 22))), image()]
            if kind == 0
            else [p for _ in range(int(rng.integers(2, 5))) for p in (text(int(rng.integers(8, 22))), image())]
            if kind == 1
            else [text(int(rng.integers(30, 120)))]
        )
        ids, segs = [vocab.bos_id], []
        for seg in parts:
            segs.append((IMAGE if seg[0] == vocab.boi_id else TEXT, len(ids), len(ids) + len(seg)))
            ids.extend(seg)
        ids.append(vocab.eos_id)
        w.write(f"d{i:07d}", TokenDoc(np.asarray(ids, np.int32), np.asarray(segs, np.int32)).members())
    w.close({"vocab": vocab.to_dict()})


def loader_tokens_per_s(spec, seconds: float, workers: int = 0) -> tuple[float, int]:
    """Tokens/s of the loader for one rank owning every stream; (rate, micro-batches)."""
    from interleaf.training.loader import StreamingLoader

    it = iter(StreamingLoader(spec, 0, 1, num_workers=workers))
    for _ in range(8):  # fill the shuffle buffers (and start workers) before timing
        next(it)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        b = next(it)
        n += 1
    dt = time.perf_counter() - t0
    return n * int(np.prod(b["tokens"].shape)) / dt, n


def step_tokens_per_s(args_model, micro_batch: int, seq_len: int, device: str, steps: int) -> float:
    """Tokens/s of forward + backward + AdamW on one micro-batch of the model."""
    import torch

    from interleaf.model.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(args_model).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.startswith("cuda"))
    tokens = torch.randint(0, args_model.vocab_size, (micro_batch, seq_len + 1), device=device)
    x, y = tokens[:, :-1], tokens[:, 1:]
    amp = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.startswith("cuda")
        else torch.autocast("cpu", enabled=False)
    )

    def step():
        with amp:
            out = model(x, targets=y)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return steps * micro_batch * seq_len / (time.perf_counter() - t0)


def main(argv=None) -> int:
    import torch

    from interleaf.config import read_yaml
    from interleaf.model.args import ModelArgs
    from interleaf.tokenizer.vocab import Vocabulary
    from interleaf.training.loader import DataConfig, make_spec, resolve_sources
    from interleaf.training.mixtures import SourceConfig, StageConfig

    a = parse_args(argv)
    torch.set_num_threads(1)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # the loader gets one core
    vocab = Vocabulary.build(n_text=512, n_codes=512, image_grid=(8, 8))  # shapes-tiny BPE + VQ-GAN
    tiny = read_yaml(Path(__file__).resolve().parents[1] / "configs" / "train" / "shapes-tiny.yaml")
    seq_len, micro, global_batch = tiny["data"]["seq_len"], tiny["micro_batch"], tiny["global_batch"]
    with tempfile.TemporaryDirectory() as tmp:
        for name, seed in (("a", 0), ("b", 1)):
            shapes_like_shards(Path(tmp) / name, vocab, a.docs // 2, seed)
        data = DataConfig(
            sources=[SourceConfig("a", [f"{tmp}/a"], 0.7), SourceConfig("b", [f"{tmp}/b"], 0.3)],
            stages=[StageConfig(0.8, {"a": 0.2, "b": 0.8})],
            seq_len=seq_len,
            shuffle_buffer=1000,
        )
        data.validate()
        spec = make_spec(data, resolve_sources(data.sources, vocab), vocab, None, 1000, global_batch // micro, micro)
        load_tps, n_batches = loader_tokens_per_s(spec, a.seconds)
        if hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))  # workers may use every core
        worker_tps = loader_tokens_per_s(spec, a.seconds, a.workers)[0] if a.workers else None
    torch.set_num_threads(torch.get_num_threads() if a.device != "cpu" else (os.cpu_count() or 1))
    margs = ModelArgs.from_name(tiny["model_size"], vocab_size=vocab.size, max_seq_len=seq_len)
    step_tps = step_tokens_per_s(margs, micro, seq_len, a.device, a.steps)
    ratio = load_tps / step_tps
    result = {
        "loader_tokens_per_s_one_core": round(load_tps),
        "loader_micro_batches": n_batches,
        "loader_tokens_per_s_workers": round(worker_tps) if worker_tps else None,
        "workers": a.workers,
        "step_tokens_per_s": round(step_tps),
        "device": a.device,
        "device_name": torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu",
        "ratio": round(ratio, 1),
        "ok": ratio >= 10,
    }
    print(f"loader  (1 core): {load_tps:>12,.0f} tokens/s  ({n_batches} micro-batches of {micro}x{seq_len})")
    if worker_tps:
        print(f"loader ({a.workers} workers): {worker_tps:>10,.0f} tokens/s")
    print(f"step ({result['device_name']}): {step_tps:>12,.0f} tokens/s  (shapes-tiny, forward+backward+AdamW)")
    print(f"ratio: {ratio:.1f}x  ({'ok' if ratio >= 10 else 'LOADER IS TOO SLOW'}: needs >= 10x)")
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if ratio >= 10 else 1


if __name__ == "__main__":
    sys.exit(main())

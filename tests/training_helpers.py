"""Small data builders shared by the shard, loader and training tests."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from interleaf.tokenizer.vocab import Vocabulary
from interleaf.training.shards import ShardWriter
from interleaf.training.tokenize import IMAGE, TEXT, TokenDoc

FAULTS_DIR = Path(__file__).resolve().parent / "faults"

CORPUS = [
    "a red circle on the left",
    "a blue square at the top",
    "the green triangle moves right",
    "two shapes appear",
    "a small yellow circle",
] * 8


def tiny_vqgan():
    """A random 16px VQ-GAN with 4x4 grids of 32 codes (deterministic weights)."""
    import torch

    from interleaf.tokenizer.vqgan import VQConfig, VQModel

    torch.manual_seed(0)
    return VQModel(
        VQConfig(
            resolution=16,
            ch=8,
            ch_mult=[1, 2, 2],
            num_res_blocks=1,
            z_channels=8,
            norm_groups=4,
            n_embed=32,
            embed_dim=4,
            mid_attn=False,
        )
    ).eval()


def make_tokenizer_dir(path: Path) -> Vocabulary:
    """A tokenizer directory: tiny BPE in tokenizer/, tiny VQ-GAN in vqgan/, vocab.json."""
    from interleaf.tokenizer.text import train_bpe

    text = train_bpe(CORPUS, vocab_size=300)
    vq = tiny_vqgan()
    vocab = Vocabulary.build(text.vocab_size, vq.config.n_embed, vq.grid)
    path.mkdir(parents=True, exist_ok=True)
    text.save(path / "tokenizer")
    vq.save(path / "vqgan")
    vocab.save(path)
    return vocab


def random_doc(rng: np.random.Generator, vocab: Vocabulary, kind: str) -> TokenDoc:
    """A random token document: 'text', 'pair' (text + image) or 'interleaved'."""

    def text():
        return rng.integers(16, vocab.n_text, int(rng.integers(2, 20))).tolist()

    def image():
        return [
            vocab.boi_id,
            *vocab.code_to_id(rng.integers(0, vocab.n_codes, vocab.tokens_per_image)).tolist(),
            vocab.eoi_id,
        ]

    parts = {"text": [text], "pair": [text, image], "interleaved": [text, image, text, image, text]}[kind]
    ids, segs = [vocab.bos_id], []
    for make in parts:
        seg = make()
        segs.append((IMAGE if seg[0] == vocab.boi_id else TEXT, len(ids), len(ids) + len(seg)))
        ids.extend(seg)
    ids.append(vocab.eos_id)
    return TokenDoc(np.asarray(ids, dtype=np.int32), np.asarray(segs, dtype=np.int32))


def write_token_shards(
    out: Path,
    vocab: Vocabulary,
    n_docs: int,
    per_shard: int,
    seed: int = 0,
    kinds=("text", "pair", "interleaved"),
    prefix: str = "t",
) -> dict[str, TokenDoc]:
    """Token shards of random documents; returns {key: doc}."""
    rng = np.random.default_rng(seed)
    docs = {}
    w = ShardWriter(out, prefix, max_count=per_shard)
    for i in range(n_docs):
        key = f"{prefix}{i:05d}"
        docs[key] = random_doc(rng, vocab, kinds[i % len(kinds)])
        w.write(key, docs[key].members())
    w.close({"vocab": vocab.to_dict()})
    return docs


def truncate(path: Path, keep: float = 0.6) -> None:
    """Cut a file to a fraction of its size (a shard whose copy was interrupted)."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def fault_env(**faults) -> dict:
    """The environment of a training process with `faults` injected (tests/faults/sitecustomize.py);
    rank 0's loss is NaN at step 2 unless `nan_steps` says otherwise. Launcher variables are dropped."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(FAULTS_DIR))
    env["INTERLEAF_FAULTS"] = json.dumps({"nan_steps": [2], **faults})
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def metrics(run_dir):
    """{step: record} of training steps, and {step: eval record} (the last line of each step wins)."""
    steps, evals = {}, {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        (evals if "eval" in r else steps)[r["step"]] = r
    return steps, evals

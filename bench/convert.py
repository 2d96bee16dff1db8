"""Converting Meta's Chameleon release layout: peak resident memory and seconds of `convert from-meta`.

One run writes a random bf16 checkpoint of the "1B" shape (dim 2048, 18 layers, 16 heads, 8 key/value
heads, vocabulary 65,536: ~1.1B parameters, ~2.2 GB) in Meta's layout into a temporary folder, with a
Chameleon-shaped VQ-GAN (512 px, 8,192 codes) and a text tokenizer naming the image codes, then runs
`interleaf convert from-meta` in a child process per case (one file; model-parallel shards) and reads
the child's peak resident set (getrusage). References measured in the same run, each in its own child:

  * the checkpoint's size (goal: peak RSS below 0.6x of it: the weights are streamed, not loaded whole);
  * loading the checkpoint whole, as transformers' converter does (torch.load, weights_only=True);
  * the interpreter with the converter's imports and nothing else (the floor of any conversion);
  * copying the checkpoint file (seconds: what the disk allows).

    python bench/convert.py                 # 1B shape, one file and 2 shards
    python bench/convert.py --shards 1 --layers 4

Timings on a shared machine are noisy; the memory numbers are not.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the layout writer the tests use

CHAMELEON_VQ = dict(embed_dim=256, n_embed=8192, z_channels=256, resolution=512, ch=128, ch_mult=[1, 1, 2, 2, 4])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shards", default="1,2", help="model-parallel shard counts to convert (default 1,2)")
    p.add_argument("--layers", type=int, default=18, help="layers of the 1B shape (default 18)")
    p.add_argument("--workdir", default=None, help="where to write the checkpoints (default: a temp folder)")
    return p.parse_args(argv)


def child(code: str) -> tuple[float, float]:
    """(seconds, peak RSS in bytes) of `python -c code` in a fresh process. It reports its own peak as
    VmHWM (getrusage's ru_maxrss would include the parent's RSS at the fork: Linux keeps it across exec)."""
    report = "\nimport re\nprint('peak-rss-kib', re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1])"
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code + report], check=True, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    line = [ln for ln in done.stdout.splitlines() if ln.startswith("peak-rss-kib")][-1]
    return seconds, int(line.split()[1]) * 1024


def write_release(root: Path, mp: int, layers: int) -> int:
    """A random 1B-shape release in Meta's layout; returns the bytes of its consolidated*.pth."""
    from chameleon_layouts import write_meta_release

    write_meta_release(
        root,
        mp=mp,
        vq={**CHAMELEON_VQ, "num_res_blocks": 2},
        dim=2048,
        n_layers=layers,
        n_heads=16,
        n_kv_heads=8,
        vocab_size=65536,
        multiple_of=256,
    )
    return sum(f.stat().st_size for f in (root / "models" / "7b").glob("consolidated*.pth"))


def main(argv=None) -> int:
    opts = parse_args(argv)
    shard_counts = [int(s) for s in opts.shards.split(",")]
    gib = 2**30
    with tempfile.TemporaryDirectory(dir=opts.workdir) as tmp:
        tmp = Path(tmp)
        rows = []
        floor_s, floor = child("import interleaf.model.meta, interleaf.cli")
        print(f"interpreter + imports: {floor / gib:.2f} GiB peak RSS ({floor_s:.1f}s)")
        for mp in shard_counts:
            src = tmp / f"release-{mp}"
            t0 = time.perf_counter()
            size = write_release(src, mp, opts.layers)
            print(f"wrote a {size / gib:.2f} GiB bf16 checkpoint in {mp} file(s) in {time.perf_counter() - t0:.0f}s")
            ckpt = sorted((src / "models" / "7b").glob("consolidated*.pth"))
            t0 = time.perf_counter()
            for f in ckpt:
                shutil.copyfile(f, tmp / "copy.pth")
            copy_s = time.perf_counter() - t0
            (tmp / "copy.pth").unlink()
            out = tmp / f"out-{mp}"
            code = f"from interleaf import cli\nassert cli.main(['convert', 'from-meta', '{src}', '{out}']) == 0"
            seconds, peak = child(code)
            rows.append((mp, size, seconds, peak, copy_s))
            shutil.rmtree(out)
            if mp == shard_counts[-1]:
                paths = [str(f) for f in ckpt]
                load_s, load_peak = child(f"import torch\nstate = [torch.load(p, weights_only=True) for p in {paths}]")
            shutil.rmtree(src)
    print()
    print("| case | checkpoint | seconds | copy of the file | peak RSS | RSS / checkpoint | goal < 0.6x |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for mp, size, seconds, peak, copy_s in rows:
        what = "consolidated.pth" if mp == 1 else f"{mp} model-parallel shards"
        print(
            f"| `convert from-meta`, {what} | {size / gib:.2f} GiB | {seconds:.1f} s | {copy_s:.1f} s | "
            f"{peak / gib:.2f} GiB | {peak / size:.2f}x | {'met' if peak < 0.6 * size else 'NOT met'} |"
        )
    size = rows[-1][1]
    print(
        f"| torch.load of the whole checkpoint | {size / gib:.2f} GiB | {load_s:.1f} s | | "
        f"{load_peak / gib:.2f} GiB | {load_peak / size:.2f}x | |"
    )
    print(f"| interpreter + imports only | | {floor_s:.1f} s | | {floor / gib:.2f} GiB | {floor / size:.2f}x | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

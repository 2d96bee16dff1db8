"""`interleaf eval` (score a model on held-out shapes) and `interleaf demo` (the whole pipeline)."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="score a model on held-out scenes of the shapes world",
        description="Draw held-out captions and caption held-out images, score both with the world's "
        "analyser, and report held-out loss per modality and VQ-GAN PSNR / codebook usage.",
    )
    p.add_argument("model_dir", help="model directory (interleaf export output)")
    p.add_argument("overrides", nargs="*", help="dotted overrides of EvalConfig, e.g. n_draw=100 cfg_scales=[3,1]")
    p.add_argument("--out", metavar="FILE", help="JSON report path (default MODEL_DIR/eval.json)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=eval_command)

    p = subparsers.add_parser(
        "demo",
        help="train a tiny model on the shapes world end to end, then generate and evaluate",
        description="Shards -> BPE -> VQ-GAN -> tokenize -> train -> export -> generate -> eval, with the "
        "shipped tiny configs. Finished stages are reused when run again.",
    )
    p.add_argument("--run-dir", default="runs/demo", help="where everything goes (default runs/demo)")
    p.add_argument("--config", default=None, help="demo config YAML (default configs/demo/shapes-tiny.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the demo config, e.g. train.steps=200")
    p.set_defaults(func=demo_command)


def eval_command(args: argparse.Namespace) -> int:
    from pathlib import Path

    from interleaf.config import load_config
    from interleaf.evaluate import EvalConfig, format_report, run_eval, summary_line

    cfg = load_config(EvalConfig, None, args.overrides)
    out = Path(args.out) if args.out else Path(args.model_dir) / "eval.json"
    report = run_eval(args.model_dir, cfg, out, progress=not args.quiet)
    print(format_report(report))
    print(summary_line(report))
    print(f"report: {out}")
    return 0


def demo_command(args: argparse.Namespace) -> int:
    from interleaf.demo import run_demo

    run_demo(args.run_dir, args.config, args.overrides)
    return 0

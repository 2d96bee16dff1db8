"""`interleaf export RUN_DIR OUT_DIR [--step N | --best]`: a checkpoint -> a self-contained model directory.

The engine state is consolidated offline into full fp32 weights with DeepSpeed's
`zero_to_fp32` (ZeRO 1, 2 and 3 alike: no processes, no GPU), loaded into a `Transformer`, and
written with `interleaf.pipeline.save_model_dir` (model.safetensors, model.yaml, vocab.json,
tokenizer/, vqgan/) that `interleaf.load` opens. The training config of the run is kept beside
it as train.yaml, and sampling defaults, when given or set by an earlier export into the same
folder, as sampling.yaml. The output folder is assembled under a temporary name and renamed at the end.
"""

from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path

from interleaf.config import load_config
from interleaf.errors import InterleafError
from interleaf.model.args import ModelArgs
from interleaf.model.transformer import Transformer
from interleaf.pipeline import read_sampling_defaults, save_model_dir, write_sampling_defaults
from interleaf.sampling.params import PER_MODEL, merge_options, options_from
from interleaf.tokenizer.text import TextTokenizer
from interleaf.tokenizer.vocab import Vocabulary
from interleaf.tokenizer.vqgan import VQModel
from interleaf.training.checkpoint import (
    CKPT_DIR,
    DS_TAG,
    best_checkpoint,
    find_checkpoint,
    read_trainer_state,
    step_name,
)
from interleaf.training.engine import cpu_accelerator_env
from interleaf.utils import atomic_dir, check_replaceable, first_line, get_logger, write_json

# deepspeed is imported once cpu_accelerator_env() has told it whether this is a CPU run (it picks
# its accelerator when first imported)

log = get_logger(__name__)


def checkpoint_for(run_dir: Path, step: int | None, best: bool = False) -> Path:
    """The checkpoint folder to export: `step` if given, the one with the lowest held-out loss if
    `best`, else the latest complete one."""
    if not run_dir.is_dir():
        raise InterleafError(f"run directory not found: {run_dir}")
    if best and step is not None:
        raise InterleafError("give a step or ask for the best checkpoint, not both")
    if best:
        ckpt = best_checkpoint(run_dir / CKPT_DIR)
        if ckpt is None:
            raise InterleafError(
                f"{run_dir} holds no checkpoint with a held-out loss (it trained without data.eval_sources)"
            )
        return ckpt
    if step is not None:
        ckpt = run_dir / CKPT_DIR / step_name(step)
        if not (ckpt / "trainer.json").is_file():
            raise InterleafError(f"{run_dir} has no complete checkpoint for step {step}")
        return ckpt
    ckpt = find_checkpoint(run_dir)
    if ckpt is None:
        raise InterleafError(f"{run_dir} holds no complete checkpoint")
    return ckpt


def consolidated_state(ckpt: Path) -> dict:
    """Full fp32 weights of the engine state of a checkpoint (any ZeRO stage), Transformer names."""
    cpu_accelerator_env()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # noqa: PLC0415

    try:
        with contextlib.redirect_stdout(io.StringIO()):  # it prints per-tensor progress
            state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt / "ds"), tag=DS_TAG)
    except (OSError, RuntimeError, ValueError, KeyError) as e:  # missing, truncated or foreign files
        raise InterleafError(f"checkpoint {ckpt}: cannot read its engine state ({first_line(e)})") from None
    return {k: v.float().contiguous() for k, v in state.items()}


def export(
    run_dir: str | Path,
    out_dir: str | Path,
    step: int | None = None,
    tokenizer: str | Path | None = None,
    sampling: dict | None = None,
    best: bool = False,
) -> Path:
    """Write the model directory of a run's checkpoint (`checkpoint_for`); returns `out_dir`.

    `sampling`: options for the directory's sampling.yaml (the per-model `SamplingParams` fields),
    over those of an earlier export into `out_dir`, which are kept otherwise (merged by
    `merge_options`, as a command line's options are over a model's).
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    ckpt = checkpoint_for(run_dir, step, best)
    check_replaceable(out_dir, "output folder")
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "training.json").is_file():
        raise InterleafError(f"{out_dir} exists and is not an earlier export: choose an empty or new folder")
    trainer = read_trainer_state(ckpt)
    if not all(isinstance(trainer.get(k), int) for k in ("step", "tokens")):
        raise InterleafError(f"checkpoint {ckpt}: trainer.json lacks its step and token counts")
    if not (ckpt / "config.yaml").is_file():
        raise InterleafError(f"checkpoint {ckpt} has no config.yaml: it is incomplete")
    earlier = read_sampling_defaults(out_dir) if out_dir.is_dir() else {}
    # a run from `init` keeps the init's sampling.yaml in its folder: the start of the export's
    sampling = options_from(
        merge_options(merge_options(read_sampling_defaults(run_dir), earlier), sampling or {}), PER_MODEL
    )
    args = load_config(ModelArgs, ckpt / "model.yaml")
    tok_dir = Path(tokenizer) if tokenizer is not None else run_dir
    text_src = tok_dir / "tokenizer" if (tok_dir / "tokenizer").exists() else tok_dir
    if tokenizer is None and not (run_dir / "tokenizer").exists():
        raise InterleafError(
            f"{run_dir} has no text tokenizer (trained from token shards without `tokenizer:`); pass --tokenizer DIR"
        )
    text = TextTokenizer.load(text_src)
    vocab = Vocabulary.load(run_dir if (run_dir / "vocab.json").is_file() else tok_dir)  # what it trained with
    if (tok_dir / "vocab.json").is_file() and Vocabulary.load(tok_dir).to_dict() != vocab.to_dict():
        raise InterleafError(f"the vocabulary in {tok_dir} differs from the one {run_dir} was trained with")
    vq_dir = tok_dir / "vqgan" if (tok_dir / "vqgan").is_dir() else run_dir / "vqgan"
    vqgan = VQModel.load(vq_dir) if vq_dir.is_dir() else None
    model = Transformer.from_state_dict(args, consolidated_state(ckpt), f"checkpoint {ckpt}").eval()
    with atomic_dir(out_dir, "output folder") as tmp:
        save_model_dir(tmp, model, vocab, text, vqgan)
        shutil.copyfile(ckpt / "config.yaml", tmp / "train.yaml")
        write_json(
            tmp / "training.json",
            {
                "run_dir": str(run_dir.resolve()),
                "checkpoint": ckpt.name,
                "step": trainer["step"],
                "tokens": trainer["tokens"],
                "eval_loss": trainer.get("eval_loss"),
            },
        )
        if sampling:
            write_sampling_defaults(tmp, **sampling)
    return out_dir

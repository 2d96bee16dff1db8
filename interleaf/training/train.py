"""`interleaf train`: configuration, checks before any work, and the training loop.

    interleaf train configs/train/shapes-tiny.yaml optim.lr=1e-3 steps=200 [--nproc 2] [--resume]

One process per device; started by `--nproc N` (local processes, gloo on CPU), `deepspeed`,
`torchrun` or `srun`. Every process reads the same config, builds the same model (same seed)
and its own share of the data (loader.py); DeepSpeed averages gradients. Rank 0 writes the
progress bar, `metrics.jsonl` (and TensorBoard events when asked) and the checkpoints' shared
files.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from tqdm import tqdm

from interleaf.config import config_file, from_dict, load_config, save_config, to_dict
from interleaf.errors import ConfigError, InterleafError
from interleaf.model.args import MODEL_SIZES, ModelArgs, flops_per_token
from interleaf.model.init import RandomInit
from interleaf.model.transformer import check_tensors, expected_shapes
from interleaf.pipeline import SAMPLING_FILE, WeightsSource, read_model_args
from interleaf.tokenizer.text import TextTokenizer
from interleaf.tokenizer.vocab import END_OF_TURN_NAME, Vocabulary
from interleaf.training import checkpoint as ck
from interleaf.training import engine as eng
from interleaf.training.checkpoint import (
    CKPT_DIR,
    check_shared_run_dir,
    complete_checkpoints,
    find_checkpoint,
    read_trainer_state,
)
from interleaf.training.engine import dist_env, read_ds_json
from interleaf.training.loader import (
    DataConfig,
    StreamingLoader,
    batch_crc,
    check_vocab,
    make_spec,
    pad_batch,
    resolve_sources,
    shard_index,
    to_torch,
)
from interleaf.training.tokenize import load_tokenizer_dir
from interleaf.utils import atomic_write, get_logger, seed_everything, usable_cpus

# tensorboard is optional (`tensorboard: true`): imported only by the runs that ask for it (prepare, Trainer.setup)

log = get_logger(__name__)


@dataclass
class OptimConfig:
    """AdamW with linear warm-up and cosine decay."""

    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # final learning rate = lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0  # global gradient-norm clipping (0 = off)

    def validate(self) -> None:
        if not 0 < self.lr < float("inf") or not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("optim.lr must be a finite number > 0 and optim.min_lr_ratio in [0, 1]")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {list(self.betas)}")
        if not 0 < self.eps < 1:
            raise ConfigError(f"optim.eps must be in (0, 1), got {self.eps}")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError("optim.warmup_steps, optim.weight_decay and optim.grad_clip must be >= 0")


@dataclass
class TrainConfig:
    """Everything `interleaf train` needs; saved, resolved, as RUN/config.yaml."""

    run_dir: str = "runs/train"
    # a named size of interleaf.model.args.MODEL_SIZES; auto: "debug", or with `init` the init's own
    # (a named size that differs from it is an error); None: ModelArgs' defaults
    model_size: str | None = "auto"
    model: dict[str, Any] = field(default_factory=dict)  # ModelArgs fields over the named size
    tokenizer: str | None = None  # vocab.json + tokenizer/ + vqgan/ (tokenize.py); else from token shards
    # fine-tuning: a model directory (an export, a conversion) to start from: its weights, its model.yaml
    # (`model:` may change only what no weight depends on: TRAINING_FIELDS), its vocabulary, and its
    # tokenizer files unless `tokenizer:` names others with the same vocabulary
    init: str | None = None
    # parameter names (fnmatch patterns, e.g. "layers.*.attention.*") that keep their initial values
    freeze: list[str] = field(default_factory=list)
    # matrices trained on some vocabulary rows only: {tok_embeddings | output: image | text}; the other
    # rows keep their initial values (such a matrix takes no weight decay, which would move them)
    train_rows: dict[str, str] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    steps: int = 1000
    global_batch: int = 32  # rows of data.seq_len tokens per optimizer step, over all processes
    micro_batch: int = 4  # rows per forward/backward on one process
    zero_stage: Literal[1, 2, 3] = 2
    deepspeed: str = "auto"  # auto: configs/deepspeed/zero{stage}-{gpu-bf16|cpu-fp32}.json; or a path
    activation_checkpointing: bool = False
    # ZeRO-3: build the model straight into each rank's partitions (deepspeed.zero.Init); false builds
    # the whole model on every rank first (more memory, the same weights)
    zero_init: bool = True
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate only at the end (when data.eval_sources are given)
    save_every: int = 500
    keep_last: int = 3  # checkpoints kept (0: all)
    max_nonfinite: int = 5  # abort after this many non-finite losses in a row
    # seconds a process waits for the others (start-up, any collective) before it stops with a message
    dist_timeout_s: float = 1800.0
    peak_tflops: float = 0.0  # per device, for MFU (0: guess from the GPU name; none on CPU)
    tensorboard: bool = False
    threads: int = 0  # torch CPU threads per process (0: torch's default)

    def validate(self) -> None:
        for name in ("steps", "global_batch", "micro_batch", "log_every", "max_nonfinite"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("eval_every", "save_every", "keep_last", "threads"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        cores = usable_cpus()
        if self.threads > cores:
            raise ConfigError(f"threads={self.threads} is more than the {cores} CPU cores this process may use")
        if not 0 < self.dist_timeout_s < float("inf"):
            raise ConfigError(f"dist_timeout_s must be a finite number of seconds > 0, got {self.dist_timeout_s}")
        if self.global_batch % self.micro_batch:
            raise ConfigError(f"global_batch={self.global_batch} is not a multiple of micro_batch={self.micro_batch}")
        if self.model_size not in ("auto", None, *MODEL_SIZES):
            raise ConfigError(f"unknown model_size {self.model_size!r} (known: auto, {', '.join(MODEL_SIZES)})")
        if self.init is not None and self.tokenizer is None:
            self.tokenizer = self.init  # a model directory is a tokenizer directory too
        for key, rows in self.train_rows.items():
            if key not in ROW_MATRICES:
                raise ConfigError(f"train_rows: unknown matrix {key!r} (known: {', '.join(ROW_MATRICES)})")
            if rows not in ROW_MASKS:
                raise ConfigError(f"train_rows.{key}: unknown rows {rows!r} (known: {', '.join(ROW_MASKS)})")


ROW_MATRICES = ("tok_embeddings", "output")  # the matrices with one row per vocabulary id
# the rows a matrix may train only: the vocabulary's image-code ids, or its plain text ids
ROW_MASKS = {"image": lambda vocab: vocab.image_mask(), "text": lambda vocab: vocab.text_mask()}
# ModelArgs fields no weight depends on: a run from `init` may set them (the others come from the init)
TRAINING_FIELDS = ("dropout", "z_loss", "loss_chunk", "attention", "max_seq_len", "init_std")


# ---- preparation: everything that can fail on bad input, before any process starts --------
@dataclass
class Plan:
    """A checked configuration, resolved against the data and the world size."""

    cfg: TrainConfig
    model_args: Any
    vocab: Any
    sources: list
    eval_sources: list
    world: int
    n_streams: int
    grad_accum: int
    frozen: list[str] = field(default_factory=list)  # parameter names that do not train
    train_rows: dict[str, str] = field(default_factory=dict)  # parameter name -> the rows (ROW_MASKS) it trains


def check_world(cfg: TrainConfig, world: int) -> int:
    """Gradient accumulation steps for this world size; ConfigError if the batch does not split."""
    if cfg.global_batch % (cfg.micro_batch * world):
        raise ConfigError(
            f"global_batch={cfg.global_batch} is not divisible by micro_batch x processes = "
            f"{cfg.micro_batch} x {world} = {cfg.micro_batch * world}"
        )
    return cfg.global_batch // (cfg.micro_batch * world)


def resolve_model_args(cfg: TrainConfig, vocab):
    """ModelArgs from the named size + overrides, with vocab_size from the vocabulary."""
    extra = dict(cfg.model)
    extra.setdefault("vocab_size", vocab.size)
    if cfg.model_size is not None:
        base = to_dict(MODEL_SIZES["debug" if cfg.model_size == "auto" else cfg.model_size])
        if {"dim", "multiple_of", "ffn_multiplier"} & set(extra):
            base.pop("ffn_hidden")  # derived from those in the table: let ModelArgs recompute it
        extra = {**base, **extra}
    args = from_dict(ModelArgs, extra, prefix="model")
    vocab.check_fits(args.vocab_size, f"model.vocab_size={args.vocab_size}")
    return args


def init_model_args(cfg: TrainConfig):
    """The init's ModelArgs with the config's TRAINING_FIELDS; a config that sets another field (or
    names a model_size) otherwise than the init has it is a ConfigError naming the field."""
    try:
        init = read_model_args(cfg.init)
    except InterleafError as e:
        raise ConfigError(f"init: {e}") from None
    args = from_dict(ModelArgs, {**to_dict(init), **cfg.model}, prefix="model")
    given = {f"model.{k}": (getattr(args, k), getattr(init, k)) for k in cfg.model if k not in TRAINING_FIELDS}
    if cfg.model_size not in ("auto", None):
        named = MODEL_SIZES[cfg.model_size]
        given.update(
            (f"model_size={cfg.model_size}: {k}", (v, getattr(init, k)))
            for k, v in to_dict(named).items()
            if k not in TRAINING_FIELDS and k != "vocab_size"
        )
    for key, (value, theirs) in given.items():
        if value != theirs:
            raise ConfigError(
                f"{key} is {value!r}, but init {cfg.init} has {theirs!r}: a run from `init` takes the init's model "
                f"(only {', '.join(TRAINING_FIELDS)} may change)"
            )
    return args


def check_init(cfg: TrainConfig, args) -> None:
    """The init directory's weights are those of a Transformer(args) (names and shapes, from the file
    headers); InterleafError naming the first that is not."""
    shapes = WeightsSource(cfg.init).shapes
    check_tensors(
        {k: torch.empty(s, device="meta") for k, s in shapes.items()}, expected_shapes(args), f"init {cfg.init}"
    )


def resolve_freeze(cfg: TrainConfig, args) -> tuple[list[str], dict[str, str]]:
    """(frozen parameter names, {parameter name: rows it trains}) of a model with `args`; a freeze
    pattern that names no parameter, or a model with nothing left to train, is a ConfigError."""
    names = list(expected_shapes(args))  # the parameters: a tied output weight is tok_embeddings.weight
    rows: dict[str, str] = {}
    for key, which in cfg.train_rows.items():
        name = "tok_embeddings.weight" if key == "output" and args.tie_embeddings else f"{key}.weight"
        if rows.setdefault(name, which) != which:
            raise ConfigError("train_rows: output and tok_embeddings are one tied matrix here; give it one set of rows")
    frozen: set[str] = set()
    for pattern in cfg.freeze:
        matched = [n for n in names if fnmatchcase(n, pattern)]
        if not matched:
            raise ConfigError(f"freeze: pattern {pattern!r} matches no parameter (names look like {names[1]})")
        frozen.update(matched)
    frozen -= set(rows)  # a matrix in train_rows trains its rows, whatever freeze says
    if len(frozen) == len(names):
        raise ConfigError("freeze: every parameter is frozen and train_rows names none: nothing would train")
    return [n for n in names if n in frozen], rows


def resolve_vocab(cfg: TrainConfig, sources: list):
    """The vocabulary: from the tokenizer directory, else from the token shards' index.json."""
    if cfg.tokenizer is not None:  # with `init`: the init, unless another with the same vocabulary is named
        vocab = load_tokenizer_dir(cfg.tokenizer).vocab  # its parts are checked against its vocab.json
        if cfg.init is not None and vocab.to_dict() != Vocabulary.load(cfg.init).to_dict():
            raise ConfigError(f"tokenizer {cfg.tokenizer} has another vocabulary than init {cfg.init}")
        return vocab
    found = [i["vocab"] for s in sources if s.kind == "tokens" for i in shard_index(s.shards) if "vocab" in i]
    if not found:
        raise ConfigError(
            "cannot tell the vocabulary: set `tokenizer:` to a tokenizer directory "
            "(token shards without index.json do not record one)"
        )
    if any(v != found[0] for v in found):
        raise ConfigError("the token shards of the data sources were made with different vocabularies")
    return Vocabulary.from_dict(found[0])


def prepare(cfg: TrainConfig, world: int, resume: bool = False) -> Plan:
    """Check the config against the data and the world size; InterleafError on the first problem."""
    grad_accum = check_world(cfg, world)
    n_streams = cfg.global_batch // cfg.micro_batch
    if cfg.deepspeed != "auto":  # filled in once the device is known; a wrong path fails here
        read_ds_json(config_file(cfg.deepspeed))
    if not resume and complete_checkpoints(Path(cfg.run_dir) / CKPT_DIR):
        raise InterleafError(
            f"{cfg.run_dir} already holds checkpoints: pass --resume to continue that run, or choose another run_dir"
        )
    ckpt = find_checkpoint(Path(cfg.run_dir)) if resume else None
    if cfg.init is not None and not Path(cfg.init).is_dir():
        raise ConfigError(f"init: model directory not found: {cfg.init}")
    # not a model directory, or a config at odds with it: an error before any data is read
    args = init_model_args(cfg) if cfg.init is not None else None
    sources = resolve_sources(cfg.data.sources)
    eval_sources = resolve_sources(cfg.data.eval_sources)
    vocab = resolve_vocab(cfg, sources + eval_sources)
    for s in sources + eval_sources:
        if s.kind == "tokens":
            check_vocab(s.shards, vocab, s.name)
    if any(s.kind == "documents" for s in sources + eval_sources) and cfg.tokenizer is None:
        raise ConfigError(
            "document shards are tokenized on the fly, which needs `tokenizer:`; or run `interleaf tokenize` first"
        )
    if cfg.data.format == "chameleon_prompt" and END_OF_TURN_NAME not in vocab.specials:
        raise ConfigError("data.format chameleon_prompt needs an end-of-turn token, which this vocabulary lacks")
    if args is None:
        args = resolve_model_args(cfg, vocab)
    else:
        vocab.check_fits(args.vocab_size, f"init {cfg.init}")
        check_init(cfg, args)
    frozen, train_rows = resolve_freeze(cfg, args)
    plan = Plan(cfg, args, vocab, sources, eval_sources, world, n_streams, grad_accum, frozen, train_rows)
    if ckpt is not None:
        check_same_model(args, ckpt)
        check_resume(plan, ckpt, read_trainer_state(ckpt))
    if cfg.data.seq_len > args.max_seq_len:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} is longer than the model's max_seq_len={args.max_seq_len}")
    if cfg.tensorboard:
        try:
            import torch.utils.tensorboard  # noqa: F401, PLC0415
        except ImportError:
            raise ConfigError("tensorboard: true needs the tensorboard package (pip install tensorboard)") from None
    return plan


def check_resume(plan: Plan, ckpt: Path, state: dict) -> None:
    """What a checkpoint cannot be resumed with: another data split, another ZeRO stage, or other
    parameters (or rows) trained, which its optimizer state does not hold (a matrix trained by rows
    keeps the rest only while the same rows train). Checkpoints written before trainer.json held
    `frozen` and `train_rows` are not checked for those."""
    cfg = plan.cfg
    if int(state["n_streams"]) != plan.n_streams:
        raise InterleafError(
            f"cannot resume {ckpt}: its data order has global_batch / micro_batch = {state['n_streams']} "
            f"streams, this config {plan.n_streams} (keep global_batch and micro_batch when resuming)"
        )
    if int(state["zero_stage"]) != cfg.zero_stage:
        raise InterleafError(
            f"cannot resume {ckpt} (ZeRO stage {state['zero_stage']}) with zero_stage={cfg.zero_stage}: DeepSpeed "
            f"does not move optimizer state across stages; keep the stage, or export and start a new run"
        )
    if "frozen" not in state:
        return
    was, now = set(state["frozen"]), set(plan.frozen)
    if was != now:
        name = min(was ^ now)
        how = "frozen there and trained here" if name in was else "trained there and frozen here"
        raise InterleafError(
            f"cannot resume {ckpt}: parameter {name} is {how} ({len(was ^ now)} differ); keep `freeze` "
            f"when resuming, or export and start a new run from the export with `init:`"
        )
    rows_was = state["train_rows"]
    for name in sorted(set(rows_was) | set(plan.train_rows)):
        a, b = (f"its {r} rows" if r else "all its rows" for r in (rows_was.get(name), plan.train_rows.get(name)))
        if a != b:
            raise InterleafError(
                f"cannot resume {ckpt}: {name} trained {a} there and {b} here; keep `train_rows` when "
                f"resuming, or export and start a new run from the export with `init:`"
            )


def check_same_model(args, ckpt: Path) -> None:
    """A resumed run must build a model with the tensors its checkpoint holds (settings that change
    no shape, such as dropout or z_loss, may change). Names the first difference."""
    if not (ckpt / "model.yaml").is_file():
        return
    saved = load_config(ModelArgs, ckpt / "model.yaml")
    old, new = expected_shapes(saved), expected_shapes(args)
    for name in sorted(set(old) | set(new), key=lambda n: (n not in old, n)):
        a, b = old.get(name), new.get(name)
        if a is None or b is None or a != b:
            fields = [
                f
                for f in (
                    "dim",
                    "n_layers",
                    "n_heads",
                    "n_kv_heads",
                    "vocab_size",
                    "ffn_hidden",
                    "qk_norm",
                    "tie_embeddings",
                )
                if getattr(saved, f) != getattr(args, f)
            ]
            what = ", ".join(f"{f} {getattr(saved, f)!r} -> {getattr(args, f)!r}" for f in fields) or f"tensor {name}"
            raise InterleafError(
                f"cannot resume {ckpt}: this config builds another model ({what}); keep the model when resuming"
            )


# ---- one step's numbers -------------------------------------------------------------------
STATS = ("loss", "ce", "z_loss", "text_sum", "n_text", "image_sum", "n_image", "n_tokens", "crc", "nonfinite")


def step_stats(out, crc: int):
    """One micro-batch's contribution to the step's global sums (float64 (len(STATS),), no sync)."""
    loss = out.loss.detach()
    parts = torch.stack(
        [
            loss.double(),
            out.ce.double(),
            out.z_loss.double(),
            (out.text_loss * out.n_text_tokens).double(),
            out.n_text_tokens.double(),
            (out.image_loss * out.n_image_tokens).double(),
            out.n_image_tokens.double(),
            out.n_tokens.double(),
            torch.tensor(float(crc), dtype=torch.float64, device=loss.device),
        ]
    ).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)  # a non-finite micro-batch is counted below instead
    return torch.cat([parts, (~torch.isfinite(loss)).double().reshape(1)])


# ---- the run -------------------------------------------------------------------------------
class Trainer:
    """One process of a training run."""

    def __init__(self, plan: Plan, rank: int, device, resume: bool):
        self.plan, self.cfg, self.rank, self.device = plan, plan.cfg, rank, device
        self.run_dir = Path(self.cfg.run_dir)
        self.resume = resume
        self.step = 0
        self.tokens = 0
        self.skipped = 0
        self.nonfinite_in_a_row = 0
        self.loader = None
        self.tb = None
        self.held_out: tuple[int, float | None] | None = None  # (step, loss) of the last held-out evaluation

    # -- setup --
    def setup(self) -> None:
        cfg, plan = self.cfg, self.plan
        ckpt = self._find_resume_point()
        dist.barrier()
        state = ck.read_trainer_state(ckpt) if ckpt is not None else None
        if state is not None:
            check_resume(plan, ckpt, state)
        # another world size reads the engine state through DeepSpeed's universal format
        universal = state is not None and int(state["world_size"]) != plan.world
        if universal:
            if self.rank == 0:
                ck.ensure_universal(ckpt)
            dist.barrier()
        self.ds_cfg = eng.ds_config(
            eng.ds_config_path(cfg.deepspeed, cfg.zero_stage, self.device),
            cfg.global_batch,
            cfg.micro_batch,
            plan.world,
            cfg.optim.grad_clip,
            self.device,
            universal,
        )
        # the same initial weights on every rank and every path, for any world size (model/init.py), or
        # the init directory's, read tensor by tensor (under ZeRO-3 each rank reads its partitions only)
        initial = WeightsSource(cfg.init) if cfg.init is not None else RandomInit(plan.model_args, cfg.seed)
        model = eng.build_model(plan.model_args, self.ds_cfg, initial, self.device, cfg.zero_init)
        rows = {name: ROW_MASKS[which](plan.vocab) for name, which in plan.train_rows.items()}
        eng.freeze(model, plan.frozen, rows)
        if cfg.activation_checkpointing:
            eng.apply_activation_checkpointing(model)
        o = cfg.optim
        self.engine = eng.build_engine(model, self.ds_cfg, o.lr, o.weight_decay, o.betas, o.eps, no_decay=set(rows))
        spec = make_spec(cfg.data, plan.sources, plan.vocab, cfg.tokenizer, cfg.steps, plan.n_streams, cfg.micro_batch)
        self.loader = StreamingLoader(spec, self.rank, plan.world, cfg.data.num_workers)
        if ckpt is not None:
            self._restore(ckpt, state, universal)
        else:
            seed_everything(cfg.seed + 1000 * self.rank + 1)  # per-rank streams (dropout)
            if self.rank == 0:
                self._truncate_metrics()  # lines of an earlier attempt that left no checkpoint
        self.flops_per_token = self._flops_per_token()
        self.peak = eng.peak_flops(self.device, cfg.peak_tflops)
        if cfg.tensorboard and self.rank == 0:
            from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415

            self.tb = SummaryWriter(str(self.run_dir / "tensorboard"))

    def _find_resume_point(self):
        if not self.resume:
            return None
        if self.rank == 0 and ck.clean_partial(self.run_dir):
            log.info("removed leftovers of an interrupted checkpoint write")
        ckpt = ck.find_checkpoint(self.run_dir)
        if ckpt is None and self.rank == 0:
            log.info("no checkpoint in %s: starting from scratch", self.run_dir)
        return ckpt

    def _restore(self, ckpt: Path, state: dict, universal: bool) -> None:
        ck.load_engine_state(self.engine, ckpt, universal)
        try:
            self.loader.load_state_dict(json.loads((ckpt / "loader.json").read_text()))
        except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise InterleafError(f"checkpoint {ckpt}: cannot read loader.json ({e})") from None
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        self.skipped, self.nonfinite_in_a_row = int(state["skipped"]), int(state["nonfinite_in_a_row"])
        if universal or not ck.load_rng(ckpt, self.rank):
            seed_everything(self.cfg.seed + 1000 * self.rank + 1 + 7919 * self.step)
        if self.rank == 0:
            self._truncate_metrics()
            log.info(
                "resumed from %s (step %d, trained on %d processes, now %d)",
                ckpt.name,
                self.step,
                state["world_size"],
                self.plan.world,
            )

    def _truncate_metrics(self) -> None:
        """Drop metric lines of steps after the resumed checkpoint (they are about to be redone)."""
        path = self.run_dir / "metrics.jsonl"
        if not path.is_file():
            return
        keep = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= self.step:
                    keep.append(line)
            except json.JSONDecodeError:
                continue
        with atomic_write(path) as f:
            f.write("".join(k + "\n" for k in keep))

    def _flops_per_token(self) -> float:
        return flops_per_token(self.plan.model_args, self.cfg.data.seq_len, training=True)

    # -- run files --
    def write_run_files(self) -> None:
        """Resolved config, model args, vocabulary and tokenizer files in RUN/ (rank 0, first start)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, self.run_dir / "config.yaml")
        save_config(self.plan.model_args, self.run_dir / "model.yaml")
        self.plan.vocab.save(self.run_dir)
        if self.cfg.tokenizer is not None:
            src = Path(self.cfg.tokenizer)
            for sub in ("tokenizer", "vqgan"):
                if (src / sub).is_dir() and not (self.run_dir / sub).exists():
                    shutil.copytree(src / sub, self.run_dir / sub)
            if not (src / "tokenizer").is_dir() and not (self.run_dir / "tokenizer").exists():
                TextTokenizer.load(src).save(self.run_dir / "tokenizer")
        if self.cfg.init is not None and (Path(self.cfg.init) / SAMPLING_FILE).is_file():
            shutil.copyfile(Path(self.cfg.init) / SAMPLING_FILE, self.run_dir / SAMPLING_FILE)  # exports keep it

    # -- steps --
    def train_step(self, micro_batches: list[dict]) -> dict:
        """Forward/backward over this rank's micro-batches, one optimizer step (or a skip); global stats."""
        cfg, engine = self.cfg, self.engine
        lr = eng.lr_at(self.step, cfg.optim.lr, cfg.optim.warmup_steps, cfg.steps, cfg.optim.min_lr_ratio)
        eng.set_lr(engine, lr)
        engine.train()
        acc = torch.zeros(len(STATS), dtype=torch.float64, device=self.device)
        for i, mb in enumerate(micro_batches):
            b = to_torch(mb, self.device)
            out = engine(b["tokens"], b["doc_ids"], targets=b["targets"], weights=b["weights"], is_image=b["is_image"])
            acc += step_stats(out, batch_crc(mb))
            engine.backward(out.loss)
            if i < len(micro_batches) - 1:
                engine.step()  # accumulates; the optimizer runs at the last micro-batch
        dist.all_reduce(acc)
        skip = acc[STATS.index("nonfinite")] > 0  # on any rank: every rank skips the update
        with eng.frozen_update(engine) if skip else contextlib.nullcontext():
            engine.step()
        return self._summarise(acc, lr)

    def _summarise(self, acc, lr: float) -> dict:
        """Global sums over every micro-batch of the step -> the metrics record of the step."""
        n_micro = self.plan.n_streams
        a = dict(zip(STATS, acc.tolist()))
        nonfinite = a["nonfinite"] > 0
        gn = self.engine.get_global_grad_norm()
        gn = float(gn) if gn is not None else float("nan")

        def mean(key):  # a skipped step has no meaningful loss: only some micro-batches were finite
            return None if nonfinite else a[key] / n_micro

        return {
            "loss": mean("loss"),
            "ce": mean("ce"),
            "z_loss": mean("z_loss"),
            "text_loss": a["text_sum"] / a["n_text"] if a["n_text"] else None,
            "image_loss": a["image_sum"] / a["n_image"] if a["n_image"] else None,
            "tokens": int(a["n_tokens"]),
            "data_crc": int(a["crc"]) % 2**32,
            "nonfinite": nonfinite,
            "grad_norm": None if nonfinite or not math.isfinite(gn) else gn,
            "lr": lr,
        }

    # -- evaluation --
    def evaluate(self) -> dict | None:
        """Held-out loss per modality over data.eval_batches micro-batches of every stream."""
        cfg, plan = self.cfg, self.plan
        if not plan.eval_sources or cfg.data.eval_batches == 0:
            return None
        spec = make_spec(
            cfg.data,
            plan.eval_sources,
            plan.vocab,
            cfg.tokenizer,
            cfg.steps,
            plan.n_streams,
            cfg.micro_batch,
            eval_mode=True,
        )
        loader = StreamingLoader(spec, self.rank, plan.world, 0)
        it = iter(loader)
        pad = None
        acc = torch.zeros(6, dtype=torch.float64, device=self.device)  # ce sum, n, text sum, n, image sum, n
        # a training model runs the reference path (or model/fast.py's training paths, which keep no
        # weights between passes): ZeRO-1/2 steps write the weights through .data, which a kept copy
        # would not see
        self.engine.eval()
        with torch.no_grad():
            for _ in range(cfg.data.eval_batches * plan.grad_accum):  # same count on every rank (ZeRO-3)
                mb = next(it, None)
                if mb is None:
                    mb = pad = pad or pad_batch(spec)
                b = to_torch(mb, self.device)
                out = self.engine(b["tokens"], b["doc_ids"], targets=b["targets"], is_image=b["is_image"])
                n_text, n_image = out.n_text_tokens.double(), out.n_image_tokens.double()
                acc += torch.stack(
                    [
                        out.text_loss.double() * n_text + out.image_loss.double() * n_image,
                        n_text + n_image,
                        out.text_loss.double() * n_text,
                        n_text,
                        out.image_loss.double() * n_image,
                        n_image,
                    ]
                )
        self.engine.train()
        dist.all_reduce(acc)
        a = acc.tolist()
        return {
            "loss": a[0] / a[1] if a[1] else None,
            "text_loss": a[2] / a[3] if a[3] else None,
            "image_loss": a[4] / a[5] if a[5] else None,
            "tokens": int(a[1]),
        }

    # -- logging --
    def log(self, record: dict) -> None:
        if self.rank != 0:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            flat = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
            for k, v in record.get("eval", {}).items() if isinstance(record.get("eval"), dict) else []:
                if isinstance(v, (int, float)):
                    flat[f"eval/{k}"] = v
            for k, v in flat.items():
                self.tb.add_scalar(k, v, record["step"])

    def save(self) -> None:
        state = {
            "step": self.step,
            "tokens": self.tokens,
            "skipped": self.skipped,
            "nonfinite_in_a_row": self.nonfinite_in_a_row,
            "world_size": self.plan.world,
            "n_streams": self.plan.n_streams,
            "zero_stage": self.cfg.zero_stage,
            "frozen": sorted(self.plan.frozen),  # what a resumed run must train alike (check_resume)
            "train_rows": self.plan.train_rows,
            # the held-out loss of these weights (every checkpoint is evaluated when there are eval sources)
            "eval_loss": self.held_out[1] if self.held_out is not None and self.held_out[0] == self.step else None,
            "time": time.time(),
        }
        files = {"config.yaml": self.run_dir / "config.yaml", "model.yaml": self.run_dir / "model.yaml"}
        ck.save_checkpoint(
            self.run_dir, self.step, self.engine, state, self.loader.state_dict, files, self.cfg.keep_last
        )

    # -- main loop --
    def run(self, progress: bool = True) -> dict:
        """Train until cfg.steps; returns the last metrics record."""
        cfg, plan = self.cfg, self.plan
        bar = tqdm(
            total=cfg.steps,
            initial=self.step,
            unit="step",
            dynamic_ncols=True,
            disable=not progress or self.rank != 0,
            desc="train",
        )
        it = iter(self.loader)
        last: dict = {}
        postfix: dict[str, str] = {}  # the progress line: loss, tokens/s, the latest held-out loss
        t_last, tok_last = time.time(), self.tokens
        while self.step < cfg.steps:
            micro = [next(it) for _ in range(plan.grad_accum)]
            stats = self.train_step(micro)
            self.step += 1
            self.tokens += stats["tokens"]
            self._count_nonfinite(stats["nonfinite"])
            bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                now = time.time()
                tps = (self.tokens - tok_last) / max(now - t_last, 1e-9)
                t_last, tok_last = now, self.tokens
                mfu = tps * self.flops_per_token / (self.peak * plan.world) if self.peak else None
                last = {
                    "step": self.step,
                    **stats,
                    "tokens_seen": self.tokens,
                    "tokens_per_s": tps,
                    "mfu": mfu,
                    "skipped": self.skipped,
                    "read": self._read_stats(),
                }
                self.log(last)
                postfix["loss"] = "nan" if stats["nonfinite"] else f"{stats['loss']:.4f}"
                postfix["tok_s"] = f"{tps:,.0f}"
                bar.set_postfix(postfix, refresh=False)
            saving = (cfg.save_every and self.step % cfg.save_every == 0) or self.step == cfg.steps
            # a checkpoint is always evaluated (on eval sources): its held-out loss is how the best is kept
            if saving or (cfg.eval_every and self.step % cfg.eval_every == 0):
                self._eval_and_log()
                if self.held_out is not None and self.held_out[1] is not None:
                    postfix["held_out"] = f"{self.held_out[1]:.4f}"
                    bar.set_postfix(postfix, refresh=False)
            if saving:
                self.save()
        bar.close()
        dist.barrier()
        return last

    def _count_nonfinite(self, nonfinite: bool) -> None:
        """Count skipped steps; stop (on every rank alike) after cfg.max_nonfinite in a row."""
        if not nonfinite:
            self.nonfinite_in_a_row = 0
            return
        self.skipped += 1
        self.nonfinite_in_a_row += 1
        if self.rank == 0:
            log.warning("step %d: loss is not finite; step skipped (%d in a row)", self.step, self.nonfinite_in_a_row)
        if self.nonfinite_in_a_row >= self.cfg.max_nonfinite:
            raise InterleafError(
                f"the loss was not finite for {self.nonfinite_in_a_row} steps in a row (last at step {self.step}); "
                f"stopping. Lower optim.lr, check the data, or resume from an earlier checkpoint"
            )

    def _read_stats(self) -> dict:
        st = self.loader.read_stats()
        keys = sorted(st)
        t = torch.tensor([st[k] for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return dict(zip(keys, (int(v) for v in t.tolist())))

    def _eval_and_log(self) -> None:
        result = self.evaluate()
        if result is not None:
            self.held_out = (self.step, result["loss"])
            self.log({"step": self.step, "eval": result})
            if self.rank == 0:
                parts = [f"{k} {v:.4f}" for k, v in result.items() if isinstance(v, float)]
                log.info("step %d held-out: %s", self.step, ", ".join(parts))


# ---- entry point ---------------------------------------------------------------------------
def load_train_config(path, overrides=()) -> TrainConfig:
    return load_config(TrainConfig, path, overrides)


def run_training(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> dict:
    """Train in this process (one rank of a run, or the only one). Collective over all ranks."""
    # DeepSpeed calls torch.distributed functions torch has renamed; not the user's concern
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    _, world, _ = dist_env()
    plan = prepare(cfg, world, resume)  # bad input fails here, before DeepSpeed starts
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = eng.pick_device()
    env_before = set(os.environ)
    rank, world = eng.init_distributed(device, cfg.dist_timeout_s)
    trainer = Trainer(plan, rank, device, resume)
    try:
        check_shared_run_dir(Path(cfg.run_dir))
        if rank == 0 and not (resume and (Path(cfg.run_dir) / "config.yaml").is_file()):
            trainer.write_run_files()
        elif rank == 0:
            save_config(cfg, Path(cfg.run_dir) / "config.yaml")
        trainer.setup()
        t0 = time.time()
        last = trainer.run(progress)
        if rank == 0:
            loss = last.get("loss")
            print(
                f"trained {trainer.step} steps, {trainer.tokens:,} tokens in {time.time() - t0:.1f}s "
                f"({world} process{'es' if world > 1 else ''}); last loss "
                f"{loss if loss is None else round(loss, 4)}; skipped {trainer.skipped}; run: {cfg.run_dir}"
            )
        return last
    except RuntimeError as e:
        if not eng.lost_contact(e):
            raise
        ckpt = find_checkpoint(Path(cfg.run_dir))
        then = f"resume the whole job from {ckpt.name} with --resume" if ckpt else "no checkpoint yet: start it again"
        raise eng.LostContact(
            f"rank {rank}: lost contact with the other processes of the run in step {trainer.step + 1} "
            f"({eng.contact_error(e)}): a process or a node stopped, or the network failed; {then}"
        ) from None
    finally:
        if trainer.tb is not None:
            trainer.tb.close()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        # leave the process as it was found: a later run in it (demo, tests) must not look launched
        for key in set(os.environ) - env_before:
            del os.environ[key]

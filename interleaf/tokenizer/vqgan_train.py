"""VQ-GAN training loop: data sources, schedule, resumable checkpoints, validation metrics.

A run directory holds:

    config.yaml                  resolved training config
    metrics.jsonl                one JSON line per log / validation event
    checkpoints/step_XXXXXXXX/   model.safetensors, disc.safetensors, optim.pt (optimizer + RNG
                                 state, torch.load(weights_only=True)), train_state.json, config.yaml
    vqgan/                       final model (VQModel.save)
    metrics.json                 final validation PSNR, codebook usage, perplexity, timings, and
                                 stopped_by_time_limit (an opt-in time_limit_min cut the run short)

Batches are a pure function of (seed, step), and the checkpoint carries the optimizer and RNG
states, so a resumed run continues exactly where the interrupted one stopped.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from interleaf.config import from_dict, load_config, read_yaml, save_config, to_dict
from interleaf.data.shapes import ShapesWorld
from interleaf.errors import ConfigError, InterleafError
from interleaf.pipeline import check_device
from interleaf.tokenizer.image import check_image, list_images, load_image, pil_to_tensor
from interleaf.tokenizer.losses import LossConfig, VQGANLoss
from interleaf.tokenizer.vqgan import VQConfig, VQModel, code_stats, psnr
from interleaf.utils import atomic_write, get_logger, seed_everything, usable_cpus, write_json

log = get_logger(__name__)

ImageFn = Callable[[int], Image.Image]


@dataclass
class DataConfig:
    """Where training images come from."""

    source: Literal["shapes", "folder"] = "shapes"
    path: str | None = None  # folder of images (source: folder)
    max_shapes: int = 3  # shapes world
    seed: int = 0  # shapes world seed (validation uses a different world seed)
    val_images: int = 256  # held-out images for PSNR / usage / perplexity
    allow_upscale: bool = False  # folder: accept images smaller than the resolution (upscaled)
    cache: bool = True  # folder: keep decoded images in memory (when they fit in ~2 GB)

    def validate(self) -> None:
        """TrainVQConfig.validate checks these."""


@dataclass
class OptimConfig:
    """Adam for the autoencoder and the discriminator, warmup + cosine schedule."""

    lr: float = 2e-4
    disc_lr: float | None = None  # defaults to lr
    betas: tuple[float, float] = (0.5, 0.9)
    weight_decay: float = 0.0
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine decay to lr * min_lr_ratio at the last step
    grad_clip: float = 0.0  # max grad norm; 0 disables

    def validate(self) -> None:
        """TrainVQConfig.validate checks these."""


@dataclass
class TrainVQConfig:
    """Everything `interleaf train-vqgan` needs."""

    model: VQConfig = field(default_factory=VQConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run_dir: str = "runs/vqgan"
    steps: int = 1000
    batch_size: int = 16
    seed: int = 0
    device: str = "cpu"
    threads: int = 0  # torch intra-op threads; 0 keeps torch's default
    # an opt-in guard, 0 = none: stop (checkpoint + final metrics) after this many minutes of training. The
    # run then ends before its steps and what it learned depends on the machine's speed, which it says.
    time_limit_min: float = 0.0
    log_every: int = 20
    val_every: int = 0  # validate every N steps (0: only at the end)
    save_every: int = 500
    keep_last: int = 2
    restart_every: int = 50  # dead-code restart interval in steps (model.restart_dead)
    restart_threshold: float = 0.05  # dead = used less than this fraction of the uniform share
    val_batch_size: int = 64

    def validate(self) -> None:
        for name in ("steps", "batch_size", "log_every", "save_every", "keep_last", "val_batch_size", "restart_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"config key '{name}' must be >= 1, got {getattr(self, name)}")
        if self.data.val_images < 1:
            raise ConfigError(f"data.val_images must be >= 1, got {self.data.val_images}")
        if self.data.source == "folder" and not self.data.path:
            raise ConfigError("data.source is 'folder' but data.path is not set")
        if not 0 < self.optim.lr < float("inf"):
            raise ConfigError(f"optim.lr must be a finite number > 0, got {self.optim.lr}")
        if not 0 <= self.optim.min_lr_ratio <= 1:
            raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {self.optim.min_lr_ratio}")
        if self.model.has_decoder is False:
            raise ConfigError("model.has_decoder must be true to train a VQ-GAN")


def load_train_config(path: str | Path | None, overrides: Sequence[str] = ()) -> TrainVQConfig:
    """YAML + dotted overrides -> validated TrainVQConfig."""
    return load_config(TrainVQConfig, path, overrides)


# ----------------------------------------------------------------------------- data


class ImageSource:
    """Training images by global sample index, and a fixed validation set."""

    def __init__(self, train: ImageFn, val: Sequence[Image.Image] | ImageFn, n_val: int, resolution: int):
        self.train, self.val, self.n_val, self.resolution = train, val, n_val, resolution

    def batch(self, step: int, batch_size: int) -> torch.Tensor:
        """Training batch number `step`: samples step*B ... step*B+B-1, (B, 3, R, R)."""
        start = step * batch_size
        return torch.stack([self._tensor(self.train(start + i)) for i in range(batch_size)])

    def val_batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """The validation set in batches of (b, 3, R, R)."""
        for a in range(0, self.n_val, batch_size):
            idx = range(a, min(a + batch_size, self.n_val))
            yield torch.stack([self._tensor(self.val(i) if callable(self.val) else self.val[i]) for i in idx])

    def _tensor(self, img) -> torch.Tensor:
        if isinstance(img, torch.Tensor):
            return img
        if img.size == (self.resolution, self.resolution):
            return pil_to_tensor(img)
        return load_image(img, self.resolution)


def shapes_source(data: DataConfig, resolution: int) -> ImageSource:
    """The procedural shapes world; validation scenes come from a different world seed."""
    world = ShapesWorld(resolution=resolution, max_shapes=data.max_shapes, seed=data.seed)
    val_world = ShapesWorld(resolution=resolution, max_shapes=data.max_shapes, seed=data.seed + 1_000_003)
    return ImageSource(
        train=lambda i: world.render(world.scene(i)),
        val=lambda i: val_world.render(val_world.scene(i)),
        n_val=data.val_images,
        resolution=resolution,
    )


def check_folder(files: Sequence[Path], progress: bool = False) -> list[tuple[int, int]]:
    """(width, height) of every file; one InterleafError naming the first unreadable file and counting the rest."""

    def check(path: Path) -> tuple[int, int] | str:
        try:
            return check_image(path)
        except InterleafError as e:
            return str(e)

    # PIL reads and decodes with the GIL released (Pillow #1224): threads spread a 100k-image check over the cores.
    # Its format plugins are imported first, once: lazily, from several threads, they race (Pillow #7717).
    Image.init()
    pool = ThreadPoolExecutor(max_workers=min(8, usable_cpus()))
    try:
        found = list(
            tqdm(
                pool.map(check, files),
                total=len(files),
                desc="checking images",
                unit="img",
                disable=not progress,
                dynamic_ncols=True,
            )
        )
    finally:
        pool.shutdown(cancel_futures=True)  # an interrupt does not wait for the queued checks
    bad = [(f, r) for f, r in zip(files, found) if isinstance(r, str)]
    if bad:
        more = [str(f) for f, _ in bad[1:4]] + (["..."] if len(bad) > 4 else [])
        raise InterleafError(bad[0][1] + (f" ({len(bad) - 1} more unreadable: {', '.join(more)})" if more else ""))
    return found


def folder_source(data: DataConfig, resolution: int, seed: int, progress: bool = False) -> ImageSource:
    """A folder of image files: checked up front, split into train/val, reshuffled each epoch."""
    files = list_images(data.path)
    for f, (w, h) in zip(files, check_folder(files, progress)):
        if min(w, h) < resolution and not data.allow_upscale:
            raise InterleafError(
                f"image {f} is {w}x{h}, smaller than the training resolution {resolution} "
                "(set data.allow_upscale=true to upscale such images)"
            )
    order = np.random.default_rng([seed, 7]).permutation(len(files))
    n_val = min(data.val_images, max(1, len(files) // 10)) if len(files) > 1 else 1
    val_files = [files[i] for i in order[:n_val]]
    train_files = [files[i] for i in order[n_val:]] or val_files  # a single image trains on itself
    cache: dict[Path, torch.Tensor] | None = {} if data.cache and len(files) * 3 * resolution**2 * 4 < 2**31 else None

    def read(path: Path) -> torch.Tensor:
        if cache is None:
            return load_image(path, resolution)
        if path not in cache:
            cache[path] = load_image(path, resolution)
        return cache[path]

    n = len(train_files)
    perms: dict[int, np.ndarray] = {}

    def train(i: int) -> torch.Tensor:
        epoch, pos = divmod(i, n)
        if epoch not in perms:
            perms.clear()
            perms[epoch] = np.random.default_rng([seed, 11, epoch]).permutation(n)
        return read(train_files[int(perms[epoch][pos])])

    return ImageSource(train=train, val=lambda i: read(val_files[i]), n_val=n_val, resolution=resolution)


def make_source(
    cfg: TrainVQConfig,
    images: Sequence[Image.Image] | ImageFn | None = None,
    val_images: Sequence[Image.Image] | ImageFn | None = None,
    progress: bool = False,
) -> ImageSource:
    """The configured source, or user-given images (a sequence cycles; a callable maps index -> image)."""
    R = cfg.model.resolution
    if images is not None:
        if not callable(images):
            seq = list(images)
            if not seq:
                raise InterleafError("no training images given")

            def images(i, s=seq):
                return s[i % len(s)]

        val = val_images if val_images is not None else (lambda i: images(10**9 + i))
        n_val = len(val) if not callable(val) else cfg.data.val_images
        return ImageSource(images, val, n_val, R)
    if cfg.data.source == "shapes":
        return shapes_source(cfg.data, R)
    return folder_source(cfg.data, R, cfg.seed, progress)


# ----------------------------------------------------------------------------- schedule


def lr_at(step: int, cfg: TrainVQConfig, base: float) -> float:
    """Linear warmup then cosine decay to base * min_lr_ratio at the last step."""
    o = cfg.optim
    if step < o.warmup_steps:
        return base * (step + 1) / o.warmup_steps
    t = (step - o.warmup_steps) / max(1, cfg.steps - o.warmup_steps)
    t = min(1.0, t)
    return base * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step_*") if p.is_dir() and (p / "train_state.json").is_file()]
    return sorted(done, key=lambda p: int(p.name.split("_")[1]))


@dataclass
class Trainer:
    """State of one VQ-GAN run: model, losses, optimizers, step counter."""

    cfg: TrainVQConfig
    model: VQModel
    loss: VQGANLoss
    opt: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer | None
    step: int = 0
    elapsed: float = 0.0  # training seconds before this process (resumed runs)
    restarted: int = 0  # dead codes restarted so far

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run_dir)

    def save(self) -> Path:
        """Write checkpoints/step_N atomically (temp folder renamed) and prune old ones."""
        root = self.run_dir / "checkpoints"
        final = root / f"step_{self.step:08d}"
        tmp = root / f".step_{self.step:08d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in self.model.state_dict().items()}, str(tmp / "model.safetensors"))
        if self.loss.discriminator is not None:
            save_file(
                {k: v.contiguous() for k, v in self.loss.discriminator.state_dict().items()},
                str(tmp / "disc.safetensors"),
            )
        torch.save(
            {
                "opt": self.opt.state_dict(),
                "opt_d": self.opt_d.state_dict() if self.opt_d else None,
                "rng": torch.get_rng_state(),
            },
            tmp / "optim.pt",
        )
        save_config(self.cfg, tmp / "config.yaml")
        write_json(tmp / "train_state.json", {"step": self.step, "elapsed": self.elapsed, "restarted": self.restarted})
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in checkpoint_dirs(self.run_dir)[: -self.cfg.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def restore(self, ckpt: Path) -> None:
        """Load model, discriminator, optimizers, RNG and step from a checkpoint folder."""
        saved = from_dict(VQConfig, read_yaml(ckpt / "config.yaml").get("model", {}), prefix="model")
        if to_dict(saved) != to_dict(self.cfg.model):
            raise InterleafError(
                f"model config differs from the checkpoint in {ckpt}; resume with the same model settings"
            )
        try:
            self.model.load_weights(load_file(str(ckpt / "model.safetensors")), source=str(ckpt))
            if self.loss.discriminator is not None:
                disc = ckpt / "disc.safetensors"
                if disc.is_file():
                    self.loss.discriminator.load_state_dict(load_file(str(disc)))
            state = torch.load(ckpt / "optim.pt", map_location="cpu", weights_only=True)
        except InterleafError:
            raise
        except Exception as e:
            raise InterleafError(f"cannot read checkpoint {ckpt}: {e}") from None
        self.opt.load_state_dict(state["opt"])
        if self.opt_d is not None and state.get("opt_d") is not None:
            self.opt_d.load_state_dict(state["opt_d"])
        torch.set_rng_state(state["rng"])
        train_state = json.loads((ckpt / "train_state.json").read_text())
        self.step, self.elapsed = int(train_state["step"]), float(train_state["elapsed"])
        self.restarted = int(train_state.get("restarted", 0))

    # ------------------------------------------------------------------ one step

    def train_step(self, x: torch.Tensor) -> dict[str, float]:
        """One autoencoder update (+ one discriminator update once it is active)."""
        cfg, step = self.cfg, self.step
        self.model.train()
        for g in self.opt.param_groups:
            g["lr"] = lr_at(step, cfg, cfg.optim.lr)
        out = self.model(x)
        last = self.model.decoder.conv_out.weight
        loss, logs = self.loss.generator_loss(x, out, step, last)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
        self.opt.step()
        if self.loss.disc_active(step):
            for g in self.opt_d.param_groups:
                g["lr"] = lr_at(step, cfg, cfg.optim.disc_lr or cfg.optim.lr)
            d_loss, d_logs = self.loss.discriminator_loss(x, out.recon, step)
            self.opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            self.opt_d.step()
            logs.update(d_logs)
        if cfg.model.restart_dead and (step + 1) % cfg.restart_every == 0:
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
            self.restarted += self.model.quantize.restart_dead_codes(out.quant.latent, cfg.restart_threshold, gen)
        if cfg.model.restart_dead:
            logs["restarted"] = self.restarted
        logs.update(loss=float(loss.detach()), lr=self.opt.param_groups[0]["lr"])
        logs["psnr"] = float(psnr(out.recon.detach(), x).mean())
        self.step += 1
        return logs


def build_trainer(cfg: TrainVQConfig) -> Trainer:
    """Seeded model, discriminator and optimizers for a fresh run."""
    seed_everything(cfg.seed)
    model = VQModel(cfg.model).to(cfg.device)
    loss = VQGANLoss(cfg.loss, cfg.model.in_channels).to(cfg.device)
    params = [p for p in model.parameters() if p.requires_grad]
    o = cfg.optim
    opt = torch.optim.Adam(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
    opt_d = None
    if loss.discriminator is not None:
        opt_d = torch.optim.Adam(
            loss.discriminator.parameters(), lr=o.disc_lr or o.lr, betas=o.betas, weight_decay=o.weight_decay
        )
    return Trainer(cfg, model, loss, opt, opt_d)


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model: VQModel, source: ImageSource, batch_size: int = 64) -> dict:
    """Validation PSNR (dB, mean over images), codebook usage (% of codes) and perplexity."""
    model.eval()
    scores, codes = [], []
    for x in source.val_batches(batch_size):
        x = x.to(model.device)
        c = model.encode(x)
        recon = model.decode_code(c)
        scores.append(psnr(recon, x).cpu())
        codes.append(c.cpu())
    all_codes = torch.cat(codes)
    stats = code_stats(all_codes, model.config.n_embed)
    return {
        "val_psnr": float(torch.cat(scores).mean()),
        "val_usage": stats["usage"],
        "val_codes_used": int(all_codes.unique().numel()),
        "val_perplexity": stats["perplexity"],
        "val_images": int(all_codes.shape[0]),
    }


# ----------------------------------------------------------------------------- the run


def _append_metrics(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def _trim_metrics(path: Path, step: int) -> None:
    """Drop log lines written after `step` (a resumed run rewrites them)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    with atomic_write(path) as f:
        f.write("".join(line + "\n" for line in keep))


def train_vqgan(
    cfg: TrainVQConfig,
    resume: bool = False,
    images: Sequence[Image.Image] | ImageFn | None = None,
    val_images: Sequence[Image.Image] | ImageFn | None = None,
    progress: bool = True,
) -> dict:
    """Train (or resume) a VQ-GAN run; returns the final metrics (also in run_dir/metrics.json)."""
    check_device(cfg.device, "config key 'device':")
    threads = torch.get_num_threads()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    try:
        return _train(cfg, resume, images, val_images, progress)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: TrainVQConfig, resume: bool, images, val_images, progress: bool) -> dict:
    run_dir = Path(cfg.run_dir)
    existing = checkpoint_dirs(run_dir)
    if existing and not resume:
        raise InterleafError(
            f"run directory {run_dir} already has checkpoints; pass --resume to continue or choose another run_dir"
        )
    source = make_source(cfg, images, val_images, progress)  # a folder is checked here, before anything is written
    trainer = build_trainer(cfg)
    metrics_path = run_dir / "metrics.jsonl"
    if resume and existing:
        trainer.restore(existing[-1])
        log.info("resumed from %s at step %d", existing[-1], trainer.step)
        _trim_metrics(metrics_path, trainer.step)
    elif metrics_path.exists():
        metrics_path.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")

    t0 = time.perf_counter()
    limit = cfg.time_limit_min * 60
    bar = tqdm(total=cfg.steps, initial=trainer.step, desc="train-vqgan", disable=not progress, dynamic_ncols=True)
    stopped_early = False
    while trainer.step < cfg.steps:
        x = source.batch(trainer.step, cfg.batch_size).to(cfg.device)
        logs = trainer.train_step(x)
        now = time.perf_counter()
        elapsed = trainer.elapsed + now - t0
        bar.update(1)
        if trainer.step % cfg.log_every == 0 or trainer.step == cfg.steps:
            row = {"step": trainer.step, **{k: round(v, 6) if isinstance(v, float) else v for k, v in logs.items()}}
            row["elapsed"] = round(elapsed, 2)
            _append_metrics(metrics_path, row)
            bar.set_postfix(loss=f"{logs['loss']:.4f}", psnr=f"{logs['psnr']:.1f}", use=f"{logs['batch_usage']:.2f}")
        if cfg.val_every and trainer.step % cfg.val_every == 0 and trainer.step < cfg.steps:
            _append_metrics(metrics_path, {"step": trainer.step, **evaluate(trainer.model, source, cfg.val_batch_size)})
            t0 += time.perf_counter() - now  # validation time is not training time
        timed_out = limit > 0 and elapsed >= limit
        if trainer.step % cfg.save_every == 0 or trainer.step == cfg.steps or timed_out:
            trainer.elapsed, t0 = elapsed, now
            trainer.save()
        if timed_out:
            stopped_early = trainer.step < cfg.steps
            break
    bar.close()
    train_seconds = trainer.elapsed

    t_eval = time.perf_counter()
    result = evaluate(trainer.model, source, cfg.val_batch_size)
    result.update(
        step=trainer.step,
        steps=cfg.steps,
        stopped_by_time_limit=stopped_early,
        train_seconds=round(train_seconds, 1),
        steps_per_s=round(trainer.step / train_seconds, 3) if train_seconds > 0 else None,
        eval_seconds=round(time.perf_counter() - t_eval, 1),
        n_embed=cfg.model.n_embed,
        grid=list(trainer.model.grid),
        params=trainer.model.num_params(),
        threads=torch.get_num_threads(),
    )
    if stopped_early:
        log.warning("train-vqgan %s (time_limit_min=%g)", time_limit_note(result), cfg.time_limit_min)
    _append_metrics(metrics_path, {"step": trainer.step, **{k: v for k, v in result.items() if k.startswith("val_")}})
    trainer.model.save(run_dir / "vqgan")
    write_json(run_dir / "metrics.json", result)
    return result


def time_limit_note(result: dict) -> str:
    """What a run stopped by `time_limit_min` says of itself ('' for a run that took all its steps)."""
    if not result["stopped_by_time_limit"]:
        return ""
    return (
        f"stopped by its time limit at step {result['step']} of {result['steps']}: "
        "what it learned depends on the machine's speed"
    )


def format_summary(result: dict, run_dir: str | Path) -> str:
    """One line: steps, time, PSNR, usage, perplexity, where the model is (and a time limit that cut the run)."""
    t = result["train_seconds"]
    note = time_limit_note(result)
    return (
        f"train-vqgan: {result['step']} steps in {int(t // 60)}m{t % 60:04.1f}s "
        f"({result['steps_per_s']} steps/s); val PSNR {result['val_psnr']:.2f} dB, codebook usage "
        f"{result['val_usage']:.1f}% ({result['val_codes_used']}/{result['n_embed']}), perplexity "
        f"{result['val_perplexity']:.1f} on {result['val_images']} images -> {Path(run_dir) / 'vqgan'}"
        + (f"; WARNING: {note}" if note else "")
    )

from dataclasses import dataclass, field
from typing import Literal

import pytest

from interleaf.config import load_config, save_config
from interleaf.errors import ConfigError


@dataclass
class Optim:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)

    def validate(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr}")


@dataclass
class Cfg:
    name: str = "x"
    steps: int = 10
    backend: Literal["sdpa", "xformers", "auto"] = "auto"
    ckpt: str | None = None
    optim: Optim = field(default_factory=Optim)
    sizes: list[int] = field(default_factory=lambda: [1, 2])

    def validate(self) -> None:
        if self.steps < 0:
            raise ConfigError(f"steps must be >= 0, got {self.steps}")


def test_yaml_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("steps: 5\noptim:\n  lr: 3e-4\n")
    cfg = load_config(Cfg, p, ["optim.betas=[0.8, 0.9]", "backend=sdpa", "sizes=[4]"])
    assert cfg.steps == 5 and cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.optim.betas == (0.8, 0.9) and cfg.backend == "sdpa" and cfg.sizes == [4]


def test_round_trip(tmp_path):
    cfg = load_config(Cfg, None, ["steps=7", "ckpt=/a/b"])
    save_config(cfg, tmp_path / "out.yaml")
    assert load_config(Cfg, tmp_path / "out.yaml") == cfg


@pytest.mark.parametrize(
    "override, key",
    [
        ("optim.lrr=1", "optim.lrr"),
        ("steps=abc", "steps"),
        ("backend=flash", "backend"),
        ("optim.betas=[1]", "optim.betas"),
        ("steps=true", "steps"),
        ("nope", "nope"),
    ],
)
def test_bad_keys_and_types_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(Cfg, None, [override])


def test_every_section_is_validated():
    with pytest.raises(ConfigError, match="steps must be"):
        load_config(Cfg, None, ["steps=-1"])
    with pytest.raises(ConfigError, match=r"optim\.lr must be"):
        load_config(Cfg, None, ["optim.lr=0"])
    cfg = load_config(Cfg, None, ["steps=0", "optim.lr=1e-9"])  # control: values in range load
    assert cfg.steps == 0 and cfg.optim.lr == 1e-9


def test_missing_file_is_clear(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(Cfg, tmp_path / "missing.yaml")


@pytest.mark.parametrize("name", ["shapes-tiny", "shapes-long"])
def test_shipped_demo_configs_load_with_their_stage_overrides(name):
    """A demo config names other configs plus overrides: all of it must load, or the demo dies late."""
    from interleaf.config import CONFIG_DIR
    from interleaf.demo import DemoConfig
    from interleaf.tokenizer import vqgan_train
    from interleaf.training import train

    cfg = load_config(DemoConfig, CONFIG_DIR / "demo" / f"{name}.yaml")
    cfg.validate()
    vq = vqgan_train.load_train_config(cfg.vqgan_config, cfg.vqgan)
    tr = train.load_train_config(cfg.train_config, cfg.train)
    if name == "shapes-tiny":
        assert (vq.time_limit_min, vq.steps, tr.steps) == (0, 1300, 2000)  # step counts, no clock
    else:
        assert (vq.steps, vq.optim.lr, vq.time_limit_min) == (3000, 1e-3, 0)
        assert (cfg.train_pairs, tr.steps, tr.data.image_first_prob) == (144_000, 16_000, 0.35)
        assert (cfg.cfg_scale, cfg.image_temperature, cfg.eval.image_temperature) == (1.5, 0.3, 0.3)

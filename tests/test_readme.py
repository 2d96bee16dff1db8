"""README's Python examples, run as written, against a tiny random model where README's model is.

The blocks are taken from README.md and executed unchanged in one namespace (as a reader would
paste them into one session), in a folder that holds `runs/demo/export/model` (the tiny model)
and the repository's `docs/examples/`. What they print and return is checked against the same
calls made here by other means.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_serve import tiny_model_dir

import interleaf
from interleaf.errors import InterleafError
from interleaf.sampling.events import Done, ImageDone

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
AUTHORS_WAY = "### Prompting and sampling as the authors do"  # Chameleon's weights: test_chameleon_sampling.py


def section(heading: str) -> str:
    """README's text from `heading` up to the next heading of its level or above."""
    start = README.index(heading + "\n") + len(heading)
    end = re.search(rf"^#{{1,{heading.index(' ')}}} ", README[start:], flags=re.M)
    return README[start : start + end.start()] if end else README[start:]


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


PYTHON_BLOCKS = python_blocks(README.replace(section(AUTHORS_WAY), ""))


@pytest.fixture(scope="module")
def readme_root(tmp_path_factory):
    """A folder laid out as README assumes: the model where `make demo` exports it, docs/examples."""
    root = tmp_path_factory.mktemp("readme")
    tiny_model_dir(root / "runs" / "demo" / "export" / "model")
    (root / "docs").mkdir()
    (root / "docs" / "examples").symlink_to(ROOT / "docs" / "examples")
    return root


@pytest.fixture
def in_readme_root(readme_root, monkeypatch):
    monkeypatch.chdir(readme_root)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is fastest
    yield readme_root
    torch.set_num_threads(threads)


def test_readme_python_examples_run_as_written(in_readme_root):
    assert PYTHON_BLOCKS, "README has no python examples"
    namespace: dict = {}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        for block in PYTHON_BLOCKS:
            exec(compile(block, "README.md", "exec"), namespace)
    printed = out.getvalue()
    # the streamed drawing: its events as printed, and the image they carried
    pipe = namespace["pipe"]
    events = list(pipe.stream("a small blue square in the center", mode="image", cfg_scale=3.0, seed=0))

    def unplaced(text: str) -> str:  # without memory addresses and timings
        return re.sub(r" at 0x[0-9a-fA-F]+|(seconds|tokens_per_s)=[0-9.e+-]+", "", text)

    assert unplaced(printed).startswith(unplaced("".join(f"{e}\n" for e in events)))
    assert any(isinstance(e, ImageDone) for e in events) and isinstance(events[-1], Done)
    # the caption: greedy text about the image *file*, equal to captioning the decoded picture
    caption = namespace["caption"]
    picture = Image.open("docs/examples/caption-prompt.png").convert("RGB")
    reference = pipe.generate([picture], mode="text", temperature=0.0)
    assert caption.token_ids == reference.token_ids and printed.endswith(caption.text + "\n")
    assert isinstance(caption.prompt[0], Path) and not caption.images
    # negative control: a file name as text (here no file of that name: allowed) is words
    as_words = pipe.generate(["caption-prompt.png"], mode="text", temperature=0.0)
    assert as_words.token_ids != reference.token_ids


def test_a_file_name_in_a_string_is_refused_with_the_spelling_to_use(in_readme_root):
    pipe = interleaf.load("runs/demo/export/model")
    name = "docs/examples/caption-prompt.png"
    with pytest.raises(InterleafError, match=re.escape(f"write interleaf.Image('{name}')")):
        pipe.generate([name], mode="text")
    with pytest.raises(InterleafError, match=re.escape(f"write interleaf.Image('{name}')")):
        pipe.stream(name, mode="text")
    with pytest.raises(InterleafError, match="a path in a prompt is not an image"):
        pipe.generate([Path(name)], mode="text")
    with pytest.raises(InterleafError, match="interleaf.Image takes a file path or a PIL image"):
        interleaf.Image(np.zeros((4, 4, 3)))
    # text that merely looks like a file name is text when no such file exists
    doc = pipe.generate(["docs/examples/no-such-picture.png"], mode="text", max_new_tokens=3)
    assert len(doc.token_ids) == 3
    # the server's prompts are built from a form, never looked up as files (test_serve.py)

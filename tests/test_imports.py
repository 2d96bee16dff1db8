"""Import structure: the command line starts without the heavy libraries, and every module of the
package imports on its own (imports sit at the top of modules, so a cycle would fail here)."""

import subprocess
import sys
from pathlib import Path

import interleaf

PACKAGE = Path(interleaf.__file__).parent
HEAVY = ("torch", "deepspeed", "yaml", "PIL", "safetensors", "webdataset", "transformers", "xformers")

# Runs in a fresh interpreter: prints the heavy libraries loaded once `code` has run.
PROBE = "import sys\n{code}\nprint(' '.join(m for m in {heavy!r} if m in sys.modules))"

# Runs in a fresh interpreter: the libraries named in argv[1] once, then each module of argv[2:] first, in
# a forked child (a cycle among the package's modules fails whichever of them is imported first).
FIRST_IMPORT = """
import os, sys, traceback
for lib in filter(None, sys.argv[1].split(",")):
    __import__(lib)
failed = []
for name in sys.argv[2:]:
    pid = os.fork()
    if pid == 0:
        try:
            __import__(name)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    if os.waitpid(pid, 0)[1] != 0:
        failed.append(name)
print(" ".join(failed))
"""


def heavy_after(code: str) -> list[str]:
    src = PROBE.format(code=code, heavy=HEAVY)
    out = subprocess.run([sys.executable, "-c", src], capture_output=True, text=True, check=True, timeout=300)
    return out.stdout.split()


def test_cli_parser_loads_no_heavy_library():
    assert heavy_after("from interleaf.cli import build_parser; build_parser()") == []
    # control: the probe does see them once a command's library is imported
    assert {"torch", "yaml", "PIL"} <= set(heavy_after("import interleaf.pipeline"))


def module_names() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__main__":  # runs the command line
            continue
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def test_every_module_imports_first():
    names = module_names()
    libraries = (
        "numpy,PIL.Image,safetensors.torch,starlette.applications,tokenizers,sentencepiece,torch,tqdm,webdataset,yaml"
    )
    assert len(names) > 40 and "interleaf.pipeline" in names and "interleaf.training.train" in names
    out = subprocess.run(
        [sys.executable, "-c", FIRST_IMPORT, libraries, *names],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=PACKAGE.parent,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == [], out.stderr[-3000:]


def test_first_import_probe_sees_a_cycle(tmp_path):
    # control: two modules importing a name from each other at their tops fail the probe
    (tmp_path / "cyc_a.py").write_text("from cyc_b import B\nA = 1\n")
    (tmp_path / "cyc_b.py").write_text("from cyc_a import A\nB = 1\n")
    out = subprocess.run(
        [sys.executable, "-c", FIRST_IMPORT, "", "cyc_a", "json"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert out.stdout.split() == ["cyc_a"], out.stderr[-3000:]

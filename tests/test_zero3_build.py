"""ZeRO-3 builds the model straight into its partitions, with the weights the whole model has.

tests/zero3_build.py runs on each of 3 processes (uneven partitions, zero-padded): every gathered
parameter equals the one `Transformer(args, seed)` holds, in fp32 and after bf16's rounding (the
parameters of a bf16 run are built in bf16 directly), tied embeddings included. Losses of whole runs built both ways are
compared in tests/test_train.py and tests/test_multinode.py.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from interleaf.training.engine import free_port

pytestmark = pytest.mark.slow


def test_partitions_hold_the_whole_models_weights():
    world, port = 3, str(free_port())
    script = str(Path(__file__).resolve().parent / "zero3_build.py")
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, script], env=env, stdout=subprocess.PIPE, text=True))
    out = [p.communicate(timeout=300)[0].strip().splitlines()[-1:] for p in procs]
    assert [p.returncode for p in procs] == [0] * world, out
    n = 29 + 29 + 28  # fp32, bf16, tied fp32 (a tied output weight is the embedding)
    assert sorted(line for lines in out for line in lines) == [f"rank {r} of 3: {n} tensors equal" for r in range(3)]

"""One rank of tests/test_zero3_build.py: build the debug model under ZeRO-3 with
`engine.build_model` (deepspeed.zero.Init + fill_parameters), gather every parameter and compare
it with the whole model `Transformer(args, seed)` builds, in fp32 and in bf16, with and without tied
embeddings; print one line."""

from interleaf.training.engine import cpu_accelerator_env, init_distributed

cpu_accelerator_env()
import deepspeed  # noqa: E402
import torch  # noqa: E402

from interleaf.model.args import ModelArgs  # noqa: E402
from interleaf.model.init import RandomInit  # noqa: E402
from interleaf.model.transformer import Transformer  # noqa: E402
from interleaf.training.engine import build_model  # noqa: E402

rank, world = init_distributed(torch.device("cpu"), 60)
checked = 0
for tied, dtype in ((False, torch.float32), (False, torch.bfloat16), (True, torch.float32)):
    args = ModelArgs.from_name("debug", vocab_size=331, tie_embeddings=tied)  # odd sizes: padded partitions
    reference = Transformer(args, seed=7)
    ds = {
        "train_batch_size": world,
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 3},
        "bf16": {"enabled": dtype == torch.bfloat16},
    }
    model = build_model(args, ds, RandomInit(args, 7), torch.device("cpu"))
    assert all(p.ds_tensor.numel() < p.ds_numel or world == 1 for p in model.parameters())  # partitioned
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        with deepspeed.zero.GatheredParameters(p):
            assert p.dtype == dtype and torch.equal(p.data, q.data.to(dtype)), name
            checked += 1
print(f"rank {rank} of {world}: {checked} tensors equal")
torch.distributed.destroy_process_group()

"""Worker for test_distributed.py's FSDP check: does preftune's log-prob engine, which calls the decoder and
the LM head as separate modules (not the model's forward), get correct gradients under FSDP2 sharding?

Run under torchrun (gloo on CPU): `python -m torch.distributed.run --nproc_per_node N -m tests.fsdp_gradients OUT`.
With N > 1 every decoder layer, the decoder (embeddings, final norm) and the LM head are each a
`fully_shard` unit, so each module the engine calls unshards its own parameters; the 4 examples
are split across the processes. Rank 0 writes OUT.safetensors: the full (gathered) gradient of
−Σ log p(answer) over the 4 examples, scaled as the trainer scales it.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from preftune.data.collate import collate_pairs
from preftune.logprobs import sequence_logps
from tests.support import load_test_tokenizer, tiny_llama, tokenized_hh_pairs

EXAMPLES = 4


def main(out: str) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    tokenizer = load_test_tokenizer()
    model = tiny_llama(len(tokenizer))
    model.train()
    if world > 1:
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model.model)
        fully_shard(model.lm_head)
    pairs = tokenized_hh_pairs(tokenizer, read=16)[:EXAMPLES]
    per_rank = EXAMPLES // world
    shard = pairs[rank * per_rank : (rank + 1) * per_rank]
    logps = sequence_logps(model, collate_pairs(shard, pad_id=tokenizer.pad_token_id), chunk_size=int(os.environ.get("CHUNK", "100000")))
    # As the trainer: sum over this process's examples × world / examples in the step; FSDP averages over processes.
    (-logps.sum.sum() * world / EXAMPLES).backward()
    gradients = {}
    for name, parameter in model.named_parameters():
        grad = parameter.grad
        gradients[name] = (grad.full_tensor() if isinstance(grad, DTensor) else grad).detach().clone()
    if rank == 0:
        save_file(gradients, out + ".safetensors")
    if world > 1:
        # Without it rank 1 can tear gloo down while rank 0 still writes, and abort ("terminate called without an active exception").
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])

"""Worker for test_distributed.py's engine-level FSDP check: preftune's sharding (`Distribution.shard`) and
its log-prob engine, which calls the decoder and the LM head in chunks rather than the model's forward.

Run under torchrun (gloo on CPU): `python -m torch.distributed.run --nproc_per_node N -m tests.fsdp_gradients OUT tied|untied CHUNK`
(N is 1 or 2). With N = 2 the model is sharded as training shards it (each decoder layer, then the causal LM as root) and
the examples are split across the processes: with a small CHUNK each process runs a different number
of LM-head chunks, which would deadlock if a chunk issued a collective. Rank 0 writes OUT.safetensors:
the full (gathered) gradient of −Σ log p(answer) over the examples, scaled as the trainer scales it.
"""

from __future__ import annotations

import os
import sys

import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor

from preftune.data.collate import collate_pairs
from preftune.logprobs import sequence_logps
from preftune.train.distributed import Distribution
from tests.support import load_test_tokenizer, tiny_llama, tokenized_hh_pairs

EXAMPLES = 4


def main(out: str, tied: str, chunk: str) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    tokenizer = load_test_tokenizer()
    model = tiny_llama(len(tokenizer), tie_word_embeddings=tied == "tied")
    model.train()
    if world > 1:
        Distribution("fsdp", world, "test").shard(model, keep_blueprint=False)
    pairs = tokenized_hh_pairs(tokenizer, read=16)[:EXAMPLES]
    # With 2 processes, process 0 takes one example and process 1 three: unequal answer tokens and chunk counts.
    bounds = {1: [0, EXAMPLES], 2: [0, 1, EXAMPLES]}[world]
    shard = pairs[bounds[rank] : bounds[rank + 1]]
    logps = sequence_logps(model, collate_pairs(shard, pad_id=tokenizer.pad_token_id), chunk_size=int(chunk))
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

"""Pages of a memory-mapped safetensors checkpoint that a converted model no longer reads, handed back.

transformers maps a safetensors checkpoint into memory, and parameters loaded in the file's dtype
are views of the mapping. Converting a layer (to bf16, or to 4-bit) reads its pages, which then
stay resident, and counted in the process's RSS, for as long as any parameter (the embeddings,
say) keeps the mapping alive. Dropping each converted layer's pages as soon as its copy exists
keeps a conversion's peak at the converted model plus one layer.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
from pathlib import Path

import torch

_MADV_DONTNEED = 4  # Linux: a private file mapping's pages are dropped and would be read from the file again


def checkpoint_mappings(maps: Path = Path("/proc/self/maps")) -> list[tuple[int, int]]:
    """[start, end) of this process's private mappings of safetensors files (empty where /proc is absent)."""
    try:
        lines = maps.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[1].endswith("p") and fields[5].endswith(".safetensors"):
            start, end = (int(address, 16) for address in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


def drop_mapped_pages(tensor: torch.Tensor, mapped: list[tuple[int, int]]) -> bool:
    """madvise(DONTNEED) the whole pages of `tensor` when it lies in a private checkpoint mapping; True if it did.

    Only for tensors nothing will read again (the caller has replaced them) and only inside a file
    mapping: there dropping a page loses nothing, where on anonymous memory it would zero live data.
    """
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        return False
    start = tensor.data_ptr()
    end = start + tensor.nbytes
    if not any(low <= start and end <= high for low, high in mapped):
        return False
    page = mmap.PAGESIZE
    first, last = -(-start // page) * page, end // page * page  # whole pages only: the edges may hold a neighbour
    return last > first and _madvise()(first, last - first, _MADV_DONTNEED) == 0


def trim_heap() -> bool:
    """Hand the allocator's free heap pages back to the kernel (glibc `malloc_trim`); False where there is no glibc.

    A conversion frees many large temporaries; glibc keeps freed heap memory for reuse, and how much
    it keeps after one 4-bit load of SmolLM2-1.7B's shape varied between 1.1 and 2.2 GB of heap.
    """
    trim = getattr(_libc(), "malloc_trim", None)
    return trim is not None and trim(0) == 1


@functools.cache
def _libc():
    return ctypes.CDLL(None, use_errno=True)


@functools.cache
def _madvise():
    libc = _libc()
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    libc.madvise.restype = ctypes.c_int
    return libc.madvise

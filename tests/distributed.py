"""Helpers for tests that spawn torch.distributed processes."""

import contextlib

import torch.distributed as dist


@contextlib.contextmanager
def gloo_group(rank: int, world: int, init_file: str):
    """A gloo process group for one spawned rank, torn down even when the test body fails."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()

"""Training state as safetensors + JSON (no pickle anywhere), one file per worker.

    rank{r}.safetensors   this worker's shard of the weights and AdamW moments (FSDP2;
                          under DDP only rank 0 writes them), and its RNG states
    state.json            step, reward shift, scheduler, data position, metrics (rank 0)

Every worker writes into its own local directory and reports it; Ray Train merges the
reports into one checkpoint directory in storage (local or S3). Resume needs the same
number of workers and the same strategy: the shards are the workers' own slices.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file

FORMAT = "bco-ray-train-v1"


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _named_params(policy: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    module = policy.module if isinstance(policy, torch.nn.parallel.DistributedDataParallel) else policy
    return dict(module.named_parameters())


def reshard(policy: torch.nn.Module) -> None:
    """FSDP2 keeps the root's parameters unsharded after a forward without backward (an
    eval pass); put every module back on its sharded parameters, the optimizer's."""
    for m in policy.modules():
        if hasattr(m, "reshard") and hasattr(m, "unshard"):
            m.reshard()


def _param_names(policy, optimizer) -> list[tuple[str, torch.nn.Parameter]]:
    reshard(policy)
    names = {id(p): n for n, p in _named_params(policy).items()}
    return [(names[id(p)], p) for g in optimizer.param_groups for p in g["params"]]


def save(directory: str, policy, optimizer, scheduler, shift, state: dict, rank: int, world: int,
         strategy: str) -> None:
    """Write this worker's part of the training state into `directory` (local)."""
    os.makedirs(directory, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    if strategy == "fsdp" or rank == 0:
        with torch.no_grad():
            for i, (name, p) in enumerate(_param_names(policy, optimizer)):
                tensors[f"model.{name}"] = _local(p.detach()).contiguous().cpu()
                for k, v in optimizer.state.get(p, {}).items():
                    tensors[f"optim.{i}.{k}"] = _local(v).detach().contiguous().cpu().reshape(_local(v).shape)
    save_file(tensors, os.path.join(directory, f"rank{rank}.safetensors"), metadata={"format": FORMAT})
    if rank == 0:
        doc = {"format": FORMAT, "world": world, "strategy": strategy, **state,
               "reward_shift": shift.state_dict(), "scheduler": _jsonable(scheduler.state_dict())}
        with open(os.path.join(directory, "state.json"), "w") as f:
            json.dump(doc, f, indent=1)


def _jsonable(sd: dict) -> dict:
    # LambdaLR keeps its lambdas as None in state_dict; the rest are numbers and lists.
    return {k: v for k, v in sd.items() if k != "lr_lambdas"}


def load(directory: str, policy, optimizer, scheduler, shift, rank: int, world: int, strategy: str) -> dict:
    """Restore this worker's state from a checkpoint directory; returns state.json."""
    with open(os.path.join(directory, "state.json")) as f:
        doc = json.load(f)
    if doc.get("format") != FORMAT:
        raise ValueError(f"{directory} is not a bco-ray training checkpoint")
    if (doc["world"], doc["strategy"]) != (world, strategy):
        raise ValueError(f"the checkpoint in {directory} was written by {doc['world']} {doc['strategy']} workers; "
                         f"resume with train.num_workers={doc['world']} and train.strategy={doc['strategy']}")
    own = load_file(os.path.join(directory, f"rank{rank}.safetensors"))
    weights = own if strategy == "fsdp" else load_file(os.path.join(directory, "rank0.safetensors"))
    torch.set_rng_state(own["rng.cpu"])
    if "rng.cuda" in own and torch.cuda.is_available():
        torch.cuda.set_rng_state(own["rng.cuda"])
    with torch.no_grad():
        for i, (name, p) in enumerate(_param_names(policy, optimizer)):
            _local(p).copy_(weights[f"model.{name}"].to(_local(p).device))
            moments = {k.split(".", 2)[2]: v for k, v in weights.items() if k.startswith(f"optim.{i}.")}
            if moments:
                state = {}
                for k, v in moments.items():
                    if k == "step":
                        state[k] = v.clone()
                    else:
                        t = torch.zeros_like(p)
                        _local(t).copy_(v.to(_local(t).device))
                        state[k] = t
                optimizer.state[p] = state
    scheduler.load_state_dict({**doc["scheduler"], "lr_lambdas": [None] * len(optimizer.param_groups)})
    for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr(), strict=True):
        group["lr"] = lr  # the scheduler sets it only at its next step
    shift.load_state_dict(doc["reward_shift"])
    return doc


def _checkpoint_dirs(fs, run_path: str) -> list[tuple[str, set[str]]]:
    """(directory, file names) of every checkpoint under a Ray Train run's storage path, newest first."""
    import pyarrow.fs as pafs

    try:
        infos = fs.get_file_info(pafs.FileSelector(run_path))
    except (FileNotFoundError, OSError):
        return []
    return [(d, {i.base_name for i in fs.get_file_info(pafs.FileSelector(d))})
            for d in sorted((i.path for i in infos if i.type == pafs.FileType.Directory
                             and i.base_name.startswith("checkpoint_")), reverse=True)]


def latest_complete(fs, run_path: str, world: int) -> str | None:
    """The newest checkpoint directory under a Ray Train run's storage path that holds every
    worker's file and state.json, registered or not.

    Ray Train registers a reported checkpoint when its controller processes the report; a
    worker that dies right after reporting can take the registration with it, though the
    files are complete in storage. Resuming from those files loses nothing."""
    for d, names in _checkpoint_dirs(fs, run_path):
        if "state.json" in names and all(f"rank{r}.safetensors" in names for r in range(world)):
            return d
    return None


def latest_state(fs, run_path: str) -> dict | None:
    """state.json of the newest checkpoint under a run's storage path (any world size)."""
    from bco_ray import storage

    for d, names in _checkpoint_dirs(fs, run_path):
        if "state.json" in names:
            return json.loads(storage.read_bytes(fs, storage.join(d, "state.json")))
    return None

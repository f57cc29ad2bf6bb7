"""Training state as safetensors + JSON (no pickle anywhere), one file per worker.

    rank{r}-NNNNN.safetensors   this worker's rows of the weights and AdamW moments (FSDP2
                                with several workers; otherwise rank 0 writes them whole) and
                                its RNG states, in files of about 1 GiB
    rank{r}.json                its files, written after them
    state.json            step, reward shift, scheduler, data position, metrics, the
                          number of workers and the strategy that wrote it (rank 0)

Every worker writes into its own staging directory and reports it; its files then move into
one checkpoint directory in storage (`persist`: a rename when storage is this machine's disk,
an upload to S3 otherwise, in the background during training). Any number of workers
resumes it: each reads only its rows of every tensor from the files that hold them
(bco_ray.train.weights.read_rows), so 2 -> 1 and 1 -> 2 workers continue the same run.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import torch
from safetensors.torch import save_file

from bco_ray.train.weights import SafetensorsDir, local, local_rows, read_rows

FORMAT = "bco-ray-train-v1"


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


FILE_BYTES = 2**30  # a rank's tensors go out in files of about this size: host memory holds one


def save(directory: str, policy, optimizer, scheduler, shift, state: dict, rank: int, world: int,
         strategy: str, file_bytes: int = FILE_BYTES) -> None:
    """Write this worker's part of the training state into `directory` (local): its tensors
    in files of about `file_bytes` (GPU tensors are copied to the host one file at a time),
    then rank{r}.json naming them, last."""
    os.makedirs(directory, exist_ok=True)
    files: list[str] = []
    part: dict[str, torch.Tensor] = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        part["rng.cuda"] = torch.cuda.get_rng_state()
    size = 0

    def flush():
        nonlocal part, size
        files.append(f"rank{rank}-{len(files):05d}.safetensors")
        save_file(part, os.path.join(directory, files[-1]), metadata={"format": FORMAT})
        part, size = {}, 0

    if strategy == "fsdp" or rank == 0:
        with torch.no_grad():
            for i, (name, p) in enumerate(_param_names(policy, optimizer)):
                named = {f"model.{name}": local(p.detach())}
                named.update({f"optim.{i}.{k}": local(v).detach() for k, v in optimizer.state.get(p, {}).items()})
                for key, t in named.items():
                    if size and size + t.nbytes > file_bytes:
                        flush()
                    part[key] = t.contiguous().cpu().reshape(t.shape)
                    size += t.nbytes
    flush()
    with open(os.path.join(directory, f"rank{rank}.json"), "w") as f:
        json.dump({"format": FORMAT, "files": files}, f)
    if rank == 0:
        doc = {"format": FORMAT, "world": world, "strategy": strategy, **state,
               "reward_shift": shift.state_dict(), "scheduler": _jsonable(scheduler.state_dict())}
        with open(os.path.join(directory, "state.json"), "w") as f:
            json.dump(doc, f, indent=1)


STAGING = ".staging-"  # not "checkpoint_": the scans below never take one for a checkpoint


def staging_dir(fs, experiment_path: str) -> str:
    """Where a worker writes its part of a checkpoint before reporting it: beside the run's
    checkpoints when storage is a local disk, so that `persist` renames GBs instead of copying
    them (the demo's 1.6 GB checkpoint was written twice), a local temporary directory otherwise."""
    import pyarrow.fs as pafs

    if isinstance(fs, pafs.LocalFileSystem):
        os.makedirs(experiment_path, exist_ok=True)
        return tempfile.mkdtemp(prefix=STAGING, dir=experiment_path)
    return tempfile.mkdtemp(prefix=STAGING)


def clear_staging(fs, experiment_path: str) -> None:
    """Staging directories an earlier attempt left behind (a worker killed while writing)."""
    import pyarrow.fs as pafs

    if isinstance(fs, pafs.LocalFileSystem) and os.path.isdir(experiment_path):
        for name in os.listdir(experiment_path):
            if name.startswith(STAGING):
                shutil.rmtree(os.path.join(experiment_path, name), ignore_errors=True)


def persist(src: str, fs, dest: str) -> None:
    """Move a worker's staged part into the checkpoint directory `dest` that every worker's part
    joins (a rename on a local disk, an upload to S3), and remove the staging directory. The
    JSON files go last, state.json after its rank's tensors, so that a checkpoint
    `latest_complete` finds is whole even if the move was cut short."""
    from bco_ray import storage

    names = sorted(os.listdir(src), key=lambda n: (n == "state.json", n.endswith(".json"), n))
    storage.move_files(src, names, fs, dest)


def _rank_files(directory: str, rank: int) -> SafetensorsDir:
    # rank{r}-NNNNN.safetensors; rank{r}.safetensors in checkpoints of earlier versions
    return SafetensorsDir(directory, f"rank{rank}[-.]*safetensors")


def _jsonable(sd: dict) -> dict:
    # LambdaLR keeps its lambdas as None in state_dict; the rest are numbers and lists.
    return {k: v for k, v in sd.items() if k != "lr_lambdas"}


def load(directory: str, policy, optimizer, scheduler, shift, rank: int, world: int) -> dict:
    """Restore this worker's state from a checkpoint directory written by any number of
    workers; returns state.json."""
    with open(os.path.join(directory, "state.json")) as f:
        doc = json.load(f)
    if doc.get("format") != FORMAT:
        raise ValueError(f"{directory} is not a bco-ray training checkpoint")
    sharded = doc["strategy"] == "fsdp" and doc["world"] > 1
    files = [_rank_files(directory, r) for r in range(doc["world"] if sharded else 1)]
    if rank < doc["world"]:  # a worker the old run did not have keeps its fresh seed
        own = files[rank] if rank < len(files) else _rank_files(directory, rank)
        torch.set_rng_state(own.tensor("rng.cpu"))
        if "rng.cuda" in own and torch.cuda.is_available():
            torch.cuda.set_rng_state(own.tensor("rng.cuda"))
    with torch.no_grad():
        for i, (name, p) in enumerate(_param_names(policy, optimizer)):
            a, b = local_rows(p)
            local(p).copy_(read_rows(files, f"model.{name}", p.shape[0], a, b))
            moments = sorted({k.split(".", 2)[2] for k in files[0].where if k.startswith(f"optim.{i}.")})
            state = {}
            for k in moments:
                if k == "step":
                    state[k] = files[0].tensor(f"optim.{i}.{k}")
                else:  # into the optimizer's own tensor when it has one: no second copy of the state
                    t = optimizer.state.get(p, {}).get(k)
                    t = torch.zeros_like(p) if t is None else t
                    local(t).copy_(read_rows(files, f"optim.{i}.{k}", p.shape[0], a, b))
                    state[k] = t
            if state:
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


def latest_complete(fs, run_path: str) -> str | None:
    """The newest checkpoint directory under a Ray Train run's storage path that holds
    state.json and the file of every worker that wrote it, registered or not.

    Ray Train registers a reported checkpoint when its controller processes the report; a
    worker that dies right after reporting can take the registration with it, though the
    files are complete in storage. Resuming from those files loses nothing."""
    from bco_ray import storage

    for d, names in _checkpoint_dirs(fs, run_path):
        if "state.json" in names:
            world = json.loads(storage.read_bytes(fs, storage.join(d, "state.json")))["world"]
            if all(f"rank{r}.json" in names or f"rank{r}.safetensors" in names for r in range(world)):
                return d
    return None


def latest_state(fs, run_path: str) -> dict | None:
    """state.json of the newest checkpoint under a run's storage path (any world size)."""
    from bco_ray import storage

    for d, names in _checkpoint_dirs(fs, run_path):
        if "state.json" in names:
            return json.loads(storage.read_bytes(fs, storage.join(d, "state.json")))
    return None

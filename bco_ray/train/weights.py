"""Weights at any scale, without Ray: every rank only ever holds its own shards.

- Load: the model is built with its parameters on the meta device (no memory), sharded by
  FSDP2, given storage for its local shards only, and each rank reads just its rows of
  every tensor from the safetensors files (`get_slice`: no full tensor is materialised).
  Host and device memory at load: N / world plus the buffers.
- Rows: FSDP2 shards dim 0 as torch.chunk does, so rank r of W holds rows
  [r * ceil(n / W), (r + 1) * ceil(n / W)) clipped to n. Checkpoints store each rank's
  rows; a checkpoint written by W workers is read by any other number of workers by
  taking, for each tensor, the overlap of the old and the new row ranges.
- Export: one tensor gathered at a time (a collective every rank joins), cast to the export
  dtype and added to rank 0's current shard file; a file is written when it reaches
  `max_shard_bytes`. Rank 0 holds at most one shard plus one tensor.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def rows_of(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rows [a, b) of a dim-0 sharded tensor of n rows held by `rank` of `world`."""
    c = -(-n // world)
    return min(n, rank * c), min(n, (rank + 1) * c)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a parameter or optimizer state (DTensor) or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def local_rows(t: torch.Tensor) -> tuple[int, int]:
    """The rows of the global tensor that this rank holds."""
    n = t.shape[0]
    if hasattr(t, "device_mesh") and t.placements[0].is_shard(0):
        return rows_of(n, t.device_mesh.get_local_rank(), t.device_mesh.size())
    return 0, n


# ---------------------------------------------------------------------------- reading

class SafetensorsDir:
    """The tensors of a directory of safetensors files (one file or HF's sharded layout),
    read by rows. Only file headers are read up front."""

    def __init__(self, directory: str | os.PathLike, pattern: str = "*.safetensors"):
        self.files = sorted(Path(directory).glob(pattern))
        if not self.files:
            raise FileNotFoundError(f"no {pattern} in {directory}")
        self._handles: dict[Path, object] = {}
        self.where: dict[str, Path] = {}
        for f in self.files:
            for k in self._open(f).keys():
                self.where[k] = f

    def _open(self, f: Path):
        if f not in self._handles:
            self._handles[f] = safe_open(str(f), framework="pt", device="cpu")
        return self._handles[f]

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def tensor(self, key: str) -> torch.Tensor:
        return self._open(self.where[key]).get_tensor(key)

    def rows(self, key: str, a: int, b: int) -> torch.Tensor:
        """Rows [a, b) of tensor `key`, read without the rest of it."""
        return self._open(self.where[key]).get_slice(key)[a:b]


def read_rows(handles: list[SafetensorsDir], key: str, n: int, a: int, b: int) -> torch.Tensor:
    """Rows [a, b) of a tensor of n rows saved by len(handles) ranks, each holding its
    rows_of(n, r, len(handles)) under `key`."""
    shards = len(handles)
    parts = []
    for r, h in enumerate(handles):
        ra, rb = rows_of(n, r, shards)
        lo, hi = max(a, ra), min(b, rb)
        if lo < hi:
            parts.append(h.rows(key, lo - ra, hi - ra))
    if not parts:
        return handles[0].rows(key, 0, 0)
    return parts[0] if len(parts) == 1 else torch.cat(parts)


# ---------------------------------------------------------------------------- loading

@contextlib.contextmanager
def parameters_on_meta():
    """Modules built inside get their parameters on the meta device, and their buffers as
    usual: RoPE's inverse frequencies are computed at construction, not loaded."""
    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)  # noqa: SLF001
    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def empty_model(model_dir: str, trust_remote_code: bool = False):
    """The causal LM of `model_dir` in float32 with no parameter storage (meta)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    with parameters_on_meta():
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code)


def materialise(module: torch.nn.Module, lm: torch.nn.Module, model_dir: str, device: torch.device) -> None:
    """Storage for this rank's shards of `module` (built by empty_model, sharded or not),
    filled with their rows of the weights in `model_dir`; buffers kept."""
    buffers = {n: b.detach().clone() for n, b in module.named_buffers()}
    tied: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        tied.setdefault(id(p), []).append(name)
    module.to_empty(device=device)
    for first, *others in (names for names in tied.values() if len(names) > 1):
        # A plain module's to_empty gives each name its own tensor (FSDP2 keeps them shared).
        shared = module.get_parameter(first)
        for name in others:
            owner, _, attr = name.rpartition(".")
            if module.get_parameter(name) is not shared:
                setattr(module.get_submodule(owner), attr, shared)
    with torch.no_grad():
        for n, b in module.named_buffers():
            b.copy_(buffers[n])
        weights = SafetensorsDir(model_dir)
        for name, p in lm.named_parameters():
            key = name if name in weights else next((k for k in (f"model.{name}", name.removeprefix("model."))
                                                     if k in weights), None)
            if key is None:
                raise KeyError(f"{model_dir} holds no tensor for the parameter {name}: its checkpoint names differ "
                               "from the model's modules; set train.meta_init false to load it through transformers")
            a, b = local_rows(p)
            local(p).copy_(weights.rows(key, a, b))


# ---------------------------------------------------------------------------- export

def export(lm: torch.nn.Module, tok, out_dir: str, rank: int, dtype: torch.dtype, max_shard_bytes: int) -> dict:
    """Write `lm` (sharded or not) as a Hugging Face model directory, shard by shard. Every
    rank calls this (each tensor is gathered by a collective); rank 0 writes. Returns the
    weight map (name -> file) on rank 0."""
    first: dict[int, tuple[str, torch.Tensor]] = {}
    for name, t in lm.state_dict(keep_vars=True).items():
        first.setdefault(id(t), (name, t))  # a tied tensor once, under its first name (as save_pretrained does)
    files: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in first.values():
        full = t.full_tensor() if hasattr(t, "full_tensor") else t
        if rank == 0:
            full = full.detach().to(dtype if full.is_floating_point() else full.dtype).cpu().contiguous()
            if size and size + full.nbytes > max_shard_bytes:
                _write_shard(files[-1], out_dir, len(files))
                files.append({})
                size = 0
            files[-1][name] = full
            size += full.nbytes
        del full
    if rank != 0:
        return {}
    _write_shard(files[-1], out_dir, len(files))
    weight_map = _name_shards(out_dir, files)
    config = copy.deepcopy(lm.config)
    config.use_cache = True
    config.dtype = dtype
    config.save_pretrained(out_dir)
    if getattr(lm, "generation_config", None) is not None:
        lm.generation_config.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return weight_map


def _write_shard(tensors: dict, out_dir: str, number: int) -> None:
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, f"part-{number:05d}.safetensors"), metadata={"format": "pt"})
    for k in list(tensors):
        tensors[k] = tensors[k].shape  # the file has it; keep only what the index needs


def _name_shards(out_dir: str, files: list[dict]) -> dict:
    """HF's names: model.safetensors alone, else model-0000i-of-0000n.safetensors and the index."""
    n = len(files)
    weight_map = {}
    for i, part in enumerate(files, 1):
        final = "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
        os.replace(os.path.join(out_dir, f"part-{i:05d}.safetensors"), os.path.join(out_dir, final))
        weight_map.update(dict.fromkeys(part, final))
    if n > 1:
        total = sum(os.path.getsize(os.path.join(out_dir, f)) for f in set(weight_map.values()))
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    return weight_map

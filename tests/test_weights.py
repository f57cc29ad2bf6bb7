"""Weights at scale without Ray (bco_ray.train.weights): each rank reads only its rows at
load, checkpoints reshard to any number of workers, the export streams shard files."""

import copy
import json
import os

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from bco_ray.train.weights import SafetensorsDir, read_rows, rows_of
from tests.distributed import gloo_group


@pytest.mark.parametrize("n,world", [(10, 3), (7, 2), (2, 4), (49152, 2), (1, 1)])
def test_rows_of_matches_fsdp2_and_covers_every_row_once(n, world):
    spans = [rows_of(n, r, world) for r in range(world)]
    assert [b - a for a, b in spans] == [len(c) for c in torch.arange(n).chunk(world)] + [0] * (world - len(torch.arange(n).chunk(world)))
    assert sum(b - a for a, b in spans) == n and spans[0][0] == 0 and spans[-1][1] == n


@pytest.mark.parametrize("old,new", [(2, 1), (1, 2), (3, 2), (2, 5)])
def test_rows_written_by_one_number_of_ranks_are_read_by_another(tmp_path, old, new):
    full = {"w": torch.randn(11, 3), "v": torch.randn(5)}
    dirs = []
    for r in range(old):
        d = tmp_path / f"r{r}"
        d.mkdir()
        save_file({k: t[slice(*rows_of(len(t), r, old))].contiguous() for k, t in full.items()}, str(d / "x.safetensors"))
        dirs.append(SafetensorsDir(d))
    for k, t in full.items():
        got = torch.cat([read_rows(dirs, k, len(t), *rows_of(len(t), r, new)) for r in range(new)])
        assert torch.equal(got, t)


def _sharded_load_and_export(rank, world, init_file, model_dir, out_dir, results):
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoTokenizer

    from bco_ray.train import weights

    with gloo_group(rank, world, init_file):
        torch.manual_seed(0)
        lm = weights.empty_model(model_dir)
        assert all(p.device.type == "meta" for p in lm.parameters())
        for layer in lm.model.layers:
            fully_shard(layer)
        fully_shard(lm)
        weights.materialise(lm, lm, model_dir, torch.device("cpu"))
        mine = {n: weights.local(p).detach().clone() for n, p in lm.named_parameters()}
        local_elems = sum(t.numel() for t in mine.values())
        ids = torch.tensor([[1, 5, 9, 14, 3, 7]])
        with torch.no_grad():
            logits = lm(input_ids=ids).logits
        weights.export(lm, AutoTokenizer.from_pretrained(model_dir), out_dir, rank, torch.float32, 2**19)
        results[rank] = {"local": mine, "elems": local_elems, "logits": logits}


def test_meta_init_reads_each_ranks_rows_and_the_export_streams_indexed_shards(tiny_llama, tmp_path):
    """Two gloo ranks build the model on meta, shard it, read their rows: together they hold
    exactly the weights, each about half of them, and compute the logits of the model that
    transformers loads; the export (512 KiB shards, so several files and an index) loads back
    through from_pretrained with the same weights."""
    from transformers import AutoModelForCausalLM

    from bco_ray.assets import resolve_model

    model_dir = str(resolve_model("tiny-llama", None))
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ref_sd = ref.state_dict()
    out = str(tmp_path / "export")
    results = mp.Manager().dict()
    mp.spawn(_sharded_load_and_export, args=(2, str(tmp_path / "init"), model_dir, out, results), nprocs=2)
    total = sum(p.numel() for p in ref.parameters())
    assert [results[r]["elems"] for r in (0, 1)] == pytest.approx([total / 2, total / 2], rel=0.02)
    for name in results[0]["local"]:
        parts = [results[r]["local"][name] for r in (0, 1)]
        assert torch.equal(torch.cat(parts), ref_sd[name]), name
    with torch.no_grad():
        want = ref(input_ids=torch.tensor([[1, 5, 9, 14, 3, 7]])).logits
    assert torch.allclose(results[0]["logits"], want, atol=1e-5) and torch.allclose(results[1]["logits"], want, atol=1e-5)

    index = json.loads(open(os.path.join(out, "model.safetensors.index.json")).read())
    files = sorted(set(index["weight_map"].values()))
    parts = [load_file(os.path.join(out, f)) for f in files]
    # Files of at most 512 KiB of tensors, unless one tensor alone is larger (the embeddings).
    assert len(files) >= 3 and all(len(t) == 1 or sum(x.nbytes for x in t.values()) <= 2**19 for t in parts)
    saved = {k: v for t in parts for k, v in t.items()}
    assert "lm_head.weight" not in saved  # tied to the embeddings: stored once, as save_pretrained does
    back = AutoModelForCausalLM.from_pretrained(out)
    assert back.config.use_cache and os.path.exists(os.path.join(out, "tokenizer.json"))
    assert all(torch.equal(back.state_dict()[k], ref_sd[k]) for k in ref_sd)


def test_one_worker_meta_init_keeps_tied_weights_tied(tiny_llama):
    """Without FSDP2, to_empty gives every parameter name its own tensor; the embeddings and
    the LM head must stay one tensor (or training would untie them)."""
    from transformers import AutoModelForCausalLM

    from bco_ray.assets import resolve_model
    from bco_ray.train import weights

    model_dir = str(resolve_model("tiny-llama", None))
    lm = weights.empty_model(model_dir)
    weights.materialise(lm, lm, model_dir, torch.device("cpu"))
    assert lm.lm_head.weight is lm.model.embed_tokens.weight
    ref = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    assert all(torch.equal(ref[k], v) for k, v in lm.state_dict().items())
    assert torch.equal(lm.model.rotary_emb.inv_freq, AutoModelForCausalLM.from_pretrained(model_dir).model.rotary_emb.inv_freq)


def test_a_checkpoint_goes_out_in_bounded_files_and_comes_back(tiny_llama, tmp_path):
    """checkpoint.save writes a rank's tensors in files of about file_bytes (the host holds one
    file's worth of GPU tensors at a time) and names them last; load restores weights and
    AdamW moments exactly, also from the one-file layout of earlier versions."""
    from safetensors.torch import load_file

    from bco_ray.train import checkpoint
    from bco_ray.train.objectives import RewardShift
    from bco_ray.train.step import PolicyLogps

    def fresh():
        torch.manual_seed(0)
        policy = PolicyLogps(copy.deepcopy(tiny_llama[0]))
        opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
        return policy, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), RewardShift()

    policy, opt, sched, shift = fresh()
    ids = torch.tensor([[1, 5, 9, 14, 3, 7]])
    policy(ids, torch.ones_like(ids), torch.tensor([[0, 0, 1, 1, 1, 1]])).sum().backward()
    opt.step()
    d = tmp_path / "ckpt"
    checkpoint.save(str(d), policy, opt, sched, shift, {"step": 1}, 0, 1, "fsdp", file_bytes=2**20)
    files = json.loads((d / "rank0.json").read_text())["files"]
    assert len(files) >= 5 and sorted(p.name for p in d.glob("rank0-*.safetensors")) == files
    sizes = [[t.nbytes for k, t in load_file(d / f).items() if not k.startswith("rng.")] for f in files]
    assert all(sum(s) <= 2**20 or len(s) == 1 for s in sizes), sizes  # or one tensor larger than that
    want = {n: p.detach().clone() for n, p in policy.named_parameters()}
    moments = [opt.state[p]["exp_avg_sq"].clone() for p in policy.parameters()]

    for layout in ("files", "one file"):
        if layout == "one file":  # what bco-ray wrote before: rank0.safetensors
            merged = {k: v for f in files for k, v in load_file(d / f).items()}
            for f in files:
                (d / f).unlink()
            save_file(merged, str(d / "rank0.safetensors"), metadata={"format": checkpoint.FORMAT})
        p2, o2, s2, sh2 = fresh()
        checkpoint.load(str(d), p2, o2, s2, sh2, 0, 1)
        assert all(torch.equal(p.detach(), want[n]) for n, p in p2.named_parameters()), layout
        assert all(torch.equal(o2.state[p]["exp_avg_sq"], m) for p, m in zip(p2.parameters(), moments, strict=True))


def test_staged_parts_are_renamed_into_one_checkpoint_tensors_first(tmp_path, monkeypatch):
    """Local storage: each worker's staged part moves into the checkpoint directory by rename
    (the same inode: GBs not written twice), safetensors before their rank's JSON and
    state.json last, so a move cut short never looks complete; staging is removed, and
    what an earlier attempt left staged is cleared."""
    import pyarrow.fs as pafs

    from bco_ray.train import checkpoint

    fs, run = pafs.LocalFileSystem(), str(tmp_path / "run")
    staged = [checkpoint.staging_dir(fs, run) for _ in range(2)]
    assert all(os.path.dirname(d) == run and os.path.basename(d).startswith(checkpoint.STAGING) for d in staged)
    inodes = {}
    for r, d in enumerate(staged):
        for name in (f"rank{r}-00000.safetensors", f"rank{r}.json") + (("state.json",) if r == 0 else ()):
            with open(os.path.join(d, name), "w") as f:
                json.dump({"world": 2}, f)
            inodes[name] = os.stat(os.path.join(d, name)).st_ino
    moved, replace = [], os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (moved.append(os.path.basename(b)), replace(a, b)))
    dest = os.path.join(run, "checkpoint_000001")
    for d in reversed(staged):  # rank 1 first: the directory is shared, not owned by rank 0
        checkpoint.persist(d, fs, dest)
    assert moved == ["rank1-00000.safetensors", "rank1.json", "rank0-00000.safetensors", "rank0.json", "state.json"]
    assert {n: os.stat(os.path.join(dest, n)).st_ino for n in os.listdir(dest)} == inodes
    assert not [d for d in staged if os.path.exists(d)]
    assert checkpoint.latest_complete(fs, run) == dest
    left = checkpoint.staging_dir(fs, run)  # a worker killed while writing
    checkpoint.clear_staging(fs, run)
    assert not os.path.exists(left) and os.listdir(run) == ["checkpoint_000001"]

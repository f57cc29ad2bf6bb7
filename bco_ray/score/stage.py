"""`bco-ray score-ref`: the prepared dataset in, the same rows plus `ref_logps` out.

    <output>/data/         prepared rows + ref_logps, ref_tokens (+ kl_* for KTO)
    <output>/quarantine/   rows longer than the reference accepts (too_long_for_reference), rows
                           it gives a non-finite log-prob (non_finite_reference_logp)
    <output>/manifest.json counts (input = scored + quarantined), backend, model, key, timing

Scoring is expensive, so a rerun whose key (input files, reference weights, dtype, length
limit, KL pairs) matches the manifest already written does nothing unless `score.force`.
"""

from __future__ import annotations

import hashlib
import json
import time

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from bco_ray import console, storage
from bco_ray.config import Config, redacted
from bco_ray.errors import UserError
from bco_ray.placement import DataActorPlacement
from bco_ray.score.refscore import (
    NON_FINITE,
    TOO_LONG,
    HFScorer,
    QuarantineSink,
    VLLMScorer,
    quarantine_rows,
)


def _cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))


def choose_backend(requested: str, gpus: float) -> str:
    """'auto' -> vllm when it is importable and there are GPUs, else hf."""
    if requested != "auto":
        return requested
    import importlib.util

    return "vllm" if gpus > 0 and importlib.util.find_spec("vllm") is not None else "hf"


def _input_fingerprint(fs, data_dir: str) -> str:
    return hashlib.sha256(json.dumps(storage.listing(fs, data_dir)).encode()).hexdigest()[:32]


def _too_long(table: pa.Table, limit: int) -> pa.Array:
    return pc.greater(pc.list_value_length(table.column("input_ids")), limit)


def _keep(table: pa.Table, limit: int) -> pa.Table:
    return table.filter(pc.invert(_too_long(table, limit)))


def _quarantine(table: pa.Table, limit: int) -> pa.Table:
    return quarantine_rows(table.filter(_too_long(table, limit)), TOO_LONG)


def batch_rows_for(rows: int, actors: int, batch_rows: int) -> int:
    """Rows per scoring batch: score.batch_rows, or fewer when the split is small, so that each
    actor gets about four batches. The demo's 651 rows in batches of 256 made three batches for
    two actors: one actor scored two of them while the other sat idle (268 s where 110 do)."""
    return max(1, min(batch_rows, -(-rows // (4 * max(1, actors)))))


def _read_in_blocks(data_dir: str, fs, cpus: float, actors: int, batch_rows: int):
    """The prepared data as a dataset of at least `actors` blocks, so every scorer gets work.
    A reader gives a block per file, and a small split is one file (the demo's 651 rows left
    its second actor idle). Such a split is read here and cut into batch-sized blocks
    (`batch_rows_for`): Ray Data's own repartition runs a task of one whole CPU, which never
    fits once the fractional scorers sit on every node (a cluster of two 1-CPU nodes waited forever)."""
    import ray

    files = storage.list_parquet(fs, data_dir)
    if len(files) >= actors:
        return storage.read_parquet(data_dir, fs, cpus)
    table = pads.dataset(files, filesystem=fs, format="parquet").to_table()
    step = batch_rows_for(table.num_rows, actors, batch_rows)
    return ray.data.from_arrow([table.slice(i, step) for i in range(0, table.num_rows, step)] or [table])


def score_reference(cfg: Config) -> dict:
    """Score every prepared row once; returns the manifest (written beside the data)."""
    import ray

    from bco_ray.assets import model_fingerprint, resolve_model

    t0 = time.time()
    sc, cpus = cfg.score, cfg.ingest.num_cpus_per_task
    src = sc.input or cfg.ingest.output or storage.join(cfg.run.run_dir, "prepared")
    in_fs, in_dir = storage.filesystem(src, cfg.storage)
    out_fs, out = storage.filesystem(sc.output or storage.join(cfg.run.run_dir, "scored"), cfg.storage)
    data_dir = storage.join(in_dir, "data")
    if not storage.exists(in_fs, data_dir):
        raise UserError(f"no prepared data at {src}/data", "run `bco-ray prepare` first (or set score.input)")
    if not storage.exists(in_fs, storage.join(in_dir, "manifest.json")):
        # prepare writes its manifest last: without it the data is a crashed run's, or a stranger's
        raise UserError(f"the prepared data at {src} has no manifest.json: its prepare did not finish",
                        "run `bco-ray prepare` again (or point score.input at a complete prepared directory)")

    ref_name = cfg.model.reference or cfg.model.policy
    ref_path = resolve_model(ref_name, cfg.model.cache_dir)
    model_cfg = json.loads((ref_path / "config.json").read_text())
    limit = sc.max_model_len or int(model_cfg.get("max_position_embeddings") or 2048)
    gpus = _cluster_gpus()
    backend = choose_backend(sc.backend, gpus)
    dtype = cfg.model.dtype if cfg.model.dtype != "auto" else ("bfloat16" if gpus > 0 else "float32")
    kl = sc.kl_pairs if sc.kl_pairs is not None else cfg.objective.loss == "kto"
    # vLLM must emit one token after the prompt, so a row may use limit - 1 positions.
    max_tokens = limit - 1
    key_fields = {"input": _input_fingerprint(in_fs, data_dir), "reference": model_fingerprint(ref_path),
                  "dtype": dtype, "max_tokens": max_tokens, "kl_pairs": kl}
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:32]
    manifest_path = storage.join(out, "manifest.json")
    if not sc.force and storage.exists(out_fs, manifest_path):
        previous = json.loads(storage.read_bytes(out_fs, manifest_path))
        if previous.get("key") == key:
            console.say(f"[score-ref] {out} already holds this input scored by this reference: skipped "
                        "(score.force=true scores again)")
            return {**previous, "skipped": True}
    for sub in ("data", "quarantine", "manifest.json"):
        p = storage.join(out, sub)
        if storage.exists(out_fs, p):
            out_fs.delete_dir(p) if sub != "manifest.json" else out_fs.delete_file(p)

    remote = {"num_cpus": cpus}
    ds = _read_in_blocks(data_dir, in_fs, cpus, sc.actors, sc.batch_rows)
    rows_in = ds.count()
    console.status(f"scoring {rows_in} rows under {ref_name} ({backend}, {sc.actors} actor(s))")
    q = ds.map_batches(_quarantine, fn_kwargs={"limit": max_tokens}, batch_format="pyarrow", **remote)
    q.write_parquet(storage.join(out, "quarantine"), filesystem=out_fs, ray_remote_args=remote)

    # Rows the reference cannot score (a non-finite log-prob) are quarantined by the scorers
    # themselves: the scored stream is written once, never split into two consumers.
    sink = QuarantineSink(out_fs, storage.join(out, "quarantine"))
    gpu_per_actor = sc.num_gpus_per_actor if sc.num_gpus_per_actor is not None else (1.0 if gpus > 0 else 0.0)
    tp = sc.tensor_parallel_size
    if tp > 1 and backend != "vllm":
        raise UserError(f"score.tensor_parallel_size {tp} needs the vllm backend (score.backend {sc.backend} chose {backend})",
                        "set score.backend: vllm, or spread the hf scorer over several GPUs with "
                        "score.num_gpus_per_actor instead")
    # A tensor-parallel engine holds no GPU itself: its placement group does (bco_ray.placement).
    groups = DataActorPlacement(tp, sc.num_cpus_per_actor)
    resources = {"num_gpus": 0, "ray_remote_args_fn": groups} if tp > 1 else {"num_gpus": gpu_per_actor}
    max_length = min(cfg.ingest.max_length, max_tokens)
    if backend == "hf":
        cls, args = HFScorer, dict(model=ref_name, dtype=dtype, cache_dir=cfg.model.cache_dir,
                                   batch_tokens=sc.batch_tokens, chunk_size=cfg.objective.logp_chunk_size,
                                   kl=kl, max_length=max_length, trust_remote_code=cfg.model.trust_remote_code,
                                   num_threads=sc.num_cpus_per_actor, quarantine=sink)
    else:
        cls, args = VLLMScorer, dict(model=ref_name, dtype=dtype, cache_dir=cfg.model.cache_dir,
                                     max_model_len=limit, kl=kl, max_length=max_length,
                                     gpu_memory_utilization=sc.vllm_gpu_memory_utilization,
                                     enforce_eager=sc.vllm_enforce_eager, cpu_kvcache_gib=sc.vllm_cpu_kvcache_gib,
                                     trust_remote_code=cfg.model.trust_remote_code, seed=cfg.run.seed,
                                     quarantine=sink, tensor_parallel_size=tp, metrics=sc.vllm_metrics)
    # The async vLLM actor takes several batches at once (calls), the hf one a single one.
    in_flight = {"max_concurrent_calls_per_actor": max(1, sc.vllm_batches_in_flight)} if backend == "vllm" else {}
    scored = ds.map_batches(_keep, fn_kwargs={"limit": max_tokens}, batch_format="pyarrow", **remote)
    scored = scored.map_batches(cls, fn_constructor_kwargs=args, batch_format="pyarrow",
                                batch_size=batch_rows_for(rows_in, sc.actors, sc.batch_rows),
                                compute=ray.data.ActorPoolStrategy(size=sc.actors, **in_flight),
                                num_cpus=sc.num_cpus_per_actor, **resources)
    try:
        scored.write_parquet(storage.join(out, "data"), filesystem=out_fs, ray_remote_args=remote)
    finally:
        groups.release()  # the GPUs go back to the cluster (training is next)
    seconds = time.time() - t0

    from bco_ray.data.ingest import count_rows

    n_scored = count_rows(out_fs, storage.join(out, "data"))
    n_quarantined = count_rows(out_fs, storage.join(out, "quarantine"))
    if n_scored + n_quarantined != rows_in:
        raise RuntimeError(f"row accounting broken: input {rows_in} != scored {n_scored} + quarantined {n_quarantined}")
    reasons: dict[str, int] = {}
    if n_quarantined:
        counted = storage.read_parquet(storage.join(out, "quarantine"), out_fs, cpus, ["reason"])
        reasons = {reason: n for (reason,), n in storage.count_by(counted, ["reason"], cpus).items()}
    if (bad := reasons.get(NON_FINITE, 0)) > sc.max_nonfinite_fraction * rows_in:
        raise UserError(f"the reference model gave non-finite log-probs for {bad} of {rows_in} rows (quarantined "
                        f"in {storage.join(out, 'quarantine')})",
                        "check its weights and dtype (float16 overflows where bfloat16 does not), or raise "
                        "score.max_nonfinite_fraction")
    if bad:
        console.say(f"[score-ref] {bad} row(s) with a non-finite reference log-prob quarantined ({NON_FINITE})")
    tokens, logp_sum = 0, 0.0
    if n_scored:  # one aggregation pass
        from ray.data.aggregate import Sum

        agg = storage.read_parquet(storage.join(out, "data"), out_fs, cpus, ["ref_logps", "ref_tokens"]) \
            .aggregate(Sum("ref_tokens"), Sum("ref_logps"))
        tokens, logp_sum = int(agg["sum(ref_tokens)"]), float(agg["sum(ref_logps)"])
    manifest = {
        "input": src, "output": sc.output or storage.join(cfg.run.run_dir, "scored"), "key": key,
        "key_fields": key_fields, "backend": backend, "reference": ref_name, "dtype": dtype,
        "max_model_len": limit, "kl_pairs": kl, "rows_in": rows_in, "scored": n_scored,
        "quarantined": n_quarantined, "quarantine_reasons": reasons,
        "completion_tokens": tokens, "mean_logp_per_token": logp_sum / max(tokens, 1),
        "seconds": round(seconds, 1), "completion_tokens_per_s": round(tokens / max(seconds, 1e-9), 1),
        "config": redacted(cfg),
    }
    storage.write_bytes(out_fs, manifest_path, json.dumps(manifest, indent=2).encode())
    return manifest

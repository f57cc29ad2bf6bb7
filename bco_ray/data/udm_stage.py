"""UDM on Ray Data: sample prompts per label, embed them in an actor pool, fit the
classifier (bco_ray.data.udm), then weigh every distinct thumbs-down prompt once in a second
actor pool and join the weights back to its rows (or, for a log at most twice the sample,
from embeddings of every distinct prompt made in the first pass).

Sampling is by a seeded hash of the row id, so a rerun with the same seed picks the same
prompts on any number of workers.
"""

from __future__ import annotations

import hashlib
import json
import time

import numpy as np
import pyarrow as pa

from bco_ray import console, storage
from bco_ray.config import Config
from bco_ray.data.udm import (
    PromptEmbedder,
    UDMClassifier,
    UDMWeigher,
    auc_lower_bound,
    calibration,
    fit_logistic_regression,
    roc_auc,
)

MIN_HELDOUT = 20  # prompts per label below which held-out AUC / accuracy mean little


def _unit_hash(row_id: str, seed: int) -> float:
    h = hashlib.blake2b(f"{seed}:{row_id}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2**64


def _select(batch: dict, fracs: dict, seed: int) -> dict:
    """Rows whose seeded hash falls under their (split, label) group's sampling fraction."""
    keep = [i for i, (s, lab, rid) in enumerate(zip(batch["split"], batch["label"], batch["row_id"], strict=True))
            if _unit_hash(str(rid), seed) < fracs.get(f"{s}/{bool(lab)}", 0.0)]
    return {k: [batch[k][i] for i in keep] for k in ("row_id", "prompt", "split")} | \
        {"label": [bool(batch["label"][i]) for i in keep]}


def _sample(ds, counts: dict, sizes: dict, seed: int) -> dict:
    """{split: rows}: up to sizes[split] rows per label, in one pass over the data."""
    # Over-draw by 2x, then keep the n smallest hashes: exact sizes, deterministic.
    fracs = {f"{split}/{label}": min(1.0, 2.0 * sizes[split] / n)
             for (split, label), n in counts.items() if n and split in sizes}
    got = ds.map_batches(_select, fn_kwargs={"fracs": fracs, "seed": seed}, batch_format="numpy").take_all()
    got.sort(key=lambda r: _unit_hash(str(r["row_id"]), seed))
    out: dict = {split: [] for split in sizes}
    taken: dict = {}
    for r in got:
        key = (r["split"], r["label"])
        if taken.get(key, 0) < sizes[r["split"]]:
            taken[key] = taken.get(key, 0) + 1
            out[r["split"]].append(r)
    return out


def embed_gpus(cfg: Config) -> float:
    """udm.num_gpus_per_actor, or 1 when the cluster has GPUs."""
    import ray

    if cfg.udm.num_gpus_per_actor is not None:
        return cfg.udm.num_gpus_per_actor
    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def embed_actors(cfg: Config) -> int:
    """udm.embed_actors, or what the cluster holds: one per GPU (num_gpus_per_actor each) when
    it has GPUs, else one per CPU less one, left to the tasks that feed them."""
    import ray

    if cfg.udm.embed_actors is not None:
        return cfg.udm.embed_actors
    res = ray.cluster_resources()
    gpus = embed_gpus(cfg)
    if gpus > 0:
        return max(1, int(res.get("GPU", 0) // gpus))
    return max(1, int(res.get("CPU", 1)) - 1)


def embed_threads(cfg: Config, actors: int) -> int | None:
    """udm.embed_threads, or the cluster's CPUs over the CPU actors (None on GPUs: torch's own)."""
    import ray

    if cfg.udm.embed_threads is not None:
        return cfg.udm.embed_threads
    if embed_gpus(cfg) > 0:
        return None
    return max(1, int(ray.cluster_resources().get("CPU", 1)) // actors)


def embedder_kwargs(cfg: Config, actors: int) -> dict:
    return {"batch_size": cfg.udm.embed_batch_size, "dtype": cfg.udm.embed_dtype,
            "threads": embed_threads(cfg, actors)}


def _embed(rows: list[dict], model_dir: str, cfg: Config) -> np.ndarray:
    """The embedding of each row's prompt; each distinct prompt is embedded once."""
    import ray

    uc = cfg.udm
    distinct = list({r["prompt"]: None for r in rows})
    actors = embed_actors(cfg)
    out = ray.data.from_items([{"prompt": x} for x in distinct]).map_batches(
        PromptEmbedder, fn_constructor_kwargs={"model_dir": model_dir, "max_length": uc.max_embed_length,
                                               **embedder_kwargs(cfg, actors)},
        batch_size=uc.embed_batch_size, batch_format="numpy", num_cpus=cfg.ingest.num_cpus_per_task,
        num_gpus=embed_gpus(cfg), compute=ray.data.ActorPoolStrategy(size=actors)).take_all()
    by_prompt = {r["prompt"]: np.asarray(r["embedding"]) for r in out}
    return np.stack([by_prompt[r["prompt"]] for r in rows])


# ---------------------------------------------------------------------------- distinct prompts

def prompt_keys(prompts: list[str]) -> np.ndarray:
    """A 64-bit key per prompt (blake2b): two of 1e7 distinct prompts share one with odds 3e-6."""
    return np.array([int.from_bytes(hashlib.blake2b(x.encode(), digest_size=8).digest(), "big") for x in prompts],
                    dtype=np.uint64)


def _down_prompts(table: pa.Table) -> pa.Table:
    """The thumbs-down rows' prompts, keyed (what the second embedding pass needs)."""
    import pyarrow.compute as pc

    down = table.filter(pc.invert(table["label"]))
    return pa.table({"prompt_key": pa.array(prompt_keys(down["prompt"].to_pylist()), pa.uint64()),
                     "prompt": down["prompt"], "label": pa.array(np.zeros(down.num_rows, dtype=bool))})


def _first_per_key(block: pa.Table) -> pa.Table:
    """Ray Data: a block of the shuffle by prompt_key (each key's rows all in it) -> one row per key."""
    _, first = np.unique(block["prompt_key"].to_numpy(), return_index=True)
    return block.take(pa.array(first))


def _drop_known(block: pa.Table, keys: np.ndarray) -> pa.Table:
    """The block's prompts whose key is not in `keys` (sorted): those still to embed."""
    return block.filter(pa.array(~np.isin(block["prompt_key"].to_numpy(), keys, assume_unique=True)))


def _no_weights() -> pa.Table:
    return pa.table({"prompt_key": pa.array([], pa.uint64()), "weight": pa.array([], pa.float32())})


def _weight_table(*parts: pa.Table) -> pa.Table:
    """The distinct prompts' (key, weight), sorted by key for lookups."""
    return (pa.concat_tables(parts) if parts else _no_weights()).sort_by("prompt_key")


_WEIGHTS: dict = {}  # per worker process: the weight table of the current prepare, fetched once


def _join_weights(table: pa.Table, ref: list) -> pa.Table:
    """`weight` of each thumbs-down row from its prompt's entry in the weight table; 1 for the others."""
    import ray

    key = ref[0].hex()
    if key not in _WEIGHTS:
        _WEIGHTS.clear()
        t = ray.get(ref[0])
        _WEIGHTS[key] = (t["prompt_key"].to_numpy(), t["weight"].to_numpy())
    keys, values = _WEIGHTS[key]
    labels = table["label"].to_numpy(zero_copy_only=False).astype(bool)
    weight = np.ones(table.num_rows, dtype=np.float32)
    down = np.flatnonzero(~labels)
    if len(down):
        q = prompt_keys(table["prompt"].take(pa.array(down)).to_pylist())
        at = np.searchsorted(keys, q)
        if not (at < len(keys)).all() or not (keys[np.minimum(at, len(keys) - 1)] == q).all():
            raise RuntimeError("a thumbs-down prompt has no weight: the distinct-prompt pass missed it")
        weight[down] = values[at]
    return table.append_column("weight", pa.array(weight))


def weigh_distinct_prompts(ds, down_rows: int, clf: UDMClassifier, model_dir: str, cfg: Config,
                           known: pa.Table | None = None):
    """(weighted dataset, the weighing pass's report): each distinct thumbs-down prompt is
    embedded and weighed once (a shuffle on its key, then the weigher's actor pool); the weights
    go back to every row through a sorted key table in the object store, which the driver never
    holds (D x 12 bytes: 120 MB at 1e7 distinct prompts). `known`: (prompt_key, weight) of
    prompts already embedded (the classifier's sample), which are not embedded again."""
    import ray

    uc, cpus = cfg.udm, cfg.ingest.num_cpus_per_task
    actors, t0 = embed_actors(cfg), time.time()
    known = known if known is not None else _no_weights()
    down = ds.map_batches(_down_prompts, batch_format="pyarrow", num_cpus=cpus)
    distinct = storage.co_locate(down, "prompt_key", down_rows, cfg.ingest.shuffle) \
        .map_batches(_first_per_key, batch_size=None, batch_format="pyarrow", num_cpus=cpus)
    if known.num_rows:
        distinct = distinct.map_batches(_drop_known, fn_kwargs={"keys": np.sort(known["prompt_key"].to_numpy())},
                                        batch_size=None, batch_format="pyarrow", num_cpus=cpus)
    weights = distinct.map_batches(
        UDMWeigher, fn_constructor_kwargs={"model_dir": model_dir, "classifier_json": clf.to_json(),
                                           **embedder_kwargs(cfg, actors)},
        batch_size=uc.embed_batch_size, batch_format="pyarrow", num_cpus=cpus, num_gpus=embed_gpus(cfg),
        compute=ray.data.ActorPoolStrategy(size=actors)).select_columns(["prompt_key", "weight"]).materialize()
    embedded, seconds = weights.count(), time.time() - t0
    report = {"distinct_down_prompts": embedded + known.num_rows, "embedded_down_prompts": embedded,
              "embed_actors": actors, "embed_threads": embed_threads(cfg, actors), "weigh_seconds": round(seconds, 1),
              # the whole pass (read, key, group, embed): a floor for the embedder's own rate
              "prompts_per_s": round(embedded / max(seconds, 1e-9), 1),
              "prompts_per_s_per_actor": round(embedded / max(seconds, 1e-9) / actors, 1)}
    table = ray.remote(_weight_table).options(num_cpus=cpus).remote(known, *weights.to_arrow_refs())
    weighted = ds.map_batches(_join_weights, fn_kwargs={"ref": [table]}, batch_format="pyarrow", num_cpus=cpus)
    return weighted, report


def _add_unit_weight(table: pa.Table) -> pa.Table:
    return table.append_column("weight", pa.array(np.ones(table.num_rows, dtype=np.float32)))


def _add_weights(table: pa.Table, weights: dict) -> pa.Table:
    """`weight` from a {row_id: density ratio} of the thumbs-down rows; 1 for the others."""
    w = [weights.get(r, 1.0) for r in table["row_id"].to_pylist()]
    return table.append_column("weight", pa.array(np.asarray(w, dtype=np.float32)))


def fit_and_weigh(ds, cfg: Config, fs, udm_dir: str):
    """(dataset with a `weight` column, UDM report). Weights are 1 when UDM is off or cannot fit."""

    from bco_ray.assets import resolve_model

    uc, seed = cfg.udm, cfg.run.seed
    if not uc.enabled:
        return ds.map_batches(_add_unit_weight, batch_format="pyarrow"), {"enabled": False}
    counts = {(split, bool(label)): n
              for (split, label), n in storage.count_by(ds, ["split", "label"], cfg.ingest.num_cpus_per_task).items()}
    sample = _sample(ds, counts, {"train": uc.sample_size, "eval": uc.eval_sample_size}, seed)
    train, held = sample["train"], sample["eval"]
    if min(sum(r["label"] for r in held), sum(not r["label"] for r in held)) < MIN_HELDOUT:
        # Too few eval prompts of a label for meaningful metrics: hold out a fifth of the sample.
        held = [r for r in train if _unit_hash(r["row_id"], seed + 1) < 0.2]
        train = [r for r in train if _unit_hash(r["row_id"], seed + 1) >= 0.2]
    if len({r["label"] for r in train}) < 2 or len({r["label"] for r in held}) < 2:
        report = {"enabled": True, "skipped": "UDM needs prompts of both labels; every weight is 1"}
        return ds.map_batches(_add_unit_weight, batch_format="pyarrow"), report
    model_dir = str(resolve_model(cfg.model.embedder, cfg.model.cache_dir))
    # A log at most twice the sample: embed every prompt in this one pass and weigh from those
    # embeddings, instead of a second embedding pool over the thumbs-down rows (at least half
    # of the rows again, plus the pool's start). Never more embeddings than the two passes.
    one_pass, rest = sum(counts.values()) <= 2 * len(train + held), []
    if one_pass:
        sampled = {r["row_id"] for r in train + held}
        rest = [{"row_id": r["row_id"], "prompt": r["prompt"], "label": False}
                for r in ds.select_columns(["row_id", "prompt", "label"]).take_all()
                if not r["label"] and r["row_id"] not in sampled]
    emb = _embed(train + held + rest, model_dir, cfg)
    x_tr, x_ho = emb[:len(train)], emb[len(train):len(train) + len(held)]
    y_tr = np.array([r["label"] for r in train])
    y_ho = np.array([r["label"] for r in held])
    coef, intercept = fit_logistic_regression(x_tr, y_tr, c=uc.l2_c)
    clf = UDMClassifier(coef=coef.tolist(), intercept=intercept, embedder=cfg.model.embedder,
                        max_embed_length=uc.max_embed_length, min_density_ratio=uc.min_density_ratio,
                        max_density_ratio=uc.max_density_ratio)
    p_tr, p_ho = clf.prob_desirable(x_tr), clf.prob_desirable(x_ho)
    clf.metrics = {
        "train_prompts": {"up": int(y_tr.sum()), "down": int((~y_tr).sum())},
        "heldout_prompts": {"up": int(y_ho.sum()), "down": int((~y_ho).sum())},
        "train_auc": roc_auc(p_tr, y_tr), "heldout_auc": roc_auc(p_ho, y_ho),
        "heldout_accuracy": float(((p_ho > 0.5) == y_ho).mean()),
        "heldout_calibration": calibration(p_ho, y_ho),
    }
    lower = auc_lower_bound(clf.metrics["heldout_auc"], int(y_ho.sum()), int((~y_ho).sum()))
    clf.metrics["heldout_auc_lower95"] = lower
    storage.write_bytes(fs, storage.join(udm_dir, "classifier.json"), clf.to_json().encode())
    if uc.min_auc is not None and not lower >= uc.min_auc:
        # A classifier that cannot tell the labels' prompts apart (no prompt shift, or too few
        # prompts to see one) still spreads weights over [0.5, 10]: noise in the loss, no gain.
        decision = (f"off: held-out AUC {clf.metrics['heldout_auc']:.3f}, its 95 % lower bound {lower:.3f} is "
                    f"below udm.min_auc {uc.min_auc} (no prompt shift shown); every weight is 1")
        console.say(f"[udm] weights {decision}")
        return ds.map_batches(_add_unit_weight, batch_format="pyarrow"), \
            {"enabled": True, "applied": False, "decision": decision,
             **{k: v for k, v in clf.metrics.items() if k != "heldout_calibration"}}
    decision = (f"on: held-out AUC {clf.metrics['heldout_auc']:.3f} (95 % lower bound {lower:.3f}"
                + (f" >= udm.min_auc {uc.min_auc})" if uc.min_auc is not None else ", udm.min_auc null)"))
    console.say(f"[udm] weights {decision}")
    if one_pass:
        rows = train + held + rest
        down = [i for i, r in enumerate(rows) if not r["label"]]
        weights = {rows[i]["row_id"]: float(x) for i, x in zip(down, clf.weights(emb[down]), strict=True)}
        weighted = ds.map_batches(_add_weights, fn_kwargs={"weights": weights}, batch_format="pyarrow",
                                  num_cpus=cfg.ingest.num_cpus_per_task)
        return weighted, {"enabled": True, "applied": True, "decision": decision, "embedding_passes": 1,
                          **{k: v for k, v in clf.metrics.items() if k != "heldout_calibration"}}
    down_rows = sum(n for (_, label), n in counts.items() if not label)
    # The sample's thumbs-down prompts are embedded already: their weights join the table as they are.
    fitted = train + held
    sampled = [i for i, r in enumerate(fitted) if not r["label"]]
    keys, first = np.unique(prompt_keys([fitted[i]["prompt"] for i in sampled]), return_index=True)
    known = pa.table({"prompt_key": pa.array(keys, pa.uint64()),
                      "weight": pa.array(clf.weights(emb[np.asarray(sampled, int)[first]]).astype(np.float32))})
    weighted, weighing = weigh_distinct_prompts(ds, down_rows, clf, model_dir, cfg, known)
    console.say(f"[udm] {down_rows} thumbs-down rows, {weighing['distinct_down_prompts']} distinct prompts "
                f"({1 - weighing['distinct_down_prompts'] / max(down_rows, 1):.0%} repeats), "
                f"{weighing['embedded_down_prompts']} embedded beyond the sample by {weighing['embed_actors']} "
                f"actor(s): {weighing['prompts_per_s_per_actor']} prompts/s each")
    return weighted, {"enabled": True, "applied": True, "decision": decision, "embedding_passes": 2,
                      "down_rows": down_rows, **weighing,
                      **{k: v for k, v in clf.metrics.items() if k != "heldout_calibration"}}


def _weight_hist(batch: dict, edges: np.ndarray) -> dict:
    w = np.asarray(batch["weight"], np.float64)[~np.asarray(batch["label"], bool)]
    return {"hist": [np.histogram(w, bins=edges)[0]], "sum": [w.sum()], "n": [len(w)]}


def diagnostics(cfg: Config, fs, data_dir: str, udm_dir: str, report: dict) -> dict:
    """Weight distribution of the written data (streamed) and a PNG; returns the report."""
    if not report.get("enabled") or "skipped" in report:
        return report
    uc = cfg.udm
    edges = np.geomspace(uc.min_density_ratio, uc.max_density_ratio, 31)
    edges[-1] *= 1.0000001  # include the upper clamp in the last bin
    hist, total, n = np.zeros(30, np.int64), 0.0, 0
    ds = storage.read_parquet(data_dir, fs, cfg.ingest.num_cpus_per_task, ["weight", "label"])
    for r in ds.map_batches(_weight_hist, fn_kwargs={"edges": edges}, batch_format="numpy").iter_rows():
        hist += np.asarray(r["hist"])
        total, n = total + float(r["sum"]), n + int(r["n"])
    cum = np.cumsum(hist)
    pct = {f"p{q}": float(edges[min(int(np.searchsorted(cum, q / 100 * cum[-1])) + 1, 30)])
           for q in (5, 50, 95)} if n else {}
    report = {**report, "thumbs_down_weight": {"mean": total / n if n else None, **pct,
                                               "at_lower_clamp": int(hist[0]), "at_upper_clamp": int(hist[-1])}}
    clf = UDMClassifier.from_json(storage.read_bytes(fs, storage.join(udm_dir, "classifier.json")).decode())
    storage.write_bytes(fs, storage.join(udm_dir, "diagnostics.png"), _plot(edges, hist, clf))
    storage.write_bytes(fs, storage.join(udm_dir, "report.json"), json.dumps(report, indent=1).encode())
    return report


def _plot(edges: np.ndarray, hist: np.ndarray, clf: UDMClassifier) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.bar(edges[:-1], hist, width=np.diff(edges), align="edge", color="tab:red", alpha=0.7,
          label="thumbs-down rows")
    a.axvline(1.0, color="tab:green", lw=2, label="thumbs-up rows (all 1)")
    a.set_xscale("log")
    a.set_xlabel("UDM weight p/(1-p), clamped")
    a.set_ylabel("rows")
    a.set_title("UDM weights of thumbs-down rows (all near 1: no prompt shift)")
    a.legend()
    cal = clf.metrics.get("heldout_calibration", [])
    b.plot([0, 1], [0, 1], "k--", lw=1, label="perfect")
    b.plot([c["mean_p"] for c in cal], [c["frac_up"] for c in cal], "o-", label="held-out prompts")
    b.set_xlabel("predicted P(thumbs-up | prompt)")
    b.set_ylabel("observed share thumbs-up")
    b.set_title(f"Classifier: held-out AUC {clf.metrics.get('heldout_auc', float('nan')):.3f}, "
                f"acc {clf.metrics.get('heldout_accuracy', float('nan')):.3f}")
    b.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()

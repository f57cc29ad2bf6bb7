"""The recipe each Ray Train worker runs: setup, resume, train loop, eval, checkpoint, export.

The step itself is `bco_ray.train.step.train_step` (no Ray); the data order is
`bco_ray.train.batching` (no Ray), read by `bco_ray.train.rank_data` through
`bco_ray.train.shards`. This file only wires them to Ray Train: `ray.train.report` with the
checkpoints, and the process group Ray set up.
Everything above `worker_loop` imports neither Ray nor pyarrow, so the GPU benchmarks run
it on machines that have only torch and transformers.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import tempfile
import time

import torch

from bco_ray.config import Config, from_dict
from bco_ray.raycluster import torch_threads
from bco_ray.train import checkpoint, weights
from bco_ray.train.batching import rank_micro_batches
from bco_ray.train.gencheck import gen_line, generation_check, generation_verdict
from bco_ray.train.objectives import RewardShift
from bco_ray.train.rank_data import RankData, check_prompts
from bco_ray.train.step import PolicyLogps, collate, evaluate, train_step

H100_BF16_TFLOPS = 989.0


# ---------------------------------------------------------------------------- setup

def build_policy(cfg: Config, device: torch.device, world: int):
    """The policy as the module to optimise (FSDP2- or DDP-wrapped), its LM and tokenizer.

    With train.meta_init (and no LoRA) the model is built without weights and each worker
    reads only its own shards from the safetensors files (bco_ray.train.weights): memory
    N / workers at load instead of the whole float32 model on every worker."""
    from transformers import AutoTokenizer

    from bco_ray.assets import load_causal_lm, local_model_dir

    tc = cfg.train
    streamed = tc.meta_init and not tc.lora_r
    # An s3:// policy (the continuous loop's promoted model) is copied to this node's cache once.
    model_dir = local_model_dir(cfg.model.policy, cfg)
    if streamed:
        lm = weights.empty_model(model_dir, cfg.model.trust_remote_code)
        tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=cfg.model.trust_remote_code)
    else:
        lm, tok = load_causal_lm(model_dir, "float32", cfg.model.cache_dir, cfg.model.trust_remote_code)
    lm.config.use_cache = False
    if tc.attn_implementation != "sdpa":
        lm.set_attn_implementation(tc.attn_implementation)
    if tc.lora_r:
        lm = get_peft_model(lm, lora_config(tc))
    if tc.gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not streamed:
        lm.to(device)
    bf16 = computes_in_bf16(tc, device)
    policy = PolicyLogps(lm, cfg.objective.logp_chunk_size, compiled_head=tc.compile)
    layers = lm.get_decoder().layers
    # One worker has nothing to shard or synchronise: FSDP2 around it cost 15-25 % of each CPU
    # step (65-77 against 83 tokens/s, demo model), so it trains the plain module, as DDP does.
    if tc.strategy == "fsdp" and world > 1:
        from torch.distributed.fsdp import (
            CPUOffloadPolicy,
            MixedPrecisionPolicy,
            OffloadPolicy,
            fully_shard,
        )

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
            else MixedPrecisionPolicy()
        offload = CPUOffloadPolicy() if tc.cpu_offload else OffloadPolicy()
        for layer in layers:
            fully_shard(layer, mp_policy=mp, offload_policy=offload)
        fully_shard(policy, mp_policy=mp, offload_policy=offload)
        if streamed:  # after sharding: each rank its rows only (in host memory when offloaded)
            weights.materialise(policy, lm, model_dir, torch.device("cpu") if tc.cpu_offload else device)
        autocast = None  # FSDP2 casts the parameters itself
    else:
        if streamed:
            weights.materialise(policy, lm, model_dir, device)
        autocast = torch.bfloat16 if bf16 else None
        if world > 1:
            policy = torch.nn.parallel.DistributedDataParallel(policy, device_ids=[device.index]
                                                               if device.type == "cuda" else None)
    if tc.compile:
        for layer in layers:
            layer.compile()
    return policy, lm, tok, autocast


def computes_in_bf16(tc, device: torch.device) -> bool:
    """train.mixed_precision: bf16, or auto on a GPU."""
    return tc.mixed_precision == "bf16" or (tc.mixed_precision == "auto" and device.type == "cuda")


def lora_config(tc):
    from peft import LoraConfig

    return LoraConfig(r=tc.lora_r, lora_alpha=tc.lora_alpha, lora_dropout=tc.lora_dropout,
                      target_modules=list(tc.lora_targets), task_type="CAUSAL_LM")


def get_peft_model(lm, config):
    try:
        from peft import get_peft_model as wrap
    except ImportError as e:
        raise ImportError("train.lora_r > 0 needs PEFT: pip install 'bco-ray[lora]'") from e
    return wrap(lm, config)


def optimizer(policy: torch.nn.Module, tc, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, fused on GPUs and on CPUs alike.

    On CPUs torch's default is a loop over the tensors: 0.36 s of a 2.3 s demo step against
    0.09 s fused (torch >= 2.4; HF's Trainer, and so TRL, picks the fused kernel by default).
    Not with GPU offload (train.cpu_offload), whose host-side step is not tested here."""
    fused = device.type == "cpu" or (device.type == "cuda" and not tc.cpu_offload)
    return torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=tc.lr,
                             betas=tuple(tc.adam_betas), weight_decay=tc.weight_decay, fused=fused)


def lr_lambda(tc, total_steps: int):
    warmup = int(round(tc.warmup_ratio * total_steps))

    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if tc.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        return max(0.0, 1.0 - progress) if tc.schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    return fn


def _flops_per_token(lm) -> float:
    """6 N (matmuls, forward + backward) + 12 L d T-ish attention, PaLM's count at T = 512."""
    n = sum(p.numel() for p in lm.parameters())
    c = lm.config
    return 6 * n + 12 * c.num_hidden_layers * c.hidden_size * 512


# ---------------------------------------------------------------------------- export

def export_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    """train.export_dtype; auto: the training compute dtype (bf16 on GPUs, float32 on CPUs)."""
    name = cfg.train.export_dtype
    if name == "auto":
        return torch.bfloat16 if computes_in_bf16(cfg.train, device) else torch.float32
    return getattr(torch, name)


def export_model(policy, lm, tok, cfg: Config, rank: int, out_dir: str, device: torch.device) -> None:
    """Write the model, HF format, on rank 0. Every rank joins the gathers: one tensor at a
    time (bco_ray.train.weights.export), or the whole state at once for a LoRA model, whose
    adapters are merged into the base weights first."""
    checkpoint.reshard(policy)  # an eval pass leaves the root's weights gathered
    if not cfg.train.lora_r:
        weights.export(lm, tok, out_dir, rank, export_dtype(cfg, device), int(cfg.train.export_shard_gb * 2**30))
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from transformers import AutoModelForCausalLM

    module = policy.module if isinstance(policy, torch.nn.parallel.DistributedDataParallel) else policy
    full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank != 0:
        return
    fresh = get_peft_model(AutoModelForCausalLM.from_config(lm.config, dtype=torch.float32), lora_config(cfg.train))
    missing, unexpected = fresh.load_state_dict({k.removeprefix("lm."): v for k, v in full.items()}, strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise RuntimeError(f"export: weights do not fit the model (missing {missing}, unexpected {unexpected})")
    fresh = fresh.merge_and_unload()  # a plain model: serving needs no PEFT
    fresh.config.use_cache = True
    fresh.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)


_CONSOLE = None  # the driver's console queue (bco_ray.console.TrainSink), when it shows our lines


def say(line: str) -> None:
    """One console line from a worker. Not print(): Ray Train 2.60 patches print in workers
    and, when stdout is wrapped, emits each line twice (to the stream and its logger).
    Always in the worker's log; on the driver's console through its queue when there is one
    (Ray's worker output is then off the console)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
    if _CONSOLE is not None:
        try:
            _CONSOLE.put_nowait(line)
        except Exception:  # noqa: BLE001 - a full or gone queue must never stop training
            pass


def _improved(state: dict, ev: dict) -> bool:
    """Is this eval the best so far (lowest eval loss, among those whose generation check
    passed)? Records it."""
    best = state.get("best_eval_loss")
    if ev.get("eval/rows") and ev.get("gen/passed", True) and (best is None or ev["eval/loss"] < best):
        state["best_eval_loss"] = ev["eval/loss"]
        return True
    return False


def count_skips(state: dict, metrics: dict, limit: int) -> str | None:
    """Books a step that `train_step` skipped for a non-finite loss or gradient (the same
    verdict on every rank) and says so; raises once `limit` steps in a row were skipped."""
    if not metrics["skipped"]:
        state["nonfinite_in_row"] = 0
        return None
    state["nonfinite_steps"] = state.get("nonfinite_steps", 0) + 1
    state["nonfinite_in_row"] = in_row = state.get("nonfinite_in_row", 0) + 1
    step = metrics["step"]
    if in_row >= limit:
        raise FloatingPointError(
            f"{in_row} steps in a row had a non-finite loss or gradient (steps {step - in_row + 1}-{step}); the "
            f"weights are those after step {step - in_row}: lower train.lr, check the reference log-probs and "
            "the data, or raise train.max_nonfinite_steps")
    return (f"[train] step {step}: non-finite loss or gradient norm ({metrics['grad_norm']}): update skipped "
            f"({in_row} in a row, {state['nonfinite_steps']} in the run; the limit is {limit})")


class PhaseClock:
    """Wall seconds per phase of the worker's run (rank 0's view), summed over attempts: where
    a train stage's time goes, for the run card. `with clock("eval"): ...` or `clock.add(...)`."""

    def __init__(self, seconds: dict | None = None):
        self.seconds = dict(seconds or {})

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] = round(self.seconds.get(phase, 0.0) + seconds, 3)

    @contextlib.contextmanager
    def __call__(self, phase: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(phase, time.perf_counter() - t0)


def _progress(step: int, total: int, m: dict) -> str:
    mfu = f" | MFU {m['mfu']:.1%}" if m.get("mfu") is not None else ""
    return (f"[train] step {step}/{total} | loss {m['loss']:.4f} | r+ {m['rewards/chosen']:+.4f} "
            f"r- {m['rewards/rejected']:+.4f} | acc {m['reward_accuracy']:.2f} | delta {m['delta']:+.4f} | "
            f"logratio {m['logratio']:+.3f} | gnorm {m['grad_norm']:.3f} | lr {m['lr']:.2e} | "
            f"{m['tokens_per_s']:.0f} tok/s{mfu}")


# ---------------------------------------------------------------------------- the loop

def worker_loop(config: dict) -> None:
    import ray
    import ray.train
    import ray.train.torch

    from bco_ray import exports, storage  # pyarrow: not needed by the Ray-free parts above
    from bco_ray.train import shards
    from bco_ray.train.tracking import Tracker

    global _CONSOLE
    t_start = time.perf_counter()
    cfg: Config = from_dict(config["cfg"])
    tc, obj = cfg.train, cfg.objective
    _CONSOLE = config.get("console")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.run.seed + rank)
    if device.type == "cpu":
        torch.set_num_threads(torch_threads(tc.cpus_per_worker))

    policy, lm, tok, autocast = build_policy(cfg, device, world)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    opt = optimizer(policy, tc, device)
    total = config["total_steps"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(tc, total))
    shift = RewardShift("pooled" if obj.delta_mode == "pooled" else "balanced", obj.delta_decay)

    state = {"step": 0, "history": [], "eval": [], "best_eval_loss": None, "mlflow_run_id": None}
    ckpt = ray.train.get_checkpoint()
    orphan = None
    if ckpt is None:
        fs, run_path = storage.filesystem(config["storage_uri"], cfg.storage)
        orphan = checkpoint.latest_complete(fs, storage.join(run_path, tc.name))
    if ckpt or orphan:
        if ckpt:
            with ckpt.as_directory() as d:
                state.update(checkpoint.load(d, policy, opt, sched, shift, rank, world))
        else:
            import pyarrow.fs as pafs

            with tempfile.TemporaryDirectory() as d:
                pafs.copy_files(orphan, d, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
                state.update(checkpoint.load(d, policy, opt, sched, shift, rank, world))
            if rank == 0:
                say(f"[train] {orphan}: complete but unregistered (a worker died right after reporting it)")
        if rank == 0:
            say(f"[train] resumed from step {state['step']} (delta {shift.value:+.4f})")
    elif config.get("shift_init"):
        shift.load_state_dict(config["shift_init"])  # the previous run's delta, carried (the loop)
        if rank == 0:
            say(f"[train] reward shift carried over from {cfg.objective.reward_shift_from} (delta {shift.value:+.4f})")
    state["fingerprint"] = config["fingerprint"]  # this run's settings from here on (train.resume force)
    clock = PhaseClock(state.get("phase_seconds"))
    clock.add("worker setup", time.perf_counter() - t_start)
    nodes: list = [ray.get_runtime_context().get_node_id()] * world  # where the workers run (run card)
    if torch.distributed.is_initialized():
        torch.distributed.all_gather_object(nodes, nodes[0])
    state["worker_nodes"] = nodes
    tracker = Tracker(cfg, config["tracking_uri"], state["mlflow_run_id"]) if rank == 0 else None
    if tracker is not None:
        state["mlflow_run_id"] = tracker.run_id

    spe, g_units = config["steps_per_epoch"], tc.micro_batch_size * tc.grad_accum * world
    order = config["order"]
    ofs, _ = storage.filesystem(config["storage_uri"], cfg.storage)
    unit_rows = 2 if obj.loss == "dpo" else 1
    data = RankData({split: shards.SplitReader(ofs, o["dir"], o) for split, o in order.items()}, unit_rows,
                    order["train"]["rows"] // unit_rows, order["train"]["chunk_units"], tc.shuffle_buffer,
                    cfg.run.seed, g_units, rank, world, spe)
    flops_tok = _flops_per_token(lm)
    peak = tc.peak_tflops or (H100_BF16_TFLOPS if device.type == "cuda" and
                              ("H100" in torch.cuda.get_device_name() or "H200" in torch.cuda.get_device_name())
                              else None)

    # The generation check: the starting model's answers (step 0) are the yardstick, kept in
    # every checkpoint; a resumed run without them (an older checkpoint) skips the check.
    gen_prompts = (check_prompts(data.readers["eval"], tc.gen_check_prompts, order["eval"]["rows"])
                   if config["eval_every"] and tc.gen_check_prompts else [])
    if gen_prompts and state["step"] == 0:
        with clock("generation check"):
            state["gen_start"] = generation_check(policy, lm, tok, device, gen_prompts, tc.gen_check_max_tokens,
                                                  rank, world)
    if gen_prompts and "gen_start" not in state:
        gen_prompts = []
    if rank == 0 and config["eval_every"] and tc.gen_check_prompts:
        say(f"[train] generation check: {len(gen_prompts)} eval-split prompts answered greedily at every eval, "
            f"against step 0" if gen_prompts else "[train] generation check: off (no eval-split prompts, or a "
            "checkpoint from before it)")

    eval_batches: list[dict] = []  # read once, at the first eval: O(eval_max_rows / world) rows

    def run_eval() -> dict:
        with clock("eval"):
            policy.eval()
            if not eval_batches:
                eval_batches.extend(data.eval_batches(config["eval_units"], tc.micro_batch_size, pad, tc.packing))
            m = evaluate(policy, eval_batches, shift, obj, autocast)
            checkpoint.reshard(policy)  # free the root's gathered weights; the optimizer holds the shards
            policy.train()
        m["step"] = state["step"]
        if gen_prompts:
            with clock("generation check"):
                answers = generation_check(policy, lm, tok, device, gen_prompts, tc.gen_check_max_tokens, rank,
                                           world)
            m.update(generation_verdict(answers, state["gen_start"], cfg))
            state["gen_failed_in_row"] = 0 if m["gen/passed"] else state.get("gen_failed_in_row", 0) + 1
            if rank == 0:
                say(gen_line(state["step"], m))
        return m

    def collapsing() -> bool:
        return bool(tc.early_stop_patience) and state.get("gen_failed_in_row", 0) >= tc.early_stop_patience

    store = ctx.get_storage()

    def persisted(ckpt, name: str):
        dest = store.build_checkpoint_path_from_name(name)
        checkpoint.persist(ckpt.path, store.storage_filesystem, dest)
        return ray.train.Checkpoint(dest, filesystem=store.storage_filesystem)

    if rank == 0:
        checkpoint.clear_staging(store.storage_filesystem, store.experiment_fs_path)

    def save_and_report(metrics: dict, final: bool = False) -> None:
        # the state saved holds the clock so far: the final checkpoint's own time is the
        # driver's remainder (train/stage.py)
        state["phase_seconds"] = dict(clock.seconds)
        with clock("checkpoint"):
            d = checkpoint.staging_dir(store.storage_filesystem, store.experiment_fs_path)
            checkpoint.save(d, policy, opt, sched, shift, state, rank, world, tc.strategy)
            # Mid-run, the move (an S3 upload) overlaps the next steps; the last one the driver reads.
            mode = ray.train.CheckpointUploadMode.SYNC if final else ray.train.CheckpointUploadMode.ASYNC
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d), checkpoint_upload_mode=mode,
                             checkpoint_upload_fn=persisted, delete_local_checkpoint_after_upload=False)

    def export(ev: dict) -> None:
        """Every rank joins the weight gather; rank 0 writes and uploads."""
        with clock("export"), tempfile.TemporaryDirectory() as d:
            export_model(policy, lm, tok, cfg, rank, d, device)
            if rank == 0:
                exports.write(d, config["export"], cfg.storage, {"step": state["step"], "train_name": tc.name})
                say(f"[train] exported the model at step {state['step']} to {config['export']}")
        state["exported_step"], state["exported_eval"] = state["step"], ev

    policy.train()
    step = state["step"]
    metrics: dict = state["history"][-1] if state["history"] else {}
    ev = None  # the last eval, when training stopped early on it
    while step < total and ev is None:
        epoch, j = divmod(step, spe)
        with clock("reading batches"):
            mine = data.step_units(step, step + 1 if step + 1 < total else None)
            mbs = [collate(rows, pad, tc.packing) for rows in rank_micro_batches(mine, tc.grad_accum)]
        t0 = time.perf_counter()
        metrics = train_step(policy, opt, mbs, shift, obj, tc.max_grad_norm or None, sched, autocast)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        clock.add("optimizer steps", dt)
        step += 1
        state["step"] = step
        metrics.update(step=step, epoch=epoch + (j + 1) / spe, seconds=dt, tokens_per_s=metrics["tokens"] / dt,
                       logratio=metrics["logratio"],
                       mfu=(flops_tok * metrics["tokens"] / dt / (peak * 1e12 * world)) if peak else None)
        state["history"].append(metrics)
        if (line := count_skips(state, metrics, tc.max_nonfinite_steps)) and rank == 0:
            say(line)
        if config.get("fail_at_step") == step and rank == world - 1 and not os.path.exists(config["fail_marker"]):
            open(config["fail_marker"], "w").close()
            os.kill(os.getpid(), signal.SIGKILL)  # a worker dies mid-run (the fault-tolerance test)
        if rank == 0 and (step % tc.log_every == 0 or step == total):
            say(_progress(step, total, metrics))
            tracker.log(metrics, step)
        if config["eval_every"] and step % config["eval_every"] == 0 and step < total:
            mid = run_eval()
            state["eval"].append(mid)
            if rank == 0:
                tracker.log(mid, step)
            if tc.export_which == "best" and _improved(state, mid):
                export(mid)
            if collapsing():  # the same verdict on every rank: all leave the loop together
                ev = mid
                state["stopped_early"] = {"step": step, "reasons": mid["gen/reasons"]}
                if rank == 0:
                    say(f"[train] stopping early at step {step} of {total}: the generation check failed "
                        f"{state['gen_failed_in_row']} time(s) in a row (train.early_stop_patience)")
                break
        if config["checkpoint_every"] and step % config["checkpoint_every"] == 0 and step < total:
            save_and_report(metrics)
    if ev is None:
        ev = run_eval()
        state["eval"].append(ev)
        if rank == 0:
            tracker.log(ev, step)
    if rank == 0:
        say(f"[train] eval at step {step}: loss {ev['eval/loss']:.4f} | reward accuracy "
            f"{ev['eval/reward_accuracy']:.3f} | margin {ev['eval/rewards/margin']:+.4f}")
    if tc.export_which == "final" or _improved(state, ev):
        export(ev)
    elif state.get("exported_step") is None:
        if rank == 0:
            say("[train] no eval passed the generation check: exporting the last weights (the eval stage will "
                "judge them)")
        export(ev)
    data.close()
    # Rows each rank read from the split files since it started (or resumed): its share only.
    read = [data.rows_read()] * world
    if torch.distributed.is_initialized():
        torch.distributed.all_gather_object(read, read[rank])
    state["rows_read"] = {split: [r[split] for r in read] for split in order}
    save_and_report({**metrics, **ev}, final=True)
    if tracker is not None:
        tracker.close()

"""TRL 1.13's BCOTrainer on the rows of a bco-ray train split: the TRL row of bench/alignment.py.

    python bench/trl_bco.py '{"data": "<run>/data/balanced/data", "out": "/tmp/trl-model",
                              "policy": "smollm2-135m-instruct", "steps": 12, "batch": 8, "lr": 3e-5,
                              "beta": 0.1, "max_length": 160, "bf16": true, "seed": 0}'

Same rows as bco-ray (the prepared data's train split: prompt, completion, label), same chat
template, optimizer steps, global batch, peak lr, warm-up and schedule ("constant" or "cosine",
both after a 10 % warm-up, as bco-ray's train.schedule); everything else is
TRL's default, the reference model run on the fly included. Writes the trained model
(safetensors, with its tokenizer) to `out` and prints one `RESULT {json}` line. Run in its own
process so that its memory, threads and accelerate state are its own.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time


def main(job: dict) -> dict:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import pyarrow.dataset as pads
    import torch
    from datasets import Dataset
    from trl.experimental.bco import BCOConfig, BCOTrainer

    from bco_ray.assets import load_causal_lm

    t0 = time.time()
    torch.set_num_threads(job.get("threads", 2))
    table = pads.dataset(job["data"], format="parquet").to_table(columns=["prompt", "completion", "label", "split"])
    rows = [r for r in table.to_pylist() if r["split"] == "train"]
    model, tok = load_causal_lm(job["policy"], "float32")
    ref_model = load_causal_lm(job["policy"], "float32")[0]
    train = Dataset.from_list([
        {"prompt": tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=False,
                                           add_generation_prompt=True),
         "completion": r["completion"], "label": bool(r["label"])} for r in rows])
    with tempfile.TemporaryDirectory() as scratch:
        cfg = BCOConfig(output_dir=scratch, per_device_train_batch_size=job["batch"], gradient_accumulation_steps=1,
                        max_steps=job["steps"], learning_rate=job["lr"],
                        lr_scheduler_type={"constant": "constant_with_warmup", "cosine": "cosine"}[job.get("schedule",
                                                                                                     "constant")],
                        warmup_steps=max(1, round(0.1 * job["steps"])), beta=job["beta"],
                        max_length=job["max_length"], report_to="none", save_strategy="no", use_cpu=True,
                        bf16=job["bf16"], seed=job["seed"], data_seed=job["seed"], logging_steps=1,
                        dataloader_drop_last=True, disable_tqdm=True)
        trainer = BCOTrainer(model=model, ref_model=ref_model, args=cfg, train_dataset=train, processing_class=tok)
        trainer.train()
    trainer.save_model(job["out"])  # safetensors and the tokenizer
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"rows": len(rows), "steps": trainer.state.global_step, "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None, "seconds": round(time.time() - t0, 1)}


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(json.loads(sys.argv[1]))), flush=True)

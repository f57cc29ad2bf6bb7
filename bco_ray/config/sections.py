"""The configuration's sections: one frozen dataclass per stage, every field a `knob` with its
default and its one-line help (docs/configuration.md is generated from them). A stage's
section is added here when the stage is."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


def knob(default: Any, help: str, secret: bool = False, **kw) -> Any:  # noqa: A002 - the name reads best here
    """A config field: its default, its one-line help, and whether its value is a secret (never
    written to an artefact: see `redacted`)."""
    return field(default=default, metadata={"help": help, "secret": secret}, **kw)


@dataclass(frozen=True)
class RunConfig:
    """Where a run writes and how it is seeded."""

    run_dir: str = knob("runs/default", "Local directory for every stage's outputs, manifests and reports.")
    seed: int = knob(0, "Seed for sampling, shuffling and initialisation; same seed, same run.")
    stop_after: Literal["assets", "prepare", "score-ref", "train", "eval", "serve"] | None = knob(None, "align: stop after this stage (e.g. prepare on a CPU-only cluster, the GPU job then skips it); null: every stage.")


@dataclass(frozen=True)
class RayConfig:
    """How the job reaches Ray."""

    address: str | None = knob(None, "Ray address to join ('auto', 'ray://host:10001'); null starts a local cluster.")
    num_cpus: int | None = knob(None, "CPUs for a local cluster; null lets Ray count them.")
    temp_dir: str | None = knob(None, "Temp dir of a local cluster (keep it short: Unix sockets cap paths at 107 bytes); null picks /tmp/bco-ray-<pid>.")
    auth: Literal["default", "disabled"] = knob("default", "Token auth of a local cluster: 'default' keeps Ray's token auth on; 'disabled' is for tests only.")


@dataclass(frozen=True)
class ModelConfig:
    """The models. Names are bundled aliases (see `bco_ray.assets`) or HF directories."""

    policy: str = knob("smollm2-135m-instruct", "Model to align: alias ('smollm2-135m-instruct', 'tiny-llama') or a local HF directory.")
    reference: str | None = knob(None, "Frozen reference model; null means the policy's initial weights.")
    embedder: str = knob("all-minilm-l6-v2", "Sentence embedder for UDM: alias or HF encoder directory.")
    dtype: Literal["auto", "float32", "bfloat16"] = knob("auto", "Compute dtype: 'auto' is bfloat16 on GPUs and float32 on CPUs.")
    trust_remote_code: bool = knob(False, "Run model code shipped inside a model directory. Off: it executes arbitrary Python.")
    cache_dir: str | None = knob(None, "Where bundled models are materialised; null is $BCO_RAY_CACHE or ~/.cache/bco-ray.")


@dataclass(frozen=True)
class ObjectiveConfig:
    """The training objective (bco_ray/train/objectives.py)."""

    loss: Literal["bco", "kto", "dpo"] = knob("bco", "Objective: BCO (default), or the KTO / DPO baselines.")
    beta: float = knob(0.1, "Reward scale beta in r = beta * (log pi - log pi_ref).")
    delta_mode: Literal["balanced", "pooled", "zero"] = knob("balanced", "Reward shift: mean of the per-label reward means ('balanced'), TRL's pooled mean ('pooled'), or none ('zero', an ablation).")
    delta_decay: float | None = knob(None, "EMA decay in (0, 1) for the reward shift on drifting data; null keeps cumulative means.")
    reward_shift_from: str | None = knob(None, "A model directory (local or s3://) whose run card's final reward-shift state this run starts from (the continuous loop's carry, loop.carry_reward_shift); null: zero.")
    udm_weights: bool = knob(True, "BCO: apply the UDM weights prepare wrote; false trains plain BCO on the same prepared data (an ablation).")
    kto_desirable_weight: float = knob(1.0, "KTO lambda_D: weight of thumbs-up rows.")
    kto_undesirable_weight: float = knob(1.0, "KTO lambda_U: weight of thumbs-down rows.")
    logp_chunk_size: int = knob(1024, "Token rows per chunk in the log-prob kernel; bounds its fp32 scratch at chunk x vocab x 4 bytes.")


@dataclass(frozen=True)
class StorageConfig:
    """Object storage for s3:// paths (AWS S3, MinIO, any S3-compatible store)."""

    endpoint_url: str | None = knob(None, "S3 endpoint, e.g. http://127.0.0.1:9000 for MinIO; null uses AWS's (or $AWS_ENDPOINT_URL).")
    region: str | None = knob(None, "S3 region; null uses $AWS_REGION or the bucket's.")
    access_key_id: str | None = knob(None, "Access key; null uses the environment / AWS credential chain (prefer that to a config file).",
                                     secret=True)
    secret_access_key: str | None = knob(None, "Secret key; null uses the environment / AWS credential chain.", secret=True)
    anonymous: bool = knob(False, "Read public buckets without credentials.")


DEFAULT_TRUE_LABELS = ("true", "1", "1.0", "yes", "y", "up", "thumbs_up", "thumbsup", "thumbs-up", "thumbs up",
                       "positive", "pos", "good", "like", "liked", "desirable", "+1", "\U0001f44d")
DEFAULT_FALSE_LABELS = ("false", "0", "0.0", "-1", "-1.0", "no", "n", "down", "thumbs_down", "thumbsdown",
                        "thumbs-down", "thumbs down", "negative", "neg", "bad", "dislike", "disliked",
                        "undesirable", "\U0001f44e")


@dataclass(frozen=True)
class IngestConfig:
    """`bco-ray prepare`: raw feedback logs in, a tokenized, split dataset out."""

    input: str = knob("data/demo_feedback", "Parquet logs: a file, a directory (searched recursively), a glob, or an s3:// URI.")
    format: Literal["auto", "unpaired", "paired", "conversational"] = knob("auto", "Row schema; 'auto' decides per file from its columns.")
    prompt_column: str = knob("prompt", "Column with the prompt (plain text).")
    completion_column: str = knob("completion", "Column with the model's answer.")
    served_log: str | None = knob(None, "The served log that feedback events (feedback the server wrote without its answer) are joined to by id; null is <input>/_served.")
    label_column: str = knob("label", "Column with the feedback (thumbs-up / thumbs-down in any spelling listed below).")
    chosen_column: str = knob("chosen", "Paired format: the preferred completion.")
    rejected_column: str = knob("rejected", "Paired format: the dispreferred completion.")
    messages_column: str = knob("messages", "Conversational format: list of {role, content}; the last assistant turn is the completion.")
    true_labels: tuple[str, ...] = knob(DEFAULT_TRUE_LABELS, "Label spellings meaning thumbs-up (case-insensitive; emoji skin tones ignored).")
    false_labels: tuple[str, ...] = knob(DEFAULT_FALSE_LABELS, "Label spellings meaning thumbs-down.")
    partition_key: str = knob("date", "Hive partition key holding the day (logs laid out as date=YYYY-MM-DD/).")
    date_from: str | None = knob(None, "First day to read (inclusive, YYYY-MM-DD); partitions outside the range are not read.")
    date_to: str | None = knob(None, "Last day to read (inclusive, YYYY-MM-DD).")
    max_chars: int = knob(200_000, "Rows whose prompt + completion exceed this many characters are quarantined as oversize.")
    max_length: int = knob(1024, "Token budget of prompt + completion + EOS; the completion is truncated first.")
    max_prompt_length: int = knob(768, "Rows whose prompt alone exceeds this many tokens are quarantined (prompt_too_long).")
    chat_template: bool = knob(True, "Wrap plain-text prompts as a user turn and apply the tokenizer's chat template.")
    conflicts: Literal["majority", "quarantine", "keep"] = knob("majority", "Same (prompt, completion) with both labels: keep the majority label (ties quarantined), quarantine all, or keep one row per label.")
    eval_fraction: float = knob(0.05, "Share of prompts (by hash, so one prompt never lands in both) in the eval split.")
    output: str | None = knob(None, "Output directory (local or s3://); null is <run_dir>/prepared.")
    shuffle: Literal["sort", "hash"] = knob("sort", "Dedup shuffle: 'sort' (tasks; any cluster size) or 'hash' (Ray's aggregator actors: faster on big clusters, but they reserve CPUs and hang a 1-CPU cluster).")
    num_cpus_per_task: float = knob(0.5, "CPUs per read/tokenize task or actor (fractional: whole CPUs starve Ray Data on small machines).")


@dataclass(frozen=True)
class UDMConfig:
    """Underlying distribution matching: density-ratio weights for thumbs-down rows."""

    enabled: bool = knob(False, "Fit UDM and write a weight per row; off (the default: in the powered benchmark it lowered the judged gain by 4.3 points on a prompt-shifted log, docs/alignment-benchmark.md): every weight is 1.")
    sample_size: int = knob(1024, "Prompts sampled per label (train split) to fit the classifier.")
    eval_sample_size: int = knob(512, "Prompts sampled per label from the eval split for held-out accuracy / AUC.")
    min_density_ratio: float = knob(0.5, "Lower clamp of the weight p / (1 - p).")
    max_density_ratio: float = knob(10.0, "Upper clamp of the weight.")
    min_auc: float | None = knob(0.55, "Apply the weights only when the classifier's held-out AUC, at its 95 % lower bound, reaches this (it found a prompt shift); else every weight is 1 and the report says why. null: always apply.")
    l2_c: float = knob(1.0, "Inverse L2 strength of the logistic regression (sklearn's C), class-balanced.")
    max_embed_length: int = knob(256, "Prompt tokens fed to the embedder (longer prompts are truncated, not overflowed).")
    embed_batch_size: int = knob(64, "Prompts per embedder forward pass.")
    num_gpus_per_actor: float | None = knob(None, "GPUs per embedding actor (fp16 on a GPU); null: 1 when the cluster has GPUs (prepare runs before anything else uses them), else 0.")
    embed_actors: int | None = knob(None, "Embedder actors in the Ray Data pool (one model each); null: one per GPU of the cluster (num_gpus_per_actor each) when it has GPUs, else one per CPU less one.")
    embed_threads: int | None = knob(None, "CPU threads of each embedding actor; null: the cluster's CPUs over the actors (at least 1), since the feeding tasks are done or idle while the embedder runs.")
    embed_dtype: Literal["auto", "float32", "bfloat16", "float16"] = knob("auto", "Embedder dtype: 'auto' is float16 on GPUs, bfloat16 on CPUs that compute it natively (AVX512-BF16/AMX: 2x, embeddings equal to cos 0.9999), float32 elsewhere.")


@dataclass(frozen=True)
class ScoreConfig:
    """`bco-ray score-ref`: the frozen reference model's log-probs, once per row."""

    backend: Literal["auto", "hf", "vllm"] = knob("auto", "'vllm' (engines as Ray Data actors), 'hf' (transformers forward), or 'auto': vLLM when it is installed and the cluster has GPUs, else hf.")
    input: str | None = knob(None, "Prepared dataset (the directory holding data/); null is ingest.output or <run_dir>/prepared.")
    output: str | None = knob(None, "Scored dataset directory (local or s3://); null is <run_dir>/scored.")
    force: bool = knob(False, "Score again even when the output already holds this input scored by this model and dtype.")
    max_model_len: int | None = knob(None, "Longest sequence the reference scores; longer rows are quarantined (too_long_for_reference). null: the model's max_position_embeddings.")
    kl_pairs: bool | None = knob(None, "Also score a mismatched (prompt, other row's completion) per row, which KTO's KL estimate needs; null: only when objective.loss is kto.")
    actors: int = knob(1, "Scoring actors (one model each); on GPUs, one per GPU.")
    num_gpus_per_actor: float | None = knob(None, "GPUs per actor; null: 1 when the cluster has GPUs, else 0.")
    num_cpus_per_actor: float = knob(0.5, "CPUs per actor (fractional on small machines, or Ray Data's readers starve).")
    max_nonfinite_fraction: float = knob(0.01, "Rows with a non-finite reference log-prob are quarantined (non_finite_reference_logp); more than this share of the input fails the stage (a broken reference).")
    batch_rows: int = knob(256, "Rows per Ray Data batch handed to an actor; the hf backend sorts them by length inside.")
    batch_tokens: int = knob(16384, "hf: padded tokens per forward pass (rows x longest row), the memory knob.")
    tensor_parallel_size: int = knob(1, "vllm: GPUs per scoring engine (tensor parallelism, on one node); each actor reserves them as a placement group. 70B in bf16: 4 on 80 GB GPUs.")
    vllm_gpu_memory_utilization: float = knob(0.85, "vllm: share of GPU memory for weights + KV cache.")
    vllm_enforce_eager: bool = knob(False, "vllm: skip CUDA graphs / torch.compile (faster start, slower scoring); tests use eager.")
    vllm_cpu_kvcache_gib: int = knob(1, "vllm on CPU builds: KV cache GiB (VLLM_CPU_KVCACHE_SPACE); vLLM otherwise asks for most of the RAM.")
    vllm_batches_in_flight: int = knob(2, "vllm: batches an actor works on at once (its AsyncLLM schedules the next while the last is summed and shipped); memory: that many batches of rows in the actor.")
    vllm_metrics: bool = knob(True, "vllm: export the engine's metrics (vllm:* queue, KV cache, tokens, latencies) as Ray metrics, beside Ray's own in the cluster's Prometheus scrape.")


@dataclass(frozen=True)
class TrainConfig:
    """`bco-ray train`: Ray Train workers, sharding, optimisation, checkpoints, export."""

    input: str | None = knob(None, "Scored dataset (the directory holding data/); null is score.output or <run_dir>/scored.")
    num_workers: int = knob(2, "Training workers (one per GPU on a GPU cluster).")
    use_gpu: bool | None = knob(None, "Train on GPUs; null: when the cluster has any.")
    cpus_per_worker: float = knob(0.5, "CPUs per worker (fractional on small machines, or Ray Data's readers starve).")
    placement: Literal["PACK", "SPREAD"] = knob("PACK", "Worker placement: PACK fills a node first (fast collectives), SPREAD puts workers on different nodes.")
    strategy: Literal["fsdp", "ddp"] = knob("fsdp", "FSDP2 (fully_shard per decoder layer, then the model; also on CPU/gloo) or DDP; one worker trains the plain module.")
    micro_batch_size: int = knob(4, "Rows (DPO: pairs) per worker per forward pass.")
    grad_accum: int = knob(2, "Micro-batches per optimizer step; global batch = micro_batch_size x grad_accum x num_workers.")
    epochs: float = knob(1.0, "Passes over the train split (fractions allowed); ignored when max_steps is set.")
    max_steps: int | None = knob(None, "Optimizer steps to run; null derives them from epochs.")
    lr: float = knob(5e-6, "Peak learning rate of AdamW.")
    weight_decay: float = knob(0.0, "AdamW weight decay.")
    adam_betas: tuple[float, ...] = knob((0.9, 0.999), "AdamW betas.")
    warmup_ratio: float = knob(0.1, "Share of the steps spent warming the learning rate up linearly from 0.")
    schedule: Literal["cosine", "linear", "constant"] = knob("cosine", "Learning-rate decay after warm-up (to 0 at the last step).")
    max_grad_norm: float = knob(1.0, "Gradient clipping (global L2 norm); 0 disables.")
    mixed_precision: Literal["auto", "bf16", "no"] = knob("auto", "bf16 compute with fp32 master weights; 'auto' is bf16 on GPUs, fp32 on CPUs.")
    gradient_checkpointing: bool = knob(False, "Recompute decoder activations in backward: less memory, ~30 % more compute.")
    compile: bool = knob(False, "torch.compile the decoder and the log-prob kernel (GPUs).")
    attn_implementation: Literal["sdpa", "flex_attention", "flash_attention_2", "eager"] = knob("sdpa", "Attention kernels of the policy (transformers' attn_implementation). With packing, sdpa computes a dense block mask over the whole packed row; flex_attention (GPUs) and flash_attention_2 (needs flash-attn) skip the blocks between rows.")
    packing: bool = knob(False, "Pack each micro-batch's rows back to back in one row with restarting position ids (no padding computed; attention stays inside each row): real tokens only, on variable-length feedback.")
    cpu_offload: bool = knob(False, "FSDP2: keep the sharded weights, gradients and AdamW state in host memory and run the optimizer there; GPUs hold a gathered layer and the activations (70B on 8 GPUs; slower).")
    meta_init: bool = knob(True, "Build the policy without weights and have each worker read only its shards from the safetensors files (load memory N / workers); false loads the whole model on every worker through transformers (LoRA always does).")
    lora_r: int = knob(0, "LoRA rank through PEFT (only adapters train; merged into the weights at export); 0: full fine-tuning.")
    lora_alpha: float = knob(16.0, "LoRA scaling numerator (the update is alpha / r x B A).")
    lora_dropout: float = knob(0.0, "Dropout on the LoRA input.")
    lora_targets: tuple[str, ...] = knob(("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), "Module names that get adapters.")
    driver_sort_rows: int = knob(100_000, "Splits of up to this many rows are put in the global order by the driver (in memory, ~3 KB a row at 1k tokens); larger ones by Ray Data's distributed sort.")
    shuffle_buffer: int = knob(1024, "Units (rows, DPO pairs) per shuffle window: every epoch permutes the windows and the chunks inside each, after the global shuffle (memory: one int per chunk of a window).")
    shuffle_chunk: int = knob(4, "Consecutive units of the global order that always share a global batch: the grain of the shuffle and of each rank's reads (gcd with the global batch; a rank reads exactly its rows when it divides micro_batch_size x grad_accum).")
    interleave_labels: bool = knob(False, "Spread thumbs-up and thumbs-down rows evenly over the global order (BCO/KTO), so every global batch holds both in the split's ratio.")
    log_every: int = knob(1, "Steps between metric lines (console, MLflow).")
    eval_max_rows: int | None = knob(4096, "Units (rows; DPO: pairs) of the eval split each eval reads, the first in its fixed order (the same every time); null: all of it (5e6 rows a time at 1e8 rows and a 5 % split).")
    eval_every: float = knob(0, "Steps between eval passes on the eval split (delta read, never updated); below 1: that share of the run's steps (0.5: halfway); 0: only at the end.")
    checkpoint_every: float = knob(50, "Steps between checkpoints (and always at the end); below 1: that share of the run's steps; 0: only at the end.")
    keep_checkpoints: int = knob(2, "Checkpoints kept (the newest).")
    max_nonfinite_steps: int = knob(3, "Abort after this many steps in a row skipped for a non-finite loss or gradient (a skip leaves weights, optimizer and delta untouched).")
    max_failures: int = knob(1, "Worker failures survived by restarting from the last checkpoint.")
    storage: str | None = knob(None, "Where Ray Train keeps checkpoints (local or s3://); null is <run_dir>/train.")
    name: str = knob("bco", "Run name under storage; rerunning with the same name resumes from its last checkpoint.")
    resume: Literal["auto", "force"] = knob("auto", "'auto': a checkpoint under train.name is resumed only when its data and training settings match this run's (else an error); 'force': resume it anyway, e.g. with a lower lr after a divergence.")
    export: str | None = knob(None, "Where the aligned model goes, HF format (local or s3://); null is <run_dir>/model.")
    export_dtype: Literal["auto", "bfloat16", "float16", "float32"] = knob("auto", "Weights dtype of the export; auto: the training compute dtype (bfloat16 on GPUs, float32 on CPUs).")
    export_shard_gb: float = knob(4.0, "Largest safetensors file of the export (GiB); more are indexed by model.safetensors.index.json. Rank 0 holds one file's worth plus one tensor while exporting.")
    export_which: Literal["final", "best"] = knob("best", "Export the last weights ('final'), or the eval with the lowest eval loss among those whose generation check passed ('best'; the last weights when none did).")
    gen_check_prompts: int = knob(16, "With eval_every: eval-split prompts the policy answers greedily at step 0 and at every eval; more looping, cut or empty answers than at step 0 (the eval gate's limits) fail that eval. 0: off.")
    gen_check_max_tokens: int = knob(48, "Longest answer of the generation check (cut answers count against the gate's eval.max_length_increase).")
    early_stop_patience: int = knob(1, "Stop training after this many failed generation checks in a row (a collapsing model); 0: never stop early.")
    tracking_uri: str | None = knob(None, "MLflow tracking URI; null is a file store under <run_dir>/mlruns; 'none' disables MLflow.")
    peak_tflops: float | None = knob(None, "Peak dense TFLOP/s per worker for MFU; null: 989 on H100/H200 in bf16, else MFU is not shown.")


JUDGE_PROMPT = ("Rate how helpful, correct and well written the answer is, from 1 (useless or broken) to 10 "
                "(excellent). Reply with the number only.\n\nQuestion:\n{prompt}\n\nAnswer:\n{answer}")


@dataclass(frozen=True)
class EvalConfig:
    """`bco-ray eval`: the candidate vs its reference on held-out prompts, and the gate."""

    enabled: bool = knob(True, "align runs this stage after train; a rejected model stops the run before serve.")
    model: str | None = knob(None, "Candidate model (HF directory or s3:// prefix); null is train.export or <run_dir>/model.")
    input: str | None = knob(None, "Prepared data whose eval split gives the prompts (and the feedback judge its rows); null is ingest.output or <run_dir>/prepared.")
    prompts: str | None = knob(None, "A JSONL file of prompts instead ({\"prompt\": text} or {\"messages\": [...]} per line).")
    num_prompts: int = knob(64, "Held-out prompts evaluated (a seeded choice among the eval split's distinct prompts).")
    samples: int = knob(1, "Sampled answers per prompt at temperature 1 (with the same seeds for both models), besides the greedy one.")
    max_tokens: int = knob(64, "Longest answer; the share of answers cut here is a gate.")
    batch_size: int = knob(64, "Answers decoded together, greedy and sampled alike (a CPU decode step costs about the same for 1 row as for 64).")
    num_cpus: float = knob(1.0, "CPUs of the eval task (it also takes one GPU when the cluster has any).")
    judge: Literal["feedback", "reward-model", "openai", "none"] = knob("feedback", "Judge of answer quality: a classifier on embeddings learnt from the train split's thumbs, a reward-model directory, an OpenAI-compatible LLM judge, or none.")
    judge_model: str | None = knob(None, "reward-model: its HF directory; openai: the model name to ask.")
    judge_url: str | None = knob(None, "openai: the judge's base URL (e.g. http://127.0.0.1:8001/v1).")
    judge_api_key_env: str = knob("BCO_RAY_JUDGE_API_KEY", "openai: environment variable holding the judge's API key (never put the key in config).")
    judge_prompt: str = knob(JUDGE_PROMPT, "openai: the judge's prompt, with {prompt} and {answer}; the first number 1-10 in the reply is the score.")
    judge_sample_size: int = knob(2048, "feedback: train-split completions per label the judge learns from.")
    max_degenerate_increase: float | None = knob(0.10, "Gate: share of looping answers (over half of the token trigrams repeats) above the reference's; null: not checked.")
    max_length_increase: float | None = knob(0.20, "Gate: share of answers cut at max_tokens above the reference's; null: not checked.")
    max_empty_increase: float | None = knob(0.10, "Gate: share of empty answers above the reference's; null: not checked.")
    max_kl_per_token: float | None = knob(1.0, "Gate: KL(candidate || reference) in nats per token on the candidate's own samples; null: not checked.")
    enforce: bool = knob(True, "A rejected model fails the run (exit 1) and is marked so beside the export (serve refuses it); false: only reported.")
    output: str | None = knob(None, "Where eval.json and samples.jsonl go (local directory); null is <run_dir>/eval.")


@dataclass(frozen=True)
class CompactConfig:
    """`bco-ray compact`: the feedback log's small files merged per day (bco_ray/data/compact.py)."""

    input: str | None = knob(None, "The feedback log to compact (local or s3://); null is serve.feedback_log, or <run_dir>/feedback.")
    until: str | None = knob(None, "Compact the days before this one (YYYY-MM-DD); null is today (UTC), which the server may still be writing.")
    max_rows_per_file: int = knob(1_000_000, "Rows per merged file at most (also what one task holds in memory).")
    min_files: int = knob(2, "Leave a day alone until it has at least this many files.")


@dataclass(frozen=True)
class TuneConfig:
    """`bco-ray tune`: a grid over lr, beta and steps on Ray Tune; each trial trains, then runs the eval stage."""

    lr: tuple[float, ...] = knob((2e-6, 5e-6, 1e-5, 2e-5), "train.lr values tried.")
    beta: tuple[float, ...] = knob((0.1,), "objective.beta values tried.")
    steps: tuple[int, ...] = knob((), "train.max_steps values tried; empty: the config's own train.max_steps (or epochs).")
    objective: Literal["judge", "win_rate"] = knob("judge", "What the best trial maximises: the judge's mean score minus the reference's on the same prompts and seeds ('judge'), or the candidate's win rate.")
    max_kl_per_token: float | None = knob(None, "A trial may win only when its KL to the reference (nats/token) stays under this, besides passing the gate; null: eval.max_kl_per_token.")
    max_concurrent_trials: int | None = knob(None, "Trials at once; null: the cluster's GPUs // train.num_workers, and 1 on CPUs (a trial's workers take the cores).")
    keep_models: bool = knob(False, "Keep every trial's exported model; false keeps only the best trial's.")
    output: str | None = knob(None, "Where results.json / results.md / best.yaml and the trials go (local directory); null is <run_dir>/tune.")


@dataclass(frozen=True)
class ServeConfig:
    """`bco-ray serve`: the aligned model behind an OpenAI-compatible HTTP API (Ray Serve)."""

    model: str | None = knob(None, "HF model directory or s3:// prefix to serve; null is train.export or <run_dir>/model.")
    model_name: str = knob("bco-ray", "Model id clients put in requests (GET /v1/models lists it).")
    host: str = knob("127.0.0.1", "Bind address; 0.0.0.0 exposes the endpoint to the network (API keys required then).")
    port: int = knob(8000, "HTTP port.")
    api_keys: tuple[str, ...] = knob((), "Accepted Bearer keys; empty and $BCO_RAY_API_KEYS unset: no auth (loopback only). Prefer the env var (comma-separated) to a file.",
                                     secret=True)
    allow_unauthenticated: bool = knob(False, "Serve without API keys on a non-loopback serve.host (behind a proxy that authenticates).")
    engine: Literal["auto", "hf", "vllm"] = knob("auto", "Generation engine: 'vllm' (AsyncLLM, continuous batching) or 'hf' (transformers, @serve.batch); 'auto' is vllm when the cluster has GPUs and vLLM is installed, else hf.")
    num_replicas: int = knob(1, "Replicas of the model server (ignored when autoscaling).")
    autoscale_max_replicas: int | None = knob(None, "Enable autoscaling between 1 and this many replicas, on ongoing requests.")
    max_ongoing_requests: int | None = knob(None, "Requests a replica works on at once; null: 16 with hf (its batches of max_batch_size), 256 with vllm (continuous batching schedules them all).")
    tensor_parallel_size: int = knob(1, "vllm: GPUs per replica (tensor parallelism, on one node), reserved as the replica's placement group. 70B in bf16: 4 on 80 GB GPUs.")
    max_queued_requests: int = knob(32, "Requests waiting for a replica; beyond this the server answers 503 at once instead of queueing.")
    max_model_len: int | None = knob(None, "Longest prompt + completion in tokens; null: the model's own limit.")
    vllm_gpu_memory_utilization: float = knob(0.85, "vllm: share of the replica's GPU memory for weights + KV cache.")
    vllm_enforce_eager: bool = knob(False, "vllm: skip CUDA graphs / torch.compile (faster start, slower decoding).")
    vllm_cpu_kvcache_gib: int = knob(1, "vllm on CPU builds: KV cache GiB per replica (VLLM_CPU_KVCACHE_SPACE).")
    vllm_metrics: bool = knob(True, "vllm: export the engine's metrics (vllm:* queue, KV cache, tokens, latencies) as Ray metrics, beside Ray's own in the cluster's Prometheus scrape.")
    max_batch_size: int = knob(8, "hf: requests decoded together in one batch (@serve.batch).")
    batch_wait_timeout_s: float = knob(0.02, "hf: how long a batch waits to fill.")
    max_tokens_limit: int = knob(1024, "Largest max_tokens a request may ask for.")
    max_request_bytes: int = knob(1_000_000, "Larger request bodies get 413.")
    cpus_per_replica: float = knob(0.5, "CPUs per model replica.")
    gpus_per_replica: float | None = knob(None, "GPUs per model replica; null: 1 when the cluster has GPUs, else 0.")
    feedback_log: str | None = knob(None, "Where POST /v1/feedback rows go (local or s3://, hive date partitions, the schema prepare reads), and every served answer under its _served/; null is <run_dir>/feedback.")
    log_commit_seconds: float = knob(0.1, "Group commit: a request is answered once its served or feedback row is on storage; an idle log writes at once, a busy one at most this often, all waiting rows together.")
    log_commit_timeout_s: float = knob(30.0, "A request whose row is not on storage after this long (storage down) gets 503; the row is still written later.")
    served_cache_size: int = knob(100_000, "Served completions remembered for feedback (oldest forgotten first).")
    gateway_replicas: int = knob(1, "Replicas of the gateway (keys, body checks, routing to a version: light, asynchronous).")


@dataclass(frozen=True)
class LoopConfig:
    """The continuous loop: `bco-ray align --since last` on each day's new feedback (docs/operations.md)."""

    registry: str | None = knob(None, "The loop's state (state.json: the last run's watermark, the promoted model, the canary), local or s3://; null is <parent of run_dir>/registry, shared by sibling run directories.")
    since: str | None = knob(None, "null: read the days ingest.date_from/date_to select; 'last': only the days after the last run's watermark (every day on the first run); or a day YYYY-MM-DD (read from the day after it).")
    until: Literal["yesterday", "today"] = knob("yesterday", "With since set, the last day read: 'yesterday' (UTC) leaves the day still being written to the next run; ingest.date_to, when set, still caps it.")
    start_from: Literal["promoted", "base"] = knob("promoted", "The weights training starts from: the registry's promoted model (the base while none is), or always model.policy.")
    reference: Literal["base", "previous"] = knob("base", "The reference model: model.reference (or model.policy), or 'previous': the model training starts from.")
    carry_reward_shift: bool = knob(False, "Start BCO's reward shift from the promoted model's final state (its run card) instead of zero; needs loop.reference base.")


@dataclass(frozen=True)
class CanaryConfig:
    """`bco-ray canary start|status|promote|rollback`: a candidate on a share of the users, beside the promoted model."""

    candidate: str | None = knob(None, "The model to try (HF directory or s3:// prefix); null: the registry's last run that passed its eval.")
    share: float = knob(0.1, "Share of the users whose requests the candidate answers (sticky per user).")
    sticky_header: str = knob("x-user-id", "Request header naming the user; without it the caller's API key, else a fresh draw per request.")
    min_rated: int = knob(200, "Rated answers per version below which `canary status` gives no verdict.")


@dataclass(frozen=True)
class Config:
    """The whole pipeline's configuration: one section per stage."""

    run: RunConfig = field(default_factory=RunConfig, metadata={"help": "Run directory and seed."})
    ray: RayConfig = field(default_factory=RayConfig, metadata={"help": "Ray cluster connection."})
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "Policy, reference and embedder models."})
    storage: StorageConfig = field(default_factory=StorageConfig, metadata={"help": "S3 endpoint and credentials."})
    ingest: IngestConfig = field(default_factory=IngestConfig, metadata={"help": "Reading, cleaning and tokenizing feedback logs."})
    udm: UDMConfig = field(default_factory=UDMConfig, metadata={"help": "Density-ratio weights for thumbs-down rows."})
    score: ScoreConfig = field(default_factory=ScoreConfig, metadata={"help": "Reference log-probs."})
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig, metadata={"help": "Loss and reward shift."})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "Ray Train: workers, optimisation, checkpoints, export."})
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"help": "Generation quality of the trained model vs the reference, and the gate."})
    tune: TuneConfig = field(default_factory=TuneConfig, metadata={"help": "The hyperparameter sweep (bco-ray tune) on Ray Tune."})
    serve: ServeConfig = field(default_factory=ServeConfig, metadata={"help": "The OpenAI-compatible endpoint and its feedback log."})
    compact: CompactConfig = field(default_factory=CompactConfig, metadata={"help": "Merging the feedback log's small files (bco-ray compact)."})
    loop: LoopConfig = field(default_factory=LoopConfig, metadata={"help": "Incremental runs on new feedback (align --since last)."})
    canary: CanaryConfig = field(default_factory=CanaryConfig, metadata={"help": "A candidate model on a share of the traffic, then promoted or rolled back."})

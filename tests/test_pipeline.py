"""The main job (`bco-ray align`) on a real local Ray cluster, with the demo config."""

import json
from pathlib import Path

import pytest

from bco_ray.config import load_config
from bco_ray.pipeline import align

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.ray
@pytest.mark.slow
def test_align_on_the_demo_config(ray_local, tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    monkeypatch.chdir(tmp_path)  # a relative run_dir, as in the demo: workers have other working dirs
    # Secrets through config and environment: none of them may reach an artefact.
    secrets = ["AKIAFAKEKEYID0001", "fake/secret+access+key0002", "fake-api-key-0003", "fake-env-api-key-0004"]
    monkeypatch.setenv("BCO_RAY_API_KEYS", secrets[3])
    cfg = load_config(ROOT / "configs" / "demo.yaml",
                      ["--run.run_dir", "run", "--model.policy", "tiny-llama",
                       "--ingest.input", str(ROOT / "data" / "demo_feedback"), "--udm.sample_size", "256",
                       "--train.max_steps", "3", "--train.eval_every", "0", "--serve.port", "18731",
                       "--storage.access_key_id", secrets[0], "--storage.secret_access_key", secrets[1],
                       "--serve.api_keys", f"[{secrets[2]}]"])
    manifest = align(cfg)
    saved = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert saved == json.loads(json.dumps(manifest))
    assert saved["stages"]["assets"]["policy"]["path"].endswith("tiny-llama")
    prep = saved["stages"]["prepare"]
    day = ROOT / "data" / "demo_feedback" / "date=2026-11-03"  # the demo config reads its last day
    assert prep["rows_read"] == sum(pq.ParquetFile(f).metadata.num_rows for f in day.glob("*.parquet"))
    assert prep["examples"] == prep["kept"] + prep["quarantined"] + prep["deduplicated"]
    assert prep["udm"]["enabled"]
    score = saved["stages"]["score-ref"]
    assert score["rows_in"] == prep["kept"] == score["scored"] + score["quarantined"]
    assert score["backend"] == "hf" and score["dtype"] == "float32"  # 'auto' on a CPU cluster
    train = saved["stages"]["train"]
    assert train["steps"] == 3 and Path(train["model"], "model.safetensors").exists()
    assert Path(train["model"]) == tmp_path / "run" / "model"
    ev = saved["stages"]["eval"]
    assert ev["passed"] and ev["prompts_from"].startswith("the eval split"), ev
    assert ev["metrics"]["greedy"]["degenerate"]["candidate"]["n"] == 24  # the demo config's eval.num_prompts
    assert (tmp_path / "run" / "eval" / "eval.json").exists() and (tmp_path / "run" / "model" / "eval.json").exists()
    assert saved["stages"]["serve"]["usage"]["completion_tokens"] > 0
    assert (tmp_path / "run" / "report" / "report.md").exists() and (tmp_path / "run" / "report" / "training.png").exists()
    assert "## Evaluation" in (tmp_path / "run" / "report" / "report.md").read_text()
    assert saved["config"]["storage"]["secret_access_key"] == saved["config"]["serve"]["api_keys"] == "<redacted>"
    # Every file the run wrote (manifests, run card and export, MLflow store, report, logs,
    # checkpoints), searched byte by byte for every secret.
    files = [f for f in (tmp_path / "run").rglob("*") if f.is_file()]
    assert len(files) > 50 and any("mlruns" in f.parts for f in files), len(files)
    leaks = [(str(f), s) for f in files for s in secrets if s.encode() in f.read_bytes()]
    assert not leaks, leaks
    # Rerun: the unchanged stages are skipped, and the job still ends with a served answer.
    again = align(cfg)
    assert all(again["stages"][s]["skipped"] for s in ("prepare", "score-ref", "train", "eval"))
    assert again["stages"]["serve"]["answer"] == saved["stages"]["serve"]["answer"]  # greedy, same model

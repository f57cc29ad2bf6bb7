"""The main job (`bco-ray align`) on a real local Ray cluster, with the demo config."""

import json
from pathlib import Path

import pytest

from bco_ray.config import load_config
from bco_ray.pipeline import align

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.ray
@pytest.mark.slow
def test_align_on_the_demo_config(ray_local, tmp_path):
    cfg = load_config(ROOT / "configs" / "demo.yaml",
                      ["--run.run_dir", str(tmp_path / "run"), "--model.policy", "tiny-llama",
                       "--ingest.input", str(ROOT / "data" / "demo_feedback"), "--udm.sample_size", "256"])
    manifest = align(cfg)
    saved = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert saved == json.loads(json.dumps(manifest))
    assert saved["stages"]["assets"]["policy"]["path"].endswith("tiny-llama")
    prep = saved["stages"]["prepare"]
    assert prep["rows_read"] == 2024 and prep["kept"] > 1800
    assert prep["examples"] == prep["kept"] + prep["quarantined"] + prep["deduplicated"]
    assert prep["udm"]["enabled"] and prep["udm"]["train_auc"] > 0.6

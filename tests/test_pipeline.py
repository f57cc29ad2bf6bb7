"""The main job on a real local Ray cluster."""

import json

import pytest

from bco_ray.config import load_config
from bco_ray.pipeline import align


@pytest.mark.ray
def test_align_runs_the_available_stages_on_local_ray(tmp_path):
    import ray

    cfg = load_config(None, ["--run.run_dir", str(tmp_path / "run"), "--model.policy", "tiny-llama",
                             "--ray.num_cpus", "2", "--ray.auth", "disabled",
                             "--ray.temp_dir", f"/tmp/bcr-{tmp_path.name[-12:]}"])
    try:
        manifest = align(cfg)
    finally:
        ray.shutdown()
    saved = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert saved == manifest
    assert saved["config"]["model"]["policy"] == "tiny-llama"
    assert saved["stages"]["assets"]["policy"]["path"].endswith("tiny-llama")

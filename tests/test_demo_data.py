"""The shipped demo log is reproducible from its generator."""

from pathlib import Path

import pyarrow.parquet as pq

from bco_ray.data.demo_data import write_log

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_demo_log_is_what_the_generator_writes(tmp_path):
    info = write_log(str(tmp_path), 2000, seed=0, shift=0.6, dirty=0.03, days=3, variants=True)
    shipped = sorted(p.relative_to(ROOT / "data" / "demo_feedback")
                     for p in (ROOT / "data" / "demo_feedback").rglob("*.parquet"))
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.parquet"))
    assert shipped == fresh and info["rows"] == 2024
    for rel in shipped:
        assert pq.read_table(ROOT / "data" / "demo_feedback" / rel).equals(pq.read_table(tmp_path / rel)), rel

"""Config: YAML + dotted overrides, errors that name the field, generated docs."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from bco_ray.config import (
    Config,
    ConfigError,
    docs_markdown,
    dump_yaml,
    load_config,
    parse_overrides,
)

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_match_the_papers_and_trls():
    cfg = load_config()
    assert cfg.objective.beta == 0.1 and cfg.objective.delta_mode == "balanced"
    assert cfg.objective.loss == "bco" and cfg.model.trust_remote_code is False


def test_yaml_then_overrides_win(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("objective:\n  beta: 0.3\n  delta_mode: pooled\nrun:\n  seed: 5\n")
    cfg = load_config(f, ["--objective.beta", "0.2", "--ray.num_cpus=2", "--objective.delta_decay", "0.99"])
    assert cfg.objective.beta == 0.2 and cfg.objective.delta_mode == "pooled"
    assert cfg.run.seed == 5 and cfg.ray.num_cpus == 2 and cfg.objective.delta_decay == 0.99
    assert isinstance(cfg.objective.beta, float)


def test_an_unquoted_no_is_the_choice_not_false(tmp_path):
    """YAML 1.1 reads `no` as false; train.mixed_precision's documented value is 'no'."""
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  mixed_precision: no\n")
    assert load_config(f).train.mixed_precision == "no"
    assert load_config(None, ["--train.mixed_precision", "no"]).train.mixed_precision == "no"
    with pytest.raises(ConfigError, match="expected one of 'auto', 'bf16', 'no', got True"):
        load_config(None, ["--train.mixed_precision", "yes"])


def test_int_for_float_and_null_for_optional():
    cfg = load_config(None, ["--objective.beta", "1", "--model.reference", "null"])
    assert cfg.objective.beta == 1.0 and isinstance(cfg.objective.beta, float)
    assert cfg.model.reference is None


def test_configs_are_frozen():
    cfg = load_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.objective.beta = 3  # type: ignore[misc]


@pytest.mark.parametrize("override, message", [
    (["--objective.bta", "1"], "unknown config key 'objective.bta'; objective accepts: loss, beta"),
    (["--nosuch.x", "1"], "unknown config key 'nosuch'; top level accepts: run, ray, model, storage, ingest, udm, score, objective, train, eval, tune, serve"),
    (["--objective.delta_mode", "mean"], "objective.delta_mode: expected one of 'balanced', 'pooled', 'zero'"),
    (["--objective.beta", "abc"], "objective.beta: expected float, got 'abc'"),
    (["--ray.num_cpus", "1.5"], "ray.num_cpus: expected int or null, got 1.5"),
    (["--model.trust_remote_code", "maybe"], "model.trust_remote_code: expected bool"),
    (["--objective", "3"], "objective: expected a mapping of ObjectiveConfig fields"),
    (["objective.beta"], "expected an override like --section.key VALUE"),
    (["--objective.beta"], "has no value"),
])
def test_errors_name_the_field_and_allowed_values(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, override)
    assert message in str(e.value)


def test_dates_are_text_for_str_fields():
    assert load_config(None, ["--ingest.date_from", "2026-11-02"]).ingest.date_from == "2026-11-02"


def test_bool_is_not_an_int():
    with pytest.raises(ConfigError, match="run.seed"):
        load_config(None, ["--run.seed", "true"])


def test_yaml_top_level_must_be_mapping(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(f)


def test_parse_overrides_nests():
    assert parse_overrides(["--a.b.c", "1", "--a.d=x"]) == {"a": {"b": {"c": 1}, "d": "x"}}


def test_dump_round_trips(tmp_path):
    cfg = load_config(None, ["--objective.beta", "0.25", "--objective.loss", "kto"])
    f = tmp_path / "dump.yaml"
    f.write_text(dump_yaml(cfg))
    assert load_config(f) == cfg


def test_every_field_has_help_and_docs_are_current():
    for section in dataclasses.fields(Config):
        assert section.metadata.get("help"), section.name
        for f in dataclasses.fields(getattr(Config(), section.name)):
            assert f.metadata.get("help"), f"{section.name}.{f.name} has no help"
    assert (ROOT / "docs" / "configuration.md").read_text() == docs_markdown() + "\n", \
        "docs/configuration.md is stale: run `bco-ray config docs > docs/configuration.md`"


def test_shipped_configs_load():
    for f in sorted((ROOT / "configs").glob("*.yaml")):
        load_config(f)


def test_cli_help_lists_stages_and_rejects_bad_config():
    out = subprocess.run([sys.executable, "-m", "bco_ray.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for stage in ("align", "assets", "config"):
        assert stage in out.stdout
    bad = subprocess.run([sys.executable, "-m", "bco_ray.cli", "config", "show", "--objective.beta", "x"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "objective.beta: expected float" in bad.stderr


def test_eval_and_checkpoint_cadence_is_steps_or_a_share_of_the_run():
    """train.eval_every / checkpoint_every: whole steps, or below 1 a share of the run's steps
    (the demo's 0.5: halfway, at 20 steps as at one epoch's 76), 0 only at the end; anything
    else is refused with the key's name (before any stage runs: preflight)."""
    from bco_ray.preflight import check_before_ray
    from bco_ray.train.stage import interval

    assert [interval(0.5, n, "k") for n in (20, 76, 1)] == [10, 38, 1]
    assert interval(0.25, 76, "k") == 19 and interval(10, 76, "k") == 10 and interval(0, 76, "k") == 0
    assert interval(10.0, 76, "k") == 10  # YAML's 10 is read as a float field's 10.0
    for bad in (2.5, -1):
        with pytest.raises(ConfigError, match="train.eval_every"):
            interval(bad, 76, "train.eval_every")
    cfg = load_config(ROOT / "configs" / "demo.yaml", ["--train.checkpoint_every", "1.5"])
    with pytest.raises(ConfigError, match="train.checkpoint_every 1.5"):
        check_before_ray(cfg, "train")

"""Configuration: one frozen dataclass per stage, YAML files, dotted CLI overrides.

    cfg = load_config("configs/demo.yaml", ["--objective.beta", "0.2", "--run.seed=3"])

Every field has a default and a one-line help (`metadata["help"]`); docs/configuration.md is
generated from them (`bco-ray config docs`). Unknown keys and wrong types are errors that
name the field and what it accepts. The sections are in `sections.py`, the loading in `loading.py`.
"""

from bco_ray.config.loading import (
    REDACTED,
    docs_markdown,
    dump_yaml,
    from_dict,
    load_config,
    parse_overrides,
    redacted,
    secret_keys,
    to_dict,
)
from bco_ray.config.sections import (
    DEFAULT_FALSE_LABELS,
    DEFAULT_TRUE_LABELS,
    JUDGE_PROMPT,
    CanaryConfig,
    CompactConfig,
    Config,
    ConfigError,
    EvalConfig,
    IngestConfig,
    LoopConfig,
    ModelConfig,
    ObjectiveConfig,
    RayConfig,
    RunConfig,
    ScoreConfig,
    ServeConfig,
    StorageConfig,
    TrainConfig,
    TuneConfig,
    UDMConfig,
    knob,
)

__all__ = ["REDACTED", "DEFAULT_FALSE_LABELS", "DEFAULT_TRUE_LABELS", "JUDGE_PROMPT", "CanaryConfig", "CompactConfig", "Config",
           "ConfigError", "EvalConfig", "IngestConfig", "LoopConfig", "ModelConfig", "ObjectiveConfig", "RayConfig", "RunConfig",
           "ScoreConfig", "ServeConfig", "StorageConfig", "TrainConfig", "TuneConfig", "UDMConfig", "docs_markdown",
           "dump_yaml", "from_dict", "knob", "load_config", "parse_overrides", "redacted", "secret_keys", "to_dict"]

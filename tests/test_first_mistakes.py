"""A newcomer's first mistakes, through the real CLI (`bco-ray ...` in a subprocess): each
gets one line saying what is wrong and what to do, the right exit status, and no traceback
(the trace is in the run's log file, and on the console with --verbose). S3 cases run
against a real S3 server (moto) on 127.0.0.1; Ray runs with its token auth on."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import free_port, start_moto

ROOT = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).parent / "bco-ray")
# The shipped demo config, with the tiny model and UDM off only for speed (neither matters to
# these errors); Ray's token auth stays on.
BASE = ["--config", "configs/demo.yaml", "--model.policy", "tiny-llama", "--udm.enabled", "false"]


def cli(*args, env=None, timeout=300):
    p = subprocess.run([CLI, *args], cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                       timeout=timeout)
    return p.returncode, p.stdout, p.stderr


def error_line(stderr: str) -> str:
    """The one error line, and nothing that looks like a Python traceback."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [x for x in stderr.splitlines() if x.startswith("bco-ray: ")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def write(path: Path, columns: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


ROWS = {"prompt": ["How do I reset my password?", "What is 2+2?"], "completion": ["Click 'forgot'.", "4"]}


def test_no_file_with_a_known_schema_stops_before_any_work(tmp_path):
    log = write(tmp_path / "log" / "a.parquet", {**ROWS, "label": ["up", "down"]})  # the config says 'feedback'
    code, out, err = cli("prepare", *BASE, "--ingest.input", str(log.parent), "--run.run_dir", str(tmp_path / "run"))
    line = error_line(err)
    assert code == 2
    assert str(log) in line and "['prompt', 'completion', 'label']" in line  # the file and its columns
    assert "(prompt, completion, feedback)" in line  # what the config expects
    assert "ingest.label_column" in line  # and the key that sets it
    assert not (tmp_path / "run" / "prepared").exists()  # nothing ran (Ray was not even started)
    log_file = (tmp_path / "run" / "logs" / "bco-ray.log").read_text()
    assert "Traceback" in log_file and "UserError" in log_file  # the full trace is in the run's log


@pytest.mark.ray
def test_every_row_quarantined_writes_the_manifest_quarantine_and_report_then_fails(tmp_path):
    log = write(tmp_path / "log" / "a.parquet", {**ROWS, "feedback": ["maybe", "meh"]})
    run = tmp_path / "run"
    code, out, err = cli("align", *BASE, "--ingest.input", str(log.parent), "--run.run_dir", str(run))
    line = error_line(err)
    assert code == 1
    assert "all 2 examples were quarantined" in line and "unknown_label x2" in line
    assert str(run / "prepared" / "quarantine") in line
    manifest = json.loads((run / "prepared" / "manifest.json").read_text())
    assert manifest["kept"] == 0 and manifest["quarantined"] == 2
    assert pq.read_table(run / "prepared" / "quarantine").num_rows == 2
    # The run's report is written on failure too, naming the stage and its error.
    report = (run / "report" / "report.md").read_text()
    assert "**Failed in stage `prepare`**" in report and "all 2 examples were quarantined" in report
    assert json.loads((run / "manifest.json").read_text())["failed"]["stage"] == "prepare"
    assert "token auth on" in out  # the product's default, said on the console
    assert (run / "logs" / "ray").is_dir()  # Ray's own logs, kept with the run


def test_empty_input_directory(tmp_path):
    (tmp_path / "log").mkdir()
    code, _, err = cli("prepare", *BASE, "--ingest.input", str(tmp_path / "log"), "--run.run_dir", str(tmp_path / "r"))
    assert code == 2 and "holds no .parquet files" in error_line(err)


def test_input_that_does_not_exist(tmp_path):
    code, _, err = cli("align", *BASE, "--ingest.input", str(tmp_path / "nope"), "--run.run_dir", str(tmp_path / "r"))
    line = error_line(err)
    assert code == 2 and "does not exist" in line and "--ingest.input" in line


def test_a_date_filter_that_matches_nothing(tmp_path):
    write(tmp_path / "log" / "date=2026-11-01" / "a.parquet", {**ROWS, "feedback": ["up", "down"]})
    code, _, err = cli("prepare", *BASE, "--ingest.input", str(tmp_path / "log"), "--ingest.date_from", "2026-12-01",
                       "--run.run_dir", str(tmp_path / "r"))
    line = error_line(err)
    assert code == 2 and "matches none of the 1 files" in line and "2026-11-01" in line
    assert "--ingest.date_from" in line


def test_a_model_path_that_does_not_exist(tmp_path):
    code, _, err = cli("align", *BASE, "--model.policy", str(tmp_path / "no-model"), "--run.run_dir", str(tmp_path / "r"))
    line = error_line(err)
    assert code == 2 and "model.policy" in line and "does not exist" in line and "tiny-llama" in line


def test_a_port_already_in_use(tmp_path):
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        code, _, err = cli("serve", *BASE, "--serve.port", str(port), "--serve.model", "tiny-llama",
                           "--run.run_dir", str(tmp_path / "r"))
    line = error_line(err)
    assert code == 2 and f"port {port} on 127.0.0.1 is already in use" in line and "--serve.port" in line


def test_serving_before_training(tmp_path):
    code, _, err = cli("serve", *BASE, "--run.run_dir", str(tmp_path / "r"))
    line = error_line(err)
    assert code == 2 and f"no model to serve at {tmp_path / 'r' / 'model'}" in line and "bco-ray train" in line


@pytest.mark.ray
def test_a_gpu_asked_for_where_there_is_none(tmp_path):
    code, _, err = cli("train", *BASE, "--train.use_gpu", "true", "--run.run_dir", str(tmp_path / "r"))
    line = error_line(err)
    assert code == 2 and "train.use_gpu: true asks for GPUs, but the Ray cluster has none" in line


def test_every_key_that_asks_for_gpus_is_checked_against_the_cluster():
    """The preflight names each GPU ask of the stages that will run (a GPU-less cluster would
    leave those actors pending forever); align's run.stop_after leaves out the later stages."""
    from bco_ray.config import load_config
    from bco_ray.preflight import gpu_requests, stages_of

    cfg = load_config(None, ["--udm.enabled", "true", "--udm.num_gpus_per_actor", "1", "--score.num_gpus_per_actor", "1",
                             "--train.use_gpu", "true", "--serve.gpus_per_replica", "1"])
    assert gpu_requests(cfg, stages_of(cfg, "align")) == [
        "train.use_gpu: true", "udm.num_gpus_per_actor: 1.0", "score.num_gpus_per_actor: 1.0",
        "serve.gpus_per_replica: 1.0"]
    prep = load_config(None, ["--udm.enabled", "true", "--udm.num_gpus_per_actor", "1", "--score.num_gpus_per_actor", "1",
                              "--run.stop_after", "prepare"])
    assert gpu_requests(prep, stages_of(prep, "align")) == ["udm.num_gpus_per_actor: 1.0"]


def test_verbose_shows_the_trace_on_the_console(tmp_path):
    code, _, err = cli("prepare", *BASE, "--ingest.input", str(tmp_path / "nope"), "--run.run_dir", str(tmp_path / "r"),
                       "--verbose")
    assert code == 2 and "Traceback" in err and "bco-ray: error:" in err


@pytest.fixture(scope="module")
def strict_s3(tmp_path_factory):
    """A moto server that checks credentials, with a log. INITIAL_NO_AUTH_ACTION_COUNT: only
    the first 4 requests go unauthenticated: start_moto's readiness probe, then the calls
    that create the user, its key and its policy."""
    import boto3

    proc, endpoint = start_moto({"INITIAL_NO_AUTH_ACTION_COUNT": "4"})
    try:
        iam = boto3.client("iam", endpoint_url=endpoint, aws_access_key_id="x", aws_secret_access_key="x",
                           region_name="us-east-1")
        iam.create_user(UserName="bco")
        key = iam.create_access_key(UserName="bco")["AccessKey"]
        iam.put_user_policy(UserName="bco", PolicyName="all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=key["AccessKeyId"],
                          aws_secret_access_key=key["SecretAccessKey"], region_name="us-east-1")
        s3.create_bucket(Bucket="logs")
        local = write(tmp_path_factory.mktemp("s3log") / "a.parquet", {**ROWS, "feedback": ["up", "down"]})
        s3.upload_file(str(local), "logs", "feedback/a.parquet")
        yield endpoint, key["AccessKeyId"], key["SecretAccessKey"]
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def s3_env(endpoint, key, secret):
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret,
            "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


def test_storage_keys_in_the_config_reach_the_workers_through_the_environment(strict_s3, tmp_path):
    """Keys given only as config overrides, nothing in the environment: the S3 server checks
    them, the CLI's local cluster reads the log in Ray Data workers that got no key in their
    arguments (config.to_dict), and no file of the run, Ray's logs included, holds them."""
    endpoint, key, secret = strict_s3
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    run_dir = tmp_path / "r"
    p = subprocess.run([CLI, "prepare", *BASE, "--ingest.input", "s3://logs/feedback", "--run.run_dir", str(run_dir),
                        "--storage.endpoint_url", endpoint,
                        "--storage.access_key_id", key, "--storage.secret_access_key", secret,
                        "--storage.region", "us-east-1"],
                       cwd=ROOT, env={**env, "AWS_EC2_METADATA_DISABLED": "true"}, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    manifest = json.loads((run_dir / "prepared" / "manifest.json").read_text())
    assert manifest["rows_read"] == 2 and manifest["kept"] + manifest["quarantined"] + manifest["deduplicated"] == 2
    files = [f for f in run_dir.rglob("*") if f.is_file()]
    assert any("ray" in str(f.relative_to(run_dir)) for f in files), files  # Ray's own logs were copied
    assert not [str(f) for f in files if secret.encode() in f.read_bytes() or key.encode() in f.read_bytes()]


def test_wrong_s3_credentials(strict_s3, tmp_path):
    endpoint, key, _ = strict_s3
    code, _, err = cli("prepare", *BASE, "--ingest.input", "s3://logs/feedback", "--run.run_dir", str(tmp_path / "r"),
                       env=s3_env(endpoint, key, "not-the-secret"))
    line = error_line(err)
    assert code == 2 and "S3 refused access to" in line and "AWS_SECRET_ACCESS_KEY" in line


def test_wrong_s3_bucket(strict_s3, tmp_path):
    endpoint, key, secret = strict_s3
    code, _, err = cli("prepare", *BASE, "--ingest.input", "s3://no-such-bucket/feedback",
                       "--run.run_dir", str(tmp_path / "r"), env=s3_env(endpoint, key, secret))
    line = error_line(err)
    assert code == 2 and "its bucket 'no-such-bucket' does not exist" in line


def test_the_right_s3_credentials_pass_the_preflight(strict_s3, tmp_path):
    # The same server and log with the right key: the listing and footers are read
    # (the check that the two cases above fail for the reason they name).
    from bco_ray import storage
    from bco_ray.config import load_config
    from bco_ray.data.ingest import check_input

    endpoint, key, secret = strict_s3
    cfg = load_config(None, ["--ingest.input", "s3://logs/feedback", "--ingest.label_column", "feedback",
                             "--storage.endpoint_url", endpoint, "--storage.access_key_id", key,
                             "--storage.secret_access_key", secret, "--storage.region", "us-east-1"])
    check_input(cfg)
    fs, path = storage.filesystem(cfg.ingest.input, cfg.storage)
    assert storage.list_parquet(fs, path) == ["logs/feedback/a.parquet"]

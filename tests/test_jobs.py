"""The align job on real clusters: through the Jobs API of a head started by the test
(`ray start --head` on 127.0.0.1), and on a 2-node cluster with a training worker on each node."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import free_port

pytestmark = [pytest.mark.ray, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def job_args(run_dir, serve_port):
    return ["--config", "configs/demo.yaml", "--model.policy", "tiny-llama", "--run.run_dir", str(run_dir),
            "--train.max_steps", "4", "--train.checkpoint_every", "2",
            "--train.eval_every", "0", "--train.max_failures", "0", "--serve.port", str(serve_port)]


@pytest.fixture
def head():
    """A Ray head on 127.0.0.1 in its own process group (stopped by signal, not `ray stop`,
    which would stop every Ray cluster of this user, the test session's included). One test's
    only: its dashboard's processes, idle, cost CI ~0.2 cores while it is up."""
    dash = free_port()
    temp = f"/tmp/bch-{os.getpid()}"
    # Token auth on (Ray's default): the head, `bco-ray submit` and `ray job submit` all
    # read the same ~/.ray/auth_token.
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "PATH": f"{BIN}:{os.environ['PATH']}"}
    proc = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
                             "--port", str(free_port()), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
                             "--num-cpus", "2", "--temp-dir", temp, "--include-dashboard", "true",
                             # the session's own cluster holds Ray's default agent ports (52365, ...):
                             # a second cluster's job agent could not bind them and never came up
                             "--dashboard-agent-listen-port", str(free_port()),
                             "--dashboard-agent-grpc-port", str(free_port()),
                             "--runtime-env-agent-port", str(free_port()), "--metrics-export-port", str(free_port())],
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{dash}"
    # With token auth on, the Jobs API answers 401 without the token (an OSError here too);
    # the head uses the user's token, ~/.ray/auth_token, as `bco-ray submit` does.
    # On a fresh machine the head writes that file as it starts.
    token_file = Path.home() / ".ray" / "auth_token"
    for _ in range(120):  # the Jobs API answers once the head's job agent is up
        try:
            token = token_file.read_text().strip()
            urllib.request.urlopen(urllib.request.Request(f"{url}/api/jobs/",
                                                          headers={"Authorization": f"Bearer {token}"}), timeout=2)
            break
        except OSError:
            time.sleep(1)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        raise RuntimeError("the Ray head did not start")
    yield url, env
    # Nothing of this throwaway cluster needs saving: a graceful stop took ~30 s of CI time.
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


def test_a_prepare_job_then_an_align_job_that_fails_in_train_and_resumes_without_redoing_stages(head, tmp_path):
    url, env = head
    run_dir = tmp_path / "run"
    port = free_port()
    # UDM and the eval stage off: what this test is about is the job's failure and resume; both
    # run on this config in the two-node test and in the CI demo (about 60 s of CI here).
    args = [*job_args(run_dir, port), "--udm.enabled", "false", "--eval.enabled", "false"]
    # 0. What cluster/kuberay/rayjob-70b-prepare.yaml runs first (jobs/align.py with
    # run.stop_after prepare): assets and prepare, nothing that needs a GPU; the manifest it
    # leaves in run_dir is what lets the next (GPU) job skip prepare.
    prep = subprocess.run([str(BIN / "bco-ray"), "submit", "--address", url, *args, "--run.stop_after", "prepare"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert prep.returncode == 0, prep.stdout[-3000:]
    saved = json.loads((run_dir / "manifest.json").read_text())
    assert list(saved["stages"]) == ["assets", "prepare"] and saved["stages"]["prepare"]["kept"] > 0
    assert (run_dir / "prepared" / "manifest.json").exists() and not (run_dir / "scored").exists()

    # 1. bco-ray submit, with a fault drill: a worker dies at step 3, no retries: the job fails.
    first = subprocess.run([str(BIN / "bco-ray"), "submit", "--address", url, "--env", "BCO_RAY_FAULT_DRILL_STEP=3",
                            *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 1, first.stdout[-3000:]
    assert "submitted job" in first.stdout and "FAILED" in first.stdout
    done = json.loads((run_dir / "manifest.json").read_text())["stages"]
    assert {"prepare", "score-ref"} <= done.keys() and "train" not in done
    assert done["prepare"]["skipped"] and not done["score-ref"].get("skipped")  # the prepare job's output

    # 2. The same job through plain `ray job submit`: prepare and score-ref are skipped,
    # training resumes from its step-2 checkpoint and the job ends by answering over HTTP.
    # Ray's own client runs in auth mode 'disabled' unless told: on a token-auth cluster
    # `ray job ...` needs RAY_AUTH_MODE=token (Ray's documented setting; `bco-ray submit`
    # sets it itself when it finds the token).
    second = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", url, "--working-dir", ".",
                             "--runtime-env-json", json.dumps({"excludes": [".venv", ".git", "runs"]}), "--",
                             "python", "jobs/align.py", *args],
                            cwd=ROOT, env={**env, "RAY_AUTH_MODE": "token"}, capture_output=True, text=True,
                            timeout=900)
    assert second.returncode == 0, second.stdout[-3000:]
    assert "resumed from step 2" in second.stdout
    stages = json.loads((run_dir / "manifest.json").read_text())["stages"]
    assert stages["prepare"]["skipped"] and stages["score-ref"]["skipped"]
    assert stages["train"]["steps"] == 4 and not stages["train"].get("skipped")
    assert stages["serve"]["answer"] is not None
    card = json.loads((run_dir / "model" / "run_card.json").read_text())
    assert [h["step"] for h in card["history"]] == [1, 2, 3, 4]
    assert (run_dir / "report" / "report.md").exists() and (run_dir / "report" / "training.png").exists()


TWO_NODES = r"""
import json, os, sys
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
from ray.cluster_utils import Cluster
# No dashboard: nothing here uses it (a local cluster of bco-ray starts none either), and its
# processes cost CI ~20 s of CPU.
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
cluster.add_node(num_cpus=1)
import ray
ray.init(address=cluster.address)
from bco_ray.config import load_config
from bco_ray.pipeline import align
cfg = load_config(sys.argv[2], sys.argv[3:])
first = align(cfg)
card = json.load(open(os.path.join(cfg.run.run_dir, "model", "run_card.json")))
print("RESULT " + json.dumps({"nodes": [n["NodeID"] for n in ray.nodes() if n["Alive"]],
                              "workers": card["worker_nodes"], "steps": card["steps"]}))
# Nothing changed: every stage is skipped. It stops before serve, whose start (every replica a
# new process: ~40 s of CI) the first run and the CI demo already test.
again = align(load_config(sys.argv[2], [*sys.argv[3:], "--run.stop_after", "eval"]))
print("AGAIN " + json.dumps({"skipped": [s for s, v in again["stages"].items() if v.get("skipped")]}))
ray.shutdown()
cluster.shutdown()
"""


def test_align_on_two_nodes_with_the_demo_config_leaks_no_secret_and_a_rerun_skips_its_stages(tmp_path):
    """The main job (`align`, the demo config: UDM and the eval gate on) on a 2-node cluster
    with a training worker on each node, from a relative run_dir (workers have other working
    dirs); secrets set through config and environment reach no artefact; a rerun skips every
    unchanged stage. One test, one cluster: each full pipeline costs CI about 2 minutes of
    fixed costs (process starts, imports)."""
    import pyarrow.parquet as pq

    secrets = ["AKIAFAKEKEYID0001", "fake/secret+access+key0002", "fake-api-key-0003", "fake-env-api-key-0004"]
    # The storage keys are in the config and, as on a pod given them, in the environment the
    # cluster's nodes started with (a joined cluster's workers get no key otherwise).
    env = {**os.environ, "PYTHONPATH": str(ROOT), "BCO_RAY_API_KEYS": secrets[3],
           "AWS_ACCESS_KEY_ID": secrets[0], "AWS_SECRET_ACCESS_KEY": secrets[1]}
    run_dir = tmp_path / "run"
    args = ["--run.run_dir", "run", "--model.policy", "tiny-llama", "--ingest.input", str(ROOT / "data" / "demo_feedback"),
            "--udm.enabled", "true", "--udm.sample_size", "256",  # UDM: off by default
            "--train.max_steps", "4", "--train.checkpoint_every", "2",
            "--train.eval_every", "0", "--train.max_failures", "0", "--serve.port", str(free_port()),
            "--storage.access_key_id", secrets[0], "--storage.secret_access_key", secrets[1],
            "--serve.api_keys", f"[{secrets[2]}]",
            # two 1-CPU nodes: a training worker on each, every other task or actor a fraction
            "--train.placement", "SPREAD", "--train.num_workers", "2", "--train.grad_accum", "2",
            "--ingest.num_cpus_per_task", "0.25", "--score.num_cpus_per_actor", "0.25",
            "--train.cpus_per_worker", "0.25", "--eval.num_cpus", "1"]
    p = subprocess.run([sys.executable, "-c", TWO_NODES, f"/tmp/bc2-{os.getpid()}", str(ROOT / "configs" / "demo.yaml"), *args],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    lines = {x.split(" ", 1)[0]: json.loads(x.split(" ", 1)[1]) for x in p.stdout.splitlines()
             if x.startswith(("RESULT ", "AGAIN "))}
    assert p.returncode == 0 and len(lines) == 2, (p.stdout[-3000:], p.stderr[-3000:])
    r = lines["RESULT"]
    assert len(set(r["nodes"])) == 2 and set(r["workers"]) == set(r["nodes"])  # one worker per node
    assert r["steps"] == 4
    assert set(lines["AGAIN"]["skipped"]) >= {"prepare", "score-ref", "train", "eval"}, lines["AGAIN"]

    saved = json.loads((run_dir / "manifest.json").read_text())
    assert saved["stages"]["assets"]["policy"]["path"].endswith("tiny-llama")
    prep = saved["stages"]["prepare"]
    day = ROOT / "data" / "demo_feedback" / "date=2026-11-03"  # the demo config reads its last day
    assert prep["rows_read"] == sum(pq.ParquetFile(f).metadata.num_rows for f in day.glob("*.parquet"))
    assert prep["examples"] == prep["kept"] + prep["quarantined"] + prep["deduplicated"]
    assert prep["udm"]["enabled"]
    score = saved["stages"]["score-ref"]
    assert score["rows_in"] == prep["kept"] == score["scored"] + score["quarantined"]
    assert score["backend"] == "hf" and score["dtype"] == "float32"  # 'auto' on a CPU cluster
    assert Path(saved["stages"]["train"]["model"]) == run_dir / "model"
    assert (run_dir / "model" / "model.safetensors").exists()
    ev = saved["stages"]["eval"]
    assert ev["passed"] and ev["prompts_from"].startswith("the eval split"), ev
    assert ev["metrics"]["greedy"]["degenerate"]["candidate"]["n"] == 24  # the demo config's eval.num_prompts
    assert (run_dir / "eval" / "eval.json").exists() and (run_dir / "model" / "eval.json").exists()
    assert saved["stages"]["serve"]["usage"]["completion_tokens"] > 0
    assert (run_dir / "report" / "report.md").exists() and (run_dir / "report" / "training.png").exists()
    assert "## Evaluation" in (run_dir / "report" / "report.md").read_text()
    assert saved["config"]["serve"]["api_keys"] == "<redacted>"
    assert saved["config"]["storage"]["secret_access_key"] is None  # moved to the environment before Ray's tasks
    # Every file the run wrote (manifests, run card and export, MLflow store, report, logs,
    # checkpoints, the served log), searched byte by byte for every secret.
    files = [f for f in run_dir.rglob("*") if f.is_file()]
    assert len(files) > 50 and any("mlruns" in f.parts for f in files), len(files)
    leaks = [(str(f), s) for f in files for s in secrets if s.encode() in f.read_bytes()]
    assert not leaks, leaks

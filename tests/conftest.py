import os
import socket

import pytest

# Tests never touch the user's cache or a model hub.
os.environ.setdefault("BCO_RAY_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "bco-ray-tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The session's Ray cluster, like a user's, takes S3 credentials from its environment: the
# stages give workers no key in their arguments (config.to_dict). moto accepts these keys.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
# As bco-ray's local clusters do (raycluster.init_ray), for the clusters tests start themselves
# (`ray start` heads, two-node clusters): their log monitors glob 5x less often.
os.environ.setdefault("RAY_LOG_MONITOR_MANY_FILES_THRESHOLD", "0")


@pytest.fixture(scope="session")
def tiny_llama():
    import torch

    from bco_ray.assets import load_causal_lm

    torch.manual_seed(0)
    model, tok = load_causal_lm("tiny-llama")
    model.eval()
    return model, tok


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray cluster for the session: loopback, 2 CPUs, short temp dir, and Ray's
    token auth on, as users run it (the product's default)."""
    import ray

    from bco_ray.config import RayConfig
    from bco_ray.raycluster import init_ray

    init_ray(RayConfig(num_cpus=2, temp_dir=f"/tmp/bcr-{os.getpid()}"))
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


def start_moto(env: dict | None = None):
    """A real S3-compatible HTTP server (moto) on 127.0.0.1: (process, endpoint URL)."""
    import subprocess
    import sys
    import time
    import urllib.request

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            return proc, endpoint
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto server did not start")


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto server with a bucket 'logs' (moto accepts any credentials)."""
    import boto3

    proc, endpoint = start_moto()
    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                 region_name="us-east-1").create_bucket(Bucket="logs")
    yield endpoint
    proc.terminate()
    proc.wait(timeout=10)


# The tiny-model settings most Ray tests share. UDM is off by default (docs/alignment-benchmark.md)
# and said so here too; test_ingest, test_jobs' two-node run and the alignment benchmark turn it on.
TINY = ["--model.policy", "tiny-llama", "--ingest.label_column", "feedback", "--ingest.max_length", "128",
        "--ingest.max_prompt_length", "96", "--udm.enabled", "false", "--ingest.eval_fraction", "0.2"]


@pytest.fixture(scope="session")
def prepared_tiny(ray_local, tmp_path_factory):
    """A small prepared dataset (tiny-llama tokens, clean unshifted log, paired rows
    included): the input of the score-ref, train and pipeline tests. Returns its run dir."""
    from bco_ray.config import load_config
    from bco_ray.data.demo_data import write_log
    from bco_ray.data.ingest import prepare

    root = tmp_path_factory.mktemp("prepared")
    write_log(str(root / "log"), 160, seed=1, shift=0.0, dirty=0.0, days=1, variants=True)
    cfg = load_config(None, TINY + ["--ingest.input", str(root / "log"), "--run.run_dir", str(root / "run")])
    prepare(cfg)
    return root / "run"


@pytest.fixture(scope="session")
def scored_tiny(prepared_tiny, tmp_path_factory):
    """prepared_tiny scored once (hf), with KL pairs so every objective can train on it: the
    input of the train and tune tests. Returns the scored directory."""
    from bco_ray.config import load_config
    from bco_ray.score.stage import score_reference

    out = str(tmp_path_factory.mktemp("scored") / "scored")
    score_reference(load_config(None, TINY + ["--run.run_dir", str(prepared_tiny), "--score.output", out,
                                              "--score.kl_pairs", "true"]))
    return out


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_metrics(prefix: str, timeout: float = 60.0, want: tuple[str, ...] = ()) -> list[str]:
    """The sample lines of this local cluster's Prometheus endpoint (Ray's metrics agent) whose
    name starts with `prefix`, waiting up to `timeout` s for workers to report (they push every
    few seconds) and, with `want`, for a line holding each of those strings (a process's
    gauges can reach the endpoint one push before its counters)."""
    import time
    import urllib.request

    import ray

    port = ray._private.worker._global_node.metrics_export_port  # noqa: SLF001
    deadline = time.time() + timeout
    while True:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        lines = [x for x in text.splitlines() if x.startswith(prefix)]
        if (lines and all(any(w in x for x in lines) for w in want)) or time.time() > deadline:
            return lines
        time.sleep(2)


class TcpGate:
    """A TCP proxy on 127.0.0.1 to a local port that a test can shut (every connection cut,
    new ones refused) and open again: a storage outage that keeps the server's state (moto
    keeps its objects in memory: stopping it would lose them)."""

    def __init__(self, target_port: int):
        import threading

        self.target, self.open, self.conns = target_port, True, []
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import threading

        while True:
            try:
                down, _ = self.sock.accept()
            except OSError:
                return
            if not self.open:
                down.close()
                continue
            try:
                up = socket.create_connection(("127.0.0.1", self.target), timeout=10)
            except OSError:
                down.close()
                continue
            self.conns += [down, up]
            for a, b in ((down, up), (up, down)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(a, b) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def shut(self) -> None:
        self.open = False
        for c in self.conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
                c.close()
            except OSError:
                pass
        self.conns = []

    def reopen(self) -> None:
        self.open = True

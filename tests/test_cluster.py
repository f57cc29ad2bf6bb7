"""cluster/ manifests: parsed, and the fields that must agree with the code checked, so they
cannot rot silently (image's Ray version, entrypoints, config files, ports, resources)."""

import importlib
import re
import shlex
from pathlib import Path

import yaml

from bco_ray.config import load_config

ROOT = Path(__file__).resolve().parents[1]
RAY_PIN = re.search(r'"ray\[[^\]]+\]==([\d.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)


def load(rel):
    return yaml.safe_load((ROOT / rel).read_text())


def containers(cluster_spec):
    groups = [cluster_spec["headGroupSpec"]] + cluster_spec.get("workerGroupSpecs", [])
    return [c for g in groups for c in g["template"]["spec"]["containers"]], groups


def check_cluster_spec(spec):
    assert spec["rayVersion"] == RAY_PIN
    cs, groups = containers(spec)
    image = cs[0]["image"]
    assert all(c["image"] == image for c in cs)  # one image everywhere
    gpu = [g for g in groups[1:] if g["rayStartParams"].get("num-gpus") == "1"]
    assert gpu, "a GPU worker group"
    for g in gpu:
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == "1"
    for c in cs:  # token auth is on: every node needs the token, or it cannot join the cluster
        assert {"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {"name": "ray-auth-token", "key": "token"}}} \
            in c.get("env", []), c["name"]
    head_ports = {p["containerPort"] for p in groups[0]["template"]["spec"]["containers"][0].get("ports", [])}
    return head_ports


def test_dockerfile_builds_on_the_pinned_ray():
    text = (ROOT / "cluster" / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{RAY_PIN}-py311-gpu@${{RAY_IMAGE_DIGEST}}" in text  # by digest, never a bare tag
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "runs/", "mlruns/"} <= set(ignored)


def test_raycluster():
    doc = load("cluster/kuberay/raycluster.yaml")
    assert doc["kind"] == "RayCluster" and doc["apiVersion"] == "ray.io/v1"
    ports = check_cluster_spec(doc["spec"])
    assert {6379, 8265, 10001, 8000} <= ports


def test_rayjob_runs_the_align_entrypoint_with_a_valid_config():
    doc = load("cluster/kuberay/rayjob.yaml")
    assert doc["kind"] == "RayJob"
    check_cluster_spec(doc["spec"]["rayClusterSpec"])
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[:2] == ["python", "jobs/align.py"] and (ROOT / argv[1]).exists()
    config = argv[argv.index("--config") + 1]
    load_config(ROOT / config, argv[argv.index("--config") + 2:])  # the job's config validates
    assert "import" in (ROOT / "jobs" / "align.py").read_text() and "align" in (ROOT / "jobs" / "align.py").read_text()


def test_rayservice_imports_the_serve_builder():
    doc = load("cluster/kuberay/rayservice.yaml")
    assert doc["kind"] == "RayService"
    check_cluster_spec(doc["spec"]["rayClusterConfig"])
    serve_cfg = yaml.safe_load(doc["spec"]["serveConfigV2"])
    app = serve_cfg["applications"][0]
    module, attr = app["import_path"].split(":")
    builder = getattr(importlib.import_module(module), attr)
    assert callable(builder)
    cfg = load_config(ROOT / app["args"]["config"], app["args"]["overrides"])
    assert cfg.serve.host == "0.0.0.0" and serve_cfg["http_options"]["port"] == cfg.serve.port == 8000


def test_aws_launcher_has_a_gpu_node_type_and_the_image():
    doc = load("cluster/aws/cluster.yaml")
    assert doc["provider"]["type"] == "aws"
    assert doc["docker"]["image"] == load("cluster/kuberay/raycluster.yaml")["spec"]["headGroupSpec"]["template"][
        "spec"]["containers"][0]["image"]
    gpu = [t for t in doc["available_node_types"].values() if t["resources"].get("GPU")]
    assert gpu and doc["head_node_type"] in doc["available_node_types"]
    (head,) = [c for c in doc["head_start_ray_commands"] if c.startswith("ray start --head")]
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head  # `ray dashboard` tunnels over SSH


def test_local_head_script_binds_loopback():
    text = (ROOT / "cluster" / "local" / "start-head.sh").read_text()
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0" in text and "--node-ip-address 127.0.0.1" in text
    assert "--dashboard-host 127.0.0.1" in text


def _70b(rel):
    doc = load(rel)
    spec = doc["spec"]
    assert doc["kind"] == "RayJob" and doc["metadata"]["labels"]["kueue.x-k8s.io/queue-name"]
    assert spec["activeDeadlineSeconds"] > 0 and spec["backoffLimit"] >= 1
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == RAY_PIN
    cs, groups = containers(cluster)
    assert all(c["image"] == cs[0]["image"] for c in cs)
    for c in cs:
        assert {"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {"name": "ray-auth-token", "key": "token"}}} \
            in c["env"], c["name"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["python", "jobs/align.py"]
    cfg = load_config(ROOT / argv[argv.index("--config") + 1], argv[argv.index("--config") + 2:])
    head = groups[0]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in head["containers"][0]["volumeMounts"]}
    claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in head["volumes"]}
    # The run directory (the manifest that lets a retried or a second job skip finished stages)
    # is a volume that outlives the job's cluster.
    run_mount = next(p for p in mounts if cfg.run.run_dir.startswith(p))
    assert claims[mounts[run_mount]] == "bco-ray-runs"
    assert all(uri.startswith("s3://") for uri in (cfg.ingest.output, cfg.score.output, cfg.train.storage,
                                                   cfg.train.export))
    return cfg, groups


def test_the_70b_jobs_hold_gpus_only_after_prepare_and_size_every_stage_to_the_gpus():
    prep, groups = _70b("cluster/kuberay/rayjob-70b-prepare.yaml")
    assert prep.run.stop_after == "prepare"
    assert not any("num-gpus" in g["rayStartParams"] for g in groups)  # a CPU-only cluster
    assert all("nvidia.com/gpu" not in c["resources"]["limits"] for c in containers(load(
        "cluster/kuberay/rayjob-70b-prepare.yaml")["spec"]["rayClusterSpec"])[0])

    cfg, groups = _70b("cluster/kuberay/rayjob-70b.yaml")
    assert cfg.run.stop_after is None and cfg.run.run_dir == prep.run.run_dir  # the same run: prepare is skipped
    gpu = [g for g in groups[1:] if "num-gpus" in g["rayStartParams"]]
    assert len(gpu) == 1 and "num-gpus" not in groups[0]["rayStartParams"]
    g = gpu[0]
    per_pod = int(g["rayStartParams"]["num-gpus"])
    pod = g["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == str(per_pod) == "8"  # one pod per node
    total = per_pod * g["replicas"]
    assert cfg.train.num_workers == total
    assert cfg.score.actors * cfg.score.tensor_parallel_size == total
    assert per_pod % cfg.score.tensor_parallel_size == 0 and per_pod % cfg.serve.tensor_parallel_size == 0
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in pod["containers"][0]["volumeMounts"]
    # The memory plan (bench/scale.py) says 70B training fits 80 GB GPUs at this size.
    from bench.scale import plan

    row = next(r for r in plan() if r["model"] == "70B" and r["gpus"] == total)
    assert row["fits_80gb"] and cfg.train.meta_init and not cfg.train.cpu_offload


def test_torch_threads_are_the_reserved_whole_cpus_capped_by_omp_num_threads(monkeypatch):
    """What every stage passes to torch.set_num_threads (docs/operations.md): its whole CPUs,
    at least one, never more than an OMP_NUM_THREADS set in the cluster's environment."""
    from bco_ray.raycluster import torch_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert [torch_threads(c) for c in (0.25, 0.5, 1, 2, 2.5, 16)] == [1, 1, 1, 2, 2, 16]
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what scripts/test.sh sets for its two lanes
    assert [torch_threads(c) for c in (0.5, 2, 16)] == [1, 1, 1]
    monkeypatch.setenv("OMP_NUM_THREADS", "8")
    assert [torch_threads(c) for c in (2, 16)] == [2, 8]
    for junk in ("", "0", "auto"):  # not a thread count: no cap
        monkeypatch.setenv("OMP_NUM_THREADS", junk)
        assert torch_threads(4) == 4

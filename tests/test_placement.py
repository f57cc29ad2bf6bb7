"""Engines that span several GPUs (tensor parallelism): each scoring actor and each Serve
replica reserves its GPUs as one placement group, and vLLM gets the matching arguments.

The cluster here declares 2 GPUs it does not have (Ray schedules by declared resources), so
the placement itself is exercised for real: the actor and the replica start inside their
group, and a task asking for a GPU, as each of vLLM's tensor-parallel workers does, is
placed in the group's GPU bundles. vLLM's CPU build does not run tensor parallelism."""

import json
import os
import subprocess
import sys
from pathlib import Path

from bco_ray.placement import engine_bundles, serve_replica_options, vllm_parallel_args

ROOT = Path(__file__).resolve().parents[1]


def test_one_gpu_needs_no_group_and_tp_asks_vllm_for_rays_executor():
    assert vllm_parallel_args(1) == {}
    assert vllm_parallel_args(4) == {"tensor_parallel_size": 4, "distributed_executor_backend": "ray"}
    assert engine_bundles(2, 0.5) == [{"CPU": 0.5}, {"GPU": 1.0, "CPU": 1.0}, {"GPU": 1.0, "CPU": 1.0}]
    opts = serve_replica_options(4, 1.0)
    assert opts["placement_group_strategy"] == "STRICT_PACK" and len(opts["placement_group_bundles"]) == 5
    assert opts["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0}  # the replica's GPUs are its group's


PLACED = r"""
import json, os
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
import ray
from ray import serve
from bco_ray.placement import DataActorPlacement, serve_replica_options

ray.init(num_cpus=6, num_gpus=2, include_dashboard=False, _temp_dir=f"/tmp/bpl-{os.getpid()}",
         _node_ip_address="127.0.0.1")

@ray.remote(num_gpus=1, num_cpus=1)
def tp_worker():  # what vLLM's Ray executor starts per tensor-parallel rank
    return ray.get_runtime_context().get_assigned_resources()

def seen():
    pg = ray.util.get_current_placement_group()
    return {"bundles": pg.bundle_specs if pg else None,
            "workers": ray.get([tp_worker.remote() for _ in range(2)]) if pg else None}

class Scorer:
    def __call__(self, batch):
        batch["seen"] = [json.dumps(seen())] * len(batch["id"])
        return batch

groups = DataActorPlacement(2, 0.5)
rows = ray.data.range(4).map_batches(Scorer, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=1),
                                     num_cpus=0.5, num_gpus=0, ray_remote_args_fn=groups).take_all()
held = ray.available_resources().get("GPU", 0)
groups.release()  # as score-ref does after writing: else the next stage finds no GPU
import time
deadline = time.time() + 30
while ray.available_resources().get("GPU", 0) < 2 and time.time() < deadline:
    time.sleep(0.2)

@serve.deployment
class Replica:
    def __call__(self):
        return seen()

handle = serve.run(Replica.options(**serve_replica_options(2, 0.5)).bind(), name="tp", route_prefix=None)
print("RESULT " + json.dumps({"data": json.loads(rows[0]["seen"]), "serve": handle.remote().result(timeout_s=60),
                              "gpus_free_before_release": held}))
serve.shutdown()
ray.shutdown()
"""


def test_a_scoring_actor_and_a_replica_each_reserve_their_gpus_as_one_group(tmp_path):
    p = subprocess.run([sys.executable, "-c", PLACED], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
                       capture_output=True, text=True, timeout=300)
    line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert p.returncode == 0 and line, (p.stdout[-2000:], p.stderr[-3000:])
    got = json.loads(line.split(" ", 1)[1])
    for where in ("data", "serve"):
        assert got[where]["bundles"] == [{"CPU": 0.5}, {"GPU": 1.0, "CPU": 1.0}, {"GPU": 1.0, "CPU": 1.0}], where
        # Both tensor-parallel workers got a GPU: the group's, since the cluster has no other.
        assert [w.get("GPU") for w in got[where]["workers"]] == [1.0, 1.0], got[where]
    # The scoring actors' groups held both GPUs until released; the replica then got them.
    assert got["gpus_free_before_release"] == 0

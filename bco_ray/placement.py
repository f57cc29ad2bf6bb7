"""How an engine that spans several GPUs reserves them: one placement group per engine.

A vLLM engine with tensor parallelism runs one worker per GPU as Ray actors of its own.
The engine's actor (a Ray Data scoring actor, a Serve replica) takes no GPU itself; its
placement group holds a CPU bundle for it and one GPU bundle per tensor-parallel rank,
all on one node (STRICT_PACK: tensor parallelism needs NVLink, not the network), and
vLLM's Ray executor places its workers in that group. This is what `ray.data.llm` and
`ray.serve.llm` do. One GPU needs none of it: the actor asks for the GPU directly.
"""

from __future__ import annotations


def engine_bundles(tensor_parallel_size: int, cpus: float) -> list[dict]:
    """The engine's own process (its CPUs), then one GPU (and a CPU) per tensor-parallel rank."""
    return [{"CPU": float(cpus)}] + [{"GPU": 1.0, "CPU": 1.0}] * tensor_parallel_size


def vllm_parallel_args(tensor_parallel_size: int) -> dict:
    """vLLM engine arguments for `tensor_parallel_size` GPUs."""
    if tensor_parallel_size <= 1:
        return {}
    return {"tensor_parallel_size": tensor_parallel_size, "distributed_executor_backend": "ray"}


class DataActorPlacement:
    """Ray Data `ray_remote_args_fn` for scoring actors: a fresh placement group per actor.
    The groups outlive the actors (Ray Data does not know of them): `release()` them once
    the dataset is written, or the GPUs stay reserved for the rest of the job."""

    def __init__(self, tensor_parallel_size: int, cpus: float):
        self.bundles = engine_bundles(tensor_parallel_size, cpus)
        self.groups: list = []

    def __call__(self) -> dict:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        pg = ray.util.placement_group(self.bundles, strategy="STRICT_PACK")
        self.groups.append(pg)
        return {"scheduling_strategy": PlacementGroupSchedulingStrategy(
            pg, placement_group_bundle_index=0, placement_group_capture_child_tasks=True)}

    def release(self) -> None:
        import ray

        while self.groups:
            ray.util.remove_placement_group(self.groups.pop())


def serve_replica_options(tensor_parallel_size: int, cpus: float) -> dict:
    """Serve deployment options of a replica whose engine spans `tensor_parallel_size` GPUs
    (Serve creates the group per replica and starts the replica in its first bundle)."""
    return {"placement_group_bundles": engine_bundles(tensor_parallel_size, cpus),
            "placement_group_strategy": "STRICT_PACK",
            "ray_actor_options": {"num_cpus": cpus, "num_gpus": 0}}

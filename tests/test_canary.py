"""Canary serving: the routing (sticky, by share) and the RayService manifest's application.
The canary on a running cluster (split, attribution, status, promote and rollback under
load) is exercised in tests/test_loop.py, between the loop's two runs."""

from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]
def test_routing_is_sticky_and_follows_the_shares():
    from bco_ray.serve.app import bucket, pick

    versions = [{"role": "candidate", "share": 0.25}, {"role": "promoted", "share": 0.75}]
    roles = [pick(versions, bucket("salt-1", f"user-{i}"))["role"] for i in range(20_000)]
    share = roles.count("candidate") / len(roles)
    assert abs(share - 0.25) < 4 * (0.25 * 0.75 / len(roles)) ** 0.5, share  # binomial, 4 sd
    assert all(pick(versions, bucket("salt-1", f"user-{i}"))["role"] == roles[i] for i in range(500))  # sticky
    # A new canary (salt) draws a new slice of the users, about a quarter of whom overlap the old one.
    again = [pick(versions, bucket("salt-2", f"user-{i}"))["role"] for i in range(20_000)]
    both = sum(a == b == "candidate" for a, b in zip(roles, again, strict=True)) / len(roles)
    assert abs(both - 0.25 * 0.25) < 0.01, both
    assert pick([{"role": "candidate", "share": 0.0}, {"role": "promoted", "share": 1.0}], 0.0)["role"] == "promoted"


def _variant(out: Path) -> str:
    """tiny-llama with its weights moved a little: a second version with its own fingerprint."""
    import torch

    from bco_ray.assets import load_causal_lm

    model, tok = load_causal_lm("tiny-llama")
    torch.manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return str(out)


def test_the_canary_rayservice_builds_the_application_it_describes(ray_local, tmp_path):
    """cluster/kuberay/rayservice-canary.yaml: its builder, given the manifest's args (the
    models swapped for local ones), makes the gateway route the manifest's share to the candidate."""
    import importlib

    import yaml

    from tests.test_cluster import ROOT, check_cluster_spec

    doc = yaml.safe_load((ROOT / "cluster/kuberay/rayservice-canary.yaml").read_text())
    assert doc["kind"] == "RayService"
    check_cluster_spec(doc["spec"]["rayClusterConfig"])
    (app,) = yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"]
    module, attr = app["import_path"].split(":")
    builder = getattr(importlib.import_module(module), attr)
    candidate = _variant(tmp_path / "candidate")
    args = {**app["args"], "promoted": "tiny-llama", "candidate": candidate}
    routes = builder(args)._bound_deployment._deployment_config.user_config
    assert [(v["role"], v["share"]) for v in routes["versions"]] == [("candidate", 0.1), ("promoted", 0.9)]
    assert routes["salt"] == candidate  # the same users from one apply to the next
    alone = builder({**args, "candidate": None})._bound_deployment._deployment_config.user_config
    assert [(v["role"], v["share"]) for v in alone["versions"]] == [("promoted", 1.0)]

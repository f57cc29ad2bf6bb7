"""The serve app's routes as Ray Serve ships them to replicas (no cluster needed)."""

import inspect

import ray.cloudpickle as cloudpickle
from fastapi import Request
from fastapi.routing import APIRoute


def test_route_annotations_survive_the_trip_to_a_replica():
    # Serve pickles the ingress routes by value; a string annotation ('Request', from
    # `from __future__ import annotations`) does not resolve there, and FastAPI >= 0.137
    # then reads `request` as a required query parameter: every route answered 422.
    from bco_ray import serve_app

    routes = [r for r in serve_app.app.routes if isinstance(r, APIRoute)]
    assert {r.path for r in routes} >= {"/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/feedback"}
    for route in routes:
        shipped = cloudpickle.loads(cloudpickle.dumps(route.endpoint))
        params = inspect.signature(shipped).parameters
        if "request" in params:
            assert params["request"].annotation is Request, route.path

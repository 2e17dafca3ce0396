"""Load test of `vseinf serve`: N concurrent text queries over loopback; errors and p50/p99 latency.

    python benchmarks/serve_load.py [INDEX_DIR] [--model CKPT] [--concurrency 200] [--rounds 3] [--out r.json]

Without INDEX_DIR the demo index is built first (scikit-image's sample photos, as `vseinf demo`).
The server runs in this process with uvicorn on 127.0.0.1 and a free port: nothing leaves the
machine. Each round releases ``--concurrency`` client threads at once (a barrier), each sending one
``GET /api/search?q=…&k=…`` with its own query; the round's latencies are measured from release to
the last byte of each answer, so they include the time spent queueing behind the other requests.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
from _report import emit  # benchmarks/ is on sys.path when run as a script

SUBJECTS = ["a dog", "two children", "a man", "a woman", "a cat", "a black dog", "a girl", "a boy", "people",
            "a surfer", "a cyclist", "a brown horse", "an astronaut", "a red motorcycle", "a rocket"]
ACTIONS = ["runs on the beach", "plays in the snow", "rides a bike", "sits on a bench", "jumps over a fence",
           "drinks coffee", "stands in front of a building", "swims in a lake", "climbs a rock",
           "looks at the camera", "walks down the street", "lies on the grass", "launches into the sky"]


def queries(n: int) -> list[str]:
    """``n`` distinct caption-like queries."""
    out = [f"{s} {a}" for a in ACTIONS for s in SUBJECTS]
    while len(out) < n:
        out += [f"{q} at night" for q in out[: n - len(out)]]
    return out[:n]


def one_round(base: str, texts: list[str], k: int) -> dict:
    barrier = threading.Barrier(len(texts))

    def fetch(text: str):
        url = f"{base}/api/search?" + urllib.parse.urlencode({"q": text, "k": k})
        barrier.wait()
        t0 = time.perf_counter()
        try:
            with urllib.request.urlopen(url, timeout=300) as r:
                status, body = r.status, r.read()
            ok = status == 200 and len(json.loads(body)["results"]) > 0
        except urllib.error.HTTPError as e:
            status, ok = e.code, False
        except Exception as e:  # connection refused/reset: counted, reported
            status, ok = f"{type(e).__name__}: {e}", False
        return ok, status, (time.perf_counter() - t0) * 1000

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(texts)) as pool:
        answers = list(pool.map(fetch, texts))
    wall = time.perf_counter() - t0
    lat = np.array([ms for _, _, ms in answers])
    errors = [str(s) for ok, s, _ in answers if not ok]
    return {"requests": len(texts), "errors": len(errors), "error_examples": errors[:5],
            "p50_ms": round(float(np.percentile(lat, 50)), 1), "p99_ms": round(float(np.percentile(lat, 99)), 1),
            "max_ms": round(float(lat.max()), 1), "wall_s": round(wall, 2),
            "throughput_qps": round(len(texts) / wall, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("index_dir", nargs="?", help="index to serve (default: build the demo index)")
    p.add_argument("--model", help="checkpoint (default: the index's own / the bundled model)")
    p.add_argument("--concurrency", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    if not 1 <= args.concurrency <= 1000:
        p.error("--concurrency must be 1..1000")

    from vseinf.serve.app import background_server, create_app

    workdir = None
    index_dir = args.index_dir
    if index_dir is None:
        from vseinf.cli.encode import load_model_or_explain
        from vseinf.demo import prepare_sample_gallery
        from vseinf.search.build import encode_gallery

        workdir = tempfile.TemporaryDirectory(prefix="vseinf-load-")
        model = load_model_or_explain(args.model)
        photos = prepare_sample_gallery(Path(workdir.name) / "images")
        index_dir = Path(workdir.name) / "index"
        print(encode_gallery(photos, index_dir, model, progress=False).summary(), file=sys.stderr)
        app = create_app(index_dir, model=model)
    else:
        app = create_app(index_dir, model_path=args.model)

    result = {"benchmark": "serve_load", "index": str(index_dir), "items": len(app.state.gallery),
              "engine": app.state.gallery.engine.name, "concurrency": args.concurrency, "k": args.k,
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count()}, "rounds": []}
    texts = queries(args.concurrency)
    with background_server(app) as base:
        one_round(base, texts[:5], args.k)  # warm-up: first model calls are slow
        for r in range(args.rounds):
            res = one_round(base, texts, args.k)
            result["rounds"].append(res)
            print(f"round {r + 1}: {res['requests']} concurrent queries, {res['errors']} errors, "
                  f"p50 {res['p50_ms']} ms, p99 {res['p99_ms']} ms, {res['throughput_qps']} queries/s",
                  file=sys.stderr)
    result["errors"] = sum(r["errors"] for r in result["rounds"])
    emit(result, args.out)
    if workdir is not None:
        workdir.cleanup()
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())

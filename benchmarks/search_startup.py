"""Start-up cost of a text search from the command line, against ``python -c "import torch"``.

    python benchmarks/search_startup.py [--images DIR] [--n-images 200] [--repeats 5]
                                        [--workdir /tmp/vseinf-bench-search] [--out results.json]

``vseinf search INDEX "text"`` embeds one query and exits, so its start-up is its running time.
Each repetition runs, as separate processes, in turn (so they share whatever else the machine does):

- ``import_torch``: ``python -c "import torch"``, the floor of anything that runs a torch model;
- ``search``: ``python -m vseinf search INDEX "a dog runs on the beach"`` — the text tower alone,
  on the transformers-free BERT (``load_model(text_only=True)``);
- ``search_full_model``: the same query answered with the whole model loaded (CNN + transformers'
  BERT), as ``vseinf search`` did before it loaded the text tower alone;
- ``search_queries_file``: ``vseinf search INDEX --queries FILE`` with ``--n-queries`` captions,
  one process for all of them.

Reported per command: median wall time and median CPU time (user + system of the child process:
steadier than wall time on a shared machine) over ``--repeats``; ratios of medians to
``import_torch``. Target (issue 18): ``search`` within 2× ``import_torch``'s wall time.

The index holds ``--n-images`` Flickr8k photos embedded by the bundled model (built once, kept in
``--workdir``); without Flickr8k, synthetic images stand in (search time does not depend on them).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _report import emit  # benchmarks/ is on sys.path when run as a script

REPO = Path(__file__).resolve().parents[1]
QUERY = "a dog runs on the beach"
FULL_MODEL_SEARCH = """
import sys
from vseinf.search.build import encode_texts_np
from vseinf.search.gallery import Gallery
gallery = Gallery.load(sys.argv[1])
model = gallery.load_model()  # the whole model, as search loaded it before text_only
print(gallery.search(encode_texts_np(model, [sys.argv[2]]), 10, absolute=True)[0][0])
"""


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def timed_run(cmd: list[str], env: dict) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one child process; its output must be non-empty on success."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])}… failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def gallery_images(images: Path | None, n: int, workdir: Path) -> tuple[Path, str]:
    """A folder of ``n`` photos: copies of Flickr8k's first ``n`` (sorted), or synthetic ones."""
    import shutil

    folder, note = workdir / f"gallery{n}", workdir / f"gallery{n}.source"
    real = images is not None and images.is_dir()
    if folder.is_dir() and len(list(folder.iterdir())) == n and note.is_file() and \
            note.read_text().startswith("Flickr8k") == real:
        return folder, note.read_text()
    shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(workdir / f"index{n}", ignore_errors=True)
    folder.mkdir(parents=True)
    if real:
        names = sorted(p for p in images.iterdir() if p.suffix.lower() == ".jpg")[:n]
        for p in names:
            shutil.copy(p, folder / p.name)  # a copy: links to files outside a gallery are skipped
        source = f"Flickr8k ({images})"
    else:
        import numpy as np
        from PIL import Image

        rng = np.random.default_rng(0)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)).save(folder / f"{i:04d}.jpg")
        source = "synthetic noise images"
    note.write_text(source)
    return folder, source


def build_index(folder: Path, workdir: Path) -> Path:
    out = workdir / f"index{len(list(folder.glob('*.jpg')))}"
    if (out / "gallery.json").is_file():
        return out
    log(f"building {out} …")
    subprocess.run([sys.executable, "-m", "vseinf", "encode", str(folder), "--out", str(out), "--no-progress"],
                   env=child_env(), check=True)
    return out


def queries_file(images: Path | None, n: int, workdir: Path) -> Path:
    """``n`` Flickr8k captions (or numbered stand-ins), one a line."""
    path = workdir / f"queries{n}.txt"
    captions = []
    token_file = images.parent / "Flickr8k_text" / "Flickr8k.token.txt" if images is not None else None
    if token_file is not None and token_file.is_file():
        lines = token_file.read_text(encoding="utf-8").splitlines()
        captions = [line.partition("\t")[2] for line in lines[:n]]
    captions += [f"{QUERY} number {i}" for i in range(n - len(captions))]
    path.write_text("\n".join(captions) + "\n", encoding="utf-8")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    shared = Path(os.environ.get("VSEINF_SHARED_DATA") or REPO.parent / "shared/data")
    ap.add_argument("--images", default=str(shared / "flickr8k/Flicker8k_Dataset"),
                    help="folder of photos for the gallery (default: Flickr8k under $VSEINF_SHARED_DATA "
                         "or ../shared/data)")
    ap.add_argument("--n-images", type=int, default=200)
    ap.add_argument("--n-queries", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--workdir", default="/tmp/vseinf-bench-search")
    ap.add_argument("--out")
    args = ap.parse_args()

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    images = Path(args.images) if args.images else None
    folder, source = gallery_images(images, args.n_images, workdir)
    index = build_index(folder, workdir)
    qfile = queries_file(images, args.n_queries, workdir)
    py = sys.executable
    commands = {
        "import_torch": [py, "-c", "import torch"],
        "search": [py, "-m", "vseinf", "search", str(index), QUERY, "-k", "10"],
        "search_full_model": [py, "-c", FULL_MODEL_SEARCH, str(index), QUERY],
        "search_queries_file": [py, "-m", "vseinf", "search", str(index), "--queries", str(qfile), "-k", "10"],
    }
    env = child_env()
    for cmd in commands.values():  # warm the file cache; not timed
        timed_run(cmd, env)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
    for r in range(args.repeats):
        for name, cmd in commands.items():
            times[name].append(timed_run(cmd, env))
        log(f"repeat {r + 1}/{args.repeats}: " + ", ".join(f"{n} {t[-1][0]:.2f}s" for n, t in times.items()))

    def medians(name):
        return statistics.median(w for w, _ in times[name]), statistics.median(c for _, c in times[name])

    base_wall, base_cpu = medians("import_torch")
    rows = {}
    for name in commands:
        wall, cpu = medians(name)
        rows[name] = {"wall_s_median": round(wall, 3), "cpu_s_median": round(cpu, 3),
                      "wall_vs_import_torch": round(wall / base_wall, 2), "cpu_vs_import_torch": round(cpu / base_cpu, 2),
                      "wall_s_all": [round(w, 3) for w, _ in times[name]]}
    rows["search_queries_file"]["n_queries"] = args.n_queries
    rows["search_queries_file"]["wall_s_per_query"] = round(rows["search_queries_file"]["wall_s_median"]
                                                            / args.n_queries, 4)
    emit({
        "benchmark": "search_startup",
        "date": datetime.date.today().isoformat(),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                    "load_average_at_end": [round(x, 2) for x in os.getloadavg()]},
        "index": {"path": str(index), "images": args.n_images, "source": source, "engine": "exact"},
        "query": QUERY,
        "repeats": args.repeats,
        "results": rows,
        "target": "search wall time ≤ 2× import_torch (issue 18)",
        "met": rows["search"]["wall_vs_import_torch"] <= 2.0,
    }, args.out)


if __name__ == "__main__":
    main()

"""``vseinf demo``: index a handful of photos with the bundled model and search them — no network needed.

The photos are the samples that ship inside scikit-image (an astronaut, a cup of coffee, Chelsea
the cat, a rocket, motorcycles, …), copied into a demo folder so the index has a stable home;
``--images DIR`` uses your own folder instead. The demo then runs a few example queries, prints
the best matches, and says how to open the same index in the web page (``vseinf serve``).
"""

from __future__ import annotations

import os
import shutil
import textwrap
from pathlib import Path
from typing import Sequence

from .data.cache import cache_dir
from .model import bundled_name
from .search.build import encode_gallery, encode_texts_np
from .search.gallery import Gallery

# The scikit-image samples that are photographs or photo-like scenes (skimage/data/<name>).
SAMPLE_IMAGES = (
    "astronaut.png", "brick.png", "camera.png", "chelsea.png", "clock_motion.png", "coffee.png", "coins.png",
    "grass.png", "gravel.png", "horse.png", "hubble_deep_field.jpg", "logo.png", "moon.png",
    "motorcycle_left.png", "motorcycle_right.png", "page.png", "retina.jpg", "rocket.jpg", "text.png",
)

# Curated queries, each with the photo(s) it describes: they show what the bundled model learned
# from Flickr8k (people, animals, objects and scenes described in plain words). Checked against the
# bundled model: each ranks its photo first among the 19 samples.
EXAMPLES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("a brown cat with green eyes", ("chelsea.png",)),
    ("a man with a camera on a tripod", ("camera.png",)),
    ("a red motorcycle", ("motorcycle_left.png", "motorcycle_right.png")),
    ("a pile of coins", ("coins.png",)),
    ("a cup of coffee on a table", ("coffee.png",)),
    ("a woman in an orange suit", ("astronaut.png",)),
    ("a field of grass", ("grass.png",)),
)
# …and one it gets wrong, shown as such: Flickr8k's photos have no astronauts, so the word means
# little to the model, while a description of what is visible finds her (above).
LIMIT_EXAMPLE: tuple[str, tuple[str, ...]] = ("an astronaut in a space suit", ("astronaut.png",))
LIMIT_NOTE = ("Flickr8k's photos show people, dogs and everyday scenes, not astronauts: the model never "
              "learned the word. Describing what is visible (“a woman in an orange suit”) finds her.")

EXAMPLE_QUERIES = tuple(q for q, _ in EXAMPLES) + (LIMIT_EXAMPLE[0],)

# What a score is, and the range of each bundled model's scores: measured on the first 300 Flickr8k
# dev photos and their 1,500 captions (a caption against its own photo, and against the other 299).
SCORE_NOTE = ("Scores are cosine similarities (−1 … 1) between the query's embedding and each photo's; "
              "only their order within one query matters.")
BUNDLED_SCORE_NOTES = {
    "flickr8k-effnet-minilm-ft": ("With this bundled model a caption and its own photo typically score "
                                  "0.14–0.37 (median 0.26), an unrelated photo about 0 (9 in 10 below 0.11)."),
    "flickr8k-effnet-minilm": ("With this bundled model a caption and its own photo typically score 0.15–0.39 "
                               "(median 0.28), an unrelated photo about 0 (9 in 10 below 0.12)."),
}


def sample_images_dir() -> Path:
    """The folder of scikit-image's bundled sample images (part of the installed package)."""
    try:
        import skimage.data
    except ImportError:
        raise ValueError("the demo photos come with scikit-image: pip install scikit-image "
                         "(or pass --images DIR with your own photos)") from None
    return Path(skimage.data.__file__).resolve().parent


def prepare_sample_gallery(dest: str | os.PathLike, names: Sequence[str] = SAMPLE_IMAGES) -> Path:
    """Copy the scikit-image sample photos into ``dest`` (kept if already there) and return it.

    Copies keep the original modification times, so re-running the demo re-encodes nothing.
    """
    src = sample_images_dir()
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    found = 0
    for name in names:
        if not (src / name).is_file():  # an older or newer scikit-image may lack a sample
            continue
        found += 1
        target = dest / name
        if not target.is_file() or target.stat().st_size != (src / name).stat().st_size:
            shutil.copy2(src / name, target)
    if found == 0:
        raise ValueError(f"{src}: none of scikit-image's sample photos are there; pass --images DIR")
    return dest


def default_demo_dir() -> Path:
    return cache_dir() / "demo"


def _query_and_expected(item) -> tuple[str, tuple[str, ...]]:
    if isinstance(item, str):
        return item, ()
    query, expected = item
    return query, tuple(expected)


def run_demo_session(model, images: str | os.PathLike | None = None, workdir: str | os.PathLike | None = None,
                     queries: Sequence = EXAMPLES, k: int = 3, progress: bool = True, echo=print,
                     limit_example: tuple[str, tuple[str, ...]] | None = None) -> dict:
    """Index the photos, run ``queries`` and print what a user needs; returns the results per query.

    Args:
        model: a loaded model (``vseinf.load_model()``).
        images: a folder of photos (default: the scikit-image samples, copied under ``workdir``).
        workdir: where the demo keeps its copy of the photos and its index.
        queries: text queries to run; an entry may be ``(query, expected file names)``, and then the
            rank of the best expected photo is printed, whether or not it made the top ``k``.
        k: results per query.
        progress: show the encoding progress bar.
        echo: where lines of output go.
        limit_example: a ``(query, expected)`` pair the model gets wrong, printed apart with
            :data:`LIMIT_NOTE` (the default demo shows one).
    """
    workdir = Path(workdir) if workdir is not None else default_demo_dir()
    gallery_dir = Path(images) if images is not None else prepare_sample_gallery(workdir / "images")
    index_dir = workdir / "index"
    echo(f"Indexing the photos in {gallery_dir} …")
    report = encode_gallery(gallery_dir, index_dir, model, progress=progress)
    echo(report.summary())
    gallery = Gallery.load(index_dir)
    asked = [_query_and_expected(q) for q in queries]
    if limit_example is not None:
        asked.append(_query_and_expected(limit_example))
    vectors = encode_texts_np(model, [q for q, _ in asked])
    bundled_note = BUNDLED_SCORE_NOTES.get(bundled_name(getattr(model, "checkpoint_path", None)))
    echo("")
    echo(textwrap.fill(SCORE_NOTE + (" " + bundled_note if bundled_note else ""), width=100))
    answers, hits, checked = {}, 0, 0
    # Every photo is ranked, so the expected photo's rank is known even when it is not in the top k.
    for n, ((query, expected), ranked) in enumerate(zip(asked, gallery.search(vectors, len(gallery)))):
        is_limit = limit_example is not None and n == len(asked) - 1
        if is_limit:
            echo("\nA query outside what the model learned:")
        results = ranked[:k]
        answers[query] = results
        ranks = [i for i, r in enumerate(ranked, 1) if r["path"] in expected]
        note = ""
        if ranks:
            note = f"   → {ranked[ranks[0] - 1]['path']} ranks {ranks[0]} of {len(ranked)}"
            if not is_limit:
                checked += 1
                hits += ranks[0] == 1
        echo(f"\n“{query}”{note}")
        for rank, r in enumerate(results, 1):
            echo(f"  {rank}. {r['score']:.3f}  {r['path']}")
        if ranks and ranks[0] > k:
            r = ranked[ranks[0] - 1]
            echo(f"  …\n  {ranks[0]}. {r['score']:.3f}  {r['path']}")
        if is_limit:
            echo(textwrap.fill(LIMIT_NOTE, width=100, initial_indent="  ", subsequent_indent="  "))
    if checked:
        echo(f"\n{hits} of {checked} example queries rank the photo they describe first.")
    # the index records which checkpoint made it, so serve and search need no --model
    echo("\nSearch these photos in your browser:\n"
         f"  vseinf serve {index_dir}\n"
         "  then open http://127.0.0.1:8000/  (GPO coefficient plots at http://127.0.0.1:8000/gpo)\n"
         "From the command line:\n"
         f'  vseinf search {index_dir} "a cat" -k 5\n'
         "Your own photos:\n"
         "  vseinf encode ~/Pictures --out ~/pictures-index && vseinf serve ~/pictures-index")
    return answers

"""Image checks before the first step: decode every image a run will read, in parallel, remembering the good ones.

A truncated image in a validation gallery used to let training run for hours and then crash validation; now
``CIRDataModule.check_images`` (used by every DataModule's ``setup``) decodes every image first and reports every
bad file at once. Images that decoded are remembered by folder, name, size and mtime in a small JSON cache, so the
second run over a dataset is instant.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from coalign.io import atomic_write_json

__all__ = ["image_problem", "image_check_cache", "find_bad_images"]


def image_problem(path: str | Path) -> str | None:
    """What is wrong with the image file ``path``, or None when it decodes (header check, size, full decode)."""
    try:
        with Image.open(path) as im:
            im.verify()  # the fast header/structure check
        with Image.open(path) as im:
            width, height = im.size
            if width * height == 0:
                return f"has size {width}x{height}"
            if Image.MAX_IMAGE_PIXELS and width * height > Image.MAX_IMAGE_PIXELS:
                limit = Image.MAX_IMAGE_PIXELS
                return f"has {width}x{height} pixels, over PIL's limit of {limit} (a decompression bomb?)"
            im.load()  # the full decode: finds truncated and corrupt data
    except FileNotFoundError:
        return "file not found"
    except Exception as err:  # noqa: BLE001 - whatever the decoder raises, the file is bad
        return f"{type(err).__name__}: {err}"
    return None


def image_check_cache() -> Path:
    """The JSON file remembering images that decoded: ``$COALIGN_CACHE_DIR/image_checks.json``, by default
    ``~/.cache/coalign/image_checks.json`` (dataset folders are often read-only or shared, so not there)."""
    folder = os.environ.get("COALIGN_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "coalign"
    return Path(folder).expanduser() / "image_checks.json"


def find_bad_images(paths: Sequence[str | Path], progress: bool = True, workers: int | None = None) -> dict[str, str]:
    """Decode every image of ``paths`` in a thread pool; return ``{path: problem}`` for each bad one.

    An image that decoded is remembered in :func:`image_check_cache` under its folder and name with its size and
    mtime, so a second run over the same files is instant; a changed file is checked again. Folders that no longer
    exist are dropped from the cache when it is written.
    """
    cache = image_check_cache()
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    bad: dict[str, str] = {}
    todo: dict[str, tuple[str, str, list[int]]] = {}
    for path in dict.fromkeys(str(p) for p in paths):
        try:
            st = os.stat(path)
        except OSError:
            bad[path] = "file not found"
            continue
        folder, name = os.path.split(os.path.abspath(path))
        stamp = [st.st_size, st.st_mtime_ns]
        if known.get(folder, {}).get(name) != stamp:
            todo[path] = (folder, name, stamp)
    if not todo:
        return bad
    with ThreadPoolExecutor(workers or min(16, 2 * (os.cpu_count() or 1))) as pool:
        results = pool.map(image_problem, todo)
        # disable=None: tqdm shows no bar when stderr is no terminal (logs, tests)
        bar = tqdm(results, total=len(todo), desc="checking images", disable=None if progress else True)
        for path, problem in zip(todo, bar):
            if problem:
                bad[path] = problem
            else:
                folder, name, stamp = todo[path]
                known.setdefault(folder, {})[name] = stamp
    try:  # only a speed-up: a read-only home just means checking again next time
        atomic_write_json(cache, {k: v for k, v in known.items() if os.path.isdir(k)}, compact=True)
    except OSError:
        pass
    return bad

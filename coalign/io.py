"""Files and tables: the one atomic writer, the one JSON reader and the one table formatter of coalign.

Every file coalign writes (checkpoint configs, gallery caches, search-index shards, synthesis outputs, metric
files) goes through :func:`atomic_path`: the data is written to a temporary file in the same folder and moved
into place with ``os.replace``, which is atomic on POSIX file systems. A process killed at any moment leaves
either the old file, no file, or the whole new file (plus, at worst, a ``.tmp-*`` file that nothing reads and
the next write replaces). We do not ``fsync``: the guarantee covers killed processes and preempted jobs, not a
power loss on a local disk.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from io import BytesIO
from pathlib import Path
from typing import Any

from PIL import Image

__all__ = [
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_save_image",
    "read_json",
    "read_jsonl",
    "write_jsonl",
    "format_table",
    "load_image",
    "check_files_exist",
]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without an error it replaces ``path``.

    For writers that want a file name (``safetensors.torch.save_file``, ``Image.save``)::

        with atomic_path(out / "shard.safetensors") as tmp:
            save_file(tensors, str(tmp))
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}.")
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the file the permissions open() would
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        # BaseException: a KeyboardInterrupt mid-write must not leave a stray temporary file either
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file, no file, or the whole new file."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 1, compact: bool = False) -> None:
    """JSON with a final newline; ``compact`` drops the spaces (upload files with a size cap)."""
    if compact:
        text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    else:
        text = json.dumps(obj, ensure_ascii=False, indent=indent) + "\n"
    atomic_write_text(path, text)


def atomic_save_image(path: str | Path, image, format: str = "PNG") -> None:
    """Save a PIL image atomically (PNG by default: lossless, so later stages see what was produced)."""
    buf = BytesIO()
    image.save(buf, format=format)
    atomic_write_bytes(path, buf.getvalue())


def read_json(path: str | Path, what: str = "JSON file") -> Any:
    """Load a JSON file, naming it (and the position of a syntax error) when it cannot be read.

    Args:
        path: the file.
        what: how the error message names the file ("CIRR caption file", "index.json", ...).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: it is not valid UTF-8 JSON.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON (line {err.lineno}, column {err.colno}): {err.msg}") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text: {err}") from None


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSON-lines file, naming the file and line when one is not valid JSON."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{n} is not valid JSON: {err}") from None
    return rows


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def format_table(values: Mapping[str, Any], title: str | None = None, extra: Mapping[str, Any] | None = None) -> str:
    """A plain-text two-column table: numbers with two decimals, then ``extra`` rows printed as they are.

    Example:
        >>> print(format_table({"R@1": 93.5}, title="test retrieval, in %"))
        test retrieval, in %
        metric  value
        ------  ------
        R@1      93.50
    """

    def cell(v: Any) -> str:
        return f"{v:6.2f}" if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)

    rows = [(k, cell(v)) for k, v in values.items()]
    rows += [(k, str(v)) for k, v in (extra or {}).items()]
    width = max([len("metric"), *(len(k) for k, _ in rows)])
    lines = [title] if title else []
    lines += [f"{'metric':<{width}}  value", f"{'-' * width}  {'-' * 6}"]
    lines += [f"{k:<{width}}  {v}" for k, v in rows]
    return "\n".join(lines)


def load_image(path: str | Path) -> Image.Image:
    """Open an image as RGB, with an error that names the file when it cannot be read.

    Raises:
        FileNotFoundError: there is no such file.
        OSError: the file cannot be decoded, has no pixels (0 wide or high), or has more pixels than PIL's
            ``Image.MAX_IMAGE_PIXELS`` (a decompression bomb: a tiny file that would fill the memory).
    """
    try:
        with Image.open(path) as im:
            width, height = im.size
            if width * height == 0:
                raise OSError(f"the image is {width}x{height} pixels")
            if Image.MAX_IMAGE_PIXELS and width * height > Image.MAX_IMAGE_PIXELS:
                raise OSError(
                    f"the image is {width}x{height} pixels, over PIL's limit of {Image.MAX_IMAGE_PIXELS} (a "
                    "decompression bomb?); raise PIL.Image.MAX_IMAGE_PIXELS if the file is trusted"
                )
            return im.convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path}") from None
    except (OSError, Image.DecompressionBombError) as err:
        raise OSError(f"cannot read image {path}: {err}") from err


def check_files_exist(paths: Sequence[str | Path], what: str = "image") -> None:
    """Raise one error listing how many files are missing and the first few, before any work starts."""
    missing = [str(p) for p in paths if not Path(p).is_file()]
    if missing:
        first = "\n  ".join(missing[:5])
        raise FileNotFoundError(f"{len(missing)} of {len(paths)} {what} files are missing, e.g.:\n  {first}")

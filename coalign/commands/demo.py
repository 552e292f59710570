"""``coalign demo``: try a model in the browser over an index (a Gradio app on 127.0.0.1).

The page searches an index built by ``coalign index`` the way ``coalign search`` does: a reference image (uploaded,
or picked from a gallery of the indexed images), a modification text and a top-k slider give a grid of the best
matches, each captioned with its rank, score and file name relative to the index's image folder. The model is
loaded once, when the command starts, and checked against the index before the page is served.

:class:`DemoSearch` is the search behind the page, a plain callable that the tests call without a browser;
:func:`build_app` builds the ``gradio.Blocks`` (which a test or a notebook may launch itself); :func:`demo` is the
command, parsed by :func:`coalign.command.run_command` like ``coalign search``.

Nothing leaves the machine unless asked: the server binds to 127.0.0.1, Gradio's analytics are off
(``GRADIO_ANALYTICS_ENABLED=False`` before Gradio is imported, ``analytics_enabled=False``), ``--share`` (a public
link through Gradio's servers) is off. The page is sent downscaled copies of the images it shows, never a path into
the image folder, so the server exposes no file that the page does not show.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

import coalign

from ..command import UserError, run_command
from ..io import load_image
from .search import _load_model

__all__ = ["DemoSearch", "build_app", "demo", "demo_command", "picker_rows"]

_EPILOG = """\
Open the printed URL in a browser. Upload a reference image or pick one from the indexed images, type how it
should change, press Enter or Search. A reference picked from the index is left out of its own results (as in
`coalign search`). The server listens on 127.0.0.1 only unless --host says otherwise; Ctrl-C stops it.

examples:
  coalign demo --index ~/photos.index
  coalign demo --index shop.index --port 8080 --top_k 20 --device cuda
  coalign demo --index shop.index --host 0.0.0.0 --port 7860   (reachable from other machines: take care)
"""

#: the longest side, in pixels, of the images the page is sent: picker thumbnails, result tiles, a picked reference
THUMBNAIL_SIZE = 160
RESULT_SIZE = 384
REFERENCE_SIZE = 1024
#: a missing or unreadable file (moved or deleted since indexing) is shown as a grey tile
_GREY = (200, 200, 200)
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _gradio():
    """Import Gradio with its analytics off, or say how to install it."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # read when Gradio is imported: nothing may reach the network
    try:
        # reason: gradio is an optional extra (coalign[demo]) that takes seconds to import; only this command uses it
        import gradio as gr
    except ImportError as err:
        raise UserError(f'coalign demo needs gradio ({err}): pip install "coalign[demo]"') from None
    return gr


def picker_rows(count: int, limit: int) -> list[int]:
    """The rows of an index of ``count`` images shown in the picker: all of them, or ``limit`` evenly spaced ones.

    Evenly spaced rows (0, n/limit, 2n/limit, ...) cover the whole folder, not just its first subfolder, and are the
    same on every start.
    """
    if limit < 1:
        raise ValueError(f"the picker must show at least 1 image, got {limit}")
    if count <= limit:
        return list(range(count))
    return [i * count // limit for i in range(limit)]


def _tile(path: Path, size: int) -> Image.Image:
    """The image at ``path`` shrunk to at most ``size`` pixels a side (a grey tile when it cannot be read)."""
    try:
        with Image.open(path) as im:
            im.draft("RGB", (size, size))  # a JPEG decodes straight at a reduced scale: fast for big photos
            tile = im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError):
        return Image.new("RGB", (size, size), _GREY)
    tile.thumbnail((size, size))
    return tile


class DemoSearch:
    """The search behind the page: a reference image and a text, ranked over the index with a model loaded once.

    Args:
        index: the opened index.
        model: the model that built it (checked here, so a wrong one fails before the page is served).
        top_k: the default number of results.
    """

    def __init__(self, index: coalign.Index, model, top_k: int = 10):
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        index.check_model(model)
        self.index, self.model, self.top_k = index, model, top_k
        self._lock = threading.Lock()  # one forward pass at a time, whatever the server's concurrency

    def reference(self, image: str | Path | Image.Image | None, picked: str | None) -> str | Path | Image.Image:
        """The query image: the picked indexed image (by path, so that it is excluded) or the given one.

        Raises:
            ValueError: neither an image nor a pick (said in words a page can show).
        """
        if picked:
            if picked not in self.index.paths:
                raise ValueError(f"{picked} is not an image of this index; pick another or upload an image")
            return self.index.root / picked
        if image is None:
            raise ValueError("no reference image: upload one or pick one from the indexed images below")
        return image

    def rank(
        self, image: str | Path | Image.Image | None, text: str | None, k: int | None = None, picked: str | None = None
    ) -> list[tuple[str, float]]:
        """:meth:`coalign.Index.search` for the page: ``[(image path, score), ...]``, best first.

        Args:
            image: the reference image (a PIL image or a path; an upload is never excluded from the results).
            text: the modification text.
            k: number of results (default: ``top_k``), at most the index's size.
            picked: a path of ``index.paths`` chosen as the reference; it is then the query and is left out of the
                results, as ``coalign search`` leaves out an indexed query image.

        Raises:
            ValueError: no reference image, an empty text or a bad ``k``.
        """
        query = self.reference(image, picked)
        text = (text or "").strip()
        if not text:
            raise ValueError('no modification text: say how the reference should change, e.g. "the same one in red"')
        k = self.top_k if k is None else int(k)
        if k < 1:
            raise ValueError(f"top-k must be at least 1, got {k}")
        with self._lock:
            return self.index.search(self.model, query, text, k=min(k, len(self.index)), exclude_query=True)

    def caption(self, rank: int, path: str, score: float) -> str:
        """``"1 · 0.8312 · shoes/red.jpg"``: rank, score (4 decimals), file name relative to the index's folder."""
        return f"{rank} · {score:.4f} · {self.relative(path)}"

    def relative(self, path: str | Path) -> str:
        """``path`` relative to the index's image folder (as ``index.paths`` names it), else unchanged."""
        try:
            return Path(path).relative_to(self.index.root).as_posix()
        except ValueError:
            return str(path)

    def __call__(
        self, image: str | Path | Image.Image | None, text: str | None, k: int | None = None, picked: str | None = None
    ) -> list[tuple[Image.Image, str]]:
        """The results gallery's items: ``(downscaled image, caption)`` per result, best first (see :meth:`rank`)."""
        ranked = self.rank(image, text, k, picked)
        return [(_tile(Path(p), RESULT_SIZE), self.caption(i, p, s)) for i, (p, s) in enumerate(ranked, 1)]


def build_app(
    index: coalign.Index,
    model,
    top_k: int = 10,
    *,
    model_name: str | None = None,
    picker_size: int = 200,
) -> Any:  # a gradio.Blocks, untyped: jsonargparse runs TYPE_CHECKING imports, and --help must not load gradio
    """The demo page (a ``gradio.Blocks``) over ``index`` with ``model`` (loaded by the caller, once); launch it with
    ``.launch()``.

    Args:
        index: the opened index.
        model: the model that built it (checked).
        top_k: the slider's starting value.
        model_name: shown in the status line (default: the name the index records).
        picker_size: at most this many indexed images are offered as references (evenly spaced through the index;
            the page says so when it shows fewer than all).

    Elements a script can find by id: ``reference`` (the image input), ``modification`` (the text), ``top_k``,
    ``search`` (the button), ``results`` (the ranked gallery), ``picked`` (which indexed image is the reference),
    ``picker`` (the indexed images), ``status``.
    """
    gr = _gradio()
    searcher = DemoSearch(index, model, top_k)
    name = model_name or index.model_name or "unnamed"
    rows = picker_rows(len(index), picker_size)
    shown = [index.paths[i] for i in rows]
    thumbnails = [(_tile(index.root / p, THUMBNAIL_SIZE), p) for p in shown]
    if len(shown) < len(index):
        picker_note = (
            f"Showing {len(shown)} of {len(index):,} indexed images (evenly spaced through the index); "
            "upload an image above to use any other."
        )
    else:
        picker_note = f"All {len(index):,} indexed images; click one to make it the reference."
    slider_max = max(top_k, min(len(index), 50))

    def run(image: Image.Image | None, text: str | None, k: float, picked: str | None) -> list[tuple[Any, str]]:
        try:
            return searcher(image, text, int(k), picked)
        except (ValueError, OSError) as err:  # bad input, an unreadable reference: one line in the page
            raise gr.Error(str(err), print_exception=False) from None
        except Exception as err:  # noqa: BLE001  any other failure is a message in the page, never a traceback
            print(f"coalign demo: search failed: {type(err).__name__}: {err}", file=sys.stderr)
            raise gr.Error(f"search failed: {type(err).__name__}: {err}", print_exception=False) from None

    def pick(event) -> tuple[Image.Image, str, str]:
        path = shown[event.index]
        try:
            image = load_image(index.root / path)
        except OSError as err:  # moved or deleted since indexing
            raise gr.Error(str(err), print_exception=False) from None
        image.thumbnail((REFERENCE_SIZE, REFERENCE_SIZE))  # only shown: the search reads the indexed file itself
        return image, path, f"Reference: **{path}** (from the index; left out of its own results)"

    # Gradio passes the clicked item to a parameter annotated gr.SelectData; a string annotation (this module's
    # `from __future__ import annotations`) naming a local could not be resolved, so it is given as the class
    pick.__annotations__ = {"event": gr.SelectData}

    def forget() -> tuple[None, str]:
        return None, ""

    # the images sent to the page are copied into Gradio's cache: those older than an hour go, and all at close
    with gr.Blocks(title="coalign demo", analytics_enabled=False, delete_cache=(3600, 3600)) as app:
        gr.Markdown("### coalign: search the index by a reference image and a text")
        gr.Markdown(f"{len(index):,} images · model {name}", elem_id="status")
        picked = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1, min_width=280):
                reference = gr.Image(
                    label="reference image",
                    type="pil",
                    format="png",  # lossless: the model sees the pixels that were uploaded
                    sources=["upload", "clipboard"],
                    height=260,
                    elem_id="reference",
                )
                picked_note = gr.Markdown("", elem_id="picked")
                text = gr.Textbox(
                    label="modification text",
                    placeholder='how the reference should change, e.g. "the same dress in red"',
                    lines=1,
                    elem_id="modification",
                )
                k = gr.Slider(1, slider_max, value=min(top_k, slider_max), step=1, label="top-k", elem_id="top_k")
                button = gr.Button("Search", variant="primary", elem_id="search")
            with gr.Column(scale=3):
                results = gr.Gallery(
                    label="results (rank · score · file)",
                    columns=5,
                    height="auto",
                    object_fit="contain",
                    elem_id="results",
                )
        gr.Markdown(f"**Or pick a reference from the index.** {picker_note}")
        picker = gr.Gallery(
            value=thumbnails,
            label="indexed images",
            columns=10,
            height="auto",
            allow_preview=False,
            interactive=False,
            elem_id="picker",
        )
        picker.select(pick, None, [reference, picked, picked_note])
        reference.upload(forget, None, [picked, picked_note])  # an upload replaces a picked reference
        reference.clear(forget, None, [picked, picked_note])
        gr.on([button.click, text.submit], run, [reference, text, k, picked], results)
    return app


def _serve(app: Any, host: str, port: int, share: bool, wait: Callable[[], None]) -> None:
    """Launch ``app``, print where it listens, ``wait`` (until Ctrl-C) and close it."""
    app.launch(
        server_name=host,
        server_port=port,
        share=share,
        prevent_thread_lock=True,
        quiet=True,
        ssr_mode=False,  # no Node.js server beside the Python one
        mcp_server=False,
        pwa=False,
    )
    try:
        print(f"coalign demo: open {app.local_url} in a browser (Ctrl-C stops the server)", flush=True)
        if share and app.share_url:
            print(f"coalign demo: public link (through Gradio's servers): {app.share_url}", flush=True)
        wait()
    except KeyboardInterrupt:
        print("coalign demo: stopping", file=sys.stderr)
    finally:
        app.close(verbose=False)


def _wait_forever() -> None:
    while True:
        time.sleep(1)  # the server runs in its own threads; the main thread only waits for Ctrl-C


def demo(
    index: Path,
    port: int = 7860,
    host: str = "127.0.0.1",
    model: str | None = None,
    top_k: int = 10,
    device: str | None = None,
    share: bool = False,
    picker_size: int = 200,
) -> int:
    """Search an index in the browser: upload or pick a reference image, type a change, see the top matches.

    Args:
        index: an index folder written by `coalign index`.
        port: the port to serve on.
        host: the address to listen on; 127.0.0.1 (the default) is this machine only, 0.0.0.0 every network.
        model: default: the model recorded in the index; otherwise a registered model name, a save_pretrained
            folder, a Lightning .ckpt file or a Hub id (owner/name). Loaded once, at start.
        top_k: the number of results the page starts with (a slider changes it).
        device: cpu, cuda, ... (default: cuda when available).
        share: also make a public link through Gradio's servers (needs the internet; anyone with it can search).
        picker_size: at most this many indexed images are offered as references (evenly spaced; uploads take any).
    """
    _gradio()  # a missing gradio is said before the model loads
    opened = coalign.Index.load(index)
    spec = model or opened.model_name
    if not spec:
        raise ValueError("the index records no model name; pass --model")
    encoder = _load_model(spec, device, "demo")
    opened.check_model(encoder)
    app = build_app(opened, encoder, top_k, model_name=spec, picker_size=picker_size)
    if host not in _LOOPBACK:
        print(f"coalign demo: note: listening on {host}: whoever reaches it sees the index's images", file=sys.stderr)
    _serve(app, host, port, share, _wait_forever)
    return 0


def demo_command(argv: list[str]) -> int:
    """``coalign demo --index DIR [--port 7860] [--host 127.0.0.1]``; returns the exit code."""
    return run_command(demo, argv, prog="coalign demo", epilog=_EPILOG)

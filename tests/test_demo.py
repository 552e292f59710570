"""`coalign demo`: the search behind the page, the command, and the page itself driven in headless Chromium.

The browser test uses Debian's chromium (`/usr/bin/chromium`, installed by .ci/run) through Playwright, never a
browser that Playwright downloads. Without chromium, Playwright or Gradio the browser tests are skipped, except on
CI (`CI=true`), where they fail: CI installs all three.
"""

from __future__ import annotations

import importlib.util
import os
import random
import re
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import torch
from PIL import Image

import coalign.commands.demo as demo_module
from coalign import CoAlign, Index, create_model
from coalign.cli import main
from coalign.commands.demo import DemoSearch, build_app, demo_command, picker_rows

TEXT = "make the square red"
CHROMIUM = Path("/usr/bin/chromium")
# Chromium with nothing that phones home (no QUIC, updates, sync or background fetches) and no GPU
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _tiny(seed: int = 0) -> CoAlign:
    torch.manual_seed(seed)
    return create_model("coalign_tiny", channels=8, embed_dim=32, text_layers=1).eval()


def _picture(rng: random.Random, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (40, 36), tuple(rng.randrange(256) for _ in range(3)))
    image.paste(tuple(rng.randrange(256) for _ in range(3)), (rng.randrange(20), rng.randrange(20), 30, 30))
    image.save(path)
    return path


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    """A tiny model saved to a folder, 12 images (some in a subfolder) indexed by it, and a query image outside."""
    tmp = tmp_path_factory.mktemp("demo")
    rng = random.Random(0)
    root = tmp / "photos"
    for i in range(12):
        _picture(rng, root / ("sub" if i % 3 == 0 else "") / f"img{i:02d}.png")
    query = _picture(rng, tmp / "query.png")
    model = _tiny()
    model.save_pretrained(tmp / "model")
    index = Index.build(model, root, tmp / "photos.index", model_name=str(tmp / "model"), progress=False)
    return index, model, query


def _captions(index: Index, results: list[tuple[str, float]]) -> list[str]:
    """What the page must show under each result: rank, score (4 decimals), file name relative to the folder."""
    return [f"{r} · {s:.4f} · {Path(p).relative_to(index.root).as_posix()}" for r, (p, s) in enumerate(results, 1)]


def _self_matching(index: Index, model: CoAlign, k: int) -> str:
    """An indexed image that is among its own top k when not left out (so that leaving it out shows)."""
    for path in index.paths:
        kept = index.search(model, index.root / path, TEXT, k, exclude_query=False)
        if str(index.root / path) in [p for p, _ in kept]:
            return path
    raise AssertionError(f"no indexed image is among its own top {k}")


def _need(module: str) -> None:
    """Skip when ``module`` is missing (fail on CI, which installs it)."""
    if importlib.util.find_spec(module) is None:
        _missing(f"{module} is not installed (pip install -e '.[dev]')")


def _missing(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}: CI must install it (.ci/run)")
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


# -- the search behind the page (no Gradio, no browser) ---------------------------------------------------------


def test_the_search_callback_is_index_search_and_leaves_out_a_picked_reference(indexed):
    index, model, query = indexed
    searcher = DemoSearch(index, model, top_k=4)
    with Image.open(query) as im:
        uploaded = im.convert("RGB")
    expected = index.search(model, query, TEXT, k=4)
    assert searcher.rank(uploaded, TEXT) == expected  # the same paths and scores, in the same order
    items = searcher(uploaded, f"  {TEXT} ", 4)
    assert [caption for _, caption in items] == _captions(index, expected)
    assert all(isinstance(tile, Image.Image) and max(tile.size) <= demo_module.RESULT_SIZE for tile, _ in items)
    assert len(searcher.rank(uploaded, TEXT, 50)) == len(index)  # k is capped at the index's size

    picked = _self_matching(index, model, 5)
    ranked = searcher.rank(None, TEXT, 5, picked=picked)
    assert ranked == index.search(model, index.root / picked, TEXT, k=5)
    assert str(index.root / picked) not in [p for p, _ in ranked] and len(ranked) == 5
    # the picked image wins over whatever the image input holds; an upload of the same pixels is not left out
    assert searcher.rank(uploaded, TEXT, 5, picked=picked) == ranked
    with Image.open(index.root / picked) as im:
        copy = im.convert("RGB")
    assert str(index.root / picked) in [p for p, _ in searcher.rank(copy, TEXT, len(index))]

    with pytest.raises(ValueError, match="no reference image: upload one or pick one"):
        searcher(None, TEXT, 3)
    for empty in ("", "   ", None):
        with pytest.raises(ValueError, match="no modification text"):
            searcher(uploaded, empty, 3)
    with pytest.raises(ValueError, match="top-k must be at least 1"):
        searcher(uploaded, TEXT, 0)
    with pytest.raises(ValueError, match="nope.png is not an image of this index"):
        searcher(None, TEXT, 3, picked="nope.png")
    with pytest.raises(ValueError, match="built by another model"):
        DemoSearch(index, _tiny(3))  # refused before any page is served


def test_the_picker_shows_evenly_spaced_rows_of_a_big_index():
    assert picker_rows(7, 200) == list(range(7))
    rows = picker_rows(1000, 200)
    assert rows[:3] == [0, 5, 10] and rows[-1] == 995 and len(set(rows)) == 200
    assert picker_rows(201, 200)[-1] == 199 and len(set(picker_rows(201, 200))) == 200
    with pytest.raises(ValueError, match="at least 1"):
        picker_rows(10, 0)


# -- the command ----------------------------------------------------------------------------------------------


def test_demo_help_lists_its_options_with_examples_and_imports_no_gradio():
    code = """
import sys
from coalign.cli import main
try:
    code = main(["demo", "--help"])
except SystemExit as exit_:
    code = exit_.code or 0
print("EXIT", code, "GRADIO", "gradio" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    assert "EXIT 0 GRADIO False" in out  # the help answers without loading gradio
    for option in ("--index", "--port", "--host", "--top_k", "--model", "--share"):
        assert option in out
    assert "examples:" in out and "coalign demo --index" in out and "127.0.0.1" in out


def test_without_gradio_the_command_says_how_to_install_it(indexed, monkeypatch, capsys):
    index, _, _ = indexed
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` now raises ImportError
    assert main(["demo", "--index", str(index.directory)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("coalign demo: error:") and 'pip install "coalign[demo]"' in err[0]


def test_the_command_serves_the_index_on_localhost_and_stops_on_ctrl_c(indexed, monkeypatch, capsys):
    _need("gradio")
    index, _, _ = indexed
    port = _free_port()
    pages = []

    def visit_then_ctrl_c() -> None:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=20) as response:
            pages.append(response.read().decode())
        raise KeyboardInterrupt

    monkeypatch.setattr(demo_module, "_wait_forever", visit_then_ctrl_c)
    assert demo_command(["--index", str(index.directory), "--port", str(port), "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert f"open http://127.0.0.1:{port}/ in a browser" in captured.out and "stopping" in captured.err
    assert pages and "12 images · model " in pages[0] and str(index.root) not in pages[0]
    assert _port_is_free(port)  # closed on Ctrl-C
    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"
    # a wrong model is refused before anything is served
    other = index.directory.parent / "other_model"
    _tiny(3).save_pretrained(other)
    args = ["--index", str(index.directory), "--model", str(other), "--port", str(port), "--device", "cpu"]
    assert demo_command(args) == 2
    assert "built by another model" in capsys.readouterr().err


def test_a_big_index_is_offered_in_part_and_the_page_says_so(indexed):
    _need("gradio")
    index, model, _ = indexed
    app = build_app(index, model, top_k=3, picker_size=5)
    blocks = app.blocks.values()
    notes = [b.value for b in blocks if type(b).__name__ == "Markdown" and "Showing" in str(b.value)]
    assert notes and "Showing 5 of 12 indexed images" in notes[0]
    (picker,) = [b for b in blocks if getattr(b, "elem_id", None) == "picker"]
    shown = [item["caption"] for item in picker.value]
    assert shown == [index.paths[i] for i in picker_rows(12, 5)]


# -- the page in a real browser -------------------------------------------------------------------------------


def test_the_page_in_headless_chromium(indexed, tmp_path):
    if not CHROMIUM.is_file():
        _missing(f"{CHROMIUM} is missing (apt-get install chromium)")
    _need("playwright")
    _need("gradio")
    from playwright.sync_api import expect, sync_playwright

    index, model, query = indexed
    k = 5
    uploaded = _captions(index, index.search(model, query, TEXT, k=k))
    picked = _self_matching(index, model, k)  # a reference from the index that its results must leave out
    from_index = _captions(index, index.search(model, index.root / picked, TEXT, k=k))
    assert picked not in [caption.split(" · ")[2] for caption in from_index]

    app = build_app(index, model, top_k=k)
    port = _free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 1000})
                page.set_default_timeout(20_000)
                page.goto(f"http://127.0.0.1:{port}/")
                expect(page.locator("#status")).to_contain_text("12 images · model ")
                results = page.locator("#results .caption-label")

                # no reference yet: a message in the page, no results
                page.locator("#modification textarea").fill(TEXT)
                page.locator("#search").click()
                expect(page.get_by_text("no reference image: upload one or pick one")).to_be_visible()
                page.screenshot(path=tmp_path / "0-no-reference.png", full_page=True)
                assert results.count() == 0

                # an uploaded reference: the ranking of Index.search, with scores and file names
                page.locator("#reference input[type=file]").set_input_files(str(query))
                expect(page.locator("#reference img")).to_be_visible()
                page.locator("#search").click()
                expect(results).to_have_text(uploaded)
                page.screenshot(path=tmp_path / "1-uploaded.png", full_page=True)

                # a reference picked from the index (Enter in the text box searches): left out of its results
                page.locator("#picker").get_by_text(picked, exact=True).click()
                expect(page.locator("#picked")).to_contain_text(picked)
                page.locator("#modification textarea").press("Enter")
                expect(results).to_have_text(from_index)
                page.screenshot(path=tmp_path / "2-picked.png", full_page=True)
                assert picked not in [text.split(" · ")[2] for text in results.all_inner_texts()]
            finally:
                browser.close()
    finally:
        app.close()
    assert all((tmp_path / name).stat().st_size > 0 for name in ("0-no-reference.png", "1-uploaded.png"))
    assert re.fullmatch(r"1 · -?\d+\.\d{4} · \S+", uploaded[0])

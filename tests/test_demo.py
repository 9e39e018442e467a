"""The Gradio demo: geometry, highlighting and input checks without a browser, then the app end to end in Chromium."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import vtokprune.demo
from vtokprune.demo import (
    CHROMIUM,
    CHROMIUM_ARGS,
    MAX_PIXELS,
    UNPRUNED,
    Comparer,
    DemoInputError,
    Outcome,
    PatchGrid,
    build_parser,
    check_question,
    highlight,
    load_upload,
    model_view,
    patch_grid,
    render_results,
    tiny_pixels,
)
from vtokprune.testing import tiny_llava

# ------------------------------------------------------------------------------------------------ highlighting


def test_highlight_dims_exactly_the_pruned_cells():
    view = Image.new("RGB", (40, 40), (200, 100, 50))
    out = np.asarray(highlight(view, [0, 5, 15], rows=4, cols=4, dim=0.75)).astype(int)
    for t in range(16):
        r, c = divmod(t, 4)
        cell = out[r * 10 : (r + 1) * 10, c * 10 : (c + 1) * 10]
        expected = (200, 100, 50) if t in (0, 5, 15) else (50, 25, 12)
        assert (np.abs(cell - np.array(expected)) <= 1).all(), t


def test_highlight_accepts_tensors_keeps_all_for_none_and_rejects_bad_indices():
    view = Image.new("RGB", (30, 20), (90, 90, 90))
    same = highlight(view, torch.tensor([0, 1, 2, 3, 4, 5]), rows=2, cols=3)
    assert np.array_equal(np.asarray(same), np.asarray(view))
    assert np.array_equal(np.asarray(highlight(view, None, 2, 3)), np.asarray(view))
    with pytest.raises(ValueError, match="outside"):
        highlight(view, [6], rows=2, cols=3)
    with pytest.raises(ValueError, match="outside"):
        PatchGrid((0, 0, 1, 1), 2, 3).cell(-1)
    assert PatchGrid((0, 0, 1, 1), 2, 3).cell(4) == (1, 1)


def test_patch_grid_follows_resize_crop_and_pad():
    class Clip:  # LLaVA-1.5's CLIP processor: shortest edge 336, centre crop 336
        do_resize, do_center_crop, do_pad = True, True, False
        size = {"shortest_edge": 336}
        crop_size = {"height": 336, "width": 336}

    g = patch_grid((672, 336), 336, 14, Clip())
    assert (g.rows, g.cols) == (24, 24)
    assert g.box == pytest.approx((168, 0, 504, 336))
    g = patch_grid((300, 900), 336, 14, Clip())  # portrait: the middle square
    assert g.box == pytest.approx((0, 300, 300, 600))

    class Padded(Clip):  # LLaVA's do_pad: square first, so the whole picture is seen
        do_pad = True

    assert patch_grid((400, 200), 336, 14, Padded()).box == pytest.approx((0, -100, 400, 300))

    class Fixed:  # resize straight to height x width: the whole picture, squashed
        do_resize, do_center_crop = True, False
        size = {"height": 224, "width": 224}

    assert patch_grid((640, 480), 224, 16, Fixed()).box == pytest.approx((0, 0, 640, 480))
    # no processor: the demo's own shortest-edge resize and centre crop
    assert patch_grid((100, 50), 56, 14).box == pytest.approx((25, 0, 75, 50))


def test_token_cells_land_where_the_real_processor_puts_them():
    """Paint one patch cell of the original picture red; the processor's pixels must show it in that token's patch."""
    from vtokprune.toyworld import build_processor
    from vtokprune.toyworld.scenes import GRID, IMAGE_SIZE, PATCH

    ip = build_processor().image_processor
    picture = Image.new("RGB", (500, 300), (30, 30, 30))
    grid = patch_grid(picture.size, IMAGE_SIZE, PATCH, ip)
    left, top, right, bottom = grid.box
    r, c = 5, 11
    cw, ch = (right - left) / grid.cols, (bottom - top) / grid.rows
    ImageDraw.Draw(picture).rectangle(
        (left + c * cw + 2, top + r * ch + 2, left + (c + 1) * cw - 3, top + (r + 1) * ch - 3), fill=(255, 0, 0)
    )
    pixels = torch.as_tensor(np.asarray(ip(images=picture, return_tensors="pt")["pixel_values"]))[0]
    red = pixels[0] - pixels[1]  # normalised red minus green: high only on the painted patch
    per_patch = red.reshape(GRID, PATCH, GRID, PATCH).mean(dim=(1, 3)).flatten()
    assert int(per_patch.argmax()) == r * grid.cols + c
    view = np.asarray(model_view(picture, grid, width=GRID * 10)).astype(int)
    cell = view[r * 10 + 3 : (r + 1) * 10 - 3, c * 10 + 3 : (c + 1) * 10 - 3]
    assert (cell[..., 0] > 200).all() and (cell[..., 1] < 60).all()


def test_model_view_pads_with_grey_and_keeps_size():
    picture = Image.new("RGB", (400, 200), (255, 255, 255))
    view = model_view(picture, PatchGrid((0, -100, 400, 300), 24, 24), width=100)
    assert view.size == (100, 100)
    arr = np.asarray(view)
    assert tuple(arr[5, 50]) == (124, 116, 104) and tuple(arr[50, 50]) == (255, 255, 255)


# ----------------------------------------------------------------------------------------------- input checks


def _png(path, size=(32, 24), mode="RGB"):
    Image.new(mode, size).save(path)
    return str(path)


def _write(path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def test_load_upload_accepts_an_image(tmp_path):
    pic = load_upload(_png(tmp_path / "a.png", mode="L"))
    assert pic.mode == "RGB" and pic.size == (32, 24)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: None, "Upload an image"),
        (lambda p: str(p / "missing.png"), "could not be read"),
        (lambda p: _write(p / "e.png", b""), "empty"),
        (lambda p: _write(p / "t.png", b"not a picture at all"), "not an image"),
    ],
)
def test_load_upload_refuses_with_a_message(tmp_path, make, message):
    with pytest.raises(DemoInputError, match=message):
        load_upload(make(tmp_path))


def test_load_upload_refuses_large_files_before_reading_them(tmp_path):
    path = tmp_path / "big.jpg"
    with open(path, "wb") as f:
        f.truncate(21 * 1024 * 1024)
    with pytest.raises(DemoInputError, match="21.0 MB.*20 MB"):
        load_upload(str(path))


def test_load_upload_refuses_more_than_20_megapixels(tmp_path):
    path = _png(tmp_path / "huge.png", size=(5000, MAX_PIXELS // 5000 + 1), mode="1")
    assert os.path.getsize(path) < 20 * 1024 * 1024
    with pytest.raises(DemoInputError, match="20 MP"):
        load_upload(path)


def test_load_upload_refuses_decompression_bombs_and_truncated_files(tmp_path, monkeypatch):
    path = _png(tmp_path / "bomb.png", size=(100, 100))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(DemoInputError, match="too many pixels"):
        load_upload(path)
    monkeypatch.undo()
    full = tmp_path / "full.jpg"
    Image.effect_noise((200, 200), 60).convert("RGB").save(full, quality=95)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(full.read_bytes()[:2000])
    with pytest.raises(DemoInputError, match="not an image"):
        load_upload(str(cut))
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # as lmms-eval sets it at import
    with pytest.raises(DemoInputError, match="not an image"):
        load_upload(str(cut))
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored


def test_load_upload_refuses_absurd_aspect_ratios(tmp_path):
    """A 1x100000 PNG (a few hundred bytes) is refused, not squeezed into a black square."""
    path = _png(tmp_path / "strip.png", size=(1, 100_000), mode="1")
    assert os.path.getsize(path) < 20_000
    with pytest.raises(DemoInputError, match="1x100000 pixels.*at most 20 times"):
        load_upload(path)
    assert load_upload(_png(tmp_path / "wide.png", size=(400, 20))).size == (400, 20)  # 20:1 is still a picture


def test_examples_carry_their_right_answers_and_results_mark_them(tmp_path):
    from vtokprune.demo import _expected_answer, example_images

    examples = example_images(tmp_path)
    assert examples and all(os.path.exists(p) and q for p, q, _ in examples)
    path, question, answer = examples[0]
    assert answer  # toy-world scenes know their answer
    assert _expected_answer(examples, "/gradio/cache/abc/" + os.path.basename(path), question) == answer
    assert _expected_answer(examples, path, "another question?") is None
    outcomes = [
        Outcome("cls", answer=answer, kept=4, available=16),
        Outcome("pool", answer="zzz", kept=4, available=16),
    ]
    page = render_results(outcomes, question, expected=answer)
    assert "right answer: <b>" in page and page.count('class="vtp-mark"') == 2
    assert ">right</span>" in page and ">wrong</span>" in page
    assert "vtp-mark" not in render_results(outcomes, question)


def test_a_failing_request_shows_a_clean_message(tmp_path, monkeypatch, caplog):
    from vtokprune.demo import FAILED, answer_request

    comparer = Comparer(tiny_llava(seed=0), None, "tiny", max_new_tokens=1)

    def boom(*args, **kwargs):
        raise RuntimeError("CUDA error: device-side assert at /secret/path.py:12")

    monkeypatch.setattr(comparer, "compare", boom)
    picture = _png(tmp_path / "p.png")
    results, status = answer_request(comparer, [], picture, "what?", ["cls"], 4)
    assert results == "" and status == FAILED and "secret" not in status and "RuntimeError" not in status
    assert "secret" in caplog.text  # the details are in the server's log
    assert answer_request(comparer, [], picture, "what?", ["cls"], 0)[1].startswith("⚠️ Choose a budget")


def test_app_has_one_image_widget(tiny_comparer, tmp_path):
    gr = pytest.importorskip("gradio")
    from vtokprune.demo import build_app

    app = build_app(tiny_comparer, str(tmp_path))
    images = [b for b in app.blocks.values() if isinstance(b, gr.Image)]
    assert len(images) == 1 and images[0].elem_id == "vtp-upload"
    assert images[0].preprocess(None) is None  # the upload reaches load_upload undecoded
    assert not list(Path(vtokprune.demo.__file__).parent.glob("*.pyi"))  # Gradio wrote no stub into the package
    assert not [b for b in app.blocks.values() if isinstance(b, gr.File)]


def test_check_question():
    assert check_question("  what colour?  ") == "what colour?"
    for bad in (None, "", "   \n"):
        with pytest.raises(DemoInputError, match="Type a question"):
            check_question(bad)
    with pytest.raises(DemoInputError, match="under 500"):
        check_question("x" * 501)


def test_render_escapes_everything_shown():
    html = render_results(
        [Outcome("cls", answer="<script>alert(1)</script>", kept=4, available=16, latency_ms=3.0)], "<b>"
    )
    assert "<script>" not in html and "&lt;script&gt;" in html and "&lt;b&gt;" in html
    assert 'data-strategy="cls"' in html and "4/16" in html and "3 ms" in html


def test_cli_defaults_bind_loopback():
    args = build_parser().parse_args([])
    assert args.host == "127.0.0.1" and args.model is None
    from vtokprune.cli import build_parser as cli_parser

    assert "demo" in cli_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]


# ------------------------------------------------------------------------------------------------ comparing


@pytest.fixture(scope="module")
def tiny_comparer():
    return Comparer(tiny_llava(seed=0), None, "tiny random LLaVA", max_new_tokens=3)


def test_comparer_on_a_model_without_processor(tiny_comparer):
    c = tiny_comparer
    assert c.tokens == 16 and "text_clip" in c.skipped and "cls" in c.usable and "none" not in c.usable
    assert set(c.default_strategies) <= set(c.usable)
    px = tiny_pixels(Image.new("RGB", (120, 80), (255, 0, 0)), 56)
    assert px.shape == (1, 3, 56, 56)
    picture = Image.effect_noise((90, 70), 50).convert("RGB")
    outcomes = c.compare(picture, "what is here?", ["cls", "fastv", "pool"], keep=4)
    assert [o.name for o in outcomes] == [UNPRUNED, "cls", "fastv", "pool"]
    for o in outcomes:
        assert o.error is None and o.answer.startswith("token ids: ") and len(o.answer.split()) == 2 + 3
        assert o.latency_ms is not None and o.latency_ms > 0 and o.picture is not None
        assert (o.kept, o.available) == ((16, 16) if o.name == UNPRUNED else (4, 16))
    # a budget the model cannot meet is reported on that panel, the others still run
    outcomes = c.compare(picture, "what is here?", ["cls"], keep=17)
    assert outcomes[1].error is not None and "17" in outcomes[1].error


def test_comparer_with_a_processor():
    """The processor path, on the toy LLaVA's architecture (256 tokens, 16x16) with a random decoder."""
    from vtokprune.toyworld import build_model, build_processor

    model = build_model(text_width=32, text_layers=2, heads=2).eval()
    c = Comparer(model, build_processor(), "toy", max_new_tokens=1)
    assert c.tokens == 256 and c.default_keep == 28
    outcomes = c.compare(Image.new("RGB", (400, 300), (10, 120, 200)), "what color is the circle ?", ["random"], 28)
    assert outcomes[1].error is None and (outcomes[1].kept, outcomes[1].available) == (28, 256)
    assert outcomes[1].picture is not None and outcomes[1].picture.size == (224, 224)


# ------------------------------------------------------------------------------------------------ in a browser


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def served_app(tiny_comparer):
    pytest.importorskip("gradio", reason="gradio is not installed: pip install 'vtokprune[demo]'")
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install 'vtokprune[demo]'")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install -y chromium")
    from vtokprune.demo import launch

    port = _free_port()
    app = launch(tiny_comparer, "127.0.0.1", port, block=False)
    assert threading.active_count() > 1
    yield f"http://127.0.0.1:{port}/"
    app.close()


def test_demo_in_a_real_browser(served_app, tiny_comparer, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    picture = tmp_path / "scene.png"
    Image.effect_noise((160, 120), 60).convert("RGB").save(picture)
    fake = tmp_path / "fake.png"
    fake.write_text("this is not a picture")
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    strip = tmp_path / "strip.png"
    Image.new("1", (1, 100_000)).save(strip)
    chosen = tiny_comparer.default_strategies
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(served_app, wait_until="domcontentloaded")
            status = page.locator("#vtp-status")
            upload_note = page.locator("#vtp-upload-note")
            upload = page.locator("#vtp-upload input[type=file]")
            upload.wait_for(state="attached", timeout=30_000)
            # not an image file at all: Gradio's own file-type check answers, with the file's name
            upload.set_input_files(str(notes))
            expect(page.locator(".toast-body").first).to_contain_text("notes.txt", timeout=20_000)
            # files that are not pictures the model can take: removed, the reason right under the widget
            for not_a_picture, message in ((fake, "not an image"), (strip, "at most 20 times")):
                upload.set_input_files(str(not_a_picture))
                expect(upload_note).to_contain_text(message, timeout=20_000)
                expect(page.locator("#vtp-upload img")).to_have_count(0, timeout=20_000)
            upload.set_input_files(str(picture))
            expect(upload_note).not_to_contain_text("⚠️", timeout=20_000)
            expect(page.locator("#vtp-upload img")).to_be_visible(timeout=20_000)  # the picture itself, once
            # no question yet
            page.locator("#vtp-run").click()
            expect(status).to_contain_text("Type a question", timeout=20_000)
            page.locator("#vtp-question textarea").fill("what is in the image?")
            page.locator("#vtp-run").click()
            cards = page.locator(".vtp-card")
            expect(cards).to_have_count(len(chosen) + 1, timeout=60_000)
            keep = tiny_comparer.default_keep
            for name in [UNPRUNED, *chosen]:
                card = page.locator(f'.vtp-card[data-strategy="{name}"]')
                expect(card.locator(".vtp-answer")).to_contain_text("token ids:")
                expected = "16/16" if name == UNPRUNED else f"{keep}/16"
                expect(card.locator(".vtp-kept")).to_have_text(expected)
                expect(card.locator(".vtp-latency")).to_contain_text(" ms")
                assert card.locator("img.vtp-picture").evaluate("img => img.naturalWidth") == 224
            assert "Traceback" not in page.content()
            # an example sets both the picture and the question
            page.locator("#vtp-run").scroll_into_view_if_needed()
            page.get_by_text(".png: ").first.click()
            expect(page.locator("#vtp-question textarea")).not_to_have_value("what is in the image?")
            question = page.locator("#vtp-question textarea").input_value()
            page.locator("#vtp-run").click()
            expect(page.locator(".vtp-question")).to_contain_text(question, timeout=60_000)
            expect(cards).to_have_count(len(chosen) + 1)
            expect(page.locator(".vtp-expected")).to_be_visible()  # the example's right answer, and a mark per card
            expect(page.locator(".vtp-mark")).to_have_count(len(chosen) + 1)
        finally:
            browser.close()

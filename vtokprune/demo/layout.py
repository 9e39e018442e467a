"""The Gradio app around a `Comparer`: example scenes, one Compare click -> results HTML, the page layout, launch
and the `vtokprune demo` command."""

from __future__ import annotations

import argparse
import html
import ipaddress
import logging
import os
import tempfile
from collections.abc import Sequence
from typing import Any

from PIL import Image

from .comparison import Comparer
from .inputs import MAX_BYTES, DemoInputError, check_question, load_upload
from .rendering import render_results

log = logging.getLogger("vtokprune.demo")

# Headless Chromium for the screenshot script and the browser test: Debian's build, no network side traffic.
CHROMIUM = os.environ.get("VTOKPRUNE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def example_images(folder: str | os.PathLike[str]) -> list[tuple[str, str, str | None]]:
    """(image path, question, right answer or None) written into `folder`: toy-world scenes when available (their
    answers are known), else a drawn picture."""
    os.makedirs(folder, exist_ok=True)
    out: list[tuple[str, str, str | None]] = []
    try:
        from ..toyworld import make_questions, make_scene, render

        for seed in (1001, 1002, 1003):
            scene = make_scene(seed)
            qs = make_questions(scene, 1)
            path = os.path.join(folder, f"scene-{seed}.png")
            render(scene).save(path)
            out.append((path, qs[0].question, qs[0].answer) if qs else (path, "What is in the image?", None))
    except Exception:  # the toy world is optional; fall back to a simple drawing
        from PIL import ImageDraw

        img = Image.new("RGB", (336, 336), (236, 232, 220))
        draw = ImageDraw.Draw(img)
        draw.ellipse((40, 50, 150, 160), fill=(200, 40, 40))
        draw.rectangle((190, 180, 300, 290), fill=(40, 90, 200))
        path = os.path.join(folder, "shapes.png")
        img.save(path)
        out.append((path, "What shapes are in the image?", None))
    return out


FAILED = "⚠️ Something went wrong while running the model; the details are in the server's log."


def _handle_upload(path: str | None) -> tuple[Any, str]:
    """The upload's checks run as soon as it arrives: a refused picture is removed from the widget and the reason
    shown right under it. Returns (the widget's new value, the message)."""
    if not path:
        return None, ""
    try:
        load_upload(path)
    except DemoInputError as e:
        return None, f"⚠️ {e}"
    return path, ""


def _raw_upload_path(payload: Any) -> str | None:
    return None if payload is None or getattr(payload, "path", None) is None else str(payload.path)


def _expected_answer(examples: Sequence[tuple[str, str, str | None]], path: str | None, question: str) -> str | None:
    """The right answer when the picture and question are one of the examples (Gradio keeps the file's name)."""
    name = os.path.basename(str(path or ""))
    for example_path, example_question, answer in examples:
        if name == os.path.basename(example_path) and question.strip() == example_question.strip():
            return answer
    return None


def answer_request(
    comparer: Comparer,
    examples: Sequence[tuple[str, str, str | None]],
    path: str | None,
    question: str | None,
    names: list[str] | None,
    keep: float | None,
) -> tuple[str, str]:
    """(results HTML, status message) for one click of Compare; never raw exception text (show_error=False)."""
    tokens = comparer.tokens or 576
    try:
        picture = load_upload(path)
        q = check_question(question)
        chosen = [n for n in (names or []) if n in comparer.usable]
        if keep is None or not 1 <= int(keep) <= tokens:
            raise DemoInputError(f"Choose a budget between 1 and {tokens} tokens.")
        outcomes = comparer.compare(picture, q, chosen, int(keep))
    except DemoInputError as e:
        return "", f"⚠️ {e}"
    except Exception:  # the user sees a clean message; the traceback goes to the server's log
        log.exception("demo request failed")
        return "", FAILED
    note = "" if chosen else "No strategy chosen: showing the unpruned model only."
    return render_results(outcomes, q, _expected_answer(examples, path, q)), note


def build_app(comparer: Comparer, examples_dir: str | None = None) -> Any:
    """The Gradio Blocks app around `comparer` (not launched)."""
    import gradio as gr

    tokens = comparer.tokens or 576
    examples = example_images(examples_dir or tempfile.mkdtemp(prefix="vtokprune-demo-"))

    def run(path: str | None, question: str | None, names: list[str] | None, keep: float | None) -> tuple[str, str]:
        return answer_request(comparer, examples, path, question, names, keep)

    skipped = "".join(f"\n- `{name}`: {html.escape(reason)}" for name, reason in sorted(comparer.skipped.items()))
    with gr.Blocks(title="vtokprune demo", analytics_enabled=False) as app:
        gr.Markdown(
            "## vtokprune: which visual tokens does each strategy keep?\n"
            f"Model: **{html.escape(comparer.description)}** ({tokens} visual tokens per image). "
            "Upload a picture or pick an example, ask a question, and compare the answers, kept tokens and latency of "
            "each pruning strategy with the unpruned model. Pruned patches are dimmed."
        )
        with gr.Row():
            with gr.Column(scale=1, min_width=300):
                upload = gr.Image(
                    label="Image (PNG, JPEG, WebP; up to 20 MB and 20 MP)",
                    type="filepath",
                    sources=["upload", "clipboard"],
                    height=240,
                    elem_id="vtp-upload",
                )
                # Gradio would open the upload with PIL first; hand over the file untouched instead, so that every
                # check in `load_upload` runs, with its message, before anything is decoded. (An instance attribute:
                # subclassing a Gradio component makes Gradio write a .pyi stub beside this module.)
                upload.preprocess = _raw_upload_path  # type: ignore[method-assign]
                upload_note = gr.Markdown(elem_id="vtp-upload-note")
                question = gr.Textbox(label="Question", placeholder="What is in the image?", elem_id="vtp-question")
                strategies = gr.CheckboxGroup(
                    choices=comparer.usable,
                    value=comparer.default_strategies,
                    label="Strategies",
                    elem_id="vtp-strategies",
                )
                keep = gr.Slider(
                    1,
                    tokens,
                    value=comparer.default_keep,
                    step=1,
                    label=f"Budget: visual tokens kept per image (of {tokens})",
                    elem_id="vtp-keep",
                )
                button = gr.Button("Compare", variant="primary", elem_id="vtp-run")
                status = gr.Markdown(elem_id="vtp-status")  # under the button the user just pressed
                gr.Examples(
                    examples=[[p, q] for p, q, _ in examples],
                    inputs=[upload, question],
                    label="Examples (right answer in brackets)",
                    example_labels=[f"{os.path.basename(p)}: {q}" + (f" ({a})" if a else "") for p, q, a in examples],
                )
                if skipped:
                    with gr.Accordion("Strategies this model cannot run", open=False):
                        gr.Markdown(skipped)
            with gr.Column(scale=3):
                results = gr.HTML(elem_id="vtp-results")
        upload.upload(_handle_upload, inputs=upload, outputs=[upload, upload_note])  # user uploads, not examples
        upload.clear(lambda: "", outputs=upload_note)
        for event in (button.click, question.submit):
            event(run, inputs=[upload, question, strategies, keep], outputs=[results, status], concurrency_limit=1)
    return app


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vtokprune demo", description="Gradio demo: compare pruning strategies side by side."
    )
    p.add_argument("--model", default=None, help="HF model id or local path (default: the embedded model)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--max-new-tokens", type=int, default=16)
    return p


def launch(comparer: Comparer, host: str = "127.0.0.1", port: int = 7860, block: bool = True) -> Any:
    """Build and launch the app; with block=False it serves from a background thread and the app is returned."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    app = build_app(comparer)
    app.queue(default_concurrency_limit=1)
    app.launch(
        server_name=host,
        server_port=port,
        prevent_thread_lock=not block,
        show_error=False,
        ssr_mode=False,
        max_file_size=4 * MAX_BYTES,
        quiet=not block,
    )
    return app


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import gradio  # noqa: F401
    except ImportError:
        print("vtokprune demo needs Gradio: pip install 'vtokprune[demo]'")
        return 2
    from ..cli import load_model

    if not _is_loopback(args.host):
        print(f"note: binding {args.host}: the demo will be reachable from other machines")
    model, processor, description = load_model(args.model)
    comparer = Comparer(model, processor, description, max_new_tokens=args.max_new_tokens)
    comparer.warmup()
    print(f"model: {description}; strategies: {', '.join(comparer.usable)}")
    launch(comparer, args.host, args.port, block=True)
    return 0

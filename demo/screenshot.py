"""Take the README screenshot of the demo with results: python demo/screenshot.py [--out docs/demo.png] [--model ...].

Starts the app on a free localhost port, drives it in headless Chromium (Debian's /usr/bin/chromium through
Playwright), answers an example question with the default strategies, and saves a PNG of the page.
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import sys
import tempfile


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="docs/demo.png")
    p.add_argument("--model", default=None)
    p.add_argument("--max-new-tokens", type=int, default=6)
    args = p.parse_args(argv)

    from PIL import Image
    from playwright.sync_api import sync_playwright

    from vtokprune.cli import load_model
    from vtokprune.demo import CHROMIUM, CHROMIUM_ARGS, Comparer, example_images, launch

    model, processor, description = load_model(args.model)
    comparer = Comparer(model, processor, description, max_new_tokens=args.max_new_tokens)
    comparer.warmup()
    port = free_port()
    app = launch(comparer, "127.0.0.1", port, block=False)
    image, question, _ = example_images(tempfile.mkdtemp(prefix="vtokprune-shot-"))[0]
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1320, "height": 900})
            page.goto(f"http://127.0.0.1:{port}/", wait_until="domcontentloaded")
            page.locator("#vtp-upload input[type=file]").set_input_files(image)
            page.locator("#vtp-question textarea").fill(question)
            page.locator("#vtp-run").click()
            page.locator(".vtp-card").nth(len(comparer.default_strategies)).wait_for(timeout=120_000)
            page.wait_for_timeout(500)
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            shot = Image.open(io.BytesIO(page.screenshot(full_page=True))).convert("RGB")
            # a 256-colour palette keeps the README picture small (well under 300 KB)
            shot.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
                args.out, optimize=True
            )
            browser.close()
    finally:
        app.close()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

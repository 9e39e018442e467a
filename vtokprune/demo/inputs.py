"""Checks on what the user hands the demo: the uploaded picture (size, pixels, aspect, format) and the question."""

from __future__ import annotations

import os
import warnings

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from ..errors import VTokPruneError

MAX_BYTES = 20 * 1024 * 1024
MAX_PIXELS = 20_000_000
MAX_ASPECT = 20  # long side / short side: a 1x100000 "picture" is not one
MAX_QUESTION_CHARS = 500


class DemoInputError(VTokPruneError, ValueError):
    """An upload or question the demo cannot take; the message is shown to the user as is."""


# ---------------------------------------------------------------------------------------------------------- inputs


def load_upload(path: str | os.PathLike[str] | None) -> Image.Image:
    """The uploaded picture as RGB, or DemoInputError with a message for the user (size is checked before decoding)."""
    if path is None or str(path) == "":
        raise DemoInputError("Upload an image (PNG, JPEG, WebP, ...) or pick one of the examples.")
    try:
        size = os.path.getsize(path)
    except OSError:
        raise DemoInputError("The upload could not be read; please upload the image again.") from None
    if size > MAX_BYTES:
        raise DemoInputError(f"The file is {size / 2**20:.1f} MB; the demo takes images of up to 20 MB.")
    if size == 0:
        raise DemoInputError("The file is empty; please upload an image.")
    not_image = "This file is not an image the demo can read; upload a PNG, JPEG, WebP, GIF or BMP picture."
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size  # read from the header; nothing is decoded yet
                if w * h > MAX_PIXELS:
                    raise DemoInputError(
                        f"The image is {w}x{h} pixels ({w * h / 1e6:.1f} MP); the demo takes images of up to 20 MP."
                    )
                if w == 0 or h == 0:
                    raise DemoInputError(not_image)
                if max(w, h) > MAX_ASPECT * min(w, h):
                    raise DemoInputError(
                        f"The image is {w}x{h} pixels; the demo takes pictures whose long side is at most "
                        f"{MAX_ASPECT} times the short side."
                    )
                strict = ImageFile.LOAD_TRUNCATED_IMAGES
                ImageFile.LOAD_TRUNCATED_IMAGES = False  # other libraries (lmms-eval) turn this on process-wide
                try:
                    img.load()
                finally:
                    ImageFile.LOAD_TRUNCATED_IMAGES = strict
                picture = ImageOps.exif_transpose(img) or img
                return picture.convert("RGB")
    except Image.DecompressionBombError:
        raise DemoInputError("The image has far too many pixels; the demo takes images of up to 20 MP.") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        if isinstance(e, DemoInputError):
            raise
        raise DemoInputError(not_image) from None


def check_question(question: str | None) -> str:
    q = (question or "").strip()
    if not q:
        raise DemoInputError("Type a question about the image.")
    if len(q) > MAX_QUESTION_CHARS:
        raise DemoInputError(f"The question is {len(q)} characters long; keep it under {MAX_QUESTION_CHARS}.")
    return q

"""`vtokprune demo`: a Gradio app comparing what each strategy keeps, side by side with the unpruned model.

The parts that need no browser (input checks, the token -> patch-cell geometry, highlighting, running the strategies)
are plain functions, tested without Gradio; `build_app` and `main` import Gradio only when called
(`pip install 'vtokprune[demo]'`).

- `inputs.py`: checks on the upload and the question (`DemoInputError` carries the message the user sees)
- `rendering.py`: patch grid geometry, the model's view with pruned patches dimmed, the HTML result cards
- `comparison.py`: `Comparer` runs one question through the unpruned model and each strategy; `Outcome` per panel
- `layout.py`: the Gradio app, one request end to end, launch and the command line

Token index -> patch cell: a single-grid vision tower (LLaVA's CLIP) sees one square crop of the picture, cut into
rows x cols patches, and its token t is the patch at row t // cols, column t % cols. The crop is found from the
processor's own settings (pad to square, resize the shortest edge, centre crop), so the highlighted cells sit on the
part of the uploaded picture the model actually looked at.
"""

from .comparison import CLIP_MEAN, CLIP_STD, DEFAULT_STRATEGIES, UNPRUNED, Comparer, Outcome, text_ids, tiny_pixels
from .inputs import MAX_ASPECT, MAX_BYTES, MAX_PIXELS, MAX_QUESTION_CHARS, DemoInputError, check_question, load_upload
from .layout import (
    CHROMIUM,
    CHROMIUM_ARGS,
    FAILED,
    _expected_answer,
    _handle_upload,
    _is_loopback,
    _raw_upload_path,
    answer_request,
    build_app,
    build_parser,
    example_images,
    launch,
    main,
)
from .rendering import DIM, DISPLAY, PatchGrid, highlight, is_right, model_view, patch_grid, render_results, tower_grid

__all__ = [
    "CHROMIUM",
    "CHROMIUM_ARGS",
    "CLIP_MEAN",
    "CLIP_STD",
    "DEFAULT_STRATEGIES",
    "DIM",
    "DISPLAY",
    "FAILED",
    "MAX_ASPECT",
    "MAX_BYTES",
    "MAX_PIXELS",
    "MAX_QUESTION_CHARS",
    "UNPRUNED",
    "Comparer",
    "DemoInputError",
    "Outcome",
    "PatchGrid",
    "_expected_answer",
    "_handle_upload",
    "_is_loopback",
    "_raw_upload_path",
    "answer_request",
    "build_app",
    "build_parser",
    "check_question",
    "example_images",
    "highlight",
    "is_right",
    "launch",
    "load_upload",
    "main",
    "model_view",
    "patch_grid",
    "render_results",
    "text_ids",
    "tiny_pixels",
    "tower_grid",
]

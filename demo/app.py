"""The vtokprune Gradio demo: compare what each pruning strategy keeps, side by side with the unpruned model.

    pip install 'vtokprune[demo]'
    python demo/app.py                      # the embedded model, http://127.0.0.1:7860
    python demo/app.py --model llava-hf/llava-1.5-7b-hf --port 7861

Same as `vtokprune demo ...`; the app itself lives in `vtokprune.demo`.
"""

from __future__ import annotations

import sys

from vtokprune.demo import main

if __name__ == "__main__":
    sys.exit(main())

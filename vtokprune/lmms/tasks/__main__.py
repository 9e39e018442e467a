"""`python -m vtokprune.lmms.tasks` prints the directory to give lmms-eval's --include_path;
`python -m vtokprune.lmms.tasks --generate` rewrites the data file."""

import sys

from . import generate, path

if "--generate" in sys.argv[1:]:
    print(generate())
else:
    print(path())

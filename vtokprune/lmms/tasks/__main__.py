"""`python -m vtokprune.lmms.tasks` prints the directory to give lmms-eval's --include_path;
`python -m vtokprune.lmms.tasks --generate` rewrites the data files (test and validation splits)."""

import sys

from . import generate_all, path

if "--generate" in sys.argv[1:]:
    print("\n".join(map(str, generate_all())))
else:
    print(path())

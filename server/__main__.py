"""``python -m server``: the same as ``ragserve serve``."""

import sys

from server.cli import serve

if __name__ == "__main__":
    sys.exit(serve())

"""``python -m ftrl.builder key=value ...``: build an env set with an LLM (see ftrl.builder.builder)."""

import logging
import sys

from ftrl.builder.builder import main

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())

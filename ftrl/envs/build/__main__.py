"""``python -m ftrl.envs.build key=value ...``: build an env set with an LLM (see ftrl.envs.build.builder)."""

import logging
import sys

from ftrl.envs.build.builder import main

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())

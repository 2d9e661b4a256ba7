"""``python -m diffusion.phema RUN_DIR ema_std=0.07 [step=N] [out=PATH]``: rebuild a post-hoc EMA."""

import sys

from diffusion.engine.phema import main

if __name__ == "__main__":
    sys.exit(main())

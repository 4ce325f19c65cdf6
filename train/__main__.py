"""python -m train --data PATH --out checkpoints/NAME [options]; see --help."""

import sys

from train.config import parse_config
from train.loop import Interrupted, train

if __name__ == "__main__":
    cfg = parse_config()
    try:
        train(cfg)
    except OSError as e:  # a full disk, a read-only or vanished directory: one clear line, not a traceback
        raise SystemExit(
            f"python -m train: cannot write in {cfg.out}: {e.strerror or e}; the checkpoints "
            "already there are whole (every save is atomic)"
        ) from None
    except KeyboardInterrupt as e:  # Ctrl-C: one line, and 128 + SIGINT as the shell would report it
        if not isinstance(e, Interrupted):
            e = "interrupted before training started; --out is as it was"
        if str(e):
            print(f"python -m train: {e}", file=sys.stderr)
        raise SystemExit(130) from None

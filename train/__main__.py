"""python -m train --data PATH --out checkpoints/NAME [options]; see --help."""

import os
import sys


def stopped(message):
    """Ctrl-C: one line, and 128 + SIGINT as the shell would report it."""
    if message:
        print(f"python -m train: {message}", file=sys.stderr)
    raise SystemExit(130)


def stopped_importing():
    """Ctrl-C while torch imports: nothing was written, so leave at once. Not through SystemExit: an interrupt that
    landed in Python code that torch's extension ran for itself leaves the interpreter marked to end by SIGINT at
    exit (-2, not 130; seen once in CI)."""
    print("python -m train: interrupted before training started; --out is as it was", file=sys.stderr, flush=True)
    os._exit(130)


def main():
    try:  # imported here, inside the try: torch takes a second or more to import, and Ctrl-C meanwhile is no error
        from train.config import parse_config
        from train.loop import Interrupted, train
    except KeyboardInterrupt:
        stopped_importing()
    cfg = parse_config()
    try:
        train(cfg)
    except OSError as e:  # a full disk, a read-only or vanished directory: one clear line, not a traceback
        raise SystemExit(
            f"python -m train: cannot write in {cfg.out}: {e.strerror or e}; the checkpoints "
            "already there are whole (every save is atomic)"
        ) from None
    except KeyboardInterrupt as e:
        stopped(str(e) if isinstance(e, Interrupted) else "interrupted before training started; --out is as it was")


if __name__ == "__main__":
    main()

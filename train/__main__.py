"""python -m train --data PATH --out checkpoints/NAME [options]; see --help."""

import sys


def stopped(message):
    """Ctrl-C: one line, and 128 + SIGINT as the shell would report it."""
    if message:
        print(f"python -m train: {message}", file=sys.stderr)
    raise SystemExit(130)


def main():
    try:  # imported here, inside the try: torch takes a second or more to import, and Ctrl-C meanwhile is no error
        from train.config import parse_config
        from train.loop import Interrupted, train
    except KeyboardInterrupt:
        stopped("interrupted before training started; --out is as it was")
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

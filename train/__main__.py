"""python -m train --data PATH --out checkpoints/NAME [options]; see --help."""
from train.config import parse_config
from train.loop import train

if __name__ == "__main__":
    cfg = parse_config()
    try:
        train(cfg)
    except OSError as e:  # a full disk, a read-only or vanished directory: one clear line, not a traceback
        raise SystemExit(f"python -m train: cannot write in {cfg.out}: {e.strerror or e}; the checkpoints "
                         "already there are whole (every save is atomic)") from None

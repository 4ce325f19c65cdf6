"""python -m train --data PATH --out checkpoints/NAME [options]; see --help."""
from train.config import parse_config
from train.loop import train

if __name__ == "__main__":
    train(parse_config())

"""Decode speed at batch 1: the engine (KV cache) against GPT.generate (full recompute), and
against the floor: the bare matrix-vector products of all the model's weights per token.

    python -m benchmarks.decode [--quick]
"""

import argparse

import torch
import torch.nn.functional as F

from benchmarks.common import markdown_table, median_time, write_results
from model import GPT, load_checkpoint
from model.checkpoint import default_checkpoints
from model.engine import Engine


def weight_matrices(model):
    """Every matrix a decode step multiplies a vector by (the tied one once, as the output layer)."""
    return [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]


def floor_per_token(model, repeats):
    mats = [w.detach() for w in weight_matrices(model)]
    vecs = [torch.randn(1, w.size(1)) for w in mats]

    def run():
        for w, v in zip(mats, vecs):
            F.linear(v, w)

    return median_time(run, repeats)


def measure(name, model, lengths, repeats, reference_repeats):
    rows = []
    floor = floor_per_token(model, 200)
    prompt = torch.zeros(1, 8, dtype=torch.long)
    engine = Engine(model, max_batch=1)
    for n in lengths:
        t_engine = median_time(lambda n=n: engine.generate(prompt[0].tolist(), n, seed=0), repeats)
        t_ref = median_time(lambda n=n: model.generate(prompt, n), reference_repeats)
        rows.append(
            {
                "model": name,
                "new_tokens": n,
                "engine_tok_s": n / t_engine,
                "generate_tok_s": n / t_ref,
                "speedup": t_ref / t_engine,
                "engine_ms_per_token": 1e3 * t_engine / n,
                "floor_ms_per_token": 1e3 * floor,
                "multiple_of_floor": t_engine / n / floor,
            }
        )
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short lengths and one repeat (a smoke test)")
    p.add_argument("--checkpoint", help="the default model (default: the bundled GPT)")
    args = p.parse_args()
    torch.manual_seed(0)
    lengths, repeats, ref_repeats = ([16], 1, 1) if args.quick else ([256, 1024], 5, 1)
    models = []
    path = args.checkpoint or next((p for p in default_checkpoints() if "gpt" in p.name), None)
    if path:
        models.append((f"default ({path.name if hasattr(path, 'name') else path})", load_checkpoint(path)[0]))
    big = GPT(65, 256, 384, 6, 6, 0.0) if not args.quick else GPT(65, 64, 64, 2, 2, 0.0)
    models.append(("6L/6H/384/ctx256 (random)" if not args.quick else "tiny (quick)", big.eval()))
    rows = [r for name, m in models for r in measure(name, m, lengths, repeats, ref_repeats)]
    table = markdown_table(
        [
            "model",
            "new tokens",
            "engine tok/s",
            "GPT.generate tok/s",
            "speedup",
            "engine ms/token",
            "floor ms/token",
            "x floor",
        ],
        [
            [
                r["model"],
                r["new_tokens"],
                f"{r['engine_tok_s']:.0f}",
                f"{r['generate_tok_s']:.1f}",
                f"{r['speedup']:.1f}x",
                f"{r['engine_ms_per_token']:.3f}",
                f"{r['floor_ms_per_token']:.3f}",
                f"{r['multiple_of_floor']:.2f}",
            ]
            for r in rows
        ],
    )
    write_results("decode" + ("-quick" if args.quick else ""), rows, table)


if __name__ == "__main__":
    main()

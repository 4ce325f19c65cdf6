"""Int8 weight-only matrix products on GPT-2 small's linear shapes, against float32's F.linear (issue 32, item 2).

    python -m benchmarks.int8_kernels [--threads 1] [--rounds 7]   # docs/bench-int8-kernels.json and .md
    python -m benchmarks.int8_kernels --loss                       # docs/bench-int8-loss.json and .md
    python -m benchmarks.int8_kernels --decode CHECKPOINT [--gguf Q8_0.gguf]   # docs/bench-int8-decode.json, .md

Candidates, each on a weight quantized per output channel (symmetric int8, a float32 scale a row):
  f32             F.linear(x, w), float32 weights (the reference)
  int8pack        torch._weight_int8pack_mm(x, w_int8, scale): torch's own int8 weight-pack kernel
  torchao         torchao's Int8WeightOnlyConfig (eager), when torchao imports here
  deq-compiled    torch.compile(F.linear(x, w_int8.to(x.dtype)) * scale): inductor's own lowering
  gemv-compiled   torch.compile((x[:, None, :] * w_int8.to(x.dtype)).sum(-1) * scale): the product written as a
                  reduction, which inductor fuses into one loop that reads the int8 weight once (model/quantize.py)
  int_mm-compiled torch.compile of per-row dynamic int8 activations and torch._int_mm (int8 x int8 -> int32)

Batch-1 decode reads every weight once a token, so it is bound by memory bandwidth: each candidate cycles through
enough copies of a weight (about 300 MB of float32) that none stays in cache, as a model's layers do. The machine
may be loaded: rounds interleave the candidates, and the page gives each one's median and its ratio to f32's
median in the same run.
"""

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINT = ROOT / "checkpoints" / "shakespeare-gpt" / "model.safetensors"  # the bundled GPT
CORPUS = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
SHAPES = {"qkv": (768, 2304), "attn.proj": (768, 768), "mlp.fc": (768, 3072), "mlp.proj": (3072, 768)}
HEAD = {"lm_head": (768, 50257)}
ROWS = (1, 4, 8, 32)
BYTES = 300 * 2**20  # float32 bytes of weight copies each candidate cycles through


def quantize_rows(w):
    """Per-output-channel symmetric int8: (int8 weight, float32 scale per row)."""
    scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def deq_linear(x, w, s):
    return F.linear(x, w.to(x.dtype)) * s


def gemv_linear(x, w, s):
    return (x[:, None, :] * w.to(x.dtype)).sum(-1) * s


def int_mm_linear(x, w, s):
    xs = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) / 127
    xq = torch.round(x / xs).to(torch.int8)
    return torch._int_mm(xq, w.t()).to(x.dtype) * xs * s


def torchao_linear(w):
    """A function of x running torchao's int8 weight-only linear on weight w, or the reason it cannot."""
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except Exception as e:  # not installed, or built for another torch
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight.data = w.clone()
    quantize_(lin, Int8WeightOnlyConfig())
    return lambda x: lin(x)


def candidates(k, n, copies, names):
    """{name: (function of x, its weights' footprint in bytes)}, each cycling through `copies` weights."""
    torch.manual_seed(0)
    ws = [torch.randn(n, k) * 0.02 for _ in range(copies)]
    qs = [quantize_rows(w) for w in ws]
    out = {}

    def cycle(f, items):
        turn = iter(range(10**12))
        return lambda x: f(x, items[next(turn) % len(items)])

    out["f32"] = cycle(lambda x, w: F.linear(x, w), ws)
    if "int8pack" in names:
        out["int8pack"] = cycle(lambda x, q: torch._weight_int8pack_mm(x, q[0], q[1]), qs)
    if "torchao" in names:
        fns = [torchao_linear(w) for w in ws[: max(1, copies // 4)]]
        if isinstance(fns[0], str):
            print("torchao:", fns[0])
        else:
            out["torchao"] = cycle(lambda x, f: f(x), fns)
    compiled = {"deq-compiled": deq_linear, "gemv-compiled": gemv_linear, "int_mm-compiled": int_mm_linear}
    for name, f in compiled.items():
        if name in names:
            c = torch.compile(f, dynamic=False)
            out[name] = cycle(lambda x, q, c=c: c(x, *q), qs)
    del ws
    return out


def timed(f, x, calls):
    start = time.perf_counter()
    for _ in range(calls):
        f(x)
    return (time.perf_counter() - start) / calls


@torch.no_grad()
def run(args):
    torch.set_num_threads(args.threads)
    torch._dynamo.config.recompile_limit = 64  # each shape and row count compiles its own
    names = args.candidates.split(",")
    shapes = SHAPES | ({} if args.no_head else HEAD)
    results = []
    for label, (k, n) in shapes.items():
        copies = max(2, math.ceil(BYTES / (4 * k * n)))
        fns = candidates(k, n, copies, names)
        for m in ROWS:
            x = torch.randn(m, k)
            ref = fns["f32"](x)
            errors, broken = {}, []
            for name, f in fns.items():
                try:
                    for _ in range(copies + 2):  # compile, warm every copy
                        y = f(x)
                    errors[name] = ((y - ref).norm() / ref.norm()).item()  # a different copy: only a sanity figure
                except Exception as e:
                    print(f"{label} M={m} {name}: {type(e).__name__}: {str(e).splitlines()[0]}")
                    broken.append(name)
            live = {name: f for name, f in fns.items() if name not in broken}
            times = {name: [] for name in live}
            calls = max(3, copies)
            for _ in range(args.rounds):
                for name, f in live.items():
                    times[name].append(timed(f, x, calls))
            med = {name: statistics.median(t) for name, t in times.items()}
            row = {"shape": label, "in": k, "out": n, "M": m, "copies": copies}
            row["us"] = {name: round(t * 1e6, 1) for name, t in med.items()}
            row["vs_f32"] = {name: round(med["f32"] / t, 2) for name, t in med.items()}
            results.append(row)
            said = {name: f"{t * 1e6:.0f}us x{med['f32'] / t:.2f}" for name, t in med.items()}
            print(label, f"M={m}", said, flush=True)
    return results


@torch.no_grad()
def loss_change(checkpoint=CHECKPOINT, corpus=CORPUS, threads=1):
    """The validation split's mean loss per token of `checkpoint` in float32; with int8 weights (model/quantize.py)
    as an eager forward of many rows computes (the blocks' linear layers int8, the head the tied float embedding);
    and with the head's int8 copy too, as the compiled decode step of up to HEAD_ROWS rows computes."""
    from model import quantize as Q
    from model.checkpoint import load_checkpoint
    from train.data import encode_text, full_loss

    torch.set_num_threads(threads)
    model, tokenizer, _ = load_checkpoint(checkpoint)
    val = encode_text(tokenizer, Path(corpus).read_text(encoding="utf-8"), None).splits["val"]
    ctx = model.config.context_size
    losses = {"float32": full_loss(model.eval(), val, ctx)}
    model = Q.quantize(model, "int8")
    losses["int8 (lm_head float32: prefills, scoring)"] = full_loss(model, val, ctx)
    model.lm_head.dense = None
    losses["int8 (lm_head int8: compiled decode)"] = full_loss(model, val, ctx)
    return {"checkpoint": str(Path(checkpoint).relative_to(ROOT)), "val_tokens": len(val), "loss": losses}


def decode_speed(checkpoint, gguf, threads, rounds, n=64, streams=32):
    """Greedy decode tokens/s of `checkpoint`'s compiled step, float32 and int8 weights, at batch 1 (the engine's
    generate, the prefill's time taken off, as benchmarks/peers.py's quill_batch1) and with `streams` requests
    decoded together (n tokens each, their prefill included); and llama-bench's batch 1 on `gguf` (q8_0) when
    given. Each system's step is compiled for batch sizes 1 and `streams` only, into a temporary folder."""
    import tempfile

    from benchmarks.peers import PROMPT, TOOLS, llama_batch1, quill_batch1
    from model import quantize as Q
    from model.checkpoint import load_checkpoint
    from model.engine import Engine
    from model.request import Request
    from model.sampling import SamplingParams

    class Tokens:
        def __init__(self):
            self.count, self.done = 0, False

        def __call__(self, event):
            self.count += hasattr(event, "id")
            self.done = self.done or not hasattr(event, "id")

    torch.set_num_threads(threads)
    engines, ids = {}, None
    for label, how in (("Quill float32", None), ("Quill int8", "int8")):
        model, tokenizer, _ = load_checkpoint(checkpoint)
        engine = Engine(Q.quantize(model, how), streams, compiled=True, compile_folder=tempfile.mkdtemp())
        engine.cache.step.build([1, streams])
        engines[label], ids = engine, tokenizer.encode(PROMPT)

    def together(engine):
        reqs = [Request(list(ids), SamplingParams(max_new_tokens=n, temperature=0), Tokens()) for _ in range(streams)]
        start = time.perf_counter()
        for req in reqs:
            engine.submit(req)
        while not all(req.emit.done for req in reqs):
            engine.step()
        return sum(req.emit.count for req in reqs) / (time.perf_counter() - start)

    runs = {f"{label}, batch {b}": [] for label in engines for b in (1, streams)}
    if gguf:
        runs["llama.cpp q8_0, batch 1"] = []
    for _ in range(rounds):
        for label, engine in engines.items():
            runs[f"{label}, batch 1"].append(quill_batch1(engine, ids, n, repeats=1))
            runs[f"{label}, batch {streams}"].append(together(engine))
        if gguf:
            runs["llama.cpp q8_0, batch 1"].append(llama_batch1(TOOLS / "build" / "bin", gguf, n, threads, 1)[0])
        print({k: round(v[-1], 1) for k, v in runs.items()}, flush=True)
    from benchmarks.common import machine

    return {"checkpoint": str(checkpoint), "gguf": str(gguf) if gguf else None, "threads": threads, "tokens": n} | {
        "machine": machine(),
        "streams": streams,
        "runs": runs,
        "median": {k: statistics.median(v) for k, v in runs.items()},
    }


def write_decode(result, out):
    (out / "bench-int8-decode.json").write_text(json.dumps(result, indent=1) + "\n")
    med, streams = result["median"], result["streams"]
    rounds = len(next(iter(result["runs"].values())))
    lines = [
        "# Int8 weights: compiled decode speed",
        "",
        f"`python -m benchmarks.int8_kernels --decode {result['checkpoint']}"
        + (f" --gguf {result['gguf']}" if result["gguf"] else "")
        + f" --threads {result['threads']}` (torch {torch.__version__}, {result['threads']} torch thread(s); "
        f"llama-bench `-t {result['threads']}`). Greedy, {result['tokens']} new tokens; batch 1: the engine's "
        f"generate with the prefill's time taken off (llama-bench `-p 0 -n {result['tokens']}`); batch {streams}: "
        f"{streams} requests decoded together, their prefill included. Medians of {rounds} "
        "interleaved rounds; this machine may be shared, so compare within a column of one run only. The GGUF is "
        "Quill's own export of the checkpoint (`python -m model.export CHECKPOINT --format gguf --dtype q8_0`); "
        "`make bench-peers` puts GPT-2 small's shape, random weights, at .tools/llama.cpp/models/gpt2-small-random"
        + (f"; measured on {result['machine']['cpu']}, {result['machine']['date']}." if "machine" in result else "."),
        "",
        "| system | tokens/s | / Quill float32 at the same batch |" + (" / llama.cpp q8_0 |" if result["gguf"] else ""),
        "|---|---|---|" + ("---|" if result["gguf"] else ""),
    ]
    for label, v in med.items():
        batch = label.rsplit(" ", 1)[1]
        row = f"| {label} | {v:.1f} | {v / med[f'Quill float32, batch {batch}']:.2f}x |"
        if result["gguf"]:
            row += f" {v / med['llama.cpp q8_0, batch 1']:.2f}x |" if batch == "1" else " |"
        lines.append(row)
    (out / "bench-int8-decode.md").write_text("\n".join(lines) + "\n")


def write_loss(loss, out):
    (out / "bench-int8-loss.json").write_text(json.dumps(loss, indent=1) + "\n")
    f32 = loss["loss"]["float32"]
    lines = [
        "# Int8 weights: the bundled GPT's validation loss",
        "",
        f"`python -m benchmarks.int8_kernels --loss`: {loss['checkpoint']}, mean cross-entropy over the whole "
        f"validation split of Tiny Shakespeare ({loss['val_tokens']} tokens, windows of the model's context). "
        "Goal: int8 within +0.01 of float32.",
        "",
        "| weights | loss | change |",
        "|---|---|---|",
    ]
    lines += [f"| {k} | {v:.4f} | {v - f32:+.4f} |" for k, v in loss["loss"].items()]
    (out / "bench-int8-loss.md").write_text("\n".join(lines) + "\n")


def write(results, args, out):
    raw = {"torch": torch.__version__, "threads": args.threads, "rounds": args.rounds, "results": results}
    (out / "bench-int8-kernels.json").write_text(json.dumps(raw, indent=1) + "\n")
    names = list(results[0]["us"])
    lines = [
        "# Int8 weight-only kernels on GPT-2 small's linear shapes",
        "",
        f"`python -m benchmarks.int8_kernels --threads {args.threads} --rounds {args.rounds}` "
        f"(torch {torch.__version__}, {args.threads} thread(s)). Each cell: median microseconds a call, and in "
        "brackets f32's median over it (above 1: faster than float32), measured in the same interleaved run. Weights "
        "cycle through copies (about 300 MB of float32) so that none stays in cache. See benchmarks/int8_kernels.py "
        "for the candidates. torchao's int8 weight-only cycles through a quarter of the copies (quantizing is "
        "slow), so some stay cached: its figures flatter it. int_mm-compiled quantizes the activations too (int8 x "
        "int8, per row): not weight-only.",
        "",
        "| shape (in -> out) | M | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for r in results:
        cells = [f"{r['us'][n]:.0f} ({r['vs_f32'][n]:.2f}x)" if n in r["us"] else "-" for n in names]
        lines.append(f"| {r['shape']} ({r['in']} -> {r['out']}) | {r['M']} | " + " | ".join(cells) + " |")
    (out / "bench-int8-kernels.md").write_text("\n".join(lines) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--candidates", default="f32,int8pack,torchao,deq-compiled,gemv-compiled,int_mm-compiled")
    ap.add_argument("--no-head", action="store_true", help="leave out the tied lm_head (768 -> 50257)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs")
    ap.add_argument("--loss", action="store_true", help="measure the bundled GPT's validation loss instead")
    ap.add_argument("--report-only", action="store_true", help="write the kernels' page again from its JSON")
    ap.add_argument("--decode", type=Path, help="a GPT checkpoint: measure its compiled decode speed instead")
    ap.add_argument("--gguf", type=Path, help="with --decode: the same weights as a q8_0 GGUF, for llama-bench")
    args = ap.parse_args(argv)
    if args.decode:
        result = decode_speed(args.decode, args.gguf, args.threads, min(args.rounds, 3))
        return write_decode(result, args.out)
    if args.report_only:  # every page whose results are there
        raw = json.loads((args.out / "bench-int8-kernels.json").read_text())
        args.threads, args.rounds = raw["threads"], raw["rounds"]
        write(raw["results"], args, args.out)
        for name, page in (("loss", write_loss), ("decode", write_decode)):
            if (args.out / f"bench-int8-{name}.json").exists():
                page(json.loads((args.out / f"bench-int8-{name}.json").read_text()), args.out)
        return None
    if args.loss:
        loss = loss_change(threads=args.threads)
        print(json.dumps(loss, indent=1))
        return write_loss(loss, args.out)
    results = run(args)
    write(results, args, args.out)


if __name__ == "__main__":
    main()

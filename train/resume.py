"""The resume state: weights, optimizer moments, RNG states and progress, all a resumed run needs; and
whether a resumed run has anything left to train."""

import torch

from model.checkpoint import CheckpointError, load_model_tensors, model_tensors, read_safetensors, write_safetensors


def save_resume(path, model, optimizer, data_gen, state):
    tensors = {f"model.{k}": v for k, v in model_tensors(model).items()}
    opt = optimizer.state_dict()
    for idx, s in opt["state"].items():
        for k, v in s.items():
            tensors[f"optim.{idx}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.data"] = data_gen.get_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    groups = [{k: v for k, v in g.items()} for g in opt["param_groups"]]
    write_safetensors(path, tensors, {**state, "param_groups": groups})


def read_resume_state(path):
    """The metadata of the resume state at `path`: the run's progress, settings, model and tokenizer."""
    try:
        return read_safetensors(path)[1]
    except CheckpointError as e:
        raise SystemExit(f"cannot resume: {e}") from None


def load_resume(path, model, optimizer, data_gen):
    """Restore what save_resume wrote into model, optimizer and data_gen; return the saved state."""
    tensors, state = read_safetensors(path)
    load_model_tensors(model, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, path)
    opt_state = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, idx, name = k.split(".", 2)
            opt_state.setdefault(int(idx), {})[name] = v
    optimizer.load_state_dict({"state": opt_state, "param_groups": state.pop("param_groups")})
    torch.set_rng_state(tensors["rng.torch"])
    data_gen.set_state(tensors["rng.data"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return state


def finished(out, state, cfg, say=True):
    """Whether the run resumed from `state` has run its cfg.max_iters iterations: then it says so (if `say`),
    and nothing is trained. A --max-iters below the iteration the run has reached is refused."""
    it = state["iter"]
    if it > cfg.max_iters:
        raise SystemExit(
            f"cannot resume: --max-iters {cfg.max_iters} is below iteration {it}, which the run in {out} has "
            f"reached; nothing was trained: pass a --max-iters above {it} to train it further"
        )
    if it == cfg.max_iters and say:
        print(
            f"{out} is finished: it has run all its {it} iterations, so nothing was trained; "
            f"to train it further, pass --resume with a --max-iters above {it}"
        )
    return it == cfg.max_iters

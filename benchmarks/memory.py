"""Memory: what a process tree holds (Linux /proc), and what a served GPT needs for its weights and KV cache.

A server's tree is its process and every descendant (Quill's engine child processes). Two sums: VmRSS counts
each process's resident pages, shared libraries (torch's are hundreds of MB) once per process; PSS (smaps_rollup)
splits each shared page between the processes that map it, so it counts them once in all.
"""

from pathlib import Path

MB = 1e6
PROC = Path("/proc")
# issue 27's goal for a server's tree: weights + KV cache + this share of the weights + this many MB
GOAL_WEIGHTS_SHARE, GOAL_FIXED_MB = 0.3, 400


def parents(proc=PROC):
    """{pid: parent pid} of every process now running."""
    out = {}
    for stat in proc.glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # gone since the listing
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after its last ')'
        out[int(stat.parent.name)] = int(text[text.rindex(")") + 2 :].split()[1])
    return out


def tree(pid, proc=PROC):
    """`pid` and its descendants."""
    children = {}
    for child, parent in parents(proc).items():
        children.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo += children.get(found[-1], [])
    return found


def field_kb(path, name):
    """The kB figure of a "Name:   1234 kB" line of a /proc file."""
    for line in path.read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    raise ValueError(f"no {name} in {path}")


def command(pid, proc=PROC, width=60):
    """The start of a process's command line, for a reader to tell the processes of a tree apart."""
    args = (proc / str(pid) / "cmdline").read_bytes().decode(errors="replace").rstrip("\0").split("\0")
    return " ".join(" ".join([Path(args[0]).name, *args[1:]]).split())[:width]


def tree_memory(pid, proc=PROC):
    """{"rss_mb", "pss_mb", "processes", "each": [[command, rss_mb, pss_mb], ...]} of `pid`'s tree; a process
    that exits meanwhile is left out."""
    each = []
    for p in tree(pid, proc):
        try:
            rss = field_kb(proc / str(p) / "status", "VmRSS") * 1024 / MB
            pss = field_kb(proc / str(p) / "smaps_rollup", "Pss") * 1024 / MB
            each.append([command(p, proc), rss, pss])
        except (OSError, ValueError):  # exited, or a zombie (no VmRSS)
            continue
    rss, pss = sum(e[1] for e in each), sum(e[2] for e in each)
    return {"rss_mb": rss, "pss_mb": pss, "processes": len(each), "each": each}


def weights_mb(model, bytes_per_value=None):
    """The model's weights at `bytes_per_value` (a tied matrix once: parameters() yields it once); None: as it
    holds them, its buffers too (a quantized model's int8 weights and their scales, model/quantize.py)."""
    if bytes_per_value is None:
        return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) / MB
    return sum(p.numel() for p in model.parameters()) * bytes_per_value / MB


def kv_cache_mb(config, bytes_per_value, running):
    """A GPT's KV cache for `running` rows (model/cache.py): keys and values per layer, (running, n_head,
    context + 1, head_size) each."""
    return config.n_layer * 2 * running * (config.context_size + 1) * config.hidden_size * bytes_per_value / MB


def goal_mb(weights, kv):
    """Issue 27's bound on a server's tree RSS, in MB."""
    return weights + kv + GOAL_WEIGHTS_SHARE * weights + GOAL_FIXED_MB

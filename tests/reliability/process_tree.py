"""A server's processes, read from /proc (Linux): its engine children and the resident memory of the whole tree."""

import contextlib
from pathlib import Path

from load_helpers import rss_mib


def children(pid):
    """The processes `pid` started that are still there."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(FileNotFoundError):  # the thread or the process has ended meanwhile
            found += [int(c) for c in task.read_text().split()]
    return found


def descendants(pid):
    """Every process below `pid`, children first."""
    found, frontier = [], children(pid)
    while frontier:
        found += frontier
        frontier = [c for p in frontier for c in children(p)]
    return found


def engine_children(pid):
    """The server's engine processes (multiprocessing's spawned children; its resource tracker is not one), in
    the order they started: at start-up, the order of the models (the default first)."""
    engines = []
    for child in children(pid):
        with contextlib.suppress(FileNotFoundError):
            with open(f"/proc/{child}/cmdline", "rb") as f:
                spawned = b"multiprocessing.spawn" in f.read()
            with open(f"/proc/{child}/stat") as f:
                started = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: start time, in clock ticks
            if spawned:
                engines.append((started, child))
    return [child for _, child in sorted(engines)]


def tree_rss_mib(pid):
    """Resident memory of `pid` and every process below it (the server, its engines, multiprocessing's tracker)."""
    total = rss_mib(pid)
    for child in descendants(pid):
        with contextlib.suppress(FileNotFoundError, AssertionError):  # gone meanwhile (a zombie has no VmRSS)
            total += rss_mib(child)
    return total

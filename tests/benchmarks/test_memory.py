"""benchmarks/memory.py: a process tree's memory from /proc, and a served GPT's weights and KV cache sizes."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import tiny_gpt

from benchmarks.memory import MB, goal_mb, kv_cache_mb, tree, tree_memory, weights_mb
from model.cache import GPTCache

linux = pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="needs Linux's /proc")


@linux
def test_tree_memory_of_this_process_counts_its_child_and_pss_no_more_than_rss():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        alone = tree_memory(child.pid)
        mine = tree_memory(os.getpid())
    finally:
        child.kill()
        child.wait()
    assert alone["processes"] == 1 and mine["processes"] >= 2
    own_rss = int(
        next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmRSS")).split()[1]
    )
    assert mine["rss_mb"] >= own_rss * 1024 / MB + alone["rss_mb"] * 0.5  # this process and (most of) its child
    assert 0 < mine["pss_mb"] <= mine["rss_mb"]


def test_tree_reads_parents_from_stat_even_when_a_name_holds_spaces_and_parentheses(tmp_path):
    for pid, name, parent in ((10, "server", 1), (11, "engine (x) y", 10), (12, "builder", 11), (13, "other", 1)):
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "stat").write_text(f"{pid} ({name}) S {parent} 1 1 0 -1\n")
    assert sorted(tree(10, tmp_path)) == [10, 11, 12]
    assert tree(13, tmp_path) == [13]


def test_kv_cache_size_is_what_the_engine_allocates_for_that_many_rows():
    model = tiny_gpt().to(torch.bfloat16)
    cache = GPTCache(model, max_batch=5)
    allocated = sum(t.numel() * t.element_size() for t in cache.k + cache.v)
    assert kv_cache_mb(model.config, 2, 5) * MB == pytest.approx(allocated)


def test_weights_count_a_tied_matrix_once_and_the_goal_adds_its_share_and_a_fixed_allowance():
    model = tiny_gpt()
    named = dict(model.named_parameters(remove_duplicate=False))
    tied = model.lm_head.weight
    assert tied is model.tok_emb.weight  # the embedding is the output layer
    assert weights_mb(model, 4) * MB == 4 * (sum(p.numel() for p in named.values()) - tied.numel())
    assert goal_mb(100, 50) == 100 + 50 + 30 + 400

"""benchmarks/peer_report.py and the pure pieces of benchmarks/peers.py: the tables and README's block are made
from a results file alone, and the default server counts as measured only once every batch size is compiled."""

import pytest

from benchmarks.common import write_between_markers
from benchmarks.peer_report import FIRST, GOAL_MB, agreement, goals_table, http_test, memory_test, readme_block, table
from benchmarks.peers import compile_progress, parse_args

SYSTEMS = ["Quill", "Quill eager", "Quill bf16"]
AGAINST = {"f32": "Quill", "f16": "Quill bf16"}


def rows(model, test, **by_system):
    return [
        [model, test, system.replace("_", " ").replace("llama ", "llama.cpp "), v] for system, v in by_system.items()
    ]


def results(model="m"):
    values = rows(
        model, "batch 1 engine, tok/s", Quill=[90, 100, 400], Quill_eager=[50, 50, 50], llama_f32=[50, 40, 60]
    )
    values += rows(model, "batch 1 engine, tok/s", Quill_bf16=[200, 200, 200], llama_f16=[100, 100, 100])
    values += rows(model, http_test(32, "greedy", "TTFT p99 ms"), Quill=[4, 5, 6], llama_f32=[10, 10, 10])
    values += rows(model, http_test(32, "greedy", "tok/s"), Quill=[1000], llama_f32=[1000])
    values += rows(model, http_test(32, "sampled", "tok/s"), Quill=[960], llama_f32=[990])
    values += rows(model, "HTTP 32 streams, sampled over greedy tok/s (ratio)", Quill=[0.9, 0.96, 0.97], llama_f32=[1])
    values += rows(model, "HTTP requests failed, count", Quill=[0, 2, 1], llama_f32=[0])
    values += rows(model, memory_test(32, "RSS"), Quill=[900], llama_f32=[300])
    values += rows(model, memory_test(32, "PSS"), Quill=[700], llama_f32=[280])
    values += rows(model, GOAL_MB, Quill=[850])
    values += rows(model, "server start to ready, s", Quill_eager=[2.0])
    first = {"ready": 2.5, "compiled": 80, "rounds": 4, "p99": 90, "longest": 95, "failed": 0, "kept p99": 70}
    values += [[model, FIRST[k], "Quill", [v]] for k, v in first.items()] + [
        [model, FIRST["kept longest"], "Quill", [75]]
    ]
    return {
        "values": values,
        "quill_systems": SYSTEMS,
        "against": AGAINST,
        "eager": "Quill eager",
        "streams": [1, 32],
        "new_tokens": {model: [112, 3]},
        "losses": {model: [1.45, 1.46]},
        "machine": {"cpu": "a CPU", "cores": 2, "date": "2026-12-24"},
    }


def test_table_shows_medians_sums_counts_and_each_quill_over_the_llama_cpp_it_meets():
    lines = table(results()["values"], SYSTEMS, AGAINST).splitlines()
    assert lines[0] == (
        "| model | test | Quill | Quill eager | Quill bf16 | llama.cpp f32 | Quill / llama.cpp f32 | llama.cpp f16 "
        "| Quill bf16 / llama.cpp f16 |"
    )
    found = {line.split(" | ")[1]: line for line in lines[2:]}
    assert found["batch 1 engine, tok/s"] == "| m | batch 1 engine, tok/s | 100 | 50 | 200 | 50 | 2.00x | 100 | 2.00x |"
    # a time: the ratio is still Quill's over llama.cpp's, lower is better
    assert found[http_test(32, "greedy", "TTFT p99 ms")].endswith("| 5 | - | - | 10 | 0.50x | - | - |")
    # a ratio of its own and a count get no Quill / llama.cpp column; a count is the sum over rounds
    assert found["HTTP 32 streams, sampled over greedy tok/s (ratio)"].endswith("| 0.96 | - | - | 1.00 | - | - | - |")
    assert found["HTTP requests failed, count"].endswith("| 3 | - | - | 0 | - | - | - |")
    assert found[memory_test(32, "RSS")].endswith("| 900 | - | - | 300 | 3.00x | - | - |")


def test_goals_give_a_verdict_per_goal_and_the_first_start_against_the_kept_packages():
    page = goals_table(results())
    assert "| batch 1 engine, tok/s, Quill / llama.cpp f32 >= 1.0x | **met** 2.00x (100 against 50) |" in page
    assert "| TTFT p99 at 32 streams greedy, Quill / llama.cpp f32 <= 1.0x | **met** 0.50x (5 against 10) |" in page
    assert "| HTTP 32 streams sampled, tok/s, Quill / llama.cpp f32 | 0.97x (960 against 990) |" in page
    assert "| Quill: HTTP 32 streams, sampled over greedy tok/s >= 0.95 | **met** 0.960 |" in page
    assert "| Quill: tree RSS after 32 streams <= the goal, MB | missed 900 (PSS 700) against 850 |" in page
    assert (
        "ready in 2.5 s (eager start: 2.0), every batch size compiled in 80.0 s; 4 rounds sent meanwhile, "
        "TTFT p99 90 ms, longest 95 (kept packages: 70, 75); 0 failed"
    ) in page
    assert "| val loss, bf16 weights - f32 (<= +0.01) | -0.0100 (1.4500; 1.4600) |" in page


def test_readme_block_quotes_the_default_server_over_llama_server_from_the_results_alone():
    block = readme_block(results())
    assert block.startswith("Against llama.cpp on the same weights (`make bench-peers`, a CPU, 2 cores, 2026-12-24;")
    assert "m: batch 1 2.00x, 1 stream -, 32 streams 1.00x greedy and 0.97x sampled (sampled over greedy 0.96)" in block
    assert "`/ready` in 2.5 s, every batch size compiled in 80 s, 0 requests failed in the 4 rounds" in block
    assert "900 MB RSS (700 PSS) against a goal of 850." in block


def test_write_between_markers_replaces_only_the_block_and_refuses_a_page_without_one(tmp_path):
    page = tmp_path / "README.md"
    page.write_text("before\n<!-- x:start -->\nold\n<!-- x:end -->\nafter\n")
    write_between_markers(page, "x", "new " * 40)
    text = page.read_text()
    assert text.startswith("before\n<!-- x:start -->\nnew new") and text.endswith("new\n<!-- x:end -->\nafter\n")
    assert "old" not in text and max(len(line) for line in text.splitlines()) <= 110
    with pytest.raises(SystemExit, match="no single"):
        write_between_markers(page, "y", "new")


def test_compile_progress_is_done_only_once_every_batch_size_is_compiled_and_failed_when_a_model_drops_out():
    def body(built, planned=(1, 2, 4)):
        return {
            "status": "ready",
            "models": ["m"],
            "compiled": {"m": {"compiled_batch_sizes": built, "batch_sizes": planned}},
        }

    assert compile_progress(body([]), True) == "compiling"
    assert compile_progress(body([4, 1]), True) == "compiling"
    assert compile_progress(body([4, 2, 1]), True) == "done"
    assert compile_progress({"status": "ready", "models": ["m"], "compiled": {}}, True) == "failed"
    assert compile_progress({"status": "ready", "models": ["m"]}, False) == "done"  # QUILL_COMPILE=0


def test_peers_options_quick_means_one_round_and_bad_names_are_refused(capsys):
    args = parse_args(["--quick", "--models", "bundled", "--dtypes", "f16,q8_0", "--systems", "Quill bf16,Quill int8"])
    assert (args.rounds, args.models, args.dtypes, args.tokens) == (1, ["bundled"], ["f16", "q8_0"], 32)
    assert parse_args([]).systems == ["Quill", "Quill eager", "Quill bf16"]  # Quill int8 when asked for
    with pytest.raises(SystemExit):
        parse_args(["--dtypes", "f32,q8_0"])  # q8_0 meets Quill int8, which --systems leaves out
    assert "q8_0 meets Quill int8" in capsys.readouterr().err
    for bad, named in ((["--dtypes", "f8"], "f8"), (["--models", "7B"], "7B"), (["--rounds", "0"], "--rounds")):
        with pytest.raises(SystemExit):
            parse_args(bad)
        assert named in capsys.readouterr().err
    assert (agreement("ROMEO: hi", "ROMEO: ho"), agreement("abc", "abcdef")) == (8, 3)

from benchmarks import prefix


def test_report_from_synthetic_results():
    raw = {
        "machine": {"cpu": "test cpu", "cores": 2, "date": "2026-12-06"},
        "results": {
            "command": "python -m benchmarks.prefix --quick",
            "load_start": "0.10",
            "load_end": "0.20",
            "runs": [
                {
                    "model": "bundled",
                    "mode": "greedy",
                    "scenario": "cold",
                    "ttft_s": {"Quill": [0.01, 0.02], prefix.BASELINE: [0.02, 0.04]},
                    "mismatches": {"Quill": 0},
                }
            ],
        },
    }
    page = prefix.report(raw)
    assert "| bundled | greedy | cold | Quill | 10.0 | 20.0 | 0.50 | 0.50 | 0 |" in page
    assert "python -m benchmarks.prefix --quick" in page

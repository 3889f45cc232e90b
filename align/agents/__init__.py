"""Agents: AppWorld-shaped environments for multi-turn, code-executing agents (LOOP, Chen et al. 2025).

Modules (import them directly; this package imports nothing heavy):

    world.py     the built-in world: apps (contacts, calendar, notes, payments, messages, supervisor) called as
                 ``apis.<app>.<method>(...)`` over a small per-task database; ``API_DOCS``; ``Task``; scenarios split
                 train/dev/test by scenario; ``make_tasks(seed)``, ``tasks_for(split, seed)``; declarative
                 state-based checks derived from each gold solution (incl. "nothing else changed"); ``check``.
    sandbox.py   agent code runs in a separate process per episode, forked from a clean pre-imported zygote:
                 per-turn wall-clock limit, CPU/memory/file/process limits, no network, chroot + unprivileged uid
                 (as root), empty environment, no inherited fds; ``Sandbox``, ``sandbox_level()``.
    env.py       ``WorldEnv(task)``: the rollout engine's Environment protocol (``reset() -> str``,
                 ``step(code) -> (observation, done)``) plus ``evaluate()`` (passed, total, reward, success),
                 ``close()``.
    appworld.py  ``AppWorldEnv(task_id, base_url)``: the same interface over the real AppWorld environment server
                 (its own venv, HTTP); ``appworld_tasks(split)``; ``AppWorldServer`` starts one.
    play.py      ``load_tasks(recipe, split)``, ``make_env(recipe, task)``, ``play(engine, ...)``: K episodes per
                 task as plain rows; ``scores(rows)``: TGC / SGC (the agent trainer and the agent harness).

See docs/agents.md.
"""

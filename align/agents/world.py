"""The built-in AppWorld-shaped world: five apps over a small per-task database, and tasks with state-based checks.

The agent writes Python that calls ``apis.<app>.<method>(...)`` (as in AppWorld, Trivedi et al. 2024); the apps read and
write a plain JSON-able dict (``Task.db``)::

    {"contacts": [{"name", "phone", "email"}], "calendar": [{"title", "date", "time"}], "notes": [{"title", "text"}],
     "payments": {"balance": int, "transactions": [{"id", "to", "amount", "note"}],
                  "requests": [{"id", "from", "amount", "note"}]},
     "messages": [{"id", "from", "to", "text"}],            # "me" is the user
     "supervisor": {"completed": bool, "answer": ...}}

Tasks come from scenarios (task templates) instantiated with seeded variation (names, amounts, texts, distractor
records). Scenarios are split train/dev/test as a whole, so no test scenario is ever seen in training; the test
scenarios recombine the API calls and phrasings of the train scenarios (see ``SCENARIOS``).

Checks are declarative and derived from the gold solution: the gold code is run on a copy of the initial database
and every change it makes becomes one check (a record ``added`` to a table, a record ``removed``, a scalar ``value``,
the supervisor ``answer``), plus one ``no_other_changes`` check: every change in the final database must be one of
the expected changes (multisets of records, ids ignored). Reward = passed / total (``check``).
"""

from __future__ import annotations

import copy
import difflib
import json
import random
import re
from collections import Counter
from dataclasses import dataclass, field

API_DOCS = """\
apis.contacts: search(name="") get(name) add(name, phone) update(name, phone) delete(name)
apis.calendar: events(date=None) get(title) add(title, date, time) move(title, date) cancel(title)
apis.notes: list() get(title) add(title, text) delete(title)
apis.payments: balance() pay(to, amount) requests(name=None) history()
apis.messages: send(to, text) inbox(name=None) last(name)
apis.supervisor: complete_task(answer=None)
Records are dicts: contact {name,phone,email}, event {title,date,time}, request {from,amount,note}.
Dates are MM-DD, times HH:MM. End with apis.supervisor.complete_task()."""
"""The API reference shown to the agent (short: the CPU policies are tiny character-level models)."""

SPLITS = ("train", "dev", "test")
TABLES = ("contacts", "calendar", "notes", "messages", "payments.transactions", "payments.requests")
SCALARS = ("payments.balance",)
ME = "me"


# ------------------------------------------------------------------------------------------------------ the apps


def _get(db: dict, path: str):
    for key in path.split("."):
        db = db[key]
    return db


def _name(value, what: str = "name") -> str:
    if not isinstance(value, str) or not value.strip():
        raise TypeError(f"{what} must be a non-empty string, got {value!r}")
    return value.strip()


def _amount(value) -> int | float:
    if isinstance(value, str):
        try:
            value = float(value.strip().lstrip("$"))
        except ValueError:
            raise ValueError(f"amount must be a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise TypeError(f"amount must be a number, got {value!r}")
    if value <= 0:
        raise ValueError(f"amount must be positive, got {value!r}")
    return int(value) if float(value).is_integer() else round(float(value), 2)


def _check(pattern: str, value, what: str, example: str) -> str:
    value = _name(value, what)
    if not re.fullmatch(pattern, value):
        raise ValueError(f"{what} must look like {example}, got {value!r}")
    return value


def _missing(kind: str, key: str, name: str, known: list[str]) -> ValueError:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ValueError(f"no {kind} {key} {name!r}{hint}")


def _next_id(rows: list[dict]) -> int:
    return max((r.get("id", 0) for r in rows if isinstance(r.get("id"), int)), default=0) + 1


class _App:
    _methods: tuple[str, ...] = ()

    def __init__(self, world: World):
        self._w = world

    def __getattr__(self, item):
        if item.startswith("__"):
            raise AttributeError(item)
        raise AttributeError(
            f"apis.{type(self).__name__.lower()} has no method {item!r}; methods: {', '.join(self._methods)}"
        )

    def __repr__(self):
        return f"<app {type(self).__name__.lower()}: {', '.join(self._methods)}>"

    @property
    def _db(self) -> dict:
        return self._w.db


class Contacts(_App):
    _methods = ("search", "get", "add", "update", "delete")

    def _find(self, name) -> dict:
        name = _name(name)
        for c in self._db["contacts"]:
            if c["name"] == name:
                return c
        raise _missing("contact", "named", name, [c["name"] for c in self._db["contacts"]])

    def search(self, name: str = "") -> list[dict]:
        q = str(name or "").strip().lower()
        return [dict(c) for c in self._db["contacts"] if q in c["name"].lower()]

    def get(self, name: str) -> dict:
        return dict(self._find(name))

    def add(self, name: str, phone: str, email: str = "") -> dict:
        name = _name(name)
        if any(c["name"] == name for c in self._db["contacts"]):
            raise ValueError(f"contact {name!r} already exists")
        rec = {"name": name, "phone": _check(r"\d{3}-\d{4}", phone, "phone", "'555-0142'"), "email": str(email)}
        self._db["contacts"].append(rec)
        return dict(rec)

    def update(self, name: str, phone: str | None = None, email: str | None = None) -> dict:
        rec = self._find(name)
        if phone is None and email is None:
            raise ValueError("nothing to update: give phone or email")
        if phone is not None:
            rec["phone"] = _check(r"\d{3}-\d{4}", phone, "phone", "'555-0142'")
        if email is not None:
            rec["email"] = str(email)
        return dict(rec)

    def delete(self, name: str) -> None:
        self._db["contacts"].remove(self._find(name))


class Calendar(_App):
    _methods = ("events", "get", "add", "move", "cancel")

    def _find(self, title) -> dict:
        title = _name(title, "title")
        for e in self._db["calendar"]:
            if e["title"] == title:
                return e
        raise _missing("event", "titled", title, [e["title"] for e in self._db["calendar"]])

    def events(self, date: str | None = None) -> list[dict]:
        return [dict(e) for e in self._db["calendar"] if date is None or e["date"] == date]

    def get(self, title: str) -> dict:
        return dict(self._find(title))

    def add(self, title: str, date: str, time: str) -> dict:
        title = _name(title, "title")
        if any(e["title"] == title for e in self._db["calendar"]):
            raise ValueError(f"event {title!r} already exists")
        rec = {
            "title": title,
            "date": _check(r"\d\d-\d\d", date, "date", "'05-03'"),
            "time": _check(r"\d\d:\d\d", time, "time", "'12:30'"),
        }
        self._db["calendar"].append(rec)
        return dict(rec)

    def move(self, title: str, date: str | None = None, time: str | None = None) -> dict:
        rec = self._find(title)
        if date is None and time is None:
            raise ValueError("nothing to move: give date or time")
        if date is not None:
            rec["date"] = _check(r"\d\d-\d\d", date, "date", "'05-03'")
        if time is not None:
            rec["time"] = _check(r"\d\d:\d\d", time, "time", "'12:30'")
        return dict(rec)

    def cancel(self, title: str) -> None:
        self._db["calendar"].remove(self._find(title))


class Notes(_App):
    _methods = ("list", "get", "add", "delete")

    def _find(self, title) -> dict:
        title = _name(title, "title")
        for n in self._db["notes"]:
            if n["title"] == title:
                return n
        raise _missing("note", "titled", title, [n["title"] for n in self._db["notes"]])

    def list(self) -> list[str]:
        return [n["title"] for n in self._db["notes"]]

    def get(self, title: str) -> str:
        return self._find(title)["text"]

    def add(self, title: str, text) -> dict:
        title = _name(title, "title")
        if any(n["title"] == title for n in self._db["notes"]):
            raise ValueError(f"note {title!r} already exists")
        rec = {"title": title, "text": str(text)}
        self._db["notes"].append(rec)
        return dict(rec)

    def delete(self, title: str) -> None:
        self._db["notes"].remove(self._find(title))


class Payments(_App):
    _methods = ("balance", "pay", "requests", "history")

    def balance(self) -> int | float:
        return self._db["payments"]["balance"]

    def pay(self, to: str, amount, note: str = "") -> dict:
        to = Contacts(self._w)._find(to)["name"]
        amount = _amount(amount)
        p = self._db["payments"]
        if amount > p["balance"]:
            raise ValueError(f"insufficient balance: {p['balance']} < {amount}")
        p["balance"] = round(p["balance"] - amount, 2) if isinstance(amount, float) else p["balance"] - amount
        rec = {"id": _next_id(p["transactions"]), "to": to, "amount": amount, "note": str(note)}
        p["transactions"].append(rec)
        return dict(rec)

    def requests(self, name: str | None = None) -> list[dict]:
        return [dict(r) for r in self._db["payments"]["requests"] if name is None or r["from"] == name]

    def history(self) -> list[dict]:
        return [dict(t) for t in self._db["payments"]["transactions"]]


class Messages(_App):
    _methods = ("send", "inbox", "last")

    def send(self, to: str, text) -> dict:
        to = Contacts(self._w)._find(to)["name"]
        rows = self._db["messages"]
        rec = {"id": _next_id(rows), "from": ME, "to": to, "text": str(text)}
        rows.append(rec)
        return dict(rec)

    def inbox(self, name: str | None = None) -> list[dict]:
        return [
            {"from": m["from"], "text": m["text"]}
            for m in self._db["messages"]
            if m["to"] == ME and (name is None or m["from"] == name)
        ]

    def last(self, name: str) -> str:
        got = self.inbox(_name(name))
        if not got:
            raise ValueError(f"no messages from {name!r}")
        return got[-1]["text"]


class Supervisor(_App):
    _methods = ("complete_task",)

    def complete_task(self, answer=None) -> None:
        if not (answer is None or isinstance(answer, (str, int, float, bool))):
            answer = str(answer)
        self._db["supervisor"]["answer"] = answer
        self._db["supervisor"]["completed"] = True


class Apis:
    """``apis``: the object the agent's code sees."""

    _apps = ("contacts", "calendar", "notes", "payments", "messages", "supervisor")

    def __init__(self, world: World):
        self.contacts, self.calendar, self.notes = Contacts(world), Calendar(world), Notes(world)
        self.payments, self.messages, self.supervisor = Payments(world), Messages(world), Supervisor(world)

    def __getattr__(self, item):
        if item.startswith("__"):
            raise AttributeError(item)
        raise AttributeError(f"no app {item!r}; apps: {', '.join(self._apps)}")

    def __repr__(self):
        return f"<apis: {', '.join(self._apps)}>"


class World:
    """The apps over one database (a deep copy of ``db``); ``apis`` is what the agent's code calls."""

    def __init__(self, db: dict):
        self.db = copy.deepcopy(db)
        self.db.setdefault("supervisor", {"completed": False, "answer": None})
        self.apis = Apis(self)

    @property
    def completed(self) -> bool:
        return bool(self.db["supervisor"].get("completed"))

    def run(self, code: str) -> None:
        """Execute trusted code (gold solutions) in-process. Agent code goes through the sandbox instead."""
        exec(compile(code, "<solution>", "exec"), {"apis": self.apis, "__name__": "__main__"})


# ----------------------------------------------------------------------------------------------------- the checks


def _canon(rec) -> str:
    if isinstance(rec, dict):
        rec = {k: v for k, v in rec.items() if k != "id"}
    return json.dumps(rec, sort_keys=True, default=str)


def _norm_answer(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return f"{float(value):g}"
    s = str(value).strip().lower() if value is not None else ""
    try:
        return f"{float(s.lstrip('$')):g}"
    except ValueError:
        return s


def diff(before: dict, after: dict) -> dict:
    """Changes from ``before`` to ``after``: records added/removed per table (multisets, ids ignored), scalars
    changed, and the supervisor's answer."""
    out: dict = {"added": [], "removed": [], "values": {}, "answer": None}
    for table in TABLES:
        b, a = Counter(map(_canon, _get(before, table))), Counter(map(_canon, _get(after, table)))
        out["added"] += [(table, r) for r in sorted((a - b).elements())]
        out["removed"] += [(table, r) for r in sorted((b - a).elements())]
    for path in SCALARS:
        if _get(before, path) != _get(after, path):
            out["values"][path] = _get(after, path)
    out["answer"] = after.get("supervisor", {}).get("answer")
    return out


def derive_checks(before: dict, expected: dict) -> list[dict]:
    """Declarative checks from the gold solution's effect: one per expected change, then ``no_other_changes``."""
    d = diff(before, expected)
    checks = [{"kind": "added", "table": t, "record": json.loads(r)} for t, r in d["added"]]
    checks += [{"kind": "removed", "table": t, "record": json.loads(r)} for t, r in d["removed"]]
    checks += [{"kind": "value", "path": p, "value": v} for p, v in d["values"].items()]
    if d["answer"] is not None:
        checks.append({"kind": "answer", "value": d["answer"]})
    checks.append({"kind": "no_other_changes"})
    return checks


def describe(chk: dict) -> str:
    k = chk["kind"]
    if k in ("added", "removed"):
        return f"{chk['table']}: {k} {chk['record']}"
    if k == "value":
        return f"{chk['path']} == {chk['value']!r}"
    if k == "answer":
        return f"answer == {chk['value']!r}"
    return "nothing else changed"


def check_details(task: Task, final_db: dict) -> list[tuple[str, bool]]:
    """Each check of ``task`` on ``final_db``: (description, passed). A malformed database fails every check."""
    try:
        actual = diff(task.db, final_db)
    except Exception:  # noqa: BLE001 - the agent may have broken the database
        return [(describe(c), False) for c in task.checks]
    added, removed = Counter(actual["added"]), Counter(actual["removed"])
    exp_added, exp_removed, exp_values, exp_answer = Counter(), Counter(), {}, None
    for c in task.checks:
        if c["kind"] == "added":
            exp_added[(c["table"], _canon(c["record"]))] += 1
        elif c["kind"] == "removed":
            exp_removed[(c["table"], _canon(c["record"]))] += 1
        elif c["kind"] == "value":
            exp_values[c["path"]] = c["value"]
        elif c["kind"] == "answer":
            exp_answer = c["value"]
    out = []
    for c in task.checks:
        k = c["kind"]
        if k == "added":
            ok = added[(c["table"], _canon(c["record"]))] > 0
        elif k == "removed":
            ok = removed[(c["table"], _canon(c["record"]))] > 0
        elif k == "value":
            ok = c["path"] in actual["values"] and actual["values"][c["path"]] == c["value"]
        elif k == "answer":
            ok = actual["answer"] is not None and _norm_answer(actual["answer"]) == _norm_answer(c["value"])
        else:  # no_other_changes
            ok = (
                not (added - exp_added)
                and not (removed - exp_removed)
                and all(p in exp_values and exp_values[p] == v for p, v in actual["values"].items())
                and (actual["answer"] is None or exp_answer is not None)
            )
        out.append((describe(c), bool(ok)))
    return out


def check(task: Task, final_db: dict) -> tuple[int, int]:
    """(passed, total) of the task's state checks on the final database."""
    details = check_details(task, final_db)
    return sum(ok for _, ok in details), len(details)


# ------------------------------------------------------------------------------------------------------ the tasks


@dataclass
class Task:
    id: str
    scenario: str
    split: str  # train | dev | test (by scenario)
    difficulty: int  # 1: one API call; 2: two calls or a nested read; 3: a nested read and another call
    instruction: str
    solution: str  # gold code for one turn; ends with apis.supervisor.complete_task()
    db: dict  # the initial state
    checks: list[dict] = field(default_factory=list)  # declarative, see derive_checks

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "scenario": self.scenario,
            "split": self.split,
            "difficulty": self.difficulty,
            "instruction": self.instruction,
            "solution": self.solution,
            "db": self.db,
            "checks": self.checks,
        }


NAMES = [
    "Ann",
    "Bob",
    "Cal",
    "Dee",
    "Eve",
    "Fay",
    "Gus",
    "Hal",
    "Ivy",
    "Jay",
    "Kim",
    "Lea",
    "Max",
    "Ned",
    "Oli",
    "Pam",
    "Ray",
    "Sam",
    "Tia",
    "Uma",
    "Val",
    "Wes",
    "Zoe",
    "Abe",
    "Bea",
    "Cy",
    "Dan",
    "Eli",
    "Flo",
    "Gil",
    "Hana",
    "Ian",
    "Jo",
    "Joe",
    "Kai",
    "Liz",
    "Mia",
    "Nia",
    "Omar",
    "Pia",
    "Rex",
    "Sue",
    "Ted",
    "Vic",
    "Will",
]
TEXTS = [
    "see you soon",
    "on my way",
    "thanks a lot",
    "call me",
    "running late",
    "sounds good",
    "happy birthday",
    "lunch at noon",
    "all done",
    "got it",
    "miss you",
    "good luck",
    "see you at 6",
    "paid",
    "welcome back",
    "new number",
    "meet at 5",
    "bring snacks",
    "no worries",
    "ok",
]
EVENTS = [
    "Lunch",
    "Dentist",
    "Gym",
    "Yoga",
    "Standup",
    "Dinner",
    "Movie",
    "Haircut",
    "Soccer",
    "Piano",
    "Review",
    "Brunch",
    "Concert",
    "Vet",
    "Tennis",
    "Class",
]
NOTES = ["Groceries", "Ideas", "Books", "Todo", "Gifts", "Trip", "Recipes", "Movies", "Chores", "Wishlist", "Goals"]
REQ_NOTES = ["pizza", "taxi", "tickets", "rent", "dinner", "coffee", "gas", "books"]


class _Vars:
    """One task's sampled values and its initial database with distractor records."""

    def __init__(self, rng: random.Random):
        self.rng = r = rng
        names = r.sample(NAMES, r.randint(5, 7) + 1)
        self.x = names.pop()  # a new contact (not in the db)
        self.contacts = names
        self.a, self.b = names[0], names[1]
        phones = r.sample(range(10000), len(names) + 1)
        self.p = f"555-{phones.pop():04d}"  # a new phone number
        events = r.sample(EVENTS, r.randint(3, 5) + 1)
        self.e_new, self.events = events.pop(), events
        self.e = events[0]
        notes = r.sample(NOTES, r.randint(2, 4) + 1)
        self.T_new, self.notes = notes.pop(), notes
        self.T = notes[0]
        self.t, self.t2 = r.sample(TEXTS, 2)
        self.n = r.randrange(5, 96)
        contacts = [
            {"name": n, "phone": f"555-{ph:04d}", "email": f"{n.lower()}@mail.com"} for n, ph in zip(names, phones)
        ]
        calendar = [{"title": t, "date": self.date(), "time": self.time()} for t in events]
        notes_ = [{"title": t, "text": r.choice(TEXTS)} for t in notes]
        self.d, self.h = self.date(), self.time()
        while self.d == calendar[0]["date"]:  # moving the event must change it
            self.d = self.date()
        others = names[1:]
        requesters = [self.a] + r.sample(others, r.randint(1, min(3, len(others))))
        requests = [
            {"id": i + 1, "from": n, "amount": r.randrange(5, 96), "note": r.choice(REQ_NOTES)}
            for i, n in enumerate(requesters)
        ]
        r.shuffle(requests)
        self.req = next(q["amount"] for q in requests if q["from"] == self.a)
        history = [
            {"id": i + 1, "to": r.choice(names), "amount": r.randrange(5, 60), "note": r.choice(REQ_NOTES)}
            for i in range(r.randint(1, 3))
        ]
        senders = [self.a] + [r.choice(others) for _ in range(r.randint(2, 4))]
        r.shuffle(senders)
        msgs = [{"from": s, "to": ME, "text": r.choice(TEXTS)} for s in senders]
        msgs += [{"from": ME, "to": r.choice(names), "text": r.choice(TEXTS)} for _ in range(r.randint(0, 2))]
        r.shuffle(msgs)
        for rows in (contacts, calendar, notes_):
            r.shuffle(rows)
        self.db = {
            "contacts": contacts,
            "calendar": calendar,
            "notes": notes_,
            "payments": {"balance": r.randrange(150, 500), "transactions": history, "requests": requests},
            "messages": [{"id": i + 1, **m} for i, m in enumerate(msgs)],
            "supervisor": {"completed": False, "answer": None},
        }

    def date(self) -> str:
        return f"{self.rng.randrange(1, 13):02d}-{self.rng.randrange(1, 29):02d}"

    def time(self) -> str:
        return f"{self.rng.randrange(7, 21):02d}:{self.rng.choice(['00', '15', '30', '45'])}"


# Clauses: (instruction phrase, code line). A scenario joins clauses with " and " (a later clause's text is {t2}, so two
# texts differ), or is a question.
CLAUSES = {
    "send": ("send {a} the message '{t}'", 'apis.messages.send("{a}","{t}")'),
    "send_x": ("send {x} the message '{t}'", 'apis.messages.send("{x}","{t}")'),
    "pay": ("pay {a} ${n}", 'apis.payments.pay("{a}",{n})'),
    "pay_req": (
        "pay {a} the amount {a} requested",
        'apis.payments.pay("{a}",apis.payments.requests("{a}")[0]["amount"])',
    ),
    "add_contact": ("add contact {x} with phone {p}", 'apis.contacts.add("{x}","{p}")'),
    "update_phone": ("change {a}'s phone to {p}", 'apis.contacts.update("{a}","{p}")'),
    "delete_contact": ("delete contact {a}", 'apis.contacts.delete("{a}")'),
    "add_event": ("add event {e_new} on {d} at {h}", 'apis.calendar.add("{e_new}","{d}","{h}")'),
    "move_event": ("move the event {e} to {d}", 'apis.calendar.move("{e}","{d}")'),
    "cancel_event": ("cancel the event {e}", 'apis.calendar.cancel("{e}")'),
    "add_note": ("add a note titled {T_new} saying '{t}'", 'apis.notes.add("{T_new}","{t}")'),
    "delete_note": ("delete the note {T}", 'apis.notes.delete("{T}")'),
    "note_phone": (
        "save {a}'s phone number in a note titled {a}",
        'apis.notes.add("{a}",apis.contacts.get("{a}")["phone"])',
    ),
    "note_date": (
        "save the date of {e} in a note titled {e}",
        'apis.notes.add("{e}",apis.calendar.get("{e}")["date"])',
    ),
    "send_balance": ("send {a} my balance", 'apis.messages.send("{a}",apis.payments.balance())'),
}
QUESTIONS = {  # (question, answer expression)
    "ask_balance": ("What is my balance?", "apis.payments.balance()"),
    "ask_phone": ("What is {a}'s phone number?", 'apis.contacts.get("{a}")["phone"]'),
    "ask_date": ("On what date is {e}?", 'apis.calendar.get("{e}")["date"]'),
    "ask_time": ("At what time is {e}?", 'apis.calendar.get("{e}")["time"]'),
}
DONE = "apis.supervisor.complete_task()"


@dataclass(frozen=True)
class Scenario:
    name: str
    split: str
    difficulty: int
    clauses: tuple[str, ...]  # keys of CLAUSES, or one key of QUESTIONS

    def instantiate(self, v: _Vars) -> tuple[str, str]:
        vals = {k: getattr(v, k) for k in ("a", "b", "x", "p", "e", "e_new", "T", "T_new", "t", "t2", "n", "d", "h")}
        if self.clauses[0] in QUESTIONS:
            q, expr = QUESTIONS[self.clauses[0]]
            return q.format(**vals), f"apis.supervisor.complete_task(answer={expr.format(**vals)})"
        parts = [tuple(x.replace("{t}", "{t2}") if i else x for x in CLAUSES[c]) for i, c in enumerate(self.clauses)]
        phrase = " and ".join(ph for ph, _ in parts).format(**vals)
        code = "\n".join([line.format(**vals) for _, line in parts] + [DONE])
        return phrase[0].upper() + phrase[1:] + ".", code


PAIRED = (
    "send",
    "pay",
    "pay_req",
    "update_phone",
    "add_event",
    "move_event",
    "cancel_event",
    "add_note",
    "delete_note",
)
"""The clauses that pair: every ordered pair of two of them is a scenario (except the two that act on one event)."""
HELD_OUT = {  # (first, second) -> split; each held-out first and second clause differs, so each stays trained
    ("cancel_event", "send"): "test",
    ("pay", "add_note"): "test",
    ("pay_req", "add_event"): "test",
    ("delete_note", "pay"): "test",
    ("update_phone", "delete_note"): "test",
    ("add_event", "cancel_event"): "test",
    ("update_phone", "send"): "dev",
    ("add_note", "pay"): "dev",
    ("move_event", "add_note"): "dev",
    ("send", "delete_note"): "dev",
    ("pay_req", "cancel_event"): "dev",
}


def _pairs() -> tuple[Scenario, ...]:
    out = []
    for first in PAIRED:
        for second in PAIRED:
            if first == second or {first, second} == {"move_event", "cancel_event"}:
                continue
            out.append(
                Scenario(
                    f"{first}_then_{second}",
                    HELD_OUT.get((first, second), "train"),
                    3 if "pay_req" in (first, second) else 2,
                    (first, second),
                )
            )
    return tuple(out)


SCENARIOS: tuple[Scenario, ...] = (
    # train: every clause alone and the questions; then the pairs, of which 11 are held out for dev and test
    Scenario("send_message", "train", 1, ("send",)),
    Scenario("pay_contact", "train", 1, ("pay",)),
    Scenario("add_contact", "train", 1, ("add_contact",)),
    Scenario("add_event", "train", 1, ("add_event",)),
    Scenario("add_note", "train", 1, ("add_note",)),
    Scenario("update_phone", "train", 1, ("update_phone",)),
    Scenario("delete_contact", "train", 1, ("delete_contact",)),
    Scenario("cancel_event", "train", 1, ("cancel_event",)),
    Scenario("delete_note", "train", 1, ("delete_note",)),
    Scenario("move_event", "train", 1, ("move_event",)),
    Scenario("send_balance", "train", 2, ("send_balance",)),
    Scenario("note_phone", "train", 2, ("note_phone",)),
    Scenario("note_event_date", "train", 2, ("note_date",)),
    Scenario("pay_requested", "train", 2, ("pay_req",)),
    Scenario("answer_balance", "train", 1, ("ask_balance",)),
    Scenario("answer_phone", "train", 2, ("ask_phone",)),
    Scenario("answer_event_date", "train", 2, ("ask_date",)),
    Scenario("answer_event_time", "train", 2, ("ask_time",)),
    Scenario("add_contact_then_send_x", "train", 2, ("add_contact", "send_x")),
) + _pairs()
TASKS_PER_SCENARIO = {"train": 4, "dev": 6, "test": 6}


def make_task(scenario: Scenario, index: int, seed: int = 0) -> Task:
    rng = random.Random(f"align-world:{seed}:{scenario.name}:{index}")
    v = _Vars(rng)
    instruction, solution = scenario.instantiate(v)
    world = World(v.db)
    world.run(solution)
    return Task(
        id=f"{scenario.name}_{index}",
        scenario=scenario.name,
        split=scenario.split,
        difficulty=scenario.difficulty,
        instruction=instruction,
        solution=solution,
        db=v.db,
        checks=derive_checks(v.db, world.db),
    )


def make_tasks(seed: int = 0) -> list[Task]:
    """Every task of the built-in world (train, dev and test), deterministic in ``seed``."""
    return [make_task(s, i, seed) for s in SCENARIOS for i in range(TASKS_PER_SCENARIO[s.split])]


def tasks_for(split: str, seed: int = 0) -> list[Task]:
    """The tasks of one split ('train', 'dev' or 'test'); an unknown split gives an empty list."""
    return [t for t in make_tasks(seed) if t.split == split]


def scenarios_for(split: str) -> list[str]:
    return [s.name for s in SCENARIOS if s.split == split]

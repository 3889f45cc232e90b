"""Recipes: every shipped YAML parses; unknown keys, wrong types, bad values and bad files are one-line UserErrors."""

import json
import string
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from align.config import Recipe, describe_fields, load_recipe, parse_overrides
from align.errors import UserError

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
RECIPE_FILES = sorted(p for p in RECIPES.rglob("*.yaml") if "accelerate" not in p.relative_to(RECIPES).parts)
SECTIONS = ("model", "lora", "data", "loss", "train", "rollout", "judge", "eval", "logging")
TOP_LEVEL = {key.split(".")[0] for key, _, _ in describe_fields()}
DOTTED_KEYS = sorted(key for key, _, _ in describe_fields())


def write(tmp_path: Path, text: str, name: str = "recipe.yaml", model: bool = True) -> Path:
    """A recipe file; ``model`` adds ``model.name_or_path: tiny:llama`` when the text names no model section (every
    recipe must name its model)."""
    if model and text.strip() and not text.lstrip().startswith(("{", "[", "-")) and "model:" not in text:
        text = "model:\n  name_or_path: tiny:llama\n" + text
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def user_error(path: Path, overrides=None) -> str:
    """The UserError message of load_recipe; asserts it is one non-empty line naming the file."""
    with pytest.raises(UserError) as info:
        load_recipe(path, overrides)
    msg = str(info.value)
    assert msg and "\n" not in msg, msg
    assert str(path) in msg or path.name in msg, msg
    return msg


# ------------------------------------------------------------------------------------------ shipped recipes


def test_recipes_folder_is_found():
    assert RECIPE_FILES, f"no recipes found under {RECIPES}"


@pytest.mark.parametrize("path", RECIPE_FILES, ids=lambda p: str(p.relative_to(RECIPES)))
def test_every_shipped_recipe_loads(path):
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    assert recipe.description.strip(), f"{path} has no description for `align recipes`"


def test_an_empty_recipe_or_one_without_a_model_is_an_error(tmp_path):
    for text in ("", "{}\n", "trainer: sft\nmodel:\n  dtype: float32\n"):
        assert "names no model" in user_error(write(tmp_path, text, model=False))
    assert load_recipe(write(tmp_path, "model:\n  name_or_path: tiny:llama\n")) == Recipe()


# ------------------------------------------------------------------------------------------------ unknown keys


def test_unknown_top_level_key_names_it_and_suggests(tmp_path):
    msg = user_error(write(tmp_path, "descripton: hello\n"))
    assert "'descripton'" in msg
    assert "did you mean 'description'" in msg


def test_unknown_nested_key_names_dotted_key_and_suggests(tmp_path):
    msg = user_error(write(tmp_path, "train:\n  lr: 1.0e-4\n  batch_sise: 4\n"))
    assert "'train.batch_sise'" in msg
    assert "did you mean 'train.batch_size'" in msg


def test_unknown_key_without_close_match(tmp_path):
    msg = user_error(write(tmp_path, "model:\n  zzzzzz: 1\n"))
    assert "unknown key 'model.zzzzzz'" in msg
    assert "did you mean" not in msg


# ----------------------------------------------------------------------------------------------- wrong types


@pytest.mark.parametrize(
    "yaml_text, key",
    [
        ("train:\n  lr: fast\n", "train.lr"),  # string for float
        ("train:\n  batch_size: 2.5\n", "train.batch_size"),  # float for int
        ("train:\n  epochs: true\n", "train.epochs"),  # bool for int
        ("description: [a, b]\n", "description"),  # list for str
        ("data:\n  train: [a.jsonl]\n", "data.train"),  # list for str
        ("lora:\n  enabled: 1\n", "lora.enabled"),  # int for bool
        ("model:\n  dtype: float64\n", "model.dtype"),  # not one of the literals
        ("train:\n  max_steps: 1.5\n", "train.max_steps"),  # float for Optional[int]
        ("model: tiny\n", "model"),  # scalar for a section
        ("train:\n  max_grad_norm: big\n", "train.max_grad_norm"),  # string for Optional[float]
    ],
)
def test_wrong_type_names_the_key(tmp_path, yaml_text, key):
    msg = user_error(write(tmp_path, yaml_text))
    assert f"'{key}'" in msg
    assert "expected" in msg


def test_yaml11_exponent_without_dot_is_a_float(tmp_path):
    # YAML 1.1 reads 5e-7 (no dot) as the string '5e-7'; it must still be accepted as a float.
    recipe = load_recipe(write(tmp_path, "train:\n  lr: 5e-7\nloss:\n  beta: 1e-1\n"))
    assert recipe.train.lr == pytest.approx(5e-7) and isinstance(recipe.train.lr, float)
    assert recipe.loss.beta == pytest.approx(0.1)


def test_int_accepted_for_float(tmp_path):
    recipe = load_recipe(write(tmp_path, "loss:\n  beta: 1\n"))
    assert recipe.loss.beta == 1.0 and isinstance(recipe.loss.beta, float)


# ------------------------------------------------------------------------------------------------- overrides


def test_overrides_are_applied(tmp_path):
    path = write(tmp_path, "train:\n  lr: 1.0e-3\n")
    recipe = load_recipe(path, ["train.lr=1e-4", "lora.enabled=true", "data.builtin_families=[sort,max]"])
    assert recipe.train.lr == pytest.approx(1e-4)
    assert recipe.lora.enabled is True
    assert recipe.data.builtin_families == ["sort", "max"]


def test_override_parsing():
    assert parse_overrides(["train.lr=1e-4", "lora.enabled=true", "description="]) == [
        ("train.lr", "1e-4"),
        ("lora.enabled", True),
        ("description", ""),
    ]


def test_override_of_unknown_key_fails(tmp_path):
    msg = user_error(write(tmp_path, ""), ["train.lrr=1e-4"])
    assert "'train.lrr'" in msg and "did you mean 'train.lr'" in msg


@pytest.mark.parametrize("bad", ["train.lr", "=5"])
def test_malformed_override_fails(tmp_path, bad):
    with pytest.raises(UserError, match="dotted.key=value"):
        load_recipe(write(tmp_path, ""), [bad])


def test_override_into_a_scalar_fails(tmp_path):
    user_error(write(tmp_path, "description: hi\n"), ["description.x=1"])


def test_override_wrong_type_fails(tmp_path):
    msg = user_error(write(tmp_path, ""), ["train.batch_size=big"])
    assert "'train.batch_size'" in msg


# -------------------------------------------------------------------------------------------------- values


@pytest.mark.parametrize(
    "yaml_text, needle",
    [
        ("train:\n  batch_size: -4\n", "train.batch_size"),
        ("train:\n  batch_size: 0\n", "train.batch_size"),
        ("train:\n  lr: 0\n", "train.lr"),
        ("loss:\n  name: cdpo\n  label_smoothing: 0.5\n", "loss.label_smoothing"),
        ("data:\n  max_length: 128\n  max_prompt_length: 128\n", "data.max_prompt_length"),
        ("data:\n  max_length: 128\n  max_prompt_length: 200\n", "data.max_prompt_length"),
        ("loss:\n  name: dpoo\n", "loss.name"),
        ("trainer: sft\nloss:\n  name: dpo\n", "trainer 'sft'"),
        ("loss:\n  name: dpo\ntrain:\n  reference: none\n", "train.reference"),
        ("train:\n  max_steps: 0\n", "train.max_steps"),
    ],
)
def test_bad_values_fail(tmp_path, yaml_text, needle):
    assert needle in user_error(write(tmp_path, yaml_text))


def test_unknown_loss_lists_the_registry(tmp_path):
    msg = user_error(write(tmp_path, "loss:\n  name: dpoo\n"))
    assert "dpo" in msg.split("choose one of", 1)[1]


def test_sft_recipe_with_sft_loss_is_fine(tmp_path):
    recipe = load_recipe(write(tmp_path, "trainer: sft\nloss:\n  name: sft\ntrain:\n  reference: none\n"))
    assert recipe.trainer == "sft"


def test_data_paths_with_dot_slash_are_relative_to_the_recipe(tmp_path):
    recipe = load_recipe(write(tmp_path, "data:\n  train: ./pairs.jsonl\n  eval: other.jsonl\n"))
    assert recipe.data.train == str((tmp_path / "pairs.jsonl").resolve())
    assert recipe.data.eval == "other.jsonl"


# ------------------------------------------------------------------------------------------------ bad files


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_non_mapping_yaml_fails_with_one_line(tmp_path, text):
    assert "mapping" in user_error(write(tmp_path, text))


@pytest.mark.parametrize("text", ["train: [1, 2\n", "a: b: c\n", "train:\n  lr: 1\n lr: 2\n", "x: '\n"])
def test_invalid_yaml_fails_with_one_line(tmp_path, text):
    assert "invalid YAML" in user_error(write(tmp_path, text))


def test_missing_recipe_file(tmp_path):
    assert "not found" in user_error(tmp_path / "nope.yaml")


def test_non_utf8_recipe(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("description: caf\xe9\n".encode("latin-1"))
    assert "UTF-8" in user_error(path)


# Regressions found by the property tests below: each input must be a UserError, not a crash.


def test_invalid_yaml_date_is_a_user_error(tmp_path):
    # PyYAML's timestamp resolver turns 2020-13-45 into a ValueError (month must be in 1..12), not a YAMLError.
    user_error(write(tmp_path, "description: 2020-13-45\n"))


def test_invalid_date_in_override_is_a_string_or_a_user_error(tmp_path):
    # parse_overrides only falls back to the raw text on yaml.YAMLError; the timestamp's ValueError escapes
    path = write(tmp_path, "")
    try:
        recipe = load_recipe(path, ["description=2020-13-45"])
    except UserError:
        user_error(path, ["description=2020-13-45"])
    else:
        assert recipe.description == "2020-13-45"


def test_huge_int_for_a_float_is_a_user_error(tmp_path):
    # float(10**400) raises OverflowError
    user_error(write(tmp_path, ""), ["train.lr=" + "1" + "0" * 400])


def test_zero_tiny_heads_is_a_user_error(tmp_path):
    # validate() computes tiny_hidden_size % tiny_heads: ZeroDivisionError for 0
    msg = user_error(write(tmp_path, "model:\n  name_or_path: tiny:llama\n  tiny_heads: 0\n"))
    assert "model.tiny_heads" in msg


# ---------------------------------------------------------------------------------------------- documentation


def test_every_field_is_documented():
    rows = describe_fields()
    keys = [k for k, _, _ in rows]
    assert len(keys) == len(set(keys))
    assert {"train.lr", "loss.name", "data.train", "model.name_or_path", "lora.enabled"} <= set(keys)
    missing = [k for k, _, help in rows if not help.strip()]
    assert not missing, f"fields without help: {missing}"


# ------------------------------------------------------------------------------------------------ properties

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20)
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
# Values that sit on the edges of the checks: zero/negative counts, ints too big for a float, YAML specials.
edge_values = st.sampled_from(
    [
        0,
        -1,
        1,
        10**400,
        -(10**400),
        "2020-13-45",
        "2021-02-30",
        ".nan",
        ".inf",
        "1e999",
        "~",
        "null",
        "yes",
        "0x10",
        "1_000",
        "[",
        "{a: 1}",
        "!!python/name:os.system",
    ]
)
unknown_names = st.text(alphabet=string.ascii_letters + string.digits + "_-. ", min_size=1, max_size=16)


@st.composite
def unknown_key_trees(draw):
    """A recipe tree with at least one unknown key, at the top level or inside a section."""
    section = draw(st.sampled_from((None,) + SECTIONS))
    allowed = TOP_LEVEL if section is None else {k.split(".", 1)[1] for k in DOTTED_KEYS if k.startswith(section + ".")}
    unknown = draw(st.dictionaries(unknown_names.filter(lambda k: k not in allowed), values, min_size=1, max_size=3))
    return unknown if section is None else {section: unknown}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=unknown_key_trees())
def test_property_unknown_keys_always_user_error(tree):
    import yaml

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "r.yaml"
        path.write_text(yaml.safe_dump(tree), encoding="utf-8")
        with pytest.raises(UserError, match="unknown key"):
            load_recipe(path)


def _override_text(value) -> str:
    """What a user would type after '=': raw text for strings, JSON (a YAML subset) for everything else."""
    if isinstance(value, str):
        return value
    return json.dumps(value)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    pairs=st.lists(
        st.tuples(
            st.sampled_from(DOTTED_KEYS + list(SECTIONS)),
            st.one_of(scalars, edge_values, st.lists(scalars, max_size=3)),
        ),
        min_size=1,
        max_size=3,
    )
)
def test_property_overrides_give_recipe_or_user_error(pairs):
    overrides = [f"{key}={_override_text(value)}" for key, value in pairs]
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "r.yaml"
        path.write_text("description: property test\n", encoding="utf-8")
        try:
            recipe = load_recipe(path, overrides)
        except UserError as e:
            assert str(e).strip()
        else:
            assert isinstance(recipe, Recipe)


def test_keys_the_trainer_does_not_read_are_errors(tmp_path):
    """A key of a section the chosen trainer never reads, or a train key it ignores, stops the run with one line
    naming the key and the trainer."""
    from align.paths import REPO_ROOT

    dpo, spo = REPO_ROOT / "recipes" / "dpo" / "tiny.yaml", REPO_ROOT / "recipes" / "spo" / "tiny.yaml"
    for recipe, override, key in [
        (dpo, "agent.iterations=5", "agent.iterations"),
        (dpo, "rollout.n=8", "rollout.n"),
        (dpo, "judge.kind=llm", "judge.kind"),
        (spo, "train.save_steps=10", "train.save_steps"),
        (spo, "train.warmup_steps=10", "train.warmup_steps"),
        (spo, "train.schedule=cosine", "train.schedule"),
        (REPO_ROOT / "recipes" / "loop" / "tiny.yaml", "data.train=x.jsonl", "data.train"),
        (REPO_ROOT / "recipes" / "reward" / "pets-bt.yaml", "loss.beta=0.2", "loss.beta"),
    ]:
        msg = user_error(recipe, [override])
        assert f"'{key}'" in msg or f"{key} " in msg, msg
        assert "not read by trainer" in msg
    assert load_recipe(spo, ["train.schedule=constant"]).train.schedule == "constant"  # what it does: fine


def test_data_cache_is_an_offline_key():
    """data.cache (the tokenisation cache) is read by the offline trainers only: online and reward recipes that set
    it get one line; their saved recipes leave it out, so they load back."""
    from align.config import dump_yaml, load_recipe
    from align.paths import REPO_ROOT

    for recipe in ("spo/tiny.yaml", "reward/pets-bt.yaml"):
        with pytest.raises(UserError, match="key 'data.cache' is not read by trainer"):
            load_recipe(REPO_ROOT / "recipes" / recipe, ["data.cache=false"])
        assert "cache:" not in dump_yaml(load_recipe(REPO_ROOT / "recipes" / recipe))
    assert load_recipe(REPO_ROOT / "recipes" / "dpo" / "tiny.yaml", ["data.cache=false"]).data.cache is False

"""Model cards (README.md in every run folder) and `align push` (its upload plan and hub calls, with a stand-in
for huggingface_hub's HfApi: nothing leaves the machine)."""

from __future__ import annotations

import re

import pytest
import yaml

import align
from align.card import push, upload_plan
from align.cli import main
from align.config import load_recipe, to_dict
from align.errors import UserError

PAIRS = [{"prompt": "2+2=", "chosen": "4", "rejected": "5"}, {"prompt": "Sky?", "chosen": "blue", "rejected": "red"}]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("card") / "dpo-run"
    recipe = {
        "description": "card test",
        "trainer": "preference",
        "model": {"name_or_path": "tiny:llama", "tiny_hidden_size": 32, "tiny_layers": 1, "tiny_heads": 1},
        "loss": {"name": "dpo"},
        "train": {"max_steps": 4, "batch_size": 4, "save_steps": 2, "eval_steps": 2},
        "logging": {"progress": False},
    }
    align.train(recipe, output_dir=out, train_dataset=PAIRS * 8, eval_dataset=PAIRS)
    return out


def test_every_run_folder_gets_a_model_card(run_dir):
    card = (run_dir / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["library_name"] == "transformers" and {"align", "dpo"} <= set(front["tags"])
    assert "base_model" not in front  # tiny:llama is not a hub id
    assert "`tiny:llama`" in card and "Rafailov et al. 2023" in card and "arXiv:2305.18290" in card
    assert "- **Run:** 4 steps on 1 process(es)" in card and f"align {align.__version__}" in card
    final = card.split("## Final metrics")[1].split("## Evaluation")[0]
    assert re.search(r"\| loss \| -?\d", final) and "| step | 4 |" in final
    assert re.search(r"\| eval/loss \| \d", card.split("## Evaluation")[1])
    for png in (run_dir / "plots").glob("*.png"):
        assert f"(plots/{png.name})" in card
    recipe = yaml.safe_load(card.split("```yaml\n")[1].split("```")[0])
    assert recipe == to_dict(load_recipe(run_dir / "recipe.yaml"))  # the card's recipe is the run's


def test_the_card_links_a_hub_base_model_and_a_lora_adapter(tmp_path):
    from align.card import model_card
    from align.config import recipe_from_dict

    recipe = recipe_from_dict(
        {"trainer": "reward", "model": {"name_or_path": "Qwen/Qwen2.5-0.5B"}, "reward": {"kind": "vpl"}}
    )
    card = model_card(tmp_path, recipe, {"steps": 3, "final": {"loss": 0.5, "eval/accuracy": 0.9}})
    assert (
        "base_model: Qwen/Qwen2.5-0.5B" in card and "Poddar et al. 2024" in card and "| eval/accuracy | 0.9 |" in card
    )
    lora = recipe_from_dict({"model": {"name_or_path": "/models/x"}, "lora": {"enabled": True}})
    card = model_card(tmp_path, lora, {"steps": 1, "final": {}})
    assert "library_name: peft" in card and "LoRA adapter" in card and "base_model" not in card


def test_upload_plan_is_the_finished_folder_without_checkpoints(run_dir, tmp_path):
    files = upload_plan(run_dir)
    assert {"README.md", "summary.json", "recipe.yaml", "model.safetensors", "metrics.jsonl"} <= set(files)
    assert any(f.startswith("plots/") for f in files) and not any(f.startswith("checkpoint-") for f in files)
    assert any(f.startswith("checkpoint-") for f in upload_plan(run_dir, checkpoints=True))
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "recipe.yaml").write_text("trainer: preference\n")
    with pytest.raises(UserError, match="no summary.json"):
        upload_plan(tmp_path / "half")


class FakeHub:
    def __init__(self, fail: Exception | None = None):
        self.calls, self.fail = [], fail

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id, kw))
        if self.fail:
            raise self.fail

    def upload_folder(self, **kw):
        self.calls.append(("upload_folder", kw))
        return type("Commit", (), {"commit_url": f"https://huggingface.co/{kw['repo_id']}/commit/abc"})()


def test_push_creates_the_repo_and_uploads_the_plan_in_one_commit(run_dir):
    hub = FakeHub()
    url = push(run_dir, "me/dpo-run", private=True, api=hub)
    assert url == "https://huggingface.co/me/dpo-run/commit/abc"
    (_, repo, kw), (_, up) = hub.calls
    assert repo == "me/dpo-run" and kw == {"repo_type": "model", "private": True, "exist_ok": True}
    assert up["folder_path"] == str(run_dir) and up["allow_patterns"] == upload_plan(run_dir)
    with pytest.raises(UserError, match="not a hub repository id"):
        push(run_dir, "no-owner", api=FakeHub())
    with pytest.raises(UserError) as e:
        push(run_dir, "me/x", api=FakeHub(OSError("offline\nmore")))
    assert str(e.value) == f"push {run_dir} -> me/x: OSError: offline"


def test_push_cli_dry_run_lists_the_files_and_bad_folders_exit_2(run_dir, tmp_path, capsys):
    assert main(["push", str(run_dir), "me/x", "--dry-run"]) == 0
    assert capsys.readouterr().out.split() == upload_plan(run_dir)
    assert main(["push", str(tmp_path / "missing"), "me/x"]) == 2
    assert "not a folder" in capsys.readouterr().err

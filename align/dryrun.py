"""``align train RECIPE --dry-run``: check a recipe, its data and its launch configuration without loading weights.

Checks: the recipe (types, ranges, conflicts: done by load_recipe), the loss, the model path (a local folder
must hold config.json; hub ids are only named), the tokenizer when it is local, the data (read, format,
columns, empty responses, and lengths when the tokenizer is available) and the accelerate config file.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from align.config import Recipe
from align.errors import UserError

ACCELERATE_KEYS = {
    "compute_environment",
    "distributed_type",
    "num_processes",
    "num_machines",
    "machine_rank",
    "mixed_precision",
    "use_cpu",
    "deepspeed_config",
    "main_training_function",
    "gpu_ids",
    "rdzv_backend",
    "same_network",
    "tpu_env",
    "tpu_use_cluster",
    "tpu_use_sudo",
    "downcast_bf16",
    "main_process_ip",
    "main_process_port",
    "debug",
    "enable_cpu_affinity",
    "fsdp_config",
    "dynamo_config",
}
DISTRIBUTED_TYPES = {"NO", "MULTI_CPU", "MULTI_GPU", "DEEPSPEED", "FSDP"}


def check_accelerate_config(path: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"accelerate_config: {path}: file not found")
    try:
        cfg = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{path}: an accelerate config must be a mapping")
    unknown = set(cfg) - ACCELERATE_KEYS
    if unknown:
        raise UserError(f"{path}: unknown accelerate key {sorted(unknown)[0]!r}")
    dt = cfg.get("distributed_type", "NO")
    if dt not in DISTRIBUTED_TYPES:
        raise UserError(f"{path}: distributed_type {dt!r} is not one of {sorted(DISTRIBUTED_TYPES)}")
    n = cfg.get("num_processes", 1)
    if not isinstance(n, int) or n < 1:
        raise UserError(f"{path}: num_processes must be a positive integer")
    if dt == "DEEPSPEED":
        from align.extras import require

        require("deepspeed", f"{path} (distributed_type DEEPSPEED)")
        ds = cfg.get("deepspeed_config") or {}
        if ds.get("zero_stage") not in (0, 1, 2, 3):
            raise UserError(f"{path}: deepspeed_config.zero_stage must be 0-3")
        return f"{dt} ZeRO-{ds['zero_stage']} x{n}" + (" (CPU)" if cfg.get("use_cpu") else "")
    return f"{dt} x{n}" + (" (CPU)" if cfg.get("use_cpu") else "")


def accelerate_processes(recipe: Recipe, recipe_path: str) -> int:
    """num_processes of the recipe's accelerate config (1 without one)."""
    if not recipe.accelerate_config:
        return 1
    path = Path(recipe.accelerate_config)
    if not path.is_file() and not path.is_absolute():
        path = Path(recipe_path).resolve().parent.parent / "accelerate" / path.name
    try:
        return int((yaml.safe_load(path.read_text()) or {}).get("num_processes", 1))
    except (OSError, ValueError, TypeError, yaml.YAMLError):
        return 1


def rollout_layout(recipe: Recipe, processes: int, where: str) -> str:
    """What the rollout engine will be on ``processes`` training processes (checked, nothing started)."""
    r = recipe.rollout
    if r.backend != "vllm":
        return f"hf (transformers) on every rank, {r.n} samples per prompt"
    v = r.vllm
    if v.mode == "server":
        push = "LoRA adapters" if recipe.lora.enabled else f"full weights ({v.weight_transfer} transfer)"
        return (
            f"vllm server mode: {len(v.server_urls)} server(s) {', '.join(v.server_urls)} (not contacted in a dry "
            f"run); rank 0 pushes {push} after each update, timeout {v.server_timeout:g} s"
        )
    tp = v.tensor_parallel_size
    if processes % tp:
        raise UserError(
            f"{where}: rollout.vllm.tensor_parallel_size {tp} does not divide the {processes} processes "
            "of the accelerate config"
        )
    groups = [list(range(g, g + tp)) for g in range(0, processes, tp)]
    executor = "external_launcher" if processes > 1 or tp > 1 else "in-process single worker"
    return (
        f"vllm colocate: {len(groups)} engine(s) over {processes} process(es), tensor parallel {tp} "
        f"(rank groups {groups if len(groups) <= 8 else str(groups[:8])[:-1] + ', ...]'}), {executor}; "
        f"gpu_memory_utilization {v.gpu_memory_utilization}, sleep level {v.sleep_level}, prefix caching "
        f"{'on' if v.enable_prefix_caching else 'off'}, max_num_seqs {v.max_num_seqs or r.batch_size}"
    )


def dry_run(recipe: Recipe, recipe_path: str) -> str:
    from align.data import normalise, parse_hf, read_rows, tokenize_rows
    from align.extras import check_run_extras
    from align.losses import get_loss
    from align.models import check_model_path, load_tokenizer

    check_run_extras(recipe, deepspeed=False)  # DeepSpeed: checked with the accelerate config
    if recipe.trainer == "reward":
        return _dry_run_reward(recipe, recipe_path)
    if recipe.trainer == "agent":
        return _dry_run_agent(recipe, recipe_path)
    lines = [f"recipe   {recipe_path}: ok ({recipe.trainer}, loss {recipe.loss.name})"]
    spec = get_loss(recipe.loss.name)
    name = recipe.model.name_or_path
    check_model_path(name)
    local = name.startswith("tiny:") or Path(name).is_dir()
    lines.append(
        f"model    {name}: {'local' if local else 'hub id (not downloaded in a dry run)'}"
        + (" + LoRA" if recipe.lora.enabled else "")
        + (
            f" on a {recipe.model.quantization} base (QLoRA, bitsandbytes)"
            if recipe.model.quantization != "none"
            else ""
        )
    )
    tok = load_tokenizer(name, recipe.model.revision, recipe.model.trust_remote_code) if local else None
    sources = [("train", recipe.data.train)] + ([("eval", recipe.data.eval)] if recipe.data.eval else [])
    for label, source in sources:
        if recipe.trainer == "online" and source.startswith("builtin:stories"):
            from align.data import load_prompts

            lines.append(
                f"data     {label} {source}: {len(load_prompts(recipe.data, recipe.train.seed))} story openings"
            )
            continue
        split = recipe.data.eval_split if label == "eval" else recipe.data.split
        if source.startswith("hf:") and not Path(parse_hf(source[3:])[0]).is_dir():
            lines.append(f"data     {label} {source}: hub dataset (checked when training starts)")
            continue
        rows = read_rows(source, recipe.data, seed=recipe.train.seed, sft=not spec.needs_rejected, split=split)
        if recipe.data.limit is not None:
            rows = rows[: recipe.data.limit]
        fmt, triples = normalise(rows, recipe.data, source, sft=not spec.needs_rejected)
        if tok is not None:
            tokenize_rows(triples, fmt, tok, recipe.data, source)
        lines.append(
            f"data     {label} {source}: {len(triples)} rows, format {fmt}"
            + (", lengths ok" if tok is not None else "")
        )
    if recipe.trainer == "online":
        j = recipe.judge
        if j.kind == "vpl" and not (j.path and Path(j.path).is_dir() and j.context and Path(j.context).is_file()):
            raise UserError(
                f"{recipe_path}: judge kind 'vpl' needs judge.path (a VPL model folder) and judge.context (the user's "
                "labelled pairs)"
            )
        if j.kind == "none":
            raise UserError(
                f"{recipe_path}: judge.kind: the online trainer needs a judge (checker, reward_model or llm)"
            )
        if j.kind == "llm" and not (j.base_url and j.model):
            raise UserError(f"{recipe_path}: judge.base_url and judge.model are required for an LLM judge")
        if j.kind == "reward_model" and not (j.path and Path(j.path).is_dir()):
            raise UserError(f"{recipe_path}: judge.path {j.path!r} is not a reward-model folder")
        if recipe.rollout.n < 2:
            raise UserError(f"{recipe_path}: rollout.n must be >= 2 for self-play")
        detail = f" at {j.base_url} ({j.model})" if j.kind == "llm" else ""
        if j.kind == "function":  # imported (not called) here: a missing module or name is caught now
            from align.judges import load_reward_function
            from align.rewards import RewardFunctions

            # reward models are checked, not loaded, in a dry run
            fns = RewardFunctions(j.functions, j.weights, resolve=lambda f: load_reward_function(f, load_models=False))
            detail = ": " + ", ".join(f"{w:g} x {name}" for (name, _), w in zip(fns.functions, fns.weights))
        lines.append(f"judge    {j.kind}{detail}")
        lines.append(f"rollout  {rollout_layout(recipe, accelerate_processes(recipe, recipe_path), recipe_path)}")
    if recipe.accelerate_config:
        cfg_path = recipe.accelerate_config
        if not Path(cfg_path).is_file():
            cfg_path = (
                str(Path(recipe_path).resolve().parent.parent / "accelerate" / Path(cfg_path).name)
                if not Path(cfg_path).is_absolute()
                else cfg_path
            )
        launch = check_accelerate_config(cfg_path)
        if (
            "ZeRO-3" in launch
            and recipe.train.reference == "model"
            and not recipe.lora.enabled
            and spec.needs_reference
        ):
            raise UserError(
                f"{recipe_path}: train.reference 'model' keeps an unsharded reference copy, which ZeRO-3 cannot hold; "
                "use train.reference=precompute (or LoRA)"
            )
        if "ZeRO-3" in launch and recipe.trainer == "online" and not recipe.lora.enabled and spec.needs_reference:
            raise UserError(
                f"{recipe_path}: online loss {spec.name!r} needs a frozen reference copy of the policy, which ZeRO-3 "
                "cannot hold; use LoRA (lora.enabled=true) or ZeRO-2"
            )
        lines.append(f"launch   {recipe.accelerate_config}: {launch}")
    lines.append("dry run ok: nothing was loaded or written")
    return "\n".join(lines)


def _dry_run_reward(recipe: Recipe, recipe_path: str) -> str:
    """Reward recipes: the backbone folder (``pkg:`` resolved), its tokenizer, and the pairs with their user columns."""
    from align.models import check_model_path
    from align.reward_model import resolve_backbone
    from align.trainers.reward import split_pairs
    from align.userdata import counting_only

    name = recipe.model.name_or_path
    path = resolve_backbone(name)
    check_model_path(path)
    lines = [
        f"recipe   {recipe_path}: ok (reward, {recipe.reward.kind})",
        f"model    {name}: {'local' if name.startswith('tiny:') or Path(path).is_dir() else 'hub id'}"
        + (f" ({path})" if path != name else "")
        + (", backbone trained" if recipe.reward.train_backbone else ", backbone frozen"),
    ]
    with counting_only():  # counts only: no judge is trained to label the pairs of a builtin set
        train, ev = split_pairs(recipe)
    users = len(train.by_user()) if recipe.reward.kind == "vpl" else None
    lines.append(f"data     train {recipe.data.train}: {len(train)} pairs" + (f", {users} users" if users else ""))
    if ev is not None:
        lines.append(f"data     eval {recipe.data.eval or 'held-out fraction'}: {len(ev)} pairs")
    lines.append("dry run ok: nothing was loaded or written")
    return "\n".join(lines)


def _dry_run_agent(recipe: Recipe, recipe_path: str) -> str:
    """Agent recipes: the policy path, the world and its task splits (the built-in world is generated, not loaded)."""
    from align.models import check_model_path

    check_model_path(recipe.model.name_or_path)
    a = recipe.agent
    lines = [
        f"recipe   {recipe_path}: ok (agent, loss {recipe.loss.name}, advantage {a.advantage}, importance "
        f"{recipe.loss.importance})",
        f"model    {recipe.model.name_or_path}" + (" + LoRA" if recipe.lora.enabled else ""),
    ]
    if a.world == "builtin":
        from align.agents.play import load_tasks

        train = load_tasks(recipe, a.split)
        ev = load_tasks(recipe, a.eval_split) if a.eval_split else []
        lines.append(
            f"world    builtin: {len(train)} {a.split} tasks ({len({t.scenario for t in train})} scenarios)"
            + (f", {len(ev)} {a.eval_split} tasks" if ev else "")
        )
        from align.agents.sandbox import check_level

        level = check_level(a.sandbox_min_level)
        lines.append(f"sandbox  level {level!r} on this machine (agent.sandbox_min_level {a.sandbox_min_level!r})")
    else:
        lines.append(f"world    appworld at {a.appworld_url} (reached when training starts)")
    lines.append(f"rollout  {rollout_layout(recipe, accelerate_processes(recipe, recipe_path), recipe_path)}")
    if recipe.accelerate_config:
        lines.append(f"launch   {recipe.accelerate_config}: {check_accelerate_config(recipe.accelerate_config)}")
    lines.append("dry run ok: nothing was loaded or written")
    return "\n".join(lines)

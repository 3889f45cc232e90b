"""Recipes: YAML files mapped onto typed, documented dataclasses.

A recipe is the single source of truth of a run. ``load_recipe(path, overrides)`` reads the YAML, applies
``dotted.key=value`` overrides, checks every key and type against the dataclasses below and returns a
``Recipe``. Any problem raises ``UserError`` with one line naming the file and the key. Every field carries
its documentation in ``metadata["help"]``; ``align recipes --explain`` prints them.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from align.errors import UserError


def doc(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with a default and a one-line help text."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class ModelConfig:
    name_or_path: str = doc(
        "tiny:llama",
        "Local folder, hub id, or 'tiny:<arch>' for a freshly built tiny model with a character tokenizer.",
    )
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = doc("float32", "Weights and compute dtype.")
    tiny_hidden_size: int = doc(128, "Hidden size of a 'tiny:' model.")
    tiny_layers: int = doc(4, "Number of layers of a 'tiny:' model.")
    tiny_heads: int = doc(
        4, "Attention heads of a 'tiny:' model (head_dim = hidden/heads; 32/64/128 keep it servable by vLLM)."
    )
    tiny_intermediate_size: int = doc(256, "MLP width of a 'tiny:' model.")
    tiny_max_positions: int = doc(256, "Context length of a 'tiny:' model.")
    attn_implementation: Optional[str] = doc(
        "sdpa", "Attention kernel passed to transformers ('sdpa', 'eager', 'flash_attention_2')."
    )
    gradient_checkpointing: bool = doc(False, "Recompute activations in the backward pass to save memory.")
    disable_dropout: bool = doc(
        True,
        "Set every dropout of the policy to 0 (TRL's default): the losses compare log-probs under two networks and "
        "dropout noise would enter those ratios. false keeps the model's dropout; the adapter's is lora.dropout.",
    )
    trust_remote_code: bool = doc(False, "Allow model code from the hub (off by default).")
    revision: Optional[str] = doc(None, "Hub revision (branch, tag or commit) when name_or_path is a hub id.")
    quantization: Literal["none", "4bit", "8bit"] = doc(
        "none",
        "QLoRA: load the base weights quantized through bitsandbytes (4bit: NF4 with double quantization, compute in "
        "model.dtype; 8bit: LLM.int8) and train a LoRA adapter on them (lora.enabled must be true; the reference is "
        "the quantized base with the adapter off). Preference and SFT trainers; needs the [qlora] extra.",
    )


@dataclass
class LoraConfig:
    enabled: bool = doc(
        False,
        "Train a LoRA adapter instead of all weights; the reference is the same network with the adapter disabled.",
    )
    r: int = doc(16, "LoRA rank.")
    alpha: int = doc(32, "LoRA alpha (scaling = alpha / r).")
    dropout: float = doc(0.0, "Dropout on the LoRA input.")
    target_modules: Union[str, list] = doc("all-linear", "Modules to adapt: 'all-linear' or a list of module names.")


@dataclass
class DataConfig:
    train: str = doc(
        "builtin:tasks",
        "Training data: a .jsonl/.json/.parquet file (optionally .gz), 'hf:owner/name[:config][@revision]' for a "
        "datasets hub id, a local dataset folder or a builder such as 'hf:json' with data.data_files, or "
        "'builtin:<name>' for a built-in set: tasks (verifiable tasks), pets / hh_users / hh_objectives / "
        "hh_rm_objectives (multi-user preference sets, ':train' or ':eval' users), hh_harmless (HH-RLHF harmless "
        "80/20 split).",
    )
    eval: Optional[str] = doc(None, "Held-out data in the same forms; None = no evaluation set.")
    mixture: list = doc(
        [],
        "With data.train 'mixture': the sources mixed, [{source: S, weight: W, split: SPLIT}] (TRL's dataset_mixture): "
        "each source's rows are shuffled with train.seed and the first W (0 < W <= 1) of them kept, then all are "
        "shuffled together. split (optional) is that of an hf: source. The rows must share one format.",
    )
    split: str = doc("train", "Split of an 'hf:' data.train source (e.g. train_prefs).")
    eval_split: str = doc("test", "Split of an 'hf:' data.eval source (e.g. test_prefs).")
    data_files: Union[str, list, None] = doc(
        None,
        "data_files of an 'hf:' source (a file or a list; paths, globs or hub paths), e.g. hf:json with "
        "[a.jsonl, b.jsonl]; the split is data.split / data.eval_split.",
    )
    format: Literal["auto", "plain", "conversational", "hh"] = doc(
        "auto",
        "Row format: plain prompt/chosen/rejected strings, message lists, or HH-RLHF full dialogues (split into "
        "prompt and responses). 'auto' detects it.",
    )
    prompt_key: str = doc("prompt", "Column holding the prompt.")
    chosen_key: str = doc("chosen", "Column holding the preferred response (the completion, for SFT data).")
    rejected_key: str = doc("rejected", "Column holding the dispreferred response (absent for SFT data).")
    max_length: int = doc(512, "Maximum tokens of prompt + response; longer rows are an error unless truncate is set.")
    max_prompt_length: int = doc(256, "Maximum prompt tokens.")
    drop_invalid: bool = doc(
        False,
        "Drop rows that fail validation (empty response, malformed dialogue) instead of stopping; the count is "
        "reported.",
    )
    truncate: bool = doc(
        False, "Truncate too-long rows (prompt from the left, response from the right) instead of failing."
    )
    limit: Optional[int] = doc(None, "Use only the first N rows.")
    chat_template: bool = doc(False, "Render plain prompts through the tokenizer's chat template as one user turn.")
    assistant_turns: Literal["all", "last"] = doc(
        "all",
        "SFT on conversational rows (TRL's 'messages' column, or chosen_key messages): train every assistant turn "
        "(TRL's assistant_only_loss) or only the last one. System, user and tool turns are never trained.",
    )
    packing: bool = doc(
        True,
        "Offline pairs and SFT, and every online objective (pairs and policy-gradient samples): pack each "
        "micro-batch's sequences into padding-free rows (position ids restart per sequence; exact for llama, mistral, "
        "qwen2/3 and gemma models, whose attention masks follow the position ids; other models are padded).",
    )
    cache: bool = doc(
        True,
        "Keep tokenised rows in datasets' cache (datasets.map, keyed by the rows' content, the tokenizer and the data "
        "settings; under $HF_DATASETS_CACHE/align_tokenized): a resume or a rerun on the same data does not tokenise "
        "again.",
    )
    builtin_size: int = doc(512, "Rows generated for 'builtin:tasks'.")
    builtin_families: list = doc([], "Task families for 'builtin:tasks' (empty = all).")
    builtin_sloppy: float = doc(
        0.0,
        "Fraction of 'builtin:tasks' SFT demonstrations written by a sloppy annotator (a systematic, family-specific "
        "mistake).",
    )


@dataclass
class LossConfig:
    name: str = doc("dpo", "Objective in the loss registry (see `align recipes --losses`).")
    beta: float = doc(
        0.1,
        "KL strength beta (DPO, cDPO, robust, hinge, SimPO); tau of IPO; 1/eta of SPPO's regression target 1/(2 beta).",
    )
    label_smoothing: float = doc(0.0, "Probability eps that a label is flipped (cdpo, robust).")
    simpo_gamma: float = doc(0.5, "SimPO target reward margin gamma.")
    eta: float = doc(0.005, "INPO step size eta (SPPO uses eta = 1/beta).")
    tau: float = doc(0.005 / 3, "INPO KL-to-reference strength tau (tau = eta gives online IPO).")
    clip_eps: float = doc(0.2, "PPO-style ratio clipping of policy-gradient losses (spo, loop, grpo, rloo).")
    sft_weight: float = doc(0.0, "Add this times the chosen NLL (per token) to the loss (RPO-style regulariser).")
    importance: Literal["token", "trajectory", "sequence_mean"] = doc(
        "token",
        "loop: per-token importance weights and clipping (LOOP); 'trajectory': one weight per episode, "
        "exp(sum_t log rho_t) (LOOP's ablation, as ml-loop); 'sequence_mean': exp(mean_t log rho_t) (GSPO).",
    )
    clip_eps_low: Optional[float] = doc(
        None,
        "Lower clip bound 1 - clip_eps_low of the policy-gradient losses (default: clip_eps, symmetric); ml-loop "
        "clips at 1/(1+eps), i.e. clip_eps_low = 1 - 1/(1 + clip_eps).",
    )
    loss_type: Literal["grpo", "bnpo", "dapo"] = doc(
        "grpo",
        "grpo, rloo: how per-token terms become the batch loss, named as in TRL: 'grpo' = mean over each response's "
        "tokens, then over responses (sequence mean); 'bnpo' = mean over every token of the process's minibatch; "
        "'dapo' = mean over every token of the global minibatch, all processes (DAPO's token-level loss).",
    )
    kl_coef: float = doc(
        0.0,
        "grpo, rloo: weight of the per-token KL to the reference (k3 estimator; TRL's beta). 0 = no reference pass.",
    )
    scale_rewards: bool = doc(
        True, "grpo: divide each group's centred rewards by their standard deviation (Dr. GRPO: false)."
    )


@dataclass
class OnlineConfig:
    iterations: int = doc(3, "Online iterations: sample from the current policy, judge, update, sync weights.")
    prompts_per_iteration: int = doc(
        64, "Prompts sampled (without replacement within an iteration) per iteration; K = rollout.n samples each."
    )
    epochs_per_iteration: int = doc(
        1, "Passes over each generation's judged samples (TRL's num_iterations, verl's ppo_epochs)."
    )
    generation_batch_size: Optional[int] = doc(
        None,
        "Completions sampled at once (TRL's generation_batch_size; whole prompts: rounded down to a multiple of "
        "rollout.n): an iteration's prompts "
        "are sampled, judged and trained on in generations of this size, each from the policy the previous one "
        "left (near on-policy for spo, grpo, rloo). None = the whole iteration at once (INPO, SPPO, iterative DPO).",
    )
    min_advantage: float = doc(0.0, "Drop samples whose |advantage| is at most this (spo, grpo, rloo).")
    old_logprobs: Literal["learner", "sampler"] = doc(
        "learner",
        "log pi_old (spo, grpo, rloo) and log pi_t (inpo, sppo): recomputed by the learner before the iteration's "
        "first update (sharded over ranks), or the sampler's own (faster; they differ under bf16 / vLLM / LoRA "
        "kernels, so the first ratio is not 1 and the INPO/SPPO targets shift).",
    )
    is_cap: Optional[float] = doc(
        None,
        "spo, grpo, rloo with old_logprobs learner: weight each token's loss by the truncated importance ratio "
        "min(pi_learner(y_t) / pi_sampler(y_t), is_cap) between the learner's pi_old and the sampler that drew the "
        "token (TIS; TRL's vllm_importance_sampling_cap, e.g. 2): corrects for sampling from a bf16 / vLLM copy. "
        "None = off.",
    )


@dataclass
class RewardConfig:
    kind: Literal["bt", "vpl"] = doc(
        "bt",
        "Reward model: Bradley-Terry ('bt') or variational personalised ('vpl': reward conditioned on a user latent z "
        "inferred from that user's labelled pairs).",
    )
    train_backbone: bool = doc(
        False,
        "Train the backbone (full, or LoRA with lora.enabled); False = frozen backbone, its embeddings computed once "
        "and only the heads trained.",
    )
    pooling: Literal["auto", "mean", "last"] = doc(
        "auto",
        "Pool token states into one embedding: mean (encoders), last token (causal LMs), auto = by architecture.",
    )
    head_hidden: int = doc(256, "Hidden width of the reward MLP (0 = linear head).")
    margin_key: Optional[str] = doc(
        None, "Column with a per-pair margin m for the BT loss (Llama 2 style); None = no margin."
    )
    label_smoothing: float = doc(0.0, "BT label smoothing: probability eps that a label is flipped.")
    latent_dim: int = doc(512, "VPL latent size (paper: 512).")
    latent_norm: bool = doc(
        False,
        "VPL: project z onto the sphere of radius sqrt(latent_dim) before the reward head, in training, evaluation "
        "and judges (vpl_llm's latent normalisation).",
    )
    context_features: Literal["concat", "concat_diff"] = doc(
        "concat",
        "VPL: what the context encoder sees of each context pair: [e_w, e_l] (vpl_llm), or [e_w, e_l, e_w - e_l] (the "
        "direction of the user's choice made explicit).",
    )
    encoder_hidden: int = doc(256, "VPL context-encoder width (pair MLP and self-attention).")
    encoder_heads: int = doc(4, "VPL self-attention heads over the context pairs.")
    context_pairs: int = doc(8, "VPL: labelled pairs of a user that form the context C (paper: up to 8).")
    query_pairs: int = doc(8, "VPL: pairs of the same user scored under z per training sample.")
    kl_beta: float = doc(1e-4, "VPL KL weight beta (paper: 1e-4).")
    kl_anneal_steps: int = doc(0, "VPL: beta rises linearly from 0 over this many steps (0 = constant beta).")
    user_key: str = doc("user", "Column with the user (annotator) id (VPL).")
    user_type_key: str = doc("user_type", "Optional column with the user type: accuracy is reported per type.")
    user_types: list = doc(
        [],
        "Train and evaluate on the pairs of these user types only (the user_type_key column; empty = all): one model "
        "per type is the oracle that `align bench reward` measures VPL against.",
    )
    controversial_key: str = doc(
        "controversial",
        "Optional boolean column marking pairs the user types disagree on: accuracy reported on that subset.",
    )
    eval_fraction: float = doc(
        0.0, "Without data.eval: hold out this fraction of pairs (VPL: of users) for evaluation."
    )
    eval_seed: int = doc(0, "Seed of the fresh context samples drawn per query pair at evaluation (VPL).")


@dataclass
class AgentConfig:
    world: Literal["builtin", "appworld"] = doc(
        "builtin", "Environment: the built-in AppWorld-shaped world, or the real AppWorld over its HTTP server."
    )
    appworld_url: str = doc(
        "http://127.0.0.1:8000", "AppWorld environment server (`appworld serve environment`), world: appworld."
    )
    split: str = doc(
        "train",
        "Task split the trainer samples from (built-in: train; AppWorld: train). Test tasks are never trained on.",
    )
    world_seed: int = doc(0, "Seed of the built-in world's task generator.")
    tasks_per_iteration: int = doc(
        40, "Tasks sampled per iteration (paper: 40); K = rollout.n rollouts each (paper: 6)."
    )
    iterations: int = doc(10, "Iterations: rollouts, advantages, PPO epochs, weight sync.")
    epochs_per_iteration: int = doc(2, "PPO epochs over an iteration's episodes (paper: 2; rloo: 1 on-policy step).")
    max_turns: int = doc(4, "Model turns per episode.")
    advantage: Literal["loo", "grpo"] = doc(
        "loo",
        "loo: A_k = R_k - mean_{i != k} R_i (LOOP/RLOO); grpo: (R_k - mean R) / std R over the K rollouts (ablation).",
    )
    min_advantage: float = doc(0.01, "Drop episodes with |A| < this (paper: 0.01).")
    max_kl: Optional[float] = doc(
        None,
        "Stop an iteration's PPO updates at the first minibatch whose approximate KL(pi_old || pi) (k3: mean over the "
        "model's tokens of rho - 1 - log rho, averaged over processes) exceeds this, as ml-loop's KL guard; the "
        "metrics row counts the updates made and whether it stopped. None = off.",
    )
    show_docs: bool = doc(True, "Show the API docs in the first observation (tiny CPU policies learn without them).")
    turn_timeout: float = doc(5.0, "Wall-clock seconds per agent turn in the sandbox.")
    packing: bool = doc(
        True,
        "Score episodes in padding-free packed rows (position ids restart per episode; exact for llama, mistral, "
        "qwen2/3 and gemma models, whose attention masks follow the position ids; other models are padded).",
    )
    sandbox_min_level: Literal["python", "seccomp", "userns", "root"] = doc(
        "python",
        "world: builtin: the weakest sandbox level the run accepts; below it the run refuses to start. root: chroot, "
        "own uid, namespaces, seccomp; userns: the non-root jail (user namespaces); seccomp: the syscall filter "
        "without a filesystem jail; python: whatever this machine gives (docs/agents.md lists what each stops).",
    )
    eval_split: Optional[str] = doc(
        "dev", "Split evaluated (greedy, one rollout per task) at the end; None = no evaluation."
    )


@dataclass
class TrainConfig:
    seed: int = doc(0, "Seed for model init (tiny models), data order and sampling.")
    epochs: int = doc(1, "Passes over the training data.")
    max_steps: Optional[int] = doc(None, "Stop after this many optimizer steps (overrides epochs).")
    batch_size: int = doc(8, "Examples (pairs) per device per micro-batch.")
    grad_accum: int = doc(1, "Micro-batches per optimizer step.")
    lr: float = doc(5e-7, "Peak learning rate (AdamW).")
    weight_decay: float = doc(0.0, "AdamW weight decay.")
    warmup_steps: int = doc(0, "Linear warm-up steps.")
    schedule: Literal["constant", "linear", "cosine"] = doc("linear", "Learning-rate schedule after warm-up.")
    max_grad_norm: Optional[float] = doc(1.0, "Clip the gradient norm to this value (None = no clipping).")
    reference: Literal["auto", "model", "precompute", "none"] = doc(
        "auto",
        "Reference log-probs: 'model' = frozen copy (or the LoRA base), 'precompute' = one pass with the initial "
        "policy before training, 'auto' = LoRA base with LoRA else precompute; 'none' only for reference-free losses.",
    )
    save_steps: int = doc(0, "Write a checkpoint every N optimizer steps (0 = only at the end).")
    keep_checkpoints: int = doc(2, "Checkpoints to keep (oldest removed).")
    logging_steps: int = doc(1, "Log metrics every N optimizer steps.")
    eval_steps: int = doc(
        0,
        "Evaluate every N optimizer steps (iterations for the online and agent trainers) and at the end: offline, the "
        "loss and its metrics on data.eval; online, the judge's score of greedy answers to held-out prompts; agent, "
        "TGC/SGC on agent.eval_split. 0: at the end only (when there is something to evaluate).",
    )
    nan_policy: Literal["stop", "skip"] = doc(
        "stop", "On a non-finite loss: stop with the step named (last checkpoint kept) or skip the step."
    )


@dataclass
class VLLMConfig:
    mode: Literal["colocate", "server"] = doc(
        "colocate",
        "colocate: a vLLM engine inside every training process (vLLM's external_launcher, the rank's own device, "
        "tensor-parallel groups of consecutive ranks); server: separate `align vllm-serve` processes generate and the "
        "trainer pushes weights (or LoRA adapters) to them after each update.",
    )
    gpu_memory_utilization: float = doc(
        0.3, "Colocate, GPU: fraction of the device's memory vLLM may take (weights + KV cache), in (0, 1]."
    )
    tensor_parallel_size: int = doc(
        1,
        "Colocate: GPUs one engine spans; must divide the number of training processes (ranks r*tp .. r*tp+tp-1 "
        "form a group and share their prompts). Server mode: set it on `align vllm-serve`.",
    )
    max_model_len: Optional[int] = doc(
        None, "Longest prompt + completion vLLM accepts (None: the model's max_position_embeddings)."
    )
    max_num_seqs: Optional[int] = doc(None, "Sequences vLLM runs at once (None: rollout.batch_size).")
    enable_prefix_caching: bool = doc(
        True, "Reuse the KV blocks of shared prompt prefixes (the K samples of a prompt, multi-turn episodes)."
    )
    enforce_eager: Optional[bool] = doc(
        None, "Skip CUDA graphs (None: on for CPU, off on GPU; graphs cost start-up time and memory, save decode time)."
    )
    sleep_level: int = doc(
        0,
        "Colocate, GPU: 0 = vLLM keeps its memory; 1 = weights offloaded to host and KV cache freed during the update; "
        "2 = both freed (weights re-pushed on wake; with LoRA the base is pushed again too). vLLM has no sleep mode "
        "on CPU: there it changes nothing.",
    )
    dtype: str = doc("auto", "vLLM's weight and compute dtype ('auto': the policy's dtype; or bfloat16, float16, ...).")
    kv_cache_memory_bytes: Optional[int] = doc(
        None, "KV cache size in bytes (None: 256 MiB on CPU; gpu_memory_utilization decides on GPU)."
    )
    server_urls: list = doc(
        [],
        "Server mode: base URLs of `align vllm-serve` processes (http://host:port); requests are spread over them.",
    )
    server_timeout: float = doc(
        120.0,
        "Server mode: seconds a server may take to answer one request (generation, weight push) before the run "
        "stops with an error naming it.",
    )
    weight_transfer: Literal["auto", "folder", "nccl"] = doc(
        "auto",
        "Server mode, full weights: 'folder' = rank 0 writes safetensors (one parameter gathered at a time) to a "
        "folder the server reloads (needs a filesystem both see); 'nccl' = vLLM's NCCL weight transfer (GPU; the "
        "server started with --weight-transfer nccl); 'auto' = nccl on GPU, folder on CPU. LoRA adapters always go "
        "as adapter folders.",
    )
    weights_dir: Optional[str] = doc(
        None, "Server mode, 'folder' pushes: where weight and adapter folders are written (None: the system temp dir)."
    )


@dataclass
class RolloutConfig:
    backend: Literal["hf", "vllm"] = doc("hf", "Generation backend of the shared rollout engine.")
    n: int = doc(4, "Samples per prompt.")
    max_new_tokens: int = doc(64, "Maximum generated tokens per sample.")
    temperature: float = doc(1.0, "Sampling temperature (0 = greedy).")
    top_p: float = doc(1.0, "Nucleus sampling threshold.")
    top_k: int = doc(0, "Top-k sampling (0 = off).")
    batch_size: int = doc(64, "Prompts per generation batch.")
    vllm: VLLMConfig = field(default_factory=VLLMConfig, metadata={"help": "vLLM settings (rollout.backend: vllm)."})


@dataclass
class JudgeConfig:
    kind: Literal["checker", "story", "reward_model", "vpl", "llm", "function", "none"] = doc(
        "checker",
        "Preference oracle: programmatic checker of the built-in tasks, the programmatic story goal (BabyLlama: "
        "mentions judge.goal and ends happily), a reward model (BT), a VPL personalised reward model with a user "
        "context, an LLM judge over an OpenAI-compatible endpoint, or your Python reward functions (judge.functions).",
    )
    functions: list = doc(
        [],
        "kind function: reward functions 'package.module:function' or 'file.py:function' ('./' = the recipe's "
        "folder), each called as f(prompts, completions, **columns) -> one number per completion (align/rewards.py), "
        "or 'reward_model:PATH' for a reward model's pointwise score r(x, y), or 'llm:MODEL@BASE_URL' ('llm-chat:' "
        "for the chat API) for an LLM judge's 0-9 score / 9.",
    )
    weights: Optional[list] = doc(None, "kind function: one weight per reward function (default 1 each).")
    goal: str = doc(
        "cat", "kind story: the topic word a story should mention (half the score; a happy ending is the other half)."
    )
    path: Optional[str] = doc(
        None,
        "Reward-model folder (kind: reward_model or vpl): an `align train` reward output or a HF "
        "sequence-classification model with one label.",
    )
    context: Optional[str] = doc(
        None,
        "kind vpl: file of the user's labelled pairs (prompt/chosen/rejected rows) that identify the user; z = mu of "
        "q(z | context).",
    )
    base_url: Optional[str] = doc(None, "OpenAI-compatible endpoint (kind: llm).")
    model: Optional[str] = doc(None, "Model name at the endpoint (kind: llm).")
    api_key_env: str = doc(
        "OPENAI_API_KEY", "Environment variable holding the API key (the key itself never goes in a recipe)."
    )
    max_concurrency: int = doc(
        8, "kind llm: requests in flight at once (results are identical to serial calls, whatever the order)."
    )
    api: Literal["completions", "chat"] = doc(
        "completions",
        "kind llm: /v1/completions with the pairwise prompt, or /v1/chat/completions with it as the user message; "
        "P comes from the log-probs of the answer token either way.",
    )


@dataclass
class EvalConfig:
    size: int = doc(200, "Held-out rows (offline) or prompts (online) evaluated, at most.")
    max_new_tokens: int = doc(32, "Maximum tokens generated per evaluation answer (and per written sample).")
    samples: int = doc(4, "Greedy completions of the first held-out prompts written per evaluation (eval_samples/).")


@dataclass
class LoggingConfig:
    plots: bool = doc(True, "Write plots/*.png of every logged metric at the end of the run.")
    progress: bool = doc(True, "Show a progress line on stderr.")
    report_to: list = doc(
        [],
        "Live trackers that receive every metrics row at its step, and the resolved recipe as configuration: "
        "tensorboard (<output>/tensorboard), trackio (local), wandb (offline with WANDB_MODE=offline), mlflow "
        "(<output>/mlruns); [] or [none] = metrics.jsonl only.",
    )
    run_name: Optional[str] = doc(None, "Name of the run in the trackers (default: the output folder's name).")


@dataclass
class Recipe:
    description: str = doc("", "One line shown by `align recipes`.")
    trainer: Literal["preference", "sft", "online", "reward", "agent"] = doc(
        "preference",
        "Data flow: offline pairs ('preference'), supervised fine-tuning ('sft'), online self-play ('online': spo, "
        "inpo, dpo, sppo on judged samples of the current policy), a reward model ('reward': BT or VPL), or "
        "multi-turn agent RL ('agent': LOOP and its ablations).",
    )
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "The policy model."})
    lora: LoraConfig = field(default_factory=LoraConfig, metadata={"help": "LoRA adapter settings."})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "Datasets."})
    loss: LossConfig = field(default_factory=LossConfig, metadata={"help": "Objective."})
    reward: RewardConfig = field(default_factory=RewardConfig, metadata={"help": "Reward model (trainer: reward)."})
    agent: AgentConfig = field(
        default_factory=AgentConfig, metadata={"help": "Agent environment and LOOP iterations (trainer: agent)."}
    )
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "Optimisation."})
    rollout: RolloutConfig = field(
        default_factory=RolloutConfig, metadata={"help": "Rollout engine (online trainers, evaluation)."}
    )
    online: OnlineConfig = field(
        default_factory=OnlineConfig, metadata={"help": "Online iterations (trainer: online)."}
    )
    judge: JudgeConfig = field(default_factory=JudgeConfig, metadata={"help": "Preference oracle."})
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"help": "Evaluation."})
    logging: LoggingConfig = field(default_factory=LoggingConfig, metadata={"help": "Logging and plots."})
    accelerate_config: Optional[str] = doc(
        None, "accelerate config this recipe is meant to be launched with (checked by --dry-run)."
    )


# ----------------------------------------------------------------------------------------------------------- parsing


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, source: str, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (ints are accepted for floats); UserError names source and key."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, source, key)
            except UserError:
                if dataclasses.is_dataclass(arg) and isinstance(value, dict):
                    raise
    elif tp is type(None):
        if value is None:
            return None
    elif tp is float:
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:  # strings too: YAML 1.1 reads "5e-7" (no dot) as a string
                return float(value)
            except (ValueError, OverflowError):
                pass
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is list or origin is list:
        if isinstance(value, list):
            return value
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return _build(tp, value, source, key + ".")
    else:  # pragma: no cover - every annotation used above is handled
        raise TypeError(f"unsupported annotation {tp}")
    raise UserError(f"{source}: key '{key}': expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _build(cls: type, data: dict, source: str, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise UserError(f"{source}: unknown key {prefix + str(key)!r}{hint}")
    return cls(**{k: _coerce(v, hints[k], source, prefix + k) for k, v in data.items()})


def set_dotted(tree: dict, dotted: str, value: Any, source: str) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        if not isinstance(node.setdefault(k, {}), dict):
            raise UserError(f"{source}: override {dotted!r}: {k!r} is not a section")
        node = node[k]
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """``["train.lr=1e-4", "lora.enabled=true"]`` -> ``[("train.lr", 0.0001), ("lora.enabled", True)]`` (values
    parsed as YAML)."""
    out = []
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise UserError(f"command line: override {item!r} is not of the form dotted.key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except Exception:  # not YAML (or an impossible date): keep the text
            value = raw
        out.append((key.strip(), value))
    return out


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe YAML, apply ``key=value`` overrides, validate and return it (UserError on any problem)."""
    path = Path(path)
    tree = read_tree(path)
    for key, value in parse_overrides(overrides or []):
        set_dotted(tree, key, value, str(path))
    return recipe_from_tree(tree, path)


def recipe_from_tree(tree: dict, path: str | Path) -> Recipe:
    """Build and validate a recipe read from ``path`` (relative data paths resolve against its folder)."""
    recipe = _build(Recipe, tree, str(path))
    recipe = _with_relative_paths(recipe, Path(path))
    validate(recipe, str(path), tree)
    return recipe


def read_tree(path: Path) -> dict:
    """The nested mapping a recipe YAML file holds (UserError for a missing, unreadable or non-mapping file)."""
    if not path.is_file():
        raise UserError(f"{path}: recipe file not found")
    try:
        text = path.read_text(encoding="utf-8")
        tree = yaml.safe_load(text)
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    except (ValueError, TypeError, OverflowError) as e:  # e.g. an impossible date such as 2020-13-45
        raise UserError(f"{path}: invalid value in YAML ({str(e).splitlines()[0]})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"{path}:{at} invalid YAML ({getattr(e, 'problem', None) or e})".replace("\n", " ")) from None
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise UserError(f"{path}: a recipe must be a mapping of sections, got {type(tree).__name__}")
    return tree


def recipe_from_dict(tree: dict, source: str = "recipe") -> Recipe:
    """Build and validate a recipe from a nested dict (used by the demo, benchmarks and tests)."""
    recipe = _build(Recipe, tree, source)
    validate(recipe, source, tree)
    return recipe


def _with_relative_paths(recipe: Recipe, path: Path) -> Recipe:
    """Data paths and reward-function files starting with './' are relative to the recipe's folder; everything else
    to the working directory."""
    for key in ("train", "eval"):
        value = getattr(recipe.data, key)
        if isinstance(value, str) and value.startswith("./"):
            setattr(recipe.data, key, str((path.parent / value).resolve()))

    def local(f):
        if isinstance(f, str) and f.startswith("./"):
            return str((path.parent / f).resolve())
        if isinstance(f, str) and f.startswith("reward_model:./"):
            return "reward_model:" + str((path.parent / f[len("reward_model:") :]).resolve())
        return f

    recipe.judge.functions = [local(f) for f in recipe.judge.functions]
    return recipe


NOT_READ = {
    "preference": ("reward", "agent", "rollout", "online", "judge"),
    "sft": ("reward", "agent", "rollout", "online", "judge"),
    "online": ("reward", "agent"),
    "agent": ("reward", "online", "judge", "data"),
    "reward": ("loss", "agent", "rollout", "online", "judge", "eval"),
}
"""Recipe sections each trainer never reads: setting a key in one is an error, not a no-op."""
NOT_READ_TRAIN = {
    "online": {
        "epochs": "an online run is online.iterations long",
        "max_steps": "an online run is online.iterations long",
        "grad_accum": "each minibatch of train.batch_size rows per process is one optimizer step",
        "warmup_steps": "the learning rate is constant: the iterations are the schedule",
        "save_steps": "a checkpoint follows every iteration",
        "logging_steps": "a metrics row follows every iteration",
        "reference": "the reference is the LoRA base or a frozen copy of the initial policy",
    },
    "reward": {
        "grad_accum": "each step is one batch of pairs (users) per process",
        "reference": "a reward model has no reference policy",
    },
}
NOT_READ_TRAIN["agent"] = {
    **NOT_READ_TRAIN["online"],
    "epochs": "an agent run is agent.iterations long",
    "max_steps": "an agent run is agent.iterations long",
}


NOT_READ_DATA = {
    "online": {"cache": "prompts are not tokenised ahead: the rollout engine tokenises them"},
    "reward": {"cache": "the reward trainer embeds texts; nothing is tokenised ahead"},
}
"""Data keys a trainer never reads (the agent trainer reads no data section at all)."""


def _check_read(recipe: Recipe, tree: dict, where: str) -> None:
    """Every key the recipe sets is one its trainer reads; a model is named."""
    model = tree.get("model")
    if not isinstance(model, dict) or "name_or_path" not in model:
        raise UserError(
            f"{where}: the recipe names no model (set model.name_or_path: a folder, a hub id or tiny:llama)"
        )
    for section in NOT_READ.get(recipe.trainer, ()):
        value = tree.get(section)
        if isinstance(value, dict) and value:
            key = next(iter(value))
            raise UserError(f"{where}: key '{section}.{key}' is not read by trainer {recipe.trainer!r}")
    for section, unread in (("train", NOT_READ_TRAIN), ("data", NOT_READ_DATA)):
        for key, why in unread.get(recipe.trainer, {}).items():
            if key in (tree.get(section) or {}):
                raise UserError(f"{where}: key '{section}.{key}' is not read by trainer {recipe.trainer!r} ({why})")
    if recipe.trainer == "agent":
        if recipe.agent.world != "builtin" and "sandbox_min_level" in (tree.get("agent") or {}):
            raise UserError(
                f"{where}: key 'agent.sandbox_min_level' is not read with agent.world {recipe.agent.world!r} (AppWorld "
                "runs the agent's code in its own server, not in our sandbox)"
            )
        for key in ("size", "max_new_tokens"):
            if key in (tree.get("eval") or {}):
                raise UserError(
                    f"{where}: key 'eval.{key}' is not read by trainer 'agent' (it evaluates every agent.eval_split "
                    "task with rollout.max_new_tokens per turn)"
                )
    if (
        recipe.trainer in ("online", "agent")
        and recipe.train.schedule != "constant"
        and "schedule" in (tree.get("train") or {})
    ):
        raise UserError(
            f"{where}: train.schedule {recipe.train.schedule!r} is not read by trainer {recipe.trainer!r} (its "
            "learning rate is constant: the iterations are the schedule; set constant or remove the key)"
        )


def validate(recipe: Recipe, where: str, tree: dict | None = None) -> None:
    """Value checks beyond types: ranges and conflicting options; with ``tree`` (the keys the recipe sets), also that
    the chosen trainer reads every one of them."""
    if tree is not None:
        _check_read(recipe, tree, where)
    t, d = recipe.train, recipe.data
    positive = {
        "train.batch_size": t.batch_size,
        "train.grad_accum": t.grad_accum,
        "train.epochs": t.epochs,
        "train.logging_steps": t.logging_steps,
        "data.max_length": d.max_length,
        "data.max_prompt_length": d.max_prompt_length,
        "rollout.n": recipe.rollout.n,
        "rollout.max_new_tokens": recipe.rollout.max_new_tokens,
        "lora.r": recipe.lora.r,
        "model.tiny_hidden_size": recipe.model.tiny_hidden_size,
        "model.tiny_layers": recipe.model.tiny_layers,
        "model.tiny_heads": recipe.model.tiny_heads,
        "model.tiny_intermediate_size": recipe.model.tiny_intermediate_size,
        "model.tiny_max_positions": recipe.model.tiny_max_positions,
        "rollout.batch_size": recipe.rollout.batch_size,
        "online.iterations": recipe.online.iterations,
        "online.prompts_per_iteration": recipe.online.prompts_per_iteration,
        "online.epochs_per_iteration": recipe.online.epochs_per_iteration,
    }
    for key, value in positive.items():
        if value <= 0:
            raise UserError(f"{where}: {key} must be > 0, got {value}")
    for key, value in {"train.lr": t.lr, "loss.beta": recipe.loss.beta}.items():
        if not value > 0:
            raise UserError(f"{where}: {key} must be > 0, got {value}")
    if t.max_steps is not None and t.max_steps <= 0:
        raise UserError(f"{where}: train.max_steps must be > 0, got {t.max_steps}")
    if t.save_steps < 0 or t.warmup_steps < 0 or t.keep_checkpoints < 1:
        raise UserError(f"{where}: train.save_steps/warmup_steps must be >= 0 and keep_checkpoints >= 1")
    if not 0.0 <= recipe.loss.label_smoothing < 0.5:
        raise UserError(f"{where}: loss.label_smoothing must be in [0, 0.5), got {recipe.loss.label_smoothing}")
    if d.max_prompt_length >= d.max_length:
        raise UserError(
            f"{where}: data.max_prompt_length ({d.max_prompt_length}) must be < data.max_length ({d.max_length})"
        )
    if (d.train == "mixture") != bool(d.mixture):
        raise UserError(
            f"{where}: data.mixture and data.train: mixture go together (a mixture's sources are listed there)"
        )
    for i, m in enumerate(d.mixture):
        key = f"data.mixture[{i}]"
        if not isinstance(m, dict) or not isinstance(m.get("source"), str) or not m["source"]:
            raise UserError(f"{where}: {key} must be a mapping with a 'source' (a file, hf:... or builtin:...)")
        extra = sorted(set(m) - {"source", "weight", "split"})
        if extra:
            raise UserError(f"{where}: {key}: unknown key {extra[0]!r} (source, weight, split)")
        w = m.get("weight", 1.0)
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 < w <= 1:
            raise UserError(f"{where}: {key}.weight must be a number in (0, 1], got {w!r}")
        if "split" in m and (not isinstance(m["split"], str) or not m["source"].startswith("hf:")):
            raise UserError(f"{where}: {key}.split applies to an 'hf:' source (a string)")
        if m["source"] == "mixture":
            raise UserError(f"{where}: {key}: a mixture cannot contain a mixture")
    q = recipe.model.quantization
    if q != "none":
        if recipe.trainer not in ("preference", "sft"):
            raise UserError(
                f"{where}: model.quantization applies to trainers 'preference' and 'sft', not {recipe.trainer!r}"
            )
        if not recipe.lora.enabled:
            raise UserError(f"{where}: model.quantization {q!r} trains a LoRA adapter: set lora.enabled=true (QLoRA)")
        if recipe.model.name_or_path.startswith(("tiny:", "memory:")):
            raise UserError(
                f"{where}: model.quantization {q!r} loads saved weights: model.name_or_path must be a folder or hub id"
            )
    if d.assistant_turns != "all" and recipe.trainer != "sft":
        raise UserError(f"{where}: data.assistant_turns applies to trainer 'sft', not {recipe.trainer!r}")
    hf = {"train": d.train.startswith("hf:"), "eval": bool(d.eval) and d.eval.startswith("hf:")}
    for key, default, which in (("split", "train", "train"), ("eval_split", "test", "eval")):
        if getattr(d, key) != default and not hf[which]:
            raise UserError(f"{where}: data.{key} applies to an 'hf:' data.{which} source, not {getattr(d, which)!r}")
    if d.data_files is not None and not any(hf.values()) and not any(m["source"].startswith("hf:") for m in d.mixture):
        raise UserError(f"{where}: data.data_files applies to 'hf:' sources (e.g. hf:json); data.train is {d.train!r}")
    _validate_rollout(recipe, where)
    from align.tracking import check_trackers

    check_trackers(recipe.logging.report_to)
    j = recipe.judge
    if j.kind != "function" and (j.functions or j.weights is not None):
        raise UserError(f"{where}: judge.functions / judge.weights apply to judge.kind 'function', not {j.kind!r}")
    if j.kind == "function":
        if not j.functions or not all(isinstance(f, str) or callable(f) for f in j.functions):
            raise UserError(f"{where}: judge.functions: judge.kind 'function' needs a list of 'module:function' names")
        if j.weights is not None and (
            len(j.weights) != len(j.functions)
            or not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in j.weights)
        ):
            raise UserError(f"{where}: judge.weights: one number per judge.functions entry ({len(j.functions)})")
    if recipe.judge.max_concurrency < 1:
        raise UserError(f"{where}: judge.max_concurrency must be >= 1, got {recipe.judge.max_concurrency}")
    if recipe.trainer == "reward":
        _validate_reward(recipe, where)
        return
    from align.losses import LOSSES  # local import: the registry imports torch

    if recipe.loss.name not in LOSSES:
        raise UserError(
            f"{where}: loss.name {recipe.loss.name!r} is not registered; choose one of {', '.join(sorted(LOSSES))}"
        )
    spec = LOSSES[recipe.loss.name]
    if recipe.trainer == "agent":
        a = recipe.agent
        if spec.name != "loop":
            raise UserError(
                f"{where}: trainer 'agent' needs loss.name 'loop' (ablations via agent.advantage, "
                f"agent.epochs_per_iteration, loss.importance); got {recipe.loss.name!r}"
            )
        for key, value in {
            "agent.tasks_per_iteration": a.tasks_per_iteration,
            "agent.iterations": a.iterations,
            "agent.epochs_per_iteration": a.epochs_per_iteration,
            "agent.max_turns": a.max_turns,
        }.items():
            if value <= 0:
                raise UserError(f"{where}: {key} must be > 0, got {value}")
        if a.max_kl is not None and not a.max_kl > 0:
            raise UserError(f"{where}: agent.max_kl must be > 0 (or null: off), got {a.max_kl}")
        if a.split.startswith("test"):
            raise UserError(f"{where}: agent.split {a.split!r}: test tasks are never used for training")
        if recipe.rollout.n < 2:
            raise UserError(f"{where}: rollout.n must be >= 2 (leave-one-out advantages need K >= 2 rollouts per task)")
    elif spec.name == "loop":
        raise UserError(f"{where}: loss 'loop' needs trainer 'agent'")
    if recipe.trainer == "online" and spec.name not in ONLINE_LOSSES:
        raise UserError(
            f"{where}: trainer 'online' supports loss.name {', '.join(ONLINE_LOSSES)}; got {recipe.loss.name!r}"
        )
    if recipe.trainer not in ("online", "agent") and spec.per_token:
        raise UserError(f"{where}: loss {spec.name!r} needs sampled responses: use trainer 'online'")
    if recipe.trainer == "sft" and spec.name != "sft":
        raise UserError(f"{where}: trainer 'sft' needs loss.name 'sft', got {recipe.loss.name!r}")
    lo = recipe.loss
    if spec.name not in ("grpo", "rloo"):
        for key, default in (("loss_type", "grpo"), ("kl_coef", 0.0)):
            if getattr(lo, key) != default:
                raise UserError(f"{where}: loss.{key} applies to loss grpo or rloo, not {spec.name!r}")
    if spec.name != "grpo" and not lo.scale_rewards:
        raise UserError(f"{where}: loss.scale_rewards applies to loss grpo, not {spec.name!r}")
    temp = recipe.rollout.temperature
    if spec.per_token and temp not in (0, 1) and recipe.online.old_logprobs == "sampler":
        raise UserError(
            f"{where}: online.old_logprobs sampler with rollout.temperature {temp}: the sampler's log-probs are of the "
            "untempered logits while the learner scores at the rollout temperature; use old_logprobs learner"
        )
    cap = recipe.online.is_cap
    if cap is not None:
        if not cap > 0:
            raise UserError(f"{where}: online.is_cap must be > 0 (or null: off), got {cap}")
        if not spec.per_token or recipe.online.old_logprobs != "learner":
            raise UserError(
                f"{where}: online.is_cap applies to policy-gradient losses (spo, grpo, rloo) with "
                "online.old_logprobs learner"
            )
        if temp not in (0, 1):
            raise UserError(
                f"{where}: online.is_cap needs rollout.temperature 1 (the sampler's log-probs are untempered)"
            )
    g = recipe.online.generation_batch_size
    if g is not None and g < recipe.rollout.n:
        raise UserError(
            f"{where}: online.generation_batch_size {g} must be at least rollout.n ({recipe.rollout.n}): one prompt's "
            "samples"
        )
    if lo.clip_eps_low is not None and not 0 < lo.clip_eps_low < 1:
        raise UserError(f"{where}: loss.clip_eps_low must be in (0, 1), got {lo.clip_eps_low}")
    if lo.kl_coef < 0 or not math.isfinite(lo.kl_coef):
        raise UserError(f"{where}: loss.kl_coef must be a finite number >= 0, got {lo.kl_coef}")
    if spec.needs_reference and t.reference == "none":
        raise UserError(f"{where}: loss {spec.name!r} needs reference log-probs but train.reference is 'none'")
    if recipe.model.name_or_path.startswith("tiny:") and recipe.model.tiny_hidden_size % recipe.model.tiny_heads:
        raise UserError(f"{where}: model.tiny_hidden_size must be divisible by model.tiny_heads")


def _validate_rollout(recipe: Recipe, where: str) -> None:
    r, v = recipe.rollout, recipe.rollout.vllm
    if r.backend != "vllm":
        changed = [f.name for f in dataclasses.fields(v) if getattr(v, f.name) != getattr(VLLMConfig(), f.name)]
        if changed:
            raise UserError(
                f"{where}: rollout.vllm.{changed[0]} is set but rollout.backend is {r.backend!r} (set rollout.backend: "
                "vllm, or remove the key)"
            )
        return
    if not 0.0 < v.gpu_memory_utilization <= 1.0:
        raise UserError(
            f"{where}: rollout.vllm.gpu_memory_utilization must be in (0, 1], got {v.gpu_memory_utilization}"
        )
    for key in ("tensor_parallel_size", "max_model_len", "max_num_seqs", "kv_cache_memory_bytes"):
        value = getattr(v, key)
        if value is not None and value < 1:
            raise UserError(f"{where}: rollout.vllm.{key} must be >= 1, got {value}")
    if v.sleep_level not in (0, 1, 2):
        raise UserError(f"{where}: rollout.vllm.sleep_level must be 0, 1 or 2, got {v.sleep_level}")
    if not v.server_timeout > 0:
        raise UserError(f"{where}: rollout.vllm.server_timeout must be > 0 seconds, got {v.server_timeout}")
    for url in v.server_urls:
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise UserError(f"{where}: rollout.vllm.server_urls: {url!r} is not an http(s):// URL")
    if v.mode == "server":
        if not v.server_urls:
            raise UserError(
                f"{where}: rollout.vllm.mode 'server' needs rollout.vllm.server_urls (start them with "
                "`align vllm-serve --model PATH --port N`)"
            )
        if v.sleep_level:
            raise UserError(f"{where}: rollout.vllm.sleep_level applies to colocated engines, not to mode 'server'")
        if v.tensor_parallel_size != 1:
            raise UserError(
                f"{where}: rollout.vllm.tensor_parallel_size is set on the server (`align vllm-serve "
                "--tensor-parallel-size N`), not in a recipe with mode 'server'"
            )
    elif v.server_urls or v.weight_transfer != "auto" or v.weights_dir is not None:
        raise UserError(
            f"{where}: rollout.vllm.server_urls / weight_transfer / weights_dir apply to mode 'server', not 'colocate'"
        )


def _validate_reward(recipe: Recipe, where: str) -> None:
    r = recipe.reward
    for key, value in {
        "reward.latent_dim": r.latent_dim,
        "reward.encoder_hidden": r.encoder_hidden,
        "reward.encoder_heads": r.encoder_heads,
        "reward.context_pairs": r.context_pairs,
        "reward.query_pairs": r.query_pairs,
    }.items():
        if value <= 0:
            raise UserError(f"{where}: {key} must be > 0, got {value}")
    if r.head_hidden < 0 or r.kl_anneal_steps < 0 or r.kl_beta < 0:
        raise UserError(f"{where}: reward.head_hidden, reward.kl_anneal_steps and reward.kl_beta must be >= 0")
    if r.encoder_hidden % r.encoder_heads:
        raise UserError(
            f"{where}: reward.encoder_hidden ({r.encoder_hidden}) must be divisible by reward.encoder_heads "
            f"({r.encoder_heads})"
        )
    if not 0.0 <= r.label_smoothing < 0.5:
        raise UserError(f"{where}: reward.label_smoothing must be in [0, 0.5), got {r.label_smoothing}")
    if r.latent_norm and r.kind != "vpl":
        raise UserError(f"{where}: reward.latent_norm applies to reward.kind 'vpl' (a BT model has no latent)")
    if r.context_features != "concat" and r.kind != "vpl":
        raise UserError(f"{where}: reward.context_features applies to reward.kind 'vpl' (a BT model has no context)")
    if not 0.0 <= r.eval_fraction < 1.0:
        raise UserError(f"{where}: reward.eval_fraction must be in [0, 1), got {r.eval_fraction}")
    if recipe.lora.enabled and not r.train_backbone:
        raise UserError(
            f"{where}: lora.enabled needs reward.train_backbone: true (a frozen backbone trains no adapter)"
        )


ONLINE_LOSSES = ("spo", "grpo", "rloo", "inpo", "dpo", "sppo", "ipo")


def to_dict(recipe: Recipe) -> dict:
    """The resolved recipe as plain data (what is saved as recipe.yaml): every key its trainer reads, with the
    defaults filled in, and none it does not (so the saved recipe loads back under the same strict checks)."""
    tree = dataclasses.asdict(recipe)
    for section in NOT_READ.get(recipe.trainer, ()):
        tree.pop(section, None)
    for section, unread in (("train", NOT_READ_TRAIN), ("data", NOT_READ_DATA)):
        for key in unread.get(recipe.trainer, {}):
            if section in tree:
                tree[section].pop(key, None)
    if recipe.trainer == "agent":
        if recipe.agent.world != "builtin":
            tree["agent"].pop("sandbox_min_level", None)
        for key in ("size", "max_new_tokens"):
            tree["eval"].pop(key, None)
    if recipe.trainer in ("online", "agent"):
        tree["train"].pop("schedule", None)  # constant: the iterations are the schedule
    return tree


def dump_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(to_dict(recipe), sort_keys=False)


def describe_fields(cls: type = Recipe, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every field; used by `align recipes --explain` and the docs."""
    rows = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(describe_fields(tp, f"{prefix}{f.name}."))
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append((f"{prefix}{f.name}", repr(default), f.metadata.get("help", "")))
    return rows

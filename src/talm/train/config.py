"""The train stage's configuration (talm.config holds the Config base: strict fields, TOML and flag layering, docstrings as --help)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from talm.config import Config, Seed
from talm.errors import TalmError
from talm.eval.tasks import TASK_NAMES
from talm.model.config import ModelConfig

# ================================================================================================================
# Training stage (run.py, loop.py, loader.py, optim.py, precision.py, report.py, cli/train_model.py)
# ================================================================================================================


class OptimConfig(Config):
    """The optimizer (AdamW, or Muon with AdamW) and its learning-rate schedule: linear warmup, then a cosine or
    a warmup-stable-decay trapezoid down to a floor."""

    name: Literal["adamw", "muon"] = "adamw"
    """adamw: AdamW for every parameter. muon: Muon (torch.optim.Muon) for the attention and MLP matrices
    inside the blocks, AdamW for the embeddings, the output head and the norms' gains."""
    lr: float = Field(default=6e-4, gt=0)
    """Peak learning rate of AdamW's parameters, reached at the end of warmup."""
    embedding_lr: float | None = Field(default=None, gt=0)
    """Peak learning rate of the token embedding (AdamW) when the output head is untied
    (--no-model.tie_embeddings); unset: lr. An embedding row moves only when its token occurs, so it takes a far
    higher rate than the head (nanochat: 0.2 against 0.004 at width 768)."""
    muon_lr: float = Field(default=0.02, gt=0)
    """Peak learning rate of Muon's matrices (with --optim.name muon); the schedule scales it like lr. 0.02 is
    nanochat's matrix_lr (Keller Jordan's lr scaling, sqrt(max(1, rows/cols)))."""
    muon_momentum: float = Field(default=0.95, ge=0.0, lt=1.0)
    """Muon's (Nesterov) momentum, as nanochat and the modded-nanogpt speedrun use."""
    muon_momentum_warmup: int = Field(default=300, ge=0)
    """Steps over which Muon's momentum ramps linearly from 0.85 to muon_momentum (nanochat: 300; 0: none)."""
    muon_per_projection: bool = True
    """Orthogonalise each projection of a fused weight (q, k, v of the attention; gate, up of SwiGLU) as its own
    matrix with its own lr scale, as nanochat and modded-nanogpt do; false: each fused weight as one matrix."""
    muon_weight_decay: float = Field(default=0.0, ge=0.0)
    """Muon's decoupled weight decay (per step: weights *= 1 - muon_lr * this); nanochat's Muon uses none."""
    schedule: Literal["cosine", "wsd"] = "cosine"
    """cosine: warmup, then a half cosine from lr to the floor at max_steps. wsd (warmup-stable-decay):
    warmup, lr held, then a linear decay to the floor over the last decay_fraction of max_steps; raising
    --max-steps of a run that has not begun its decay continues it seamlessly."""
    decay_fraction: float = Field(default=0.2, ge=0.0, le=1.0)
    """With schedule wsd: the fraction of max_steps (at the end) over which the lr decays to the floor."""
    min_lr_ratio: float = Field(default=0.1, ge=0.0, le=1.0)
    """The floor the schedule decays to, as a fraction of the peak (0.1 = lr/10)."""
    warmup_steps: int = Field(default=100, ge=0)
    """Optimizer steps of linear warmup from ~0 to lr."""
    rewarm: bool = False
    """On resume, when the new settings (a raised --max-steps after a cosine or a begun wsd decay, another
    schedule) would raise the lr by more than one warmup step, warm it up linearly from the lr the run had to
    the new schedule over warmup_steps steps. Off: such a resume is refused, naming the choices (keep
    --max-steps, --optim.rewarm, or --restart). A lower or unchanged lr always resumes as is."""
    weight_decay: float = Field(default=0.1, ge=0.0)
    """AdamW weight decay, applied to matrices only (not to norms' gains)."""
    beta1: float = Field(default=0.9, ge=0.0, lt=1.0)
    """AdamW beta1 (momentum of the gradient average)."""
    beta2: float = Field(default=0.95, ge=0.0, lt=1.0)
    """AdamW beta2 (momentum of the squared-gradient average)."""
    eps: float = Field(default=1e-8, gt=0)
    """AdamW epsilon."""
    grad_clip: float = Field(default=1.0, ge=0.0)
    """Clip the global gradient norm to this value (0 disables clipping)."""


class TrainConfig(Config):
    """The training loop: batch, length, evaluation, checkpoints, device and precision."""

    objective: Literal["lm", "dpo", "grpo"] = "lm"
    """What a step minimises (train/objective.py): lm = next-token prediction, on every token of text data or
    on the assistant's tokens of conversation data (pretraining and SFT); dpo = preference tuning on preference
    pairs (the [dpo] settings; needs --init-from, whose weights are also the reference); grpo = reinforcement
    learning with verifiable rewards on prompt data (train/grpo.py, the [grpo] settings; needs --init-from)."""
    max_steps: int = Field(default=5000, ge=1)
    """Optimizer steps to train for (the cosine schedule ends here)."""
    batch_size: int = Field(default=16, ge=1)
    """Sequences per micro-batch on each process."""
    tokens_per_step: int | None = Field(default=None, ge=1)
    """Tokens per optimizer step, over all processes; reached by gradient accumulation. Must be a multiple of
    batch_size * context_length * processes. Unset means one micro-batch per process per step."""
    eval_every: int = Field(default=250, ge=1)
    """Evaluate on the validation slice every this many steps (and at the end)."""
    eval_tokens: int = Field(default=262144, ge=1)
    """Tokens of the validation split evaluated each time (a fixed slice from its start)."""
    eval_tasks: list[Literal[TASK_NAMES]] = []  # type: ignore[valid-type]
    """Benchmarks scored at evaluations (talm.eval, e.g. hellaswag): each task's headline metric goes to
    metrics.jsonl and loss.png. Needs a val split (tasks are scored when the val loss is)."""
    eval_tasks_every: int | None = Field(default=None, ge=1)
    """Score the eval tasks at the first evaluation at or after every this many steps (unset: every evaluation)."""
    eval_tasks_limit: int = Field(default=500, ge=1)
    """Examples of each eval task scored (the first ones of its split: the same ones every time)."""
    eval_tasks_dir: str | None = None
    """Directory holding local copies of the eval tasks' Hub repositories (DIR/OWNER/NAME); unset: the Hub."""
    save_every: int = Field(default=500, ge=1)
    """Save the latest checkpoint every this many steps (and at the end, and on Ctrl-C)."""
    log_every: int = Field(default=10, ge=1)
    """Write a train-loss line to metrics.jsonl every this many steps."""
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    """Where to train: auto picks cuda, then mps, then cpu."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Autocast precision: auto = bfloat16 on GPUs that support it, float16 (with loss scaling) on older GPUs,
    bfloat16 on CPUs that compute it natively (AVX512-BF16 or AMX-BF16), float32 on other CPUs (they emulate
    bfloat16, several times slower than float32) and on mps. The run's banner says which was picked."""
    compile: bool = False
    """Compile the training steps with torch.compile: a one-time cost before the first step (on CPU, inductor
    takes ~50 s for the tiny model), repaid only once steps x (eager - compiled step time) exceeds it: in the
    tiny preset's ~100 s CPU run, compiled steps would have to be twice as fast. Meant for GPUs and long runs;
    benchmarks/bench_convergence.py measures it at equal time. Evaluation and checkpoint saves use the
    uncompiled model, so they cause no recompiles."""
    parallel: Literal["auto", "ddp", "fsdp"] = "auto"
    """How processes share the work (docs/scaling.md). ddp: every process holds the whole model and optimizer
    state. fsdp: each of N processes holds 1/N of them (FSDP2), for models that do not fit one device; its
    checkpoints are sharded (torch.distributed.checkpoint) and resume on any process count. auto: ddp when the
    model, gradients and optimizer state take at most half of a device's memory, else fsdp; on one process,
    neither. The banner says which was chosen."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass instead of keeping them: much less memory for
    long contexts and big batches, at the cost of about one more forward pass per step."""
    isolate_conversations: bool = True
    """Conversation data only: a packed row's conversations do not attend to each other (a block-diagonal causal
    mask for SDPA instead of is_causal). Measured on CPU (benchmarks/bench_doc_mask.py) it costs no clear
    slowdown; on GPUs a dense mask rules out the flash-attention kernels, so measure there and turn it off
    (--no-train.isolate_conversations) if it is slower: conversations are still never cut, the loss is still
    only on the assistant's tokens, they merely see earlier conversations of their row."""
    deterministic: bool = False
    """Bitwise-reproducible runs (deterministic kernels; on CPU a resumed run repeats the same losses)."""
    seed: Seed = 1337
    """Seed of the model initialisation, the data order and dropout."""
    report_to: list[Literal["tensorboard", "wandb"]] = []
    """Also send metrics to these trackers (optional extras: pip install talm[tensorboard] / talm[wandb])."""
    init_from: str | None = None
    """Start the run from these weights instead of a random init (fresh optimizer and schedule): a talm model
    directory (models/NAME, its best/ or latest/), a transformers model directory, or a Hugging Face Hub id
    (gpt2, HuggingFaceTB/SmolLM2-135M). The architecture is the source's (flags may only lower the context and
    set the dropout); the data must be made with its tokenizer. Ignored when the run resumes: the checkpoint
    wins."""
    sample_every: int | None = Field(default=None, ge=1)
    """Print a short greedy and a sampled continuation of each sample prompt under the progress bar, and record
    them in metrics.jsonl, at the first evaluation every this many steps (and at the last). Unset: never."""
    sample_prompts: list[str] = []
    """The prompts of --sample-every (default: one, the start of a new document)."""
    sample_tokens: int = Field(default=48, ge=1)
    """Tokens generated per sample."""


class GRPOConfig(Config):
    """Reinforcement learning with verifiable rewards (train.objective grpo, talm.train.grpo): each micro-batch
    holds train.batch_size replies, group_size sampled to each of batch_size / group_size prompts."""

    group_size: int = Field(default=8, ge=2)
    """Replies sampled per prompt; each reply's advantage is its reward minus its group's mean. train.batch_size
    must be a multiple of it."""
    max_new_tokens: int = Field(default=64, ge=1)
    """The longest reply sampled (and generated at evaluation), in tokens; a reply ends at <|endoftext|>."""
    temperature: float = Field(default=1.0, gt=0)
    """Sampling temperature of the replies (evaluation is greedy)."""
    top_k: int | None = Field(default=None, ge=1)
    """Sample among the top_k likeliest tokens only (unset: all; nanochat's GRPO: 50)."""
    reward: str = "final_number"
    """The reward function (talm.train.rewards): final_number (1 when the reply's final number is the reference,
    as GSM8K is scored) or exact_text."""
    normalise_std: bool = False
    """Divide each group's advantages by its standard deviation (GRPO's original form; nanochat and Dr. GRPO
    leave it out: it weighs nearly-solved and nearly-failed prompts up)."""
    loss_mean: Literal["token", "sequence"] = "token"
    """token: the loss is the mean over every reply token of a process's step (nanochat, DAPO); sequence: each
    reply's tokens averaged first, then the replies (GRPO's original)."""
    eval_prompts: int = Field(default=200, ge=1)
    """Held-out prompts (the first ones of the val split) whose greedy pass@1 is measured at every evaluation
    (val_pass@1 in metrics.jsonl)."""


class DataConfig(Config):
    """Where the training tokens come from."""

    dir: str = ""
    """Directory of .npy shards and meta*.json manifest(s) written by download_data."""
    tokenizer_path: str | None = None
    """Tokenizer file; unset means the one the data was made with (from the manifest)."""


class DPOConfig(Config):
    """Preference tuning (--train.objective dpo, --preset dpo; train/dpo.py): the loss and its reference model."""

    loss: Literal["dpo", "ipo", "simpo"] = "dpo"
    """dpo: the sigmoid loss of Rafailov et al. 2023; ipo: Azar et al.'s squared loss, which stops at a margin;
    simpo: Meng et al.'s reference-free loss on length-normalised log-probabilities (no reference model)."""
    beta: float = Field(default=0.1, gt=0)
    """How far the policy may move from the reference (dpo, ipo); simpo's reward scale (its paper uses 2-2.5)."""
    gamma: float = Field(default=0.5, ge=0)
    """SimPO's target reward margin (gamma); unused by dpo and ipo."""
    reference: Literal["model", "stored"] = "model"
    """Where the reference log-probabilities come from: model = a frozen copy of the starting weights (the
    --init-from source) computes them beside every step (memory: a second model); stored = computed once for
    every pair before the first step and kept in the checkpoints (compute: one pass over the pairs up front)."""


class RunConfig(Config):
    """Everything one training run needs; saved beside every checkpoint."""

    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    data: DataConfig = DataConfig()
    dpo: DPOConfig = DPOConfig()
    grpo: GRPOConfig = GRPOConfig()

    @model_validator(mode="after")
    def _check_grpo(self) -> RunConfig:
        if self.train.objective == "grpo" and self.train.batch_size % self.grpo.group_size:
            raise TalmError(
                f"train.batch_size={self.train.batch_size} is not a multiple of grpo.group_size="
                f"{self.grpo.group_size} (a micro-batch holds whole groups of replies): pass --train.batch_size "
                f"{self.grpo.group_size * max(1, self.train.batch_size // self.grpo.group_size)}"
            )
        return self


# Named starting points for `train_model --preset NAME`; a TOML file and flags override them field by field.
PRESETS: dict[str, dict[str, Any]] = {
    # Trains on tiny-shakespeare in a few minutes on a 2-core CPU (val bits/byte about 2.1-2.3 from ~5 at start).
    # The recipe is the one that won benchmarks/bench_convergence.py at equal wall-clock time on 2 CPU cores
    # (docs/benchmarks.md, "Convergence"): Muon for the hidden matrices (nanochat's and modded-nanogpt's
    # optimizer), warmup-stable-decay, and the speedrun's QK-norm, ReLU² MLP and zero-initialised projections;
    # then, retuned at equal time: an untied head, the embedding at its own high rate (0.1, nanochat-style), a
    # longer decay to zero and a short momentum warmup (a ~450-step run would otherwise warm it up for 300).
    "tiny": {
        "model": {
            "context_length": 128,
            "n_layer": 4,
            "n_head": 4,
            "d_model": 128,
            "qk_norm": True,
            "mlp": "relu2",
            "zero_init_proj": True,
            "tie_embeddings": False,
        },
        "optim": {
            "name": "muon",
            "schedule": "wsd",
            "lr": 4e-3,
            "embedding_lr": 0.1,
            "warmup_steps": 30,
            "muon_momentum_warmup": 50,
            "weight_decay": 0.1,
            "decay_fraction": 0.4,
            "min_lr_ratio": 0.0,
        },
        "train": {
            "max_steps": 600,
            "batch_size": 16,
            "eval_every": 100,
            "eval_tokens": 32768,
            "save_every": 200,
            "log_every": 10,
        },
    },
    # A ~10M-parameter model for one small GPU (or a patient CPU): the tiny preset's measured recipe (Muon, WSD,
    # QK-norm, ReLU², zero-initialised projections; docs/benchmarks.md, "Convergence") at 3x the width and context.
    "small": {
        "model": {
            "context_length": 512,
            "n_layer": 6,
            "n_head": 6,
            "d_model": 384,
            "qk_norm": True,
            "mlp": "relu2",
            "zero_init_proj": True,
        },
        "optim": {"name": "muon", "schedule": "wsd", "lr": 3e-3, "warmup_steps": 100, "min_lr_ratio": 0.1},
        "train": {"max_steps": 5000, "batch_size": 32, "eval_every": 250, "save_every": 500},
    },
    # Supervised fine-tuning of a base model on conversation data (download_data smoltalk / --conversations):
    # nanochat's chat_sft recipe (scripts/chat_sft.py): Muon for the matrices and AdamW for the rest at 2% of
    # the pretraining rates (init_lr_frac=0.02 of matrix_lr 0.02 and unembedding_lr 0.004 -> 4e-4 and 8e-5),
    # no weight decay, no warmup and a linear decay to zero (here: wsd with the whole run as its decay). The
    # model's shape is the base model's, so the preset sets none of it.
    "sft": {
        "optim": {
            "name": "muon",
            "muon_lr": 4e-4,
            "lr": 8e-5,
            "weight_decay": 0.0,
            "muon_weight_decay": 0.0,
            "warmup_steps": 0,
            "schedule": "wsd",
            "decay_fraction": 1.0,
            "min_lr_ratio": 0.0,
        },
        "train": {
            "max_steps": 1000,
            "batch_size": 16,
            "eval_every": 100,
            "eval_tokens": 65536,
            "save_every": 200,
            "log_every": 10,
        },
    },
    # Preference tuning of a chat model on preference pairs (`--init-from models/CHAT`): Zephyr's DPO recipe
    # (arXiv:2310.16944: AdamW, no weight decay, a warmup then a decay to zero, beta 0.1 as TRL's default) at a
    # rate a small model moves at (Zephyr's 5e-7 is for 7B weights); frequent evaluations of the held-out pairs.
    "dpo": {
        "optim": {"lr": 1e-5, "warmup_steps": 10, "min_lr_ratio": 0.0, "weight_decay": 0.0},
        "train": {
            "objective": "dpo",
            "max_steps": 500,
            "batch_size": 8,
            "eval_every": 50,
            "eval_tokens": 65536,
            "save_every": 100,
            "log_every": 10,
        },
    },
    # Fine-tuning a pretrained model (`--init-from`): no model settings (the architecture is the source's),
    # AdamW at a low lr: 3e-5 as nanoGPT's config/finetune_shakespeare.py (which fine-tunes GPT-2 at a constant
    # 3e-5 for 20 steps of 32k tokens), with a short warmup and a gentle cosine to lr/10 so the first steps do not
    # jolt the pretrained weights; a short run with frequent evaluations and samples (fine-tuning on a small
    # text overfits within a few epochs: best/ keeps the checkpoint of the lowest val loss).
    "finetune": {
        "optim": {"lr": 3e-5, "warmup_steps": 10, "min_lr_ratio": 0.1, "weight_decay": 0.1},
        "train": {
            "max_steps": 200,
            "batch_size": 8,
            "eval_every": 25,
            "eval_tokens": 65536,
            "save_every": 100,
            "log_every": 5,
            "sample_every": 50,
        },
    },
    # GPT-2 small (124M with GPT-2's vocab): 12 layers, 768 wide, 1024 context, 2**19 = 524,288 tokens per step.
    # The recipe of nanochat's base_train.py for this size (karpathy/nanochat: matrix_lr 0.02 for Muon,
    # warmdown_ratio 0.2 to final_lr_frac 0.0, total_batch_size 524288, ReLU², QK-norm, zero-initialised
    # projections) and its default length, 20 tokens per parameter (Chinchilla): 124M x 20 / 2**19 ~ 4,800 steps.
    # Two differences, both for the Hugging Face export: the output layer stays tied to the embedding, so
    # AdamW's one lr (GPT-3 small's 6e-4, as nanoGPT) serves both where nanochat gives its untied head 0.004 and
    # its embedding 0.2; and no logit soft-cap (nanochat: 15), which the Llama format cannot express. nanochat
    # warms up none of its lrs; talm keeps 100 steps (2% of the run) for the AdamW side.
    "gpt2-124m": {
        "model": {
            "context_length": 1024,
            "n_layer": 12,
            "n_head": 12,
            "d_model": 768,
            "qk_norm": True,
            "mlp": "relu2",
            "zero_init_proj": True,
        },
        "optim": {
            "name": "muon",
            "schedule": "wsd",
            "decay_fraction": 0.2,
            "min_lr_ratio": 0.0,
            "muon_lr": 0.02,
            "lr": 6e-4,
            "warmup_steps": 100,
            "weight_decay": 0.0,
        },
        "train": {
            "max_steps": 4800,
            "batch_size": 16,
            "tokens_per_step": 524288,
            "eval_every": 250,
            "eval_tokens": 524288,
            "save_every": 500,
            "compile": True,
        },
    },
}

PRESETS["grpo"] = {
    # Reinforcement learning on prompt data (download_data gsm8k, --prompts) from a chat model (--init-from):
    # nanochat's chat_rl recipe (scripts/chat_rl.py: the pretraining rates x 0.05, no weight decay, a linear
    # decay to zero, 16 replies per prompt at temperature 1, top-k 50) at talm's tiny scale: 8 prompts x 8
    # replies per step.
    "train": {
        "objective": "grpo",
        "max_steps": 200,
        "batch_size": 64,
        "eval_every": 20,
        "save_every": 20,
        "log_every": 1,
    },
    "optim": {
        "name": "muon",
        "muon_lr": 1e-3,
        "lr": 2e-4,
        "weight_decay": 0.0,
        "muon_weight_decay": 0.0,
        "warmup_steps": 0,
        "schedule": "wsd",
        "decay_fraction": 1.0,
        "min_lr_ratio": 0.0,
    },
    "grpo": {"group_size": 8, "max_new_tokens": 64, "temperature": 1.0, "top_k": 50},
}

# The data each preset's recipe is made for: "conversations" (data with loss masks, made by download_data with
# --conversations or a chat preset: the loss on the assistant's replies), "text" (every token learned),
# "preferences" (pairs, made by download_data ultrafeedback or --preferences) or "prompts" (prompts with
# reference answers, made by download_data gsm8k or --prompts).
PRESET_DATA: dict[str, Literal["text", "conversations", "preferences", "prompts"]] = {
    "dpo": "preferences",
    "grpo": "prompts",
    "tiny": "text",
    "small": "text",
    "sft": "conversations",
    "finetune": "text",
    "gpt2-124m": "text",
}

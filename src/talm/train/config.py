"""The train stage's configuration (talm.config holds the Config base: strict fields, TOML and flag layering, docstrings as --help)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    Field,
)

from talm.config import Config, Seed
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
    muon_lr: float = Field(default=0.02, gt=0)
    """Peak learning rate of Muon's matrices (with --optim.name muon); the schedule scales it like lr. 0.02 is
    nanochat's matrix_lr (Keller Jordan's lr scaling, sqrt(max(1, rows/cols)))."""
    muon_momentum: float = Field(default=0.95, ge=0.0, lt=1.0)
    """Muon's (Nesterov) momentum, as nanochat and the modded-nanogpt speedrun use."""
    muon_momentum_warmup: int = Field(default=300, ge=0)
    """Steps over which Muon's momentum ramps linearly from 0.85 to muon_momentum (nanochat: 300; 0: none)."""
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
    deterministic: bool = False
    """Bitwise-reproducible runs (deterministic kernels; on CPU a resumed run repeats the same losses)."""
    seed: Seed = 1337
    """Seed of the model initialisation, the data order and dropout."""
    report_to: list[Literal["tensorboard", "wandb"]] = []
    """Also send metrics to these trackers (optional extras: pip install talm[tensorboard] / talm[wandb])."""


class DataConfig(Config):
    """Where the training tokens come from."""

    dir: str = ""
    """Directory of .npy shards and meta*.json manifest(s) written by download_data."""
    tokenizer_path: str | None = None
    """Tokenizer file; unset means the one the data was made with (from the manifest)."""


class RunConfig(Config):
    """Everything one training run needs; saved beside every checkpoint."""

    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    data: DataConfig = DataConfig()


# Named starting points for `train_model --preset NAME`; a TOML file and flags override them field by field.
PRESETS: dict[str, dict[str, Any]] = {
    # Trains on tiny-shakespeare in a few minutes on a 2-core CPU (val bits/byte about 2.1-2.3 from ~5 at start).
    # The recipe is the one that won benchmarks/bench_convergence.py at equal wall-clock time on 2 CPU cores
    # (docs/benchmarks.md, "Convergence"): Muon for the hidden matrices (nanochat's and modded-nanogpt's
    # optimizer), warmup-stable-decay, and the speedrun's QK-norm, ReLU² MLP and zero-initialised projections.
    "tiny": {
        "model": {
            "context_length": 128,
            "n_layer": 4,
            "n_head": 4,
            "d_model": 128,
            "qk_norm": True,
            "mlp": "relu2",
            "zero_init_proj": True,
        },
        "optim": {
            "name": "muon",
            "schedule": "wsd",
            "lr": 3e-3,
            "warmup_steps": 30,
            "weight_decay": 0.1,
            "min_lr_ratio": 0.1,
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
    # A ~10M-parameter model for one small GPU (or a patient CPU).
    "small": {
        "model": {"context_length": 512, "n_layer": 6, "n_head": 6, "d_model": 384},
        "optim": {"lr": 1e-3, "warmup_steps": 200},
        "train": {"max_steps": 5000, "batch_size": 32, "eval_every": 250, "save_every": 500},
    },
    # GPT-2 small (124M with GPT-2's vocab): 12 layers, 768 wide, 1024 context, ~0.5M tokens per step.
    "gpt2-124m": {
        "model": {"context_length": 1024, "n_layer": 12, "n_head": 12, "d_model": 768},
        "optim": {"lr": 6e-4, "warmup_steps": 700, "weight_decay": 0.1},
        "train": {
            "max_steps": 19073,
            "batch_size": 16,
            "tokens_per_step": 524288,
            "eval_every": 250,
            "eval_tokens": 524288,
            "save_every": 1000,
            "compile": True,
        },
    },
}

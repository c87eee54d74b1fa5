"""What a resume may change: the one place that compares the config a checkpoint was saved with (checkpoint.json
"config") with the resumed run's, field by field, and decides each change.

Every field of `RunConfig` has a decision in `POLICY` (a field without one is refused, and a test fails):

- silent: how the run is computed, logged or evaluated, not what it learns (eval cadence, device, compile);
- note: allowed and said in one line (an optimizer hyperparameter, the dropout, the data directory);
- architecture: refused, the weights were trained for the saved shape;
- refused: refused with its own reason (another optimizer: its state does not fit);
- kept: a resume ignores it (the data order and random state come from the checkpoint): the saved value is kept;
- peak: a peak lr lowered is said; raised, it needs --optim.rewarm (a warm-up to it), else refused;
- schedule: allowed while the lr does not jump (`rewarm_segment`: refused, or re-warmed with --optim.rewarm);
- global batch: the tokens per optimizer step stay the run's; another process count or micro-batch keeps them
  by gradient accumulation when that divides exactly, else refused naming the flags that fix it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from talm.errors import TalmError
from talm.train.config import OptimConfig, RunConfig
from talm.train.optim import PEAKS, multiplier, rewarmed

SILENT, NOTE, ARCH, REFUSED, KEPT, PEAK, SCHEDULE, BATCH = (
    "silent", "note", "architecture", "refused", "kept", "peak", "schedule", "global batch",
)  # fmt: skip
OPTIMIZER_NOTE = "an optimizer setting, its saved state carries on"
SHAPE = "the saved weights were trained for it"

# field -> (decision, why: the reason a note or a refusal gives)
POLICY: dict[str, tuple[str, str]] = {
    **{
        f"model.{k}": (ARCH, SHAPE)
        for k in ("vocab_size", "context_length", "n_layer", "n_head", "n_kv_head")
    },
    **{
        f"model.{k}": (ARCH, SHAPE)
        for k in ("d_model", "arch", "mlp", "mlp_hidden", "rope_theta", "norm_eps")
    },
    **{f"model.{k}": (ARCH, SHAPE) for k in ("qk_norm", "logit_softcap", "zero_init_proj", "tie_embeddings")},
    "model.dropout": (NOTE, "a regularisation of training; the weights carry on"),
    "optim.name": (REFUSED, "the saved optimizer state is the other optimizer's"),
    "optim.lr": (PEAK, ""),
    "optim.embedding_lr": (PEAK, ""),
    "optim.muon_lr": (PEAK, ""),
    **{f"optim.{k}": (NOTE, OPTIMIZER_NOTE) for k in ("muon_momentum", "muon_momentum_warmup")},
    **{f"optim.{k}": (NOTE, OPTIMIZER_NOTE) for k in ("muon_weight_decay", "weight_decay", "beta1", "beta2")},
    **{f"optim.{k}": (NOTE, OPTIMIZER_NOTE) for k in ("eps", "grad_clip", "muon_per_projection")},
    **{
        f"optim.{k}": (SCHEDULE, "the lr follows the new schedule from here (it does not jump)")
        for k in ("schedule", "decay_fraction", "min_lr_ratio", "warmup_steps")
    },
    "optim.rewarm": (SILENT, ""),
    "train.objective": (
        REFUSED,
        "another stage: train it under a new --model-name with --init-from this model",
    ),
    "train.max_steps": (SCHEDULE, ""),
    "train.batch_size": (BATCH, ""),
    "train.tokens_per_step": (BATCH, ""),
    **{f"train.{k}": (SILENT, "") for k in ("eval_every", "save_every", "log_every", "device", "compile")},
    **{f"train.{k}": (SILENT, "") for k in ("eval_tasks", "eval_tasks_every", "eval_tasks_limit")},
    **{f"train.{k}": (SILENT, "") for k in ("eval_tasks_dir", "report_to", "parallel", "deterministic")},
    **{f"train.{k}": (SILENT, "") for k in ("activation_checkpointing", "sample_every", "sample_prompts")},
    "train.sample_tokens": (SILENT, ""),
    "train.eval_tokens": (
        NOTE,
        "val losses are now measured on another slice, best/ compares them all the same",
    ),
    "train.dtype": (NOTE, "another precision for the remaining steps"),
    "train.isolate_conversations": (NOTE, "which conversations of a packed row see each other"),
    "train.seed": (KEPT, "a resumed run continues its checkpoint's data order and random state"),
    "train.init_from": (KEPT, ""),  # run.py says "--init-from ... ignored" whenever it is passed on a resume
    **{
        f"grpo.{k}": (NOTE, "how the replies are sampled and scored from here; the weights carry on")
        for k in ("group_size", "max_new_tokens", "temperature", "top_k", "reward")
    },
    **{
        f"grpo.{k}": (NOTE, "how advantages weigh in the loss from here")
        for k in ("normalise_std", "loss_mean")
    },
    "grpo.eval_prompts": (
        NOTE,
        "val_pass@1 is now measured on another slice, best/ compares them all the same",
    ),
    "data.dir": (NOTE, "the loader keeps its position (epoch and window), now in this data's shuffled order"),
    "data.tokenizer_path": (SILENT, ""),  # the tokenizer's fingerprint is checked against the checkpoint's
    "dpo.loss": (REFUSED, "another loss is another run: train it under a new --model-name"),
    "dpo.beta": (NOTE, "the loss's strength from here on; the weights carry on"),
    "dpo.gamma": (NOTE, "SimPO's margin from here on; the weights carry on"),
    # stored log-probabilities come from the checkpoint; the trained weights cannot give the starting ones again
    "dpo.reference": (REFUSED, "the reference is the starting weights, which a resumed run no longer holds"),
}


def config_fields() -> list[str]:
    """Every field of RunConfig as "section.name"."""
    return [f"{s}.{k}" for s, info in RunConfig.model_fields.items() for k in info.annotation.model_fields]


@dataclass
class ResumePlan:
    """What a resume does besides loading the checkpoint: lines to say, and the lr's re-warm (or None)."""

    notes: list[str] = field(default_factory=list)
    lr_segment: dict | None = None


def flag(name: str) -> str:
    return f"--{name}"


def plan_resume(
    meta: dict[str, Any], trainer_state: dict[str, Any], cfg: RunConfig, *, world_size: int, model_dir: Path
) -> ResumePlan:
    """Decide every change `cfg` makes to the run saved in `meta` (checkpoint.json) and `trainer_state`: raise
    TalmError (one line) for a refused one, set `cfg` where the saved value stays (the global batch, kept
    fields), and return the lines to say and the lr's re-warm. Reads and writes nothing on disk."""
    old = RunConfig.model_validate(meta["config"])  # today's defaults fill a field added since
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = old.model.vocab_size
    changes = [(name, *values(old, cfg, name)) for name in config_fields()]
    changes = [(name, a, b) for name, a, b in changes if a != b]
    step = int(trainer_state["step"])
    refuse_changes(changes, model_dir, cfg, step)
    plan = ResumePlan()
    for name, was, now in changes:
        decision, why = POLICY[name]
        if decision == NOTE or (decision == SCHEDULE and why) or (decision == PEAK and now < was):
            plan.notes.append(f"{name} {was} -> {now}: {why or 'lowered at once'}")
        elif decision == KEPT:
            section, key = name.split(".")
            setattr(getattr(cfg, section), key, was)
            if why:
                plan.notes.append(f"{name} {now} ignored ({why}): kept {was}; pass --restart to start over")
    plan.notes += keep_global_batch(meta, trainer_state, old, cfg, world_size)
    segment = trainer_state.get("lr_segment") or None
    plan.lr_segment, note = rewarm_segment(meta["config"], cfg.optim, cfg.train.max_steps, step, segment)
    plan.notes += [note] if note else []
    return plan


def values(old: RunConfig, new: RunConfig, name: str) -> tuple[Any, Any]:
    section, key = name.split(".")
    return getattr(getattr(old, section), key), getattr(getattr(new, section), key)


def refuse_changes(changes: list[tuple[str, Any, Any]], model_dir: Path, cfg: RunConfig, step: int) -> None:
    """TalmError (one line) for the first refused change: the architecture's all together, then field order."""
    for name, was, now in changes:
        if name not in POLICY:
            raise TalmError(
                f"resuming {str(model_dir)!r} with {name} {was} -> {now} is not supported (no resume rule for it): "
                f"keep {flag(name)} {was}, or pass --restart to start over"
            )
    arch = [(name, a, b) for name, a, b in changes if POLICY[name][0] == ARCH]
    if arch:
        diff = ", ".join(f"{name.split('.')[1]} {a} -> {b}" for name, a, b in arch)
        raise TalmError(
            f"{str(model_dir)!r} holds a model with another architecture ({diff}): pick a new "
            "--model-name, drop the differing settings to resume it, or pass --restart to start it over"
        )
    for name, was, now in changes:
        decision, why = POLICY[name]
        if decision == REFUSED:
            raise TalmError(
                f"cannot resume {str(model_dir)!r} with {name} {was} -> {now} ({why}): keep {flag(name)} {was}, "
                "or pass --restart to start over"
            )
        if decision == PEAK:
            refuse_peak(name, was, now, cfg, step)


def refuse_peak(name: str, was: float | None, now: float | None, cfg: RunConfig, step: int) -> None:
    """A peak lr that comes or goes (embedding_lr: the optimizer's groups) is refused; a raise needs a re-warm."""
    if (was is None) != (now is None):
        raise TalmError(
            f"the run was trained {'with' if was else 'without'} {flag(name)}, which decides the optimizer's "
            f"groups: resume {'with it set' if was else 'without it'}, or pass --restart"
        )
    if name == "optim.muon_lr" and cfg.optim.name != "muon" or now <= was:
        return  # an unused peak, or a lower one
    if not cfg.optim.rewarm:
        raise TalmError(
            f"resuming at step {step} with {name} {was} -> {now} would raise that lr {now / was:.3g}x at once: "
            f"keep {flag(name)} {was}, pass --optim.rewarm to warm up to it over --optim.warmup_steps steps, or "
            "--restart to train from scratch"
        )
    if cfg.optim.warmup_steps == 0:
        raise TalmError(
            f"--optim.rewarm warms {name} {was} -> {now} up over --optim.warmup_steps steps, which is 0: set "
            f"--optim.warmup_steps (e.g. 100), or keep {flag(name)} {was}"
        )


def saved_tokens_per_step(meta: dict[str, Any], trainer_state: dict[str, Any], old: RunConfig) -> int | None:
    """The resumed run's tokens per optimizer step: checkpoint.json's; for a checkpoint written before it was
    recorded, its config's, else its micro-batch times its process count (one RNG state per process)."""
    if meta.get("tokens_per_step"):
        return int(meta["tokens_per_step"])
    if old.train.tokens_per_step:
        return old.train.tokens_per_step
    processes = len(trainer_state.get("rng") or [])
    return old.train.batch_size * old.model.context_length * processes if processes else None


def keep_global_batch(
    meta: dict[str, Any], trainer_state: dict[str, Any], old: RunConfig, cfg: RunConfig, world_size: int
) -> list[str]:
    """The global batch (batch_size x context x processes x micro-steps) stays the run's: another process count
    or batch_size keeps it by gradient accumulation (setting train.tokens_per_step), else TalmError."""
    saved = saved_tokens_per_step(meta, trainer_state, old)
    t = cfg.train
    micro = t.batch_size * cfg.model.context_length * world_size
    if saved is None or (t.tokens_per_step or micro) == saved:
        if old.train.batch_size != t.batch_size:
            return [
                f"train.batch_size {old.train.batch_size} -> {t.batch_size}: the same {saved} tokens per step"
            ]
        return []
    was_processes = len(trainer_state.get("rng") or []) or "?"
    if t.tokens_per_step not in (None, old.train.tokens_per_step):
        raise TalmError(
            f"train.tokens_per_step {old.train.tokens_per_step} -> {t.tokens_per_step} would change the run's "
            f"global batch ({saved} tokens per step): keep --train.tokens_per_step {saved}, or pass --restart"
        )
    if saved % micro:
        raise TalmError(
            f"resuming on {world_size} process(es) (the run had {was_processes}) cannot keep its {saved} tokens "
            f"per step: they are not a multiple of batch_size x context_length x processes = {t.batch_size} x "
            f"{cfg.model.context_length} x {world_size}: set --train.batch_size to divide them, resume on "
            f"{was_processes} process(es), or pass --restart"
        )
    t.tokens_per_step = saved
    return [
        f"{world_size} process(es) of {t.batch_size} sequences (the run had {was_processes} of "
        f"{old.train.batch_size}): {saved // micro} micro-step(s) per step keep its {saved} tokens per step "
        f"(--train.tokens_per_step {saved})"
    ]


def peaks(cfg: OptimConfig) -> dict[str, float]:
    """Each parameter group's peak lr in use (optim.PEAKS): AdamW's, Muon's (with muon), the embedding's (set)."""
    used = {"lr": cfg.lr} | ({"muon_lr": cfg.muon_lr} if cfg.name == "muon" else {})
    return used | ({"embedding_lr": cfg.embedding_lr} if cfg.embedding_lr is not None else {})


def rewarm_segment(
    saved: dict[str, Any], new: OptimConfig, new_max_steps: int, step: int, segment: dict | None
) -> tuple[dict | None, str | None]:
    """Whether resuming at `step` keeps every group's lr continuous. `saved` is the resumed run's config
    (checkpoint.json "config"), `segment` its saved re-warm (or None). The new schedule may follow the saved one,
    or fall below it; a group's lr may not rise above both its saved lr and its last lr plus one warmup step
    (1/warmup_steps of its peak: what warmup itself does per step). Returns (the segment to train with, a line
    saying what happened); TalmError naming the choices if it would rise further and --optim.rewarm is off. The
    segment starts each group at the lr it had (a multiplier of its new peak)."""
    try:
        old_cfg = OptimConfig.model_validate(saved["optim"])
        old_max = int(saved["train"]["max_steps"])
    except (KeyError, TypeError, ValueError):  # a config without a schedule we can read: nothing to compare
        return segment, None
    if step <= 0:
        return segment, None
    old_peaks, new_peaks = peaks(old_cfg), peaks(new)
    last, now, jumps = (
        {},
        {},
        False,
    )  # per group: its last lr and its next one, as multipliers of the new peak
    for k in new_peaks.keys() & old_peaks.keys():
        ratio = old_peaks[k] / new_peaks[k]
        old = rewarmed(multiplier(old_cfg, old_max), segment, old_cfg.warmup_steps, k)
        last[k], now[k] = (
            ratio * old(step - 1),
            rewarmed(multiplier(new, new_max_steps), segment, new.warmup_steps, k)(step),
        )
        jumps |= now[k] > max(ratio * old(step), last[k] + 1.0 / max(new.warmup_steps, 1)) + 1e-12
    if not jumps:
        return segment, None
    fields = ("schedule", "warmup_steps", "min_lr_ratio", "decay_fraction", "lr", "muon_lr", "embedding_lr")
    changes = [f"max_steps {old_max} -> {new_max_steps}"] if old_max != new_max_steps else []
    changes += [f"{k} {getattr(old_cfg, k)} -> {getattr(new, k)}" for k in fields if getattr(old_cfg, k) != getattr(new, k)]  # fmt: skip
    what = ", ".join(changes) or "these settings"
    was, would = (
        f"{new.lr * last['lr']:.3g}",
        f"{new.lr * now['lr']:.3g}",
    )  # AdamW's lr, the one metrics.jsonl logs
    if not new.rewarm:
        raise TalmError(
            f"resuming at step {step} with {what} would raise the lr from {was} to {would} at once: keep "
            f"--max-steps {old_max} and the saved schedule, pass --optim.rewarm to warm up from {was} to the new "
            f"schedule over {new.warmup_steps} steps, or --restart to train from scratch"
        )
    return {"step": step, "from": {k: last.get(k, last["lr"]) for k in PEAKS}}, (
        f"{what}: re-warming the lr from {was} to the new schedule ({would}) over {new.warmup_steps} steps"
    )

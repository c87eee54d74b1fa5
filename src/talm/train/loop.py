"""The training loop: build a run's pieces, then step (accumulate, clip, step), evaluate, log and checkpoint.

`Trainer` builds (and so validates) everything a run needs before it writes anything: the data and every
shard's header, the tokenizer, loaders, model, optimizer, precision, and the checkpoint to resume. `Trainer.run`
then trains to max_steps on the schedule of the config: a train-loss record every log_every steps, evaluation
(and best/) every eval_every, latest/ every save_every, and a clean save on Ctrl-C. Under torchrun it runs on
many processes (DDP or FSDP, see parallel.py; gradients synced only on the last micro-step); everything written
(checkpoints, metrics.jsonl, tokenizer.json) is written by rank 0 only, atomically (under FSDP every rank
writes its shards of a checkpoint).

One optimizer step is `Trainer.train_step` (its objective's micro-batches, forward and loss, backward, clip,
step, schedule); the steps on their schedule are `Trainer.run_steps` (log, evaluate, save, Ctrl-C). A step's
stats (loss, gradient norm, stop votes, the objective's) are read only on log, eval and save steps, on a
schedule every rank shares, because reading them waits for the device; in between the host queues the next
steps. docs/design.md §4 walks through one step. Helpers that are ideas of their own keep their modules: what
a step minimises (objective.py), the optimizer (optim.py), saving and loading (state.py, checkpoint.py),
parallelism (parallel.py), metrics sinks, which run to train (run.py) and what a resume may change (resume.py).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from talm.eval.runner import TrainingTasks
from talm.model.threads import use_cpu_threads
from talm.train import dist, init, resume, rundir, state
from talm.train.checkpoint import read_meta
from talm.train.config import RunConfig
from talm.train.inputs import accumulation, check_trained_with, load_inputs
from talm.train.metrics import MetricsLog
from talm.train.objective import make_objective
from talm.train.optim import apply_schedule, build_optimizer, group_multipliers
from talm.train.parallel import Parallel
from talm.train.precision import Precision, set_deterministic
from talm.train.report import make_sinks
from talm.train.rundir import TOKENIZER_FILE
from talm.train.samples import samples_at_eval
from talm.train.stop import StopRequest


@dataclass
class TrainResult:
    step: int
    tokens_seen: int
    seconds: float
    tokens_per_s: float
    val_loss: float | None
    val_bpb: float | None
    model_dir: Path


OBJECTIVE_SECTIONS = ("dpo", "grpo")  # config sections read by that objective alone


def describe(cfg: RunConfig) -> str:
    """The resolved config, one line per section (an objective's own section only when it is the run's)."""
    lines = []
    for section, values in cfg.model_dump(mode="json").items():
        if section in OBJECTIVE_SECTIONS and section != cfg.train.objective:
            continue
        lines.append(f"  {section}: " + " ".join(f"{k}={v}" for k, v in values.items()))
    return "\n".join(lines)


def announce(trainer: Trainer) -> None:
    """The run's banner (rank 0, stderr): what is trained, where, how, and anything odd about the data."""
    say = lambda *a: dist.print0(*a, ctx=trainer.ctx)  # noqa: E731
    t = trainer.cfg.train
    if trainer.resumed:
        say(f"resuming {trainer.model_dir} from step {trainer.step} ({trainer.tokens_seen:,} tokens seen)")
        for note in trainer.resume_notes:  # what the resume changes (resume.py)
            say(note)
    elif trainer.step == 0:
        source = init.describe(t.init_from) if t.init_from else "scratch"
        if not t.init_from and trainer.data.loss_mask:
            source += (
                " (random weights; to fine-tune a base model on these conversations: --init-from models/BASE)"
            )
        say(f"training {trainer.model_dir} from {source}")
    say(
        f"model: {trainer.model.num_params():,} parameters ({trainer.model.num_params(embeddings=False):,} "
        f"without embeddings), device {trainer.device}, {trainer.ctx.world_size} process(es), "
        f"{trainer.tokens_per_step:,} tokens/step ({trainer.accum} micro-step(s) of {t.batch_size} x "
        f"{trainer.cfg.model.context_length} per process), precision {trainer.precision}"
    )
    checkpointing = ", activation checkpointing per block" if t.activation_checkpointing else ""
    say(f"parallel: {trainer.parallel.description}{checkpointing}")
    say(trainer.threads)
    say(describe(trainer.cfg))
    for line in trainer.objective.describe():
        say(line)
    if not trainer.objective.has_val:
        say(f"no val split in {trainer.data.dir}: training without evaluation, so no best/ checkpoint")
    if not trainer.data.complete:
        say(f"note: {trainer.data.dir} is not complete (download_data is still writing or was stopped)")


def already_trained(trainer: Trainer) -> TrainResult:
    """A run resumed at (or past) max_steps: say so on stdout, with the scores its checkpoint recorded."""
    meta = read_meta(trainer.resume_from or trainer.model_dir / "latest")
    val_loss, bpb = meta.get("val_loss"), meta.get("val_bpb")
    scores = meta.get("scores") or {"val_loss": val_loss, "val_bpb": bpb}
    dist.print0(
        f"{trainer.model_dir} is already trained to step {trainer.step} ({trainer.objective.scores_text(scores)}): raise "
        "--max-steps to train further, or pass --restart to start over",
        ctx=trainer.ctx,
        file=sys.stdout,
    )
    return TrainResult(
        trainer.step, trainer.tokens_seen, trainer.elapsed, 0.0, val_loss, bpb, trainer.model_dir
    )


def mfu_text(mfu: float | None) -> str:
    return "" if mfu is None else f", MFU {100 * mfu:.1f}%"


class Trainer:
    """One training run: owns the model, optimizer, loaders, checkpoints and metrics of models/NAME."""

    def __init__(
        self,
        cfg: RunConfig,
        model_dir: str | Path,
        *,
        resume_from: Path | None = None,
        restart: bool = False,
    ) -> None:
        """Build (and so validate) everything the run needs; writes nothing. Without `resume_from`, the run starts
        fresh and deletes an earlier run's outputs when it starts, which needs `restart` if there are any."""
        self.model_dir = Path(model_dir)
        if resume_from is None and not restart:
            rundir.check_fresh_start(self.model_dir)
        self.ctx = dist.setup(cfg.train.device, group=cfg.train.parallel != "auto")
        self.device = self.ctx.device
        saved, plan = None, resume.ResumePlan()
        if resume_from is not None:  # every change of the saved config: refused, or kept, said, adjusted
            saved = state.read_saved(resume_from)
            plan = resume.plan_resume(*saved, cfg, world_size=self.ctx.world_size, model_dir=self.model_dir)
        self.resume_notes = plan.notes
        self.threads = use_cpu_threads(self.device)  # "threads: N (why)", for the banner
        t = cfg.train
        if t.deterministic:
            set_deterministic(self.device)

        self.data, self.tokenizer = load_inputs(cfg)  # sets cfg.model.vocab_size if unset
        self.cfg = cfg
        self.tokens_per_step, self.accum = accumulation(cfg, self.ctx.world_size)
        self.precision = Precision(t.dtype, self.device)
        # DDP or FSDP; under FSDP the model is built sharded (never whole on one process), and either way before
        # the optimizer is built over its parameters.
        self.parallel = Parallel(t, cfg.model, self.ctx, self.precision)
        torch.manual_seed(t.seed)
        self.model = init.build_model(cfg, self.tokenizer, self.parallel, resumed=resume_from is not None)
        self.optimizer = build_optimizer(self.model, cfg.optim, self.device)
        self.objective = make_objective(
            cfg, self.data, self.tokenizer, model=self.model, accum=self.accum, ctx=self.ctx,
            precision=self.precision,
        )  # fmt: skip
        self.task_scores = TrainingTasks.of_run(self.tokenizer, t, self.precision.autocast)  # --eval-tasks
        # A multiplier of each group's peak lr, re-warmed over the segment a resume decided (resume.rewarm_segment).
        self.lr_segment = plan.lr_segment
        self.lr_mult = group_multipliers(cfg.optim, t.max_steps, self.lr_segment)

        self.step = 0
        self.tokens_seen = 0
        self.elapsed = 0.0  # training seconds of earlier sessions of this run
        self.best_score = math.inf  # the objective's lowest (val loss for language modelling): best/'s
        self.last_val: dict[str, Any] | None = None  # the last evaluation's metrics
        self.data_wait = 0.0  # seconds spent waiting for batches in this session
        self.stop_asked = False  # whether Ctrl-C had come when the last step read it
        self._t0 = time.perf_counter()
        self.resume_from = resume_from
        self.resumed = resume_from is not None
        self.checkpointer = state.Checkpointer(
            self.model, self.optimizer, counters=self, ctx=self.ctx, sharded=self.parallel.sharded,
            model_config=cfg.model, parts={
                "loader": self.objective, "scaler": self.precision.scaler,
                "rng": state.RNGStates(self.ctx, t.seed, step=lambda: self.step),
            },
        )  # fmt: skip
        if resume_from is not None and saved is not None:
            check_trained_with(saved[0], self.tokenizer, self.model_dir, self.data.dir)
            self.checkpointer.load(resume_from, saved[1])
        else:  # the init above was the same on every rank; dropout must differ per rank
            torch.manual_seed(t.seed + self.ctx.rank)
        self.objective.check_next()  # the first batch's data: bad ids fail before any write
        self.net = self.parallel.wrap(self.model, compile=t.compile)

    def now(self) -> float:
        """Training seconds of the whole run so far (earlier sessions included)."""
        return self.elapsed + (time.perf_counter() - self._t0)

    def state_dict(self) -> dict[str, Any]:
        """The run's counters, and the lr's re-warm (which a resume's plan decides again: it is not loaded)."""
        return {
            "step": self.step, "tokens_seen": self.tokens_seen, "elapsed": self.now(),
            "best_val_loss": self.best_score, "lr_segment": self.lr_segment or {},
        }  # fmt: skip

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.step, self.tokens_seen = int(saved["step"]), int(saved["tokens_seen"])
        self.elapsed, self.best_score = float(saved["elapsed"]), float(saved["best_val_loss"])

    def save(self, which: str, val: dict[str, Any] | None = None) -> None:
        """Write models/NAME/<which> (latest or best) with `val`, the evaluation's metrics; every rank takes part."""
        val = val or {}
        meta = {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "tokens_per_step": self.tokens_per_step,  # the global batch a resume keeps (resume.py)
            "config": self.cfg.model_dump(mode="json"),
            "tokenizer": {"file": TOKENIZER_FILE, "fingerprint": self.tokenizer.fingerprint},
            "val_loss": val.get("val_loss"),
            "val_bpb": val.get("val_bpb"),
            "scores": val,
        }
        self.checkpointer.save(self.model_dir / which, meta)

    def _record(self, **values: Any) -> dict[str, Any]:
        """A metrics.jsonl record: where the run is (step, tokens, seconds), then `values`."""
        return {"step": self.step, "tokens": self.tokens_seen, "time": round(self.now(), 3), **values}

    def eval_and_log(self, log: MetricsLog) -> None:
        metrics = self.objective.evaluate(self.model)
        tasks = self.task_scores(self.model, self.step)  # --eval-tasks
        record = self._record(**metrics, **tasks)
        samples = samples_at_eval(  # --sample-every's continuations, when due
            self.model, self.tokenizer, self.precision, self.cfg, self.step,
            sharded=self.parallel.sharded, is_main=self.ctx.is_main,
        )  # fmt: skip
        log.log(record | samples)
        self.last_val = metrics
        score = self.objective.best_score(metrics)
        if score < self.best_score:
            self.best_score = score
            self.save("best", self.last_val)
        log.on_eval()

    def train_step(self, stop: StopRequest) -> tuple[torch.Tensor, float]:
        """One optimizer step over `accum` micro-batches: (its stats, lr). The stats stay on the device, summed over
        ranks: [mean loss, gradient norm, ranks asking to stop, the objective's stats (means over micro-batches)].
        Reading them waits for the device to finish the step, so the loop reads them only on log, eval and save
        steps (`read_stats`), and the host queues the next step meanwhile. A non-finite loss is caught at the next
        read, before anything is saved or evaluated."""
        lr = apply_schedule(self.optimizer, self.cfg.optim, self.step, self.lr_mult(self.step))  # AdamW's lr
        scaler = self.precision.scaler
        loss_sum = torch.zeros((), device=self.device)
        stat_sums = torch.zeros(len(self.objective.stat_names), device=self.device)
        batches = self.objective.step_batches()
        for micro in range(self.accum):
            t = time.perf_counter()
            batch = next(batches)
            self.data_wait += time.perf_counter() - t
            last = micro == self.accum - 1
            with self.parallel.micro_step(self.net, self.model, last):
                with self.precision.autocast():
                    loss, stats = self.objective.loss(self.net, batch)
                loss_sum += loss.detach()
                stat_sums += stats.float()
                scaler.scale(loss / self.accum).backward()
        scaler.unscale_(self.optimizer)
        clip = self.cfg.optim.grad_clip or math.inf
        grad_norm = self.parallel.grad_norm(self.model, clip)
        self.stop_asked = stop.requested  # read once per step: the loop's own check uses this reading too
        stop_vote = torch.tensor(float(self.stop_asked), device=self.device)
        step_stats = torch.stack([loss_sum / self.accum, grad_norm.float(), stop_vote]).float()
        stats = dist.all_reduce_sum(torch.cat([step_stats, stat_sums / self.accum]))
        scaler.step(self.optimizer)
        scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += self.tokens_per_step
        return stats, lr

    def run_steps(self, log: MetricsLog) -> tuple[float, bool]:
        """The steps, with logs, evaluations and saves on their schedule: (seconds inside optimizer steps, for
        tokens/s; whether Ctrl-C stopped it, after saving latest/)."""
        t = self.cfg.train
        train_seconds = 0.0
        saved_step = self.step if self.resumed else -1
        bar = tqdm(
            total=t.max_steps, initial=self.step, desc="train", unit="step", disable=not self.ctx.is_main,
            dynamic_ncols=True, mininterval=0.5,
        )  # fmt: skip
        self.model.train()
        interrupted = False
        try:
            with StopRequest() as stop:
                window_tokens, window_time = 0, 0.0
                # the bar's fields: the last logged step's, then the last val loss
                postfix: dict[str, str] = {}
                pending: list[tuple[int, torch.Tensor]] = []  # stats of the steps not read yet
                while self.step < t.max_steps:
                    t_step = time.perf_counter()
                    stats, lr = self.train_step(stop)
                    pending.append((self.step, stats))
                    last = self.step == t.max_steps
                    logs = self.step % t.log_every == 0 or last
                    evals = self.objective.has_val and (self.step % t.eval_every == 0 or last)
                    saves = self.step % t.save_every == 0 or last
                    # Steps are read on a schedule every rank shares (so all stop at the same step); a single
                    # process also reads as soon as Ctrl-C is pressed. Many ranks stop within log_every steps.
                    if logs or evals or saves or (self.stop_asked and self.ctx.world_size == 1):
                        loss, means, interrupted = self.read_stats(pending)
                        pending = []
                    dt = time.perf_counter() - t_step
                    train_seconds += dt
                    window_tokens += self.tokens_per_step
                    window_time += dt
                    if logs or interrupted:
                        tps = window_tokens / window_time if window_time else 0.0
                        mfu = self.utilisation(tps)
                        extra = {} if mfu is None else {"mfu": round(mfu, 4)}
                        extra |= {f"train_{k}": v for k, v in means.items()}
                        log.log(self._record(train_loss=loss, lr=lr, tokens_per_s=tps, **extra))
                        postfix |= {"loss": f"{loss:.4f}", "lr": f"{lr:.2e}", "tok_s": f"{tps:,.0f}"}
                        postfix |= {} if mfu is None else {"mfu": f"{100 * mfu:.1f}%"}
                        bar.set_postfix(postfix, refresh=False)
                        window_tokens, window_time = 0, 0.0
                    bar.update(1)
                    if interrupted:
                        break
                    if evals:
                        self.eval_and_log(log)
                        assert self.last_val is not None
                        # the first metric, shown until the next evaluation
                        postfix["val"] = f"{next(iter(self.last_val.values())):.4f}"
                        bar.set_postfix(postfix, refresh=False)
                    if saves:
                        self.save("latest", self.last_val)
                        saved_step = self.step
            if interrupted and saved_step != self.step:
                self.save("latest", self.last_val)
        finally:
            bar.close()
            log.close()
        return train_seconds, interrupted

    def read_stats(self, pending: list[tuple[int, torch.Tensor]]) -> tuple[float, dict[str, float], bool]:
        """Read the stats of the steps since the last read (one wait for the device): (the last step's mean loss
        over ranks, its objective's stats, whether any rank asked to stop). Raises if any of those steps
        diverged, naming the first."""
        values = torch.stack([stats for _, stats in pending]).tolist()
        for (step, _), (loss_sum, grad_norm, *_) in zip(pending, values, strict=True):
            loss = loss_sum / self.ctx.world_size
            # With float16's scaler an inf gradient only skips the step (and lowers the scale): not a divergence.
            if not math.isfinite(loss) or (
                not self.precision.scaler.is_enabled() and not math.isfinite(grad_norm)
            ):
                what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {grad_norm}"
                raise rundir.diverged(self.model_dir, f"step {step} ({what})")
        world = self.ctx.world_size
        means = {k: v / world for k, v in zip(self.objective.stat_names, values[-1][3:], strict=True)}
        return values[-1][0] / world, means, any(v[2] > 0 for v in values)

    def utilisation(self, tokens_per_s: float) -> float | None:
        """Model FLOPs utilisation: the model's training FLOP/s over the peak of every process's device."""
        peak = self.precision.peak_flops
        if peak is None:
            return None
        flops = tokens_per_s * self.model.flops_per_token(self.cfg.model.context_length)
        return flops / (peak * self.ctx.world_size)

    def run(self) -> TrainResult:
        """Train to max_steps (nothing to do if already there), then print the summary line on stdout."""
        announce(self)
        if self.step >= self.cfg.train.max_steps:
            return already_trained(self)

        sinks = []
        if self.ctx.is_main:  # the sinks first: a missing optional package fails before anything is touched
            self.model_dir.mkdir(parents=True, exist_ok=True)
            config = self.cfg.model_dump(mode="json")
            sinks = make_sinks(list(self.cfg.train.report_to), self.model_dir, config)
            resumed_at = self.step if self.resumed else None
            rundir.reset_run_dir(
                self.model_dir, tokenizer_file=Path(self.tokenizer.path), resumed_at=resumed_at
            )
        dist.barrier()
        start_step, start_tokens = self.step, self.tokens_seen
        self._t0 = time.perf_counter()
        train_seconds, interrupted = self.run_steps(
            MetricsLog(self.model_dir, sinks, enabled=self.ctx.is_main)
        )
        if interrupted:
            dist.print0(
                f"stopped at step {self.step}; saved {self.model_dir / 'latest'}: rerun the same command to resume",
                ctx=self.ctx,
            )
            raise KeyboardInterrupt
        seconds, tokens = self.now(), self.tokens_seen - start_tokens
        tps = tokens / train_seconds if train_seconds else 0.0
        scores = self.last_val or {}
        dist.print0(
            f"done: {self.step - start_step} steps, {tokens:,} tokens in {train_seconds:.1f}s "
            f"({tps:,.0f} tokens/s{mfu_text(self.utilisation(tps))}, "
            f"data wait {100 * self.data_wait / max(train_seconds, 1e-9):.1f}%); "
            f"{self.objective.scores_text(scores)}; saved {self.model_dir / 'latest'}",
            ctx=self.ctx,
            file=sys.stdout,
        )
        val_loss, bpb = scores.get("val_loss"), scores.get("val_bpb")
        return TrainResult(self.step, self.tokens_seen, seconds, tps, val_loss, bpb, self.model_dir)

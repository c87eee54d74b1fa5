"""The training loop: accumulate, clip, step; evaluate (loss, perplexity, bits per byte); log; checkpoint.

`resolve_run` turns a preset, a TOML file and command-line overrides into one validated `RunConfig`, and
decides whether the run resumes from `models/NAME/latest` (or `best/`). `run_training` is train_model's whole
run: it holds a lock on models/NAME and validates everything (config, device, data and shards, tokenizer,
writability) before it writes or deletes anything; `train` runs a resolved config on one process or, under
torchrun, on many (DDP, gradients synced only on the last micro-step). Everything written (checkpoints,
metrics.jsonl, tokenizer.json) is written by rank 0 only, atomically.

A model directory holding any trace of a run (checkpoints, metrics, logs) is never wiped without --restart:
without a resumable latest/, the run resumes from best/ or is refused with the choices spelled out.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from talm.config import merge, validate
from talm.data.manifest import DataSet, read_data
from talm.errors import TalmError
from talm.files import RunLock, aside_path, check_writable_dir, sweep_stale_temps, write_file
from talm.model.gpt import GPT
from talm.train import dist
from talm.train.checkpoint import (
    TRAINER_STATE,
    is_checkpoint,
    load_trainer_state,
    load_weights,
    read_meta,
    recover_interrupted_save,
    save_checkpoint,
)
from talm.train.config import PRESETS, RunConfig
from talm.train.loader import EvalSlice, TokenLoader, check_shards
from talm.train.metrics import MetricsLog, truncate_after
from talm.train.optim import build_optimizer, schedule
from talm.train.report import make_sinks

TOKENIZER_FILE = "tokenizer.json"
# What a run writes into models/NAME beside tokenizer.json: what --restart deletes, and a trace of an earlier run.
RUN_OUTPUTS = ("latest", "best", "metrics.jsonl", "loss.png", "tensorboard", "wandb_run_id")
OTHER_NAME = "pick another --model-name"


# ---------------------------------------------------------------------------------------------------------------
# Resolving the run: config layers, resume or restart, data and tokenizer.


def preset(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise TalmError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def run_traces(model_dir: Path) -> list[str]:
    """What an earlier run left in models/NAME (checkpoints, metrics, logs): what --restart would delete."""
    found = []
    for name in RUN_OUTPUTS:
        p = model_dir / name
        if not (p.exists() or p.is_symlink()):
            continue
        if name == "latest" and p.is_dir() and not any(p.iterdir()):
            continue  # an empty latest/ holds nothing to lose
        if name == "metrics.jsonl" and p.is_file() and p.stat().st_size == 0:
            continue
        found.append(name + ("/" if p.is_dir() else ""))
    return found


def is_resumable(path: Path) -> bool:
    """A full checkpoint: weights, checkpoint.json and the trainer state a run continues from."""
    return is_checkpoint(path) and (path / TRAINER_STATE).is_file()


def refuse_to_wipe(model_dir: Path, traces: list[str]) -> TalmError:
    return TalmError(
        f"{str(model_dir)!r} holds an earlier run ({', '.join(traces)}) but no checkpoint to resume it from "
        f"(latest/ is missing or incomplete and best/ is not a full checkpoint): pass --restart to delete it and "
        f"start over, or {OTHER_NAME}"
    )


def resume_point(model_dir: Path, *, probe: bool = False) -> Path | None:
    """The checkpoint a run without --restart continues from: latest/, else best/ if an earlier run left traces;
    None for a directory without any. TalmError (the choices spelled out) if there are traces but nothing to
    resume. `probe`: before the run holds the directory's lock, also look at a checkpoint an interrupted save
    moved aside, and never refuse (the decision is taken again under the lock)."""
    latest = model_dir / "latest"
    if is_checkpoint(latest):
        return latest
    if probe and is_checkpoint(aside_path(latest)):
        return aside_path(latest)
    traces = run_traces(model_dir)
    if not traces:
        return None
    if is_resumable(model_dir / "best"):
        return model_dir / "best"
    if probe:
        return None
    raise refuse_to_wipe(model_dir, traces)


def resolve_run(
    model_dir: str | Path,
    layers: list[dict[str, Any]],
    *,
    restart: bool = False,
    flag_names: dict[str, str] | None = None,
    probe: bool = False,
) -> tuple[RunConfig, Path | None]:
    """The run's config and the checkpoint to resume from (None for a fresh start). Reads, never writes.

    `layers` (preset, TOML file, flags: later wins) are merged on top of the defaults, or, when models/NAME
    already has a checkpoint and `restart` is False, on top of that checkpoint's config, so rerunning the same
    command resumes the same run (see `resume_point`, also for `probe`).
    """
    model_dir = Path(model_dir)
    resume_from = None
    if not restart and model_dir.is_dir():
        resume_from = resume_point(model_dir, probe=probe)
    base: dict[str, Any] = read_meta(resume_from)["config"] if resume_from is not None else {}
    data = base
    for layer in layers:
        data = merge(data, layer)
    cfg = validate(RunConfig, data, flag_names)
    if resume_from is not None:
        saved = base["model"]
        if cfg.model.vocab_size is None:
            cfg.model.vocab_size = saved.get("vocab_size")
        changed = {k: (saved.get(k), v) for k, v in cfg.model.model_dump().items() if saved.get(k) != v}
        if changed:
            diff = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items())
            raise TalmError(
                f"{str(model_dir)!r} holds a model with another architecture ({diff}): pick a new "
                "--model-name, drop the differing settings to resume it, or pass --restart to start it over"
            )
    return cfg, resume_from


def _take_model_dir(model_dir: Path, lock: RunLock) -> None:
    """Rank 0, before anything is written: check models/NAME can be written, lock it, then (no other run can
    be writing) undo an interrupted checkpoint save and sweep the temporaries crashed writers left."""
    check_writable_dir(model_dir, instead=OTHER_NAME)
    lock.acquire()
    for which in ("latest", "best"):
        recover_interrupted_save(model_dir / which)
    sweep_stale_temps(model_dir)
    for name in ("latest", "best", "tensorboard"):
        p = model_dir / name
        if p.exists() or p.is_symlink():
            check_writable_dir(p, instead=OTHER_NAME)
    for name in ("metrics.jsonl", TOKENIZER_FILE, "loss.png", "wandb_run_id"):
        if (model_dir / name).is_dir():
            raise TalmError(
                f"{str(model_dir / name)!r} is a directory, where the run writes a file: move it away or "
                f"{OTHER_NAME}"
            )


def run_training(
    model_dir: str | Path,
    layers: list[dict[str, Any]],
    *,
    restart: bool = False,
    flag_names: dict[str, str] | None = None,
) -> TrainResult:
    """train_model's run, in the order that keeps a user's work safe:

    1. resolve and validate the config (read only), pick the device and join the process group;
    2. rank 0: check models/NAME is writable, lock it for the whole run (a second run is refused with one line
       naming the holder), recover an interrupted save, sweep stale temporaries; the other ranks wait;
    3. decide again, under the lock, whether to resume (latest/, else best/, else refuse) or start fresh;
    4. build the Trainer: data, every shard's header, tokenizer, model, optimizer, the checkpoint to resume;
    5. only then (`Trainer.run`) delete an old run for --restart, and train.
    The lock is released and the process group torn down on any exit.
    """
    model_dir = Path(model_dir)
    cfg, _ = resolve_run(model_dir, layers, restart=restart, flag_names=flag_names, probe=True)
    ctx = dist.setup(cfg.train.device)
    lock = RunLock(
        model_dir, "train_model", instead=f"wait for it to finish or stop it (Ctrl-C), or {OTHER_NAME}"
    )
    try:
        dist.on_main(lambda: _take_model_dir(model_dir, lock), ctx)
        cfg, resume_from = resolve_run(model_dir, layers, restart=restart, flag_names=flag_names)
        if resume_from is not None and resume_from.name == "best":
            dist.print0(
                f"{model_dir / 'latest'} is missing or incomplete: resuming from {resume_from} (step "
                f"{read_meta(resume_from)['step']}), the best checkpoint; the steps after it are trained again",
                ctx=ctx,
            )
        return Trainer(cfg, model_dir, resume_from=resume_from, restart=restart).run()
    finally:
        lock.release()
        dist.teardown()


def load_tokenizer(cfg: RunConfig, data: DataSet):
    """The tokenizer to train with: -t if given (it must be the data's), else the one the manifest names."""
    from talm.tokenizer.api import Tokenizer

    want = data.tokenizer.get("fingerprint")
    if cfg.data.tokenizer_path:
        tok = Tokenizer.from_file(cfg.data.tokenizer_path)
        if tok.fingerprint != want:
            raise TalmError(
                f"tokenizer {cfg.data.tokenizer_path!r} is not the one {str(data.dir)!r} was made with "
                f"({data.tokenizer.get('path')!r}, fingerprint {str(want)[:12]}): drop -t to use the data's, "
                "or recreate the data with this tokenizer"
            )
        return tok
    recorded = data.tokenizer.get("path")
    candidates = [Path(recorded), data.dir / recorded] if recorded else []
    for path in candidates:
        if path.is_file():
            tok = Tokenizer.from_file(path)
            if tok.fingerprint == want:
                return tok
            raise TalmError(
                f"tokenizer file {str(path)!r} changed since {str(data.dir)!r} was made (fingerprint differs): "
                "pass the original with -t PATH, or recreate the data"
            )
    raise TalmError(
        f"the tokenizer {recorded!r} that {str(data.dir)!r} was made with is not found: pass it with -t PATH"
    )


def describe(cfg: RunConfig) -> str:
    """The resolved config, one line per section."""
    lines = []
    for section, values in cfg.model_dump(mode="json").items():
        lines.append(f"  {section}: " + " ".join(f"{k}={v}" for k, v in values.items()))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Precision, determinism, RNG.


def autocast_dtype(requested: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None = plain float32) for a --dtype choice on a device."""
    if requested == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return None
    if requested == "float32":
        return None
    if requested == "float16" and device.type != "cuda":
        raise TalmError(
            f"--train.dtype float16 needs a CUDA GPU (this run is on {device.type}): use bfloat16"
        )
    if requested == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise TalmError("this GPU has no bfloat16 support: use --train.dtype float16 (or auto)")
    return torch.bfloat16 if requested == "bfloat16" else torch.float16


def set_deterministic(device: torch.device) -> None:
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class StopRequest:
    """Turns Ctrl-C / SIGTERM into a flag checked between steps, so the run can save and exit cleanly.

    A second Ctrl-C interrupts at once.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# ---------------------------------------------------------------------------------------------------------------
# The run.


@dataclass
class TrainResult:
    step: int
    tokens_seen: int
    seconds: float
    tokens_per_s: float
    val_loss: float | None
    val_bpb: float | None
    model_dir: Path


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
        if resume_from is None and not restart and self.model_dir.is_dir():
            traces = run_traces(self.model_dir)
            if traces:
                raise refuse_to_wipe(self.model_dir, traces)
        self.ctx = dist.setup(cfg.train.device)
        self.device = self.ctx.device
        t = cfg.train
        if t.deterministic:
            set_deterministic(self.device)

        self.data = read_data(cfg.data.dir, splits=("train",))  # without a val split: no evaluation
        check_shards(self.data)  # a truncated or overwritten shard fails now, before anything is written
        self.tokenizer = load_tokenizer(cfg, self.data)
        if cfg.model.vocab_size is None:
            cfg.model.vocab_size = self.tokenizer.vocab_size
        elif cfg.model.vocab_size < self.tokenizer.vocab_size:
            raise TalmError(
                f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                f"{self.tokenizer.vocab_size} ids: leave it unset to take the tokenizer's"
            )
        self.cfg = cfg

        W, B, T = self.ctx.world_size, t.batch_size, cfg.model.context_length
        micro_tokens = B * T * W
        self.tokens_per_step = t.tokens_per_step or micro_tokens
        if self.tokens_per_step % micro_tokens:
            raise TalmError(
                f"train.tokens_per_step={self.tokens_per_step} is not a multiple of batch_size x context_length x "
                f"processes = {B} x {T} x {W} = {micro_tokens}: use a multiple of {micro_tokens}"
            )
        self.accum = self.tokens_per_step // micro_tokens

        vocab = self.tokenizer.vocab_size  # every id in the data must be one of the tokenizer's
        self.loader = TokenLoader(
            self.data, batch_size=B, context_length=T, seed=t.seed, rank=self.ctx.rank, world_size=W,
            device=self.device, vocab_size=vocab, accum_steps=self.accum,
        )  # fmt: skip
        self.eval_slice: EvalSlice | None = None
        if any(s.tokens > 0 for s in self.data.split("val")):
            self.eval_slice = EvalSlice(
                self.data, eval_tokens=t.eval_tokens, context_length=T, batch_size=B, rank=self.ctx.rank,
                world_size=W, device=self.device, vocab_size=vocab,
            )  # fmt: skip

        torch.manual_seed(t.seed)
        self.model = GPT(cfg.model).to(self.device)
        self.optimizer = build_optimizer(self.model, cfg.optim, self.device)
        self.amp_dtype = autocast_dtype(t.dtype, self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.lr_at = schedule(cfg.optim, t.max_steps)

        self.step = 0
        self.tokens_seen = 0
        self.elapsed = 0.0  # training seconds of earlier sessions of this run
        self.best_val_loss = math.inf
        self.last_val: tuple[float, float | None] | None = None
        self.data_wait = 0.0  # seconds spent waiting for batches in this session
        self.resume_from = resume_from
        self.resumed = resume_from is not None
        if resume_from is not None:
            self._resume(resume_from)
        else:  # the init above was the same on every rank; dropout must differ per rank
            torch.manual_seed(t.seed + self.ctx.rank)
        self.loader.check_next()  # the shard of the first batch: ids out of range fail before any write

        net: torch.nn.Module = self.model
        if t.compile:
            net = torch.compile(net)
        if self.ctx.distributed:
            net = DDP(net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.net = net

    # -- checkpoints -------------------------------------------------------------------------------------------

    def _resume(self, checkpoint_dir: Path) -> None:
        trained_with = read_meta(checkpoint_dir)["tokenizer"]["fingerprint"]
        if trained_with != self.tokenizer.fingerprint:
            raise TalmError(
                f"{str(self.model_dir)!r} was trained with another tokenizer than {str(self.data.dir)!r} was made "
                "with: resume it on data made with its tokenizer.json, or pick a new --model-name"
            )
        load_weights(self.model, checkpoint_dir, self.device)
        state = load_trainer_state(checkpoint_dir)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError, TypeError) as err:
            raise TalmError(
                f"cannot resume from {str(checkpoint_dir / TRAINER_STATE)!r}: its optimizer state does not fit "
                f"this model ({err}): pass --restart to start over, or {OTHER_NAME}"
            ) from None
        fused = self.optimizer.defaults.get("fused")
        for group in self.optimizer.param_groups:  # the saved run may have used another device's kernel
            group["fused"], group["foreach"] = fused, self.optimizer.defaults.get("foreach")
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.loader.load_state_dict(state["loader"])
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        self.elapsed = float(state["elapsed"])
        self.best_val_loss = float(state["best_val_loss"])
        rngs = state["rng"]
        if len(rngs) == self.ctx.world_size:
            set_rng_state(rngs[self.ctx.rank], self.device)
        else:  # another process count: the data order is unchanged, only dropout's randomness is reseeded
            torch.manual_seed(self.cfg.train.seed + self.step + self.ctx.rank)

    def save(self, which: str, val: tuple[float, float | None] | None = None) -> None:
        """Write models/NAME/<which> (every rank takes part: each contributes its RNG state). A failed save (a
        full disk) is one line on rank 0, the previous checkpoint kept; the other ranks stop with it."""
        rngs = dist.all_gather_objects({k: v.cpu() for k, v in rng_state(self.device).items()})

        def write() -> None:
            state = {
                "step": self.step,
                "tokens_seen": self.tokens_seen,
                "elapsed": self.elapsed + (time.perf_counter() - self._t0),
                "best_val_loss": self.best_val_loss,
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
                "loader": self.loader.state_dict(),
                "rng": rngs,
            }
            meta = {
                "step": self.step,
                "tokens_seen": self.tokens_seen,
                "config": self.cfg.model_dump(mode="json"),
                "tokenizer": {"file": TOKENIZER_FILE, "fingerprint": self.tokenizer.fingerprint},
                "val_loss": val[0] if val else None,
                "val_bpb": val[1] if val else None,
            }
            save_checkpoint(self.model_dir / which, self.model, meta, state)

        dist.on_main(write, self.ctx)

    def _prepare_model_dir(self) -> None:
        """Rank 0, once everything is validated: a fresh start (--restart) deletes the earlier run's outputs;
        copy the tokenizer; on resume, drop metrics past the checkpoint."""
        d = self.model_dir
        if not self.resumed:
            # Everything a run derives from its metrics goes too, so no stale curve outlives a restart.
            for name in RUN_OUTPUTS:
                p = d / name
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                elif p.exists() or p.is_symlink():
                    p.unlink()
        d.mkdir(parents=True, exist_ok=True)
        tok_copy = d / TOKENIZER_FILE
        if not self.resumed or not tok_copy.is_file():
            write_file(tok_copy, Path(self.tokenizer.path).read_bytes())
        if self.resumed:
            truncate_after(d, self.step)

    # -- evaluation ----------------------------------------------------------------------------------------------

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float | None]:
        """Mean loss (nats/token) on the fixed val slice, over all ranks, and bits per byte.

        The per-batch losses stay float32 on the device (MPS has no float64) and are summed in float64 on the
        CPU, with one transfer at the end; only the cross-rank sum (CUDA or CPU, never MPS) uses a float64
        tensor."""
        assert self.eval_slice is not None
        self.model.eval()
        losses, counts = [], []
        for x, y in self.eval_slice:
            with self.autocast():
                _, loss = self.model(x, y)
            losses.append(loss.detach().float())
            counts.append(y.numel())
        self.model.train()
        loss_sum = sum(v * n for v, n in zip(torch.stack(losses).cpu().tolist(), counts, strict=True))
        count = float(sum(counts))
        if self.ctx.distributed:
            total = torch.tensor([loss_sum, count], dtype=torch.float64, device=self.device)
            loss_sum, count = dist.all_reduce_sum(total).tolist()
        val_loss = loss_sum / count
        tpb = self.eval_slice.tokens_per_byte
        bpb = val_loss / math.log(2) * tpb if tpb else None
        return val_loss, bpb

    def _eval_and_log(self, log: MetricsLog) -> tuple[float, float | None]:
        val_loss, bpb = self.evaluate()
        log.log(
            {
                "step": self.step,
                "tokens": self.tokens_seen,
                "time": round(self._now(), 3),
                "val_loss": val_loss,
                "val_ppl": math.exp(min(val_loss, 700.0)),
                "val_bpb": bpb,
            }
        )
        self.last_val = (val_loss, bpb)
        if val_loss < self.best_val_loss:
            self.best_val_loss = val_loss
            self.save("best", self.last_val)
        log.on_eval()
        return val_loss, bpb

    def _now(self) -> float:
        return self.elapsed + (time.perf_counter() - self._t0)

    # -- the loop ------------------------------------------------------------------------------------------------

    def train_step(self, stop: StopRequest) -> tuple[float, float, bool]:
        """One optimizer step over `accum` micro-batches: (loss averaged over ranks, lr, stop requested)."""
        lr = self.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(self.accum):
            t = time.perf_counter()
            x, y = self.loader.next_batch()
            self.data_wait += time.perf_counter() - t
            last = micro == self.accum - 1
            sync = self.net.no_sync() if isinstance(self.net, DDP) and not last else nullcontext()
            with sync:
                with self.autocast():
                    _, loss = self.net(x, y)
                loss_sum += loss.detach()
                self.scaler.scale(loss / self.accum).backward()
        self.scaler.unscale_(self.optimizer)
        clip = self.cfg.optim.grad_clip or math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        # One sync per optimizer step: the mean loss over ranks, and whether any rank wants to stop.
        stats = torch.stack(
            [
                loss_sum / self.accum,
                grad_norm.float(),
                torch.tensor(float(stop.requested), device=self.device),
            ]
        )
        stats = dist.all_reduce_sum(stats.float()).tolist()
        train_loss = stats[0] / self.ctx.world_size
        if not math.isfinite(train_loss) or (not self.scaler.is_enabled() and not math.isfinite(stats[1])):
            what = f"loss {train_loss}" if not math.isfinite(train_loss) else f"gradient norm {stats[1]}"
            raise TalmError(
                f"training diverged at step {self.step + 1} ({what}); the last good checkpoint is kept in "
                f"{str(self.model_dir / 'latest')!r}: lower --optim.lr or raise --optim.warmup_steps, then "
                "resume (or --restart)"
            )
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += self.tokens_per_step
        return train_loss, lr, stats[2] > 0

    def run(self) -> TrainResult:
        ctx, t, cfg = self.ctx, self.cfg.train, self.cfg
        main = ctx.is_main
        say = lambda *a: dist.print0(*a, ctx=ctx)  # noqa: E731
        if self.resumed:
            say(f"resuming {self.model_dir} from step {self.step} ({self.tokens_seen:,} tokens seen)")
        elif self.step == 0:
            say(f"training {self.model_dir} from scratch")
        say(
            f"model: {self.model.num_params():,} parameters ({self.model.num_params(embeddings=False):,} "
            f"without embeddings), device {self.device}, {ctx.world_size} process(es), "
            f"{self.tokens_per_step:,} tokens/step ({self.accum} micro-step(s) of {t.batch_size} x "
            f"{cfg.model.context_length} per process), precision {self.amp_dtype or torch.float32}"
        )
        say(describe(cfg))
        if self.eval_slice is None:
            say(f"no val split in {self.data.dir}: training without evaluation, so no best/ checkpoint")
        if not self.data.complete:
            say(f"note: {self.data.dir} is not complete (download_data is still writing or was stopped)")
        if self.step >= t.max_steps:
            meta = read_meta(self.resume_from or self.model_dir / "latest")
            val_loss, bpb = meta.get("val_loss"), meta.get("val_bpb")
            scores = scores_text(val_loss, bpb)
            dist.print0(
                f"{self.model_dir} is already trained to step {self.step} ({scores}): raise --max-steps to train "
                "further, or pass --restart to start over",
                ctx=ctx,
                file=sys.stdout,
            )
            return TrainResult(self.step, self.tokens_seen, self.elapsed, 0.0, val_loss, bpb, self.model_dir)

        sinks = []
        if main:  # the sinks first: a missing optional package must fail before anything is touched
            self.model_dir.mkdir(parents=True, exist_ok=True)
            sinks = make_sinks(list(t.report_to), self.model_dir, cfg.model_dump(mode="json"))
            self._prepare_model_dir()
        dist.barrier()
        log = MetricsLog(self.model_dir, sinks, enabled=main)
        self._t0 = time.perf_counter()
        start_step, start_tokens = self.step, self.tokens_seen
        train_seconds = 0.0  # wall time inside optimizer steps (not eval or saving), for tokens/s
        saved_step = self.step if self.resumed else -1
        bar = tqdm(
            total=t.max_steps, initial=self.step, desc="train", unit="step", disable=not main, dynamic_ncols=True,
            mininterval=0.5,
        )  # fmt: skip
        self.model.train()
        interrupted = False
        try:
            with StopRequest() as stop:
                window_tokens, window_time = 0, 0.0
                while self.step < t.max_steps:
                    t_step = time.perf_counter()
                    loss, lr, interrupted = self.train_step(stop)
                    dt = time.perf_counter() - t_step
                    train_seconds += dt
                    window_tokens += self.tokens_per_step
                    window_time += dt
                    last = self.step == t.max_steps
                    if self.step % t.log_every == 0 or last or interrupted:
                        tps = window_tokens / window_time if window_time else 0.0
                        log.log(
                            {
                                "step": self.step,
                                "tokens": self.tokens_seen,
                                "time": round(self._now(), 3),
                                "train_loss": loss,
                                "lr": lr,
                                "tokens_per_s": tps,
                            }
                        )
                        bar.set_postfix(
                            loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}", refresh=False
                        )
                        window_tokens, window_time = 0, 0.0
                    bar.update(1)
                    if interrupted:
                        break
                    if self.eval_slice is not None and (self.step % t.eval_every == 0 or last):
                        self._eval_and_log(log)
                    if self.step % t.save_every == 0 or last:
                        self.save("latest", self.last_val)
                        saved_step = self.step
            if interrupted and saved_step != self.step:
                self.save("latest", self.last_val)
        finally:
            bar.close()
            log.close()
        if interrupted:
            say(
                f"stopped at step {self.step}; saved {self.model_dir / 'latest'}: rerun the same command to resume"
            )
            raise KeyboardInterrupt
        seconds = self._now()
        tokens = self.tokens_seen - start_tokens
        tps = tokens / train_seconds if train_seconds else 0.0
        val_loss, bpb = self.last_val if self.last_val else (None, None)
        dist.print0(
            f"done: {self.step - start_step} steps, {tokens:,} tokens in {train_seconds:.1f}s "
            f"({tps:,.0f} tokens/s, data wait {100 * self.data_wait / max(train_seconds, 1e-9):.1f}%); "
            f"{scores_text(val_loss, bpb)}; saved {self.model_dir / 'latest'}",
            ctx=ctx,
            file=sys.stdout,
        )
        return TrainResult(self.step, self.tokens_seen, seconds, tps, val_loss, bpb, self.model_dir)


def scores_text(val_loss: float | None, bpb: float | None) -> str:
    if val_loss is None:
        return "not evaluated"
    return f"val loss {val_loss:.4f}, val bits/byte " + (f"{bpb:.4f}" if bpb is not None else "n/a")


def train(cfg: RunConfig, model_dir: str | Path, *, resume_from: Path | None = None) -> TrainResult:
    """Train (or resume) models/NAME with a resolved config, without the lock and checks of `run_training`;
    tears the process group down at the end."""
    try:
        return Trainer(cfg, model_dir, resume_from=resume_from).run()
    finally:
        dist.teardown()

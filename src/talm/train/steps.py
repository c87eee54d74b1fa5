"""The steps of one training session, on the config's schedule: step, read the step's stats when due, log,
evaluate (and save best/), save latest/, and stop cleanly on Ctrl-C.

Reading a step's stats (loss, gradient norm, stop votes) waits for the device to finish it, so they are read
only on log, eval and save steps, on a schedule every rank shares; in between the host queues the next steps.
`Trainer` (loop.py) builds the run and does one step; this module drives the steps.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from talm.train import rundir
from talm.train.metrics import MetricsLog
from talm.train.stop import StopRequest

if TYPE_CHECKING:
    from talm.train.loop import Trainer


def run_steps(tr: Trainer, log: MetricsLog) -> tuple[float, bool]:
    """The steps, with logs, evaluations and saves on their schedule: (seconds inside optimizer steps, for
    tokens/s; whether Ctrl-C stopped it, after saving latest/)."""
    t = tr.cfg.train
    train_seconds = 0.0
    saved_step = tr.step if tr.resumed else -1
    bar = tqdm(
        total=t.max_steps, initial=tr.step, desc="train", unit="step", disable=not tr.ctx.is_main,
        dynamic_ncols=True, mininterval=0.5,
    )  # fmt: skip
    tr.model.train()
    interrupted = False
    try:
        with StopRequest() as stop:
            window_tokens, window_time = 0, 0.0
            postfix: dict[str, str] = {}  # the bar's fields: the last logged step's, then the last val loss
            pending: list[tuple[int, torch.Tensor]] = []  # stats of the steps not read yet
            while tr.step < t.max_steps:
                t_step = time.perf_counter()
                stats, lr = tr.train_step(stop)
                pending.append((tr.step, stats))
                last = tr.step == t.max_steps
                logs = tr.step % t.log_every == 0 or last
                evals = tr.eval_slice is not None and (tr.step % t.eval_every == 0 or last)
                saves = tr.step % t.save_every == 0 or last
                # Steps are read on a schedule every rank shares (so all stop at the same step); a single
                # process also reads as soon as Ctrl-C is pressed. Many ranks stop within log_every steps.
                if logs or evals or saves or (tr.stop_asked and tr.ctx.world_size == 1):
                    loss, interrupted = settle(tr, pending)
                    pending = []
                dt = time.perf_counter() - t_step
                train_seconds += dt
                window_tokens += tr.tokens_per_step
                window_time += dt
                if logs or interrupted:
                    tps = window_tokens / window_time if window_time else 0.0
                    mfu = utilisation(tr, tps)
                    extra = {} if mfu is None else {"mfu": round(mfu, 4)}
                    log.log(tr._record(train_loss=loss, lr=lr, tokens_per_s=tps, **extra))
                    postfix |= {"loss": f"{loss:.4f}", "lr": f"{lr:.2e}", "tok_s": f"{tps:,.0f}"}
                    postfix |= {} if mfu is None else {"mfu": f"{100 * mfu:.1f}%"}
                    bar.set_postfix(postfix, refresh=False)
                    window_tokens, window_time = 0, 0.0
                bar.update(1)
                if interrupted:
                    break
                if evals:
                    tr.eval_and_log(log)
                    assert tr.last_val is not None
                    postfix["val"] = f"{tr.last_val[0]:.4f}"  # shown until the next evaluation
                    bar.set_postfix(postfix, refresh=False)
                if saves:
                    tr.save("latest", tr.last_val)
                    saved_step = tr.step
        if interrupted and saved_step != tr.step:
            tr.save("latest", tr.last_val)
    finally:
        bar.close()
        log.close()
    return train_seconds, interrupted


def settle(tr: Trainer, pending: list[tuple[int, torch.Tensor]]) -> tuple[float, bool]:
    """Read the stats of the steps since the last read (one wait for the device): (the last step's mean loss
    over ranks, whether any rank asked to stop). Raises if any of those steps diverged, naming the first."""
    values = torch.stack([stats for _, stats in pending]).tolist()
    for (step, _), (loss_sum, grad_norm, _) in zip(pending, values, strict=True):
        loss = loss_sum / tr.ctx.world_size
        # With float16's scaler an inf gradient only skips the step (and lowers the scale): not a divergence.
        if not math.isfinite(loss) or (not tr.precision.scaler.is_enabled() and not math.isfinite(grad_norm)):
            what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {grad_norm}"
            raise rundir.diverged(tr.model_dir, f"step {step} ({what})")
    return values[-1][0] / tr.ctx.world_size, any(v[2] > 0 for v in values)


def mfu_text(mfu: float | None) -> str:
    return "" if mfu is None else f", MFU {100 * mfu:.1f}%"


def utilisation(tr: Trainer, tokens_per_s: float) -> float | None:
    """Model FLOPs utilisation: the model's training FLOP/s over the peak of every process's device."""
    peak = tr.precision.peak_flops
    if peak is None:
        return None
    flops = tokens_per_s * tr.model.flops_per_token(tr.cfg.model.context_length)
    return flops / (peak * tr.ctx.world_size)

"""Training curves as pictures: train and val loss, val bits per byte (a run on conversation data has none: its
val loss takes that panel), and (when the run scored any with --eval-tasks) benchmark scores, against tokens seen;
a preference-tuning run (talm.train.dpo) shows its preference accuracy and its rewards instead of bits per byte.

The runs' metrics.jsonl are read with `talm.train.metrics` (the one definition of that format); `plot_runs` draws one
or several runs on one chart and writes the PNG atomically, to a path checked before any work
(`talm.files.check_output_file`). matplotlib is an optional extra (`pip install 'talm[plot]'`) and is
imported only here, with its non-interactive Agg canvas (no display needed, safe inside a training run).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from talm.errors import TalmError
from talm.eval.runner import is_task_field
from talm.files import check_output_file, write_atomically
from talm.train.metrics import FILE, finite_points, metrics_path, read_timelines

X_AXES = {"tokens": "tokens seen", "step": "optimizer step", "time": "time"}
INSTEAD = "pick another -o/--output"


def matplotlib_available() -> bool:
    try:
        return importlib.util.find_spec("matplotlib") is not None
    except ValueError:  # a module set to None in sys.modules (how tests simulate its absence)
        return False


def check_plot_path(out: str | Path, runs: list[str | Path] = ()) -> Path:
    """Refuse, before any work, a picture path that cannot be written (a directory, a file where a folder must
    be, an unwritable place) or that is one of the metrics files being drawn."""
    out = check_output_file(out, overwrite=True, instead=INSTEAD)
    for run in runs:
        source = metrics_path(run)
        if source.exists() and out.resolve() == source.resolve():
            raise TalmError(f"-o/--output {str(out)!r} is the metrics file being drawn: {INSTEAD}")
    return out


def _smooth(values: list[float], span: int) -> list[float]:
    """Exponential moving average (debiased, so the first points are not pulled toward 0)."""
    alpha = 2 / (span + 1)
    out, avg, weight = [], 0.0, 0.0
    for v in values:
        avg = (1 - alpha) * avg + alpha * v
        weight = (1 - alpha) * weight + alpha
        out.append(avg / weight)
    return out


def _time_scale(seconds: float) -> tuple[float, str]:
    if seconds > 3 * 3600:
        return 3600.0, "time (hours)"
    if seconds > 300:
        return 60.0, "time (minutes)"
    return 1.0, "time (s)"


def plot_runs(
    runs: list[tuple[str, str | Path]],
    out: str | Path,
    *,
    x: str = "tokens",
    title: str | None = None,
) -> Path:
    """Draw the runs ((label, model dir or metrics.jsonl), ...) on one chart (`draw_runs`) and save it as PNG at
    `out`, a path checked before any work. The file is replaced atomically."""
    if x not in X_AXES:
        raise TalmError(f"unknown x axis {x!r}: use one of {', '.join(X_AXES)}")
    if not matplotlib_available():
        raise TalmError("plotting needs matplotlib, which is not installed: pip install 'talm[plot]'")
    out = check_plot_path(out, [path for _, path in runs])
    return save_figure(draw_runs(runs, x=x, title=title), out)


def draw_runs(runs: list[tuple[str, str | Path]], *, x: str = "tokens", title: str | None = None) -> Any:
    """The chart of the runs, a matplotlib Figure. Left: train loss (faint: as logged; solid: smoothed) and val
    loss. Right: val bits per byte, the number that compares runs with different tokenizers; for runs whose
    evaluations have no bits per byte (conversation data: the loss covers the assistant's tokens only), their val
    loss on its own scale. Benchmarks, if any run scored them, in a third panel."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter

    data = [(label, *read_timelines(path)) for label, path in runs]
    for (_, train, evals), (_, path) in zip(data, runs, strict=True):
        if not train and not evals:
            raise TalmError(
                f"{str(metrics_path(path))!r} holds no metrics yet: plot it after the first log line"
            )

    task_fields = sorted({k for _, _, evals in data for r in evals for k in r if is_task_field(k)})
    # preference tuning (talm.train.dpo): accuracy in the right panel, the rewards in one more
    preferences = any("train_pref_accuracy" in r for _, train, _ in data for r in train)
    panels = 2 + bool(task_fields) + preferences
    fig = Figure(figsize=(6 * panels, 4.6), layout="constrained")
    FigureCanvasAgg(fig)
    loss_ax, bpb_ax, *more_ax = fig.subplots(1, panels)
    task_ax = more_ax[:1] if task_fields else []
    x_scale, x_label = 1.0, X_AXES[x]
    if x == "time":
        longest = max((r.get("time", 0.0) for _, t, e in data for r in t + e), default=0.0)
        x_scale, x_label = _time_scale(longest)
    single = len(data) == 1
    # bits per byte if any run has them (one unit per panel), else the runs' val loss
    has_bpb = any(finite_points(evals, "val_bpb", x)[1] for _, _, evals in data)
    right = "val_bpb" if has_bpb else "val_loss"
    other = other_val_metric(
        data
    )  # another objective's evaluation (GRPO: val_pass@1), where no run has a loss
    if other and not any(finite_points(evals, "val_loss", x)[1] for _, _, evals in data):
        right = other
    loss_values = _plot_losses(loss_ax, bpb_ax, data, x, x_scale, None if preferences else right)
    if preferences:
        _plot_preferences(bpb_ax, more_ax[-1], data, x, x_scale)

    if task_ax:
        _plot_tasks(task_ax[0], data, task_fields, x, x_scale, single)
    if loss_values:  # leave out the first steps' spike so the part that matters is readable
        low, high = min(loss_values), max(loss_values)
        loss_ax.set_ylim(low - 0.05 * (high - low), high + 0.05 * (high - low) + 1e-6)
    loss_ax.set_title("loss (nats per token)")
    for ax in (loss_ax, bpb_ax, *more_ax):
        ax.set_xlabel(x_label)
        ax.grid(True, alpha=0.3)
        if x == "tokens":
            ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    if loss_ax.has_data():
        loss_ax.legend(loc="upper right", fontsize=8)
    if not preferences:
        _finish_right_panel(bpb_ax, has_bpb, single)
    if right not in ("val_bpb", "val_loss") and bpb_ax.has_data():
        bpb_ax.set_title(f"validation {right[4:]} (higher is better)")
    fig.suptitle(title or ", ".join(label for label, _, _ in data))
    return fig


def other_val_metric(data: list[tuple[str, Any, Any]]) -> str | None:
    """The first numeric "val_*" field of the runs' evaluations besides loss, perplexity and bits per byte."""
    known = ("val_loss", "val_ppl", "val_bpb")
    fields = sorted(
        {k for _, _, evals in data for r in evals for k in r if k.startswith("val_") and k not in known}
    )
    return fields[0] if fields else None


def _finish_right_panel(ax: Any, has_bpb: bool, single: bool) -> None:
    """Title the right panel by what it holds; 'no evaluation yet' only when no run has evaluated."""
    if has_bpb:
        ax.set_title("validation bits per byte (lower is better)")
    elif ax.has_data():
        ax.set_title("validation loss, no bits per byte (conversation data: the assistant's tokens)")
    if ax.has_data():
        if not single:
            ax.legend(loc="upper right", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no evaluation yet", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])


def _plot_losses(
    loss_ax: Any, bpb_ax: Any, data: list[tuple[str, Any, Any]], x: str, x_scale: float, right: str | None
) -> list[float]:
    """Each run's train and val loss on `loss_ax` and its `right` field (val_bpb, or val_loss when no run has
    bits per byte; None: nothing) on `bpb_ax`; the losses drawn."""
    single = len(data) == 1
    colors = [f"C{i % 10}" for i in range(len(data))]
    loss_values: list[float] = []
    for (label, train, evals), color in zip(data, colors, strict=True):
        tx, ty = finite_points(train, "train_loss", x)
        vx, vy = finite_points(evals, "val_loss", x)
        bx, by = finite_points(evals, right, x) if right else ([], [])
        tx, vx, bx = ([v / x_scale for v in xs] for xs in (tx, vx, bx))
        train_color = "C0" if single else color
        val_color = "C1" if single else color
        name = "" if single else f"{label}: "
        if ty:
            loss_ax.plot(tx, ty, color=train_color, alpha=0.25, linewidth=0.8)
            smooth = _smooth(ty, max(1, len(ty) // 50))
            loss_ax.plot(tx, smooth, color=train_color, linewidth=1.5, label=f"{name}train")
        if vy:
            style = "-" if single else "--"
            loss_ax.plot(
                vx, vy, style, color=val_color, linewidth=1.8, marker="o", ms=3.5, label=f"{name}val"
            )
        if by:
            bpb_ax.plot(bx, by, color=val_color, marker="o", markersize=3.5, linewidth=1.8, label=label)
            if single:
                end = (bx[-1], by[-1])
                bpb_ax.annotate(
                    f"{by[-1]:.3f}", end, textcoords="offset points", xytext=(4, 4), color=val_color
                )
        loss_values += ty[len(ty) // 20 :] + vy
    return loss_values


def _plot_preferences(
    accuracy_ax: Any, reward_ax: Any, data: list[tuple[str, Any, Any]], x: str, x_scale: float
) -> None:
    """Preference tuning's stats: each run's preference accuracy (train smoothed, val with markers) on
    `accuracy_ax`; its chosen and rejected rewards and their margin on `reward_ax`."""
    single = len(data) == 1
    stats = (("pref_accuracy", accuracy_ax, "C0"), ("chosen_reward", reward_ax, "C2"))
    stats += (("rejected_reward", reward_ax, "C3"), ("reward_margin", reward_ax, "C4"))
    for run, (label, train, evals) in enumerate(data):
        style, name = ("-", "--", ":", "-.")[run % 4], "" if single else f"{label}: "
        for key, ax, color in stats:
            tx, ty = finite_points(train, f"train_{key}", x)
            vx, vy = finite_points(evals, f"val_{key}", x)
            if ty:
                smooth = _smooth(ty, max(1, len(ty) // 50))
                ax.plot(
                    [v / x_scale for v in tx],
                    smooth,
                    style,
                    color=color,
                    alpha=0.5,
                    label=f"{name}train {key}",
                )
            if vy:
                ax.plot(
                    [v / x_scale for v in vx],
                    vy,
                    style,
                    color=color,
                    marker="o",
                    ms=3.5,
                    label=f"{name}val {key}",
                )
    accuracy_ax.set_title("preference accuracy (chosen reward > rejected; higher is better)")
    accuracy_ax.set_ylim(-0.02, 1.02)
    reward_ax.set_title("rewards (beta x log-ratio to the reference) and their margin")
    for ax in (accuracy_ax, reward_ax):
        ax.legend(loc="best", fontsize=7)


def _plot_tasks(
    ax: Any, data: list[tuple[str, Any, Any]], fields: list[str], x: str, x_scale: float, single: bool
) -> None:
    """Benchmark scores (`TASK/METRIC` fields of the evaluation lines): one colour per task, one style per run."""
    for run, (label, _, evals) in enumerate(data):
        for i, key in enumerate(fields):
            xs, ys = finite_points(evals, key, x)
            if ys:
                name = key if single else f"{label}: {key}"
                style = ("-", "--", ":", "-.")[run % 4]
                ax.plot(
                    [v / x_scale for v in xs], ys, style, color=f"C{i % 10}", marker="o", ms=3.5, label=name
                )
    ax.set_title("benchmarks during training (higher is better)")
    ax.legend(loc="lower right", fontsize=8)


def save_figure(fig: Any, out: Path) -> Path:
    """Write the figure as PNG, atomically (`talm.files.write_atomically`); a failure (a full disk) is one line."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(out, lambda f: fig.savefig(f, format="png", dpi=110))
    except OSError as err:
        raise TalmError(
            f"could not write {str(out)!r} ({err.strerror or err}): free some disk space or {INSTEAD}"
        ) from None
    return out


def run_title(model_dir: Path, evals: list[dict[str, Any]]) -> str:
    """`NAME: val loss 1.532, 1.987 bits/byte at 12.3M tokens` (or just NAME before the first evaluation)."""
    if not evals:
        return model_dir.name
    last = evals[-1]
    shown = [
        k for k, v in last.items() if k.startswith("val_") and isinstance(v, (int, float)) and k != "val_bpb"
    ]
    parts = [f"val {k[4:].replace('_', ' ')} {last[k]:.3f}" for k in shown[:1]]
    if isinstance(last.get("val_bpb"), (int, float)):
        parts.append(f"{last['val_bpb']:.3f} bits/byte")
    return f"{model_dir.name}: {', '.join(parts)} at {_count(last.get('tokens', 0))} tokens"


def _count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(int(n))


def plot_model(model_dir: str | Path, out: str | Path | None = None, *, x: str = "tokens") -> Path:
    """loss.png of one model directory (default: models/NAME/loss.png)."""
    model_dir = Path(model_dir)
    target = check_plot_path(Path(out) if out else model_dir / "loss.png", [model_dir])
    _, evals = read_timelines(model_dir)
    return plot_runs([(model_dir.name, model_dir)], target, x=x, title=run_title(model_dir, evals))


def run_labels(runs: list[Path]) -> list[str]:
    """Each run's name (its directory's), or its full path where two names would be the same."""
    names = [(p.parent if p.name == FILE else p).name or str(p) for p in runs]
    return [str(p) if names.count(n) > 1 else n for p, n in zip(runs, names, strict=True)]


def plot_metrics(
    runs: list[str | Path], out: str | Path | None = None, *, x: str = "tokens", title: str | None = None
) -> Path:
    """What `plot_metrics` draws: one run directory -> its loss.png (the picture training keeps up to date,
    with the run's title); anything else -> the runs on one chart, compare.png unless `out` says otherwise."""
    paths = [Path(r) for r in runs]
    if len(paths) == 1 and paths[0].is_dir() and title is None:
        return plot_model(paths[0], out, x=x)
    default = metrics_path(paths[0]).parent / "loss.png" if len(paths) == 1 else Path("compare.png")
    return plot_runs(list(zip(run_labels(paths), paths, strict=True)), out or default, x=x, title=title)

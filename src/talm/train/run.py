"""train_model's run as a Python call: which run to train, with which settings, and in what order to check and
write so a user's work stays safe.

`train_model` is the whole command for a Python caller: a --model-name, a data directory, an optional preset,
TOML file and setting overrides. `resolve_run` turns those config layers into one validated `RunConfig` and
decides whether the run resumes models/NAME (from latest/, or best/). `run_training` holds the lock on
models/NAME and validates everything (config, device, data and shards, tokenizer, writability) before it writes
or deletes anything; `train` runs a resolved config without those checks (tests, benchmarks).

A model directory holding any trace of a run (checkpoints, metrics, logs) is never wiped without --restart:
without a resumable latest/, the run resumes from best/ or is refused with the choices spelled out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from talm.config import load_toml, merge, validate
from talm.data.manifest import read_data
from talm.data.prompts import directory_kind, prompt_dataset
from talm.errors import TalmError
from talm.train import dist, rundir
from talm.train.checkpoint import DamagedCheckpoint, read_meta
from talm.train.config import PRESET_DATA, PRESETS, RunConfig
from talm.train.init import apply_source, check_data
from talm.train.loop import Trainer, TrainResult
from talm.train.objective import check_data_kind


def preset(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise TalmError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def preset_data_note(preset_name: str | None, data_dir: str | Path) -> str | None:
    """What a preset's recipe learns on this data (config.PRESET_DATA): TalmError for a conversation recipe on
    plain text (it would learn every token, not the replies); a line for a text recipe on conversations."""
    if not preset_name:
        return None
    preset(preset_name)  # an unknown name: one line
    if "prompts" in (directory_kind(data_dir), PRESET_DATA[preset_name]):
        return None  # the objective and the data's kind: refused in one line if they differ (check_data_kind)
    kind = read_data(data_dir, splits=("train",)).kind
    if "preferences" in (kind, PRESET_DATA[preset_name]):
        return None  # the objective and the data's kind: refused in one line if they differ (check_data_kind)
    conversations = kind == "conversations"
    if PRESET_DATA[preset_name] == "conversations" and not conversations:
        raise TalmError(
            f"--preset {preset_name} fine-tunes on conversations (the loss on the assistant's replies), but "
            f"{str(data_dir)!r} holds plain text without loss masks, so every token would be learned: make "
            "conversation data (download_data smoltalk, or download_data --conversations), or use --preset finetune on text"
        )
    if PRESET_DATA[preset_name] == "text" and conversations:
        return (
            f"--preset {preset_name} is a recipe for plain text, but {data_dir} holds conversations: the loss is "
            "on the assistant's replies only, at this preset's rates (--preset sft is the fine-tuning recipe)"
        )
    return None


def config_layers(
    *,
    data_dir: str | Path,
    tokenizer_path: str | Path | None = None,
    preset_name: str | None = None,
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """The layers of a run's settings, later ones winning: a preset, a TOML file, then the overrides (the
    command line's flags, as {"train": {"max_steps": 10}, ...}) with the data directory and tokenizer."""
    layers = []
    if preset_name:
        layers.append(preset(preset_name))
    if config_file:
        layers.append(load_toml(config_file))
    data: dict[str, Any] = {"dir": str(data_dir)}
    if tokenizer_path:
        data["tokenizer_path"] = str(tokenizer_path)
    layers.append(merge(overrides or {}, {"data": data}))
    return layers


def resolve_run(
    model_dir: str | Path,
    layers: list[dict[str, Any]],
    *,
    restart: bool = False,
    flag_names: dict[str, str] | None = None,
    probe: bool = False,
    resume_from: str = "latest",
) -> tuple[RunConfig, Path | None]:
    """The run's config and the checkpoint to resume from (None for a fresh start). Reads, never writes.

    `layers` (preset, TOML file, flags: later wins) are merged on top of the defaults, or, when models/NAME
    already has a checkpoint and `restart` is False, on top of that checkpoint's config, so rerunning the same
    command resumes the same run (see `rundir.resume_point`, also for `probe`; `resume_from` "best" resumes
    from best/ instead of latest/). A fresh run with train.init_from takes the source's architecture.
    """
    model_dir = Path(model_dir)
    rundir.check_resume_choice(resume_from, restart)
    checkpoint = None
    if not restart and (model_dir.is_dir() or resume_from == "best"):
        checkpoint = rundir.resume_point(model_dir, probe=probe, which=resume_from)
    base: dict[str, Any] = read_meta(checkpoint)["config"] if checkpoint is not None else {}
    data = base
    for layer in layers:
        data = merge(data, layer)
    if checkpoint is None:
        data = apply_source(data, layers, flag_names)
    cfg = validate(RunConfig, data, flag_names)
    try:
        prompts = directory_kind(cfg.data.dir) == "prompts"
        data_set = prompt_dataset(cfg.data.dir) if prompts else read_data(cfg.data.dir, splits=("train",))
    except TalmError:
        data_set = None  # the Trainer says what is wrong with the data, in its order of checks
    if data_set is not None:
        check_data_kind(cfg, data_set)
    if checkpoint is None and cfg.train.objective == "dpo" and not cfg.train.init_from:
        raise TalmError(
            "--preset dpo (train.objective dpo) tunes a chat model on preference pairs: pass --init-from "
            "models/CHAT, the model to start from (its weights are also the reference)"
        )
    if checkpoint is None and cfg.train.objective == "grpo" and not cfg.train.init_from:
        raise TalmError(
            "GRPO (--preset grpo) improves a model that already answers the prompts sometimes: pass --init-from "
            "models/CHAT (a chat model, e.g. one fine-tuned with --preset sft)"
        )
    if checkpoint is None and cfg.train.init_from:
        check_data(cfg.train.init_from, cfg.data.dir)
    return cfg, checkpoint


def run_training(
    model_dir: str | Path,
    layers: list[dict[str, Any]],
    *,
    restart: bool = False,
    flag_names: dict[str, str] | None = None,
    resume_from: str = "latest",
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
    options = dict(restart=restart, flag_names=flag_names, resume_from=resume_from)
    cfg, _ = resolve_run(model_dir, layers, probe=True, **options)
    ctx = dist.setup(cfg.train.device)
    lock = rundir.run_lock(model_dir)
    try:
        dist.on_main(lambda: rundir.lock_run_dir(model_dir, lock), ctx)
        cfg, checkpoint = resolve_run(model_dir, layers, **options)
        if checkpoint is not None and checkpoint.name == "best":
            why = "as asked" if resume_from == "best" else f"{model_dir / 'latest'} is missing or incomplete"
            dist.print0(
                f"resuming from {checkpoint} (step {read_meta(checkpoint)['step']}), the best checkpoint, {why}; "
                "the metrics after it are dropped and its steps trained again",
                ctx=ctx,
            )
        asked = any((layer.get("train") or {}).get("init_from") for layer in layers)
        if checkpoint is not None and asked:
            dist.print0(
                f"--init-from {cfg.train.init_from} ignored: {model_dir} resumes from its checkpoint (the "
                "checkpoint wins; pass --restart to start over from the source)",
                ctx=ctx,
            )
        return Trainer(cfg, model_dir, resume_from=checkpoint, restart=restart).run()
    finally:
        lock.release()
        dist.teardown()


def train_model(
    model_name: str,
    data_dir: str | Path,
    *,
    tokenizer_path: str | Path | None = None,
    preset_name: str | None = None,
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    restart: bool = False,
    flag_names: dict[str, str] | None = None,
    resume_from: str = "latest",
) -> TrainResult:
    """The train_model command: train (or resume from `resume_from`, latest or best, or with `restart` start
    over) models/`model_name` on the shards of `data_dir`. `flag_names` maps config paths to the flags that set
    them, for error messages."""
    model_dir = rundir.model_dir_for(model_name)
    note = preset_data_note(preset_name, data_dir)  # before anything is written
    if note:
        dist.print0(note)
    layers = config_layers(
        data_dir=data_dir,
        tokenizer_path=tokenizer_path,
        preset_name=preset_name,
        config_file=config_file,
        overrides=overrides,
    )
    try:
        return run_training(
            model_dir, layers, restart=restart, flag_names=flag_names, resume_from=resume_from
        )
    except (
        DamagedCheckpoint
    ) as err:  # its fix in train_model's flags, not those of the commands that use a model
        raise err.with_fix(rundir.damaged_fix(model_dir, err.path)) from None


def train(cfg: RunConfig, model_dir: str | Path, *, resume_from: Path | None = None) -> TrainResult:
    """Train (or resume) models/NAME with a resolved config, without the lock and checks of `run_training`;
    tears the process group down at the end."""
    try:
        return Trainer(cfg, model_dir, resume_from=resume_from).run()
    finally:
        dist.teardown()

"""run.py and rundir.py without training: the run's name, its config layers, and which checkpoint it resumes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from talm.errors import TalmError
from talm.train import precision, rundir
from talm.train.loop import Trainer
from talm.train.precision import Precision, autocast_dtype
from talm.train.run import config_layers, resolve_run, train_model


@pytest.mark.parametrize("name", ["shakespeare", "gpt2-124m", "a.b_c", "9"])
def test_plain_model_names_map_under_models(name: str) -> None:
    assert rundir.model_dir_for(name) == Path("models") / name


@pytest.mark.parametrize("name", ["../escape", "a/b", "", ".hidden", "-flag", "/abs", "sp ace"])
def test_other_model_names_are_refused(name: str) -> None:
    with pytest.raises(TalmError, match=f"model name {name!r} is not a plain name"):
        rundir.model_dir_for(name)


def test_train_model_refuses_a_bad_name_before_touching_disk(in_tmp: Path) -> None:
    with pytest.raises(TalmError, match="not a plain name"):
        train_model("../escape", "no-such-data")
    assert list(in_tmp.iterdir()) == []


def test_config_layers_later_wins(in_tmp: Path) -> None:
    Path("run.toml").write_text("[train]\nmax_steps = 7\nbatch_size = 3\n")
    layers = config_layers(
        data_dir="d", tokenizer_path="t.json", preset_name="tiny", config_file="run.toml",
        overrides={"train": {"batch_size": 2}},
    )  # fmt: skip
    cfg, resume_from = resolve_run("models/none", layers)
    assert resume_from is None
    assert (cfg.train.max_steps, cfg.train.batch_size, cfg.model.n_layer) == (7, 2, 4)  # toml, flag, preset
    assert (cfg.data.dir, cfg.data.tokenizer_path) == ("d", "t.json")
    with pytest.raises(TalmError, match="unknown preset 'huge'"):
        config_layers(data_dir="d", preset_name="huge")


def test_resume_point_never_wipes_an_earlier_run(in_tmp: Path) -> None:
    d = Path("models/m")
    d.mkdir(parents=True)
    assert rundir.resume_point(d) is None  # an empty directory: a fresh start
    (d / "latest").mkdir()
    assert rundir.resume_point(d) is None  # an empty latest/ holds nothing to lose
    (d / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(TalmError, match=r"holds an earlier run \(metrics.jsonl\).*--restart"):
        rundir.resume_point(d)
    assert rundir.resume_point(d, probe=True) is None  # before the lock: never refuses
    with pytest.raises(TalmError, match="holds an earlier run"):
        rundir.check_fresh_start(d)
    assert (d / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_precision_choices_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "cpu_native_bf16", lambda: False)  # a CPU without native bf16
    cpu = torch.device("cpu")
    assert autocast_dtype("auto", cpu) is None and autocast_dtype("float32", cpu) is None
    assert autocast_dtype("bfloat16", cpu) == torch.bfloat16
    with pytest.raises(TalmError, match="float16 needs a CUDA GPU"):
        autocast_dtype("float16", cpu)
    plain = Precision("auto", cpu)
    assert str(plain) == "torch.float32" and not plain.scaler.is_enabled()


def test_a_run_saved_before_the_architecture_options_resumes(tiny_data: Path, in_tmp: Path) -> None:
    """A checkpoint.json written before a ModelConfig field existed holds the model that field's default
    computes: resuming it with unchanged settings must not count the new field as a change."""
    import json

    from talm.train.run import train

    layer = {
        "model": {"n_layer": 1, "n_head": 2, "d_model": 32, "context_length": 32},
        "train": {"max_steps": 2, "batch_size": 4, "eval_every": 100, "save_every": 100, "device": "cpu"},
        "data": {"dir": str(tiny_data)},
    }
    cfg, _ = resolve_run(in_tmp / "m", [layer])
    train(cfg, in_tmp / "m")
    meta_path = in_tmp / "m" / "latest" / "checkpoint.json"
    meta = json.loads(meta_path.read_text())
    for field in ("qk_norm", "mlp", "logit_softcap", "zero_init_proj"):
        del meta["config"]["model"][field]  # as an older talm wrote it
    meta_path.write_text(json.dumps(meta))
    cfg, resume_from = resolve_run(in_tmp / "m", [layer | {"train": layer["train"] | {"max_steps": 3}}])
    assert resume_from == in_tmp / "m" / "latest" and cfg.model.mlp == "swiglu" and not cfg.model.qk_norm
    cfg, resume_from = resolve_run(in_tmp / "m", [layer | {"model": layer["model"] | {"qk_norm": True}}])
    with pytest.raises(TalmError, match=r"another architecture \(qk_norm False -> True\)"):
        Trainer(cfg, in_tmp / "m", resume_from=resume_from)


def test_restart_deletes_everything_the_old_run_wrote_and_nothing_else(tiny_data: Path, in_tmp: Path) -> None:
    """--restart removes every output of the earlier run (rundir.RUN_OUTPUTS: checkpoints, metrics, plot,
    evaluate's evals/, the trackers' files), so no old score is merged into the new run's; a file talm did not
    write stays. A directory holding only evals/ is an earlier run: a fresh start without --restart is refused."""
    import json

    from talm.eval.runner import TaskResult, read_results, write_results

    layer = {
        "model": {"n_layer": 1, "n_head": 2, "d_model": 32, "context_length": 32},
        "train": {"max_steps": 2, "batch_size": 4, "eval_every": 100, "save_every": 100, "device": "cpu"},
        "data": {"dir": str(tiny_data)},
    }
    d = in_tmp / "models" / "m"
    old = TaskResult("hellaswag", {"acc": 0.9, "acc_norm": 0.9}, 0.25, 10, 1.0)
    write_results(d, 2, [old])  # as `evaluate` scores the old run's step 2
    with pytest.raises(TalmError, match=r"holds an earlier run \(evals/\)"):
        rundir.check_fresh_start(d)
    cfg, _ = resolve_run(d, [layer], restart=True)
    Trainer(cfg, d, restart=True).run()
    for name in ("tensorboard", "wandb"):  # the trackers' directories, as their sinks make them
        (d / name).mkdir()
        (d / name / "events").write_text("old")
    (d / "wandb_run_id").write_text("0123\n")
    (d / "loss.png").write_bytes(b"old plot")
    write_results(d, 2, [old])
    (d / "notes.txt").write_text("mine")  # not talm's: never deleted
    cfg, _ = resolve_run(d, [layer], restart=True)
    Trainer(cfg, d, restart=True).run()
    assert not (d / "evals").exists() and not (d / "wandb").exists() and not (d / "tensorboard").exists()
    assert not (d / "wandb_run_id").exists() and (d / "notes.txt").read_text() == "mine"
    assert (d / "loss.png").read_bytes() != b"old plot"
    assert [json.loads(line)["step"] for line in (d / "metrics.jsonl").read_text().splitlines()] == [2, 2]
    new = TaskResult("arc_easy", {"acc": 0.5, "acc_norm": 0.5}, 0.25, 10, 1.0)
    assert set(read_results(write_results(d, 2, [new]))["tasks"]) == {"arc_easy"}  # nothing merged


def test_a_preset_is_checked_against_its_data(tiny_data: Path, in_tmp: Path) -> None:
    """--preset sft on plain text (no loss masks) would learn every token: refused before anything is written;
    a text preset on conversation data is said in one line (the loss is on the replies only)."""
    import json

    from conftest import BASE_TOKENIZER

    from talm.data.config import DownloadConfig
    from talm.data.prepare import prepare
    from talm.train.config import PRESET_DATA, PRESETS
    from talm.train.run import preset_data_note

    assert set(PRESET_DATA) == set(PRESETS)  # every preset says what data it is for
    with pytest.raises(
        TalmError, match=r"--preset sft fine-tunes on conversations .* holds plain text"
    ) as err:
        train_model("m", tiny_data, preset_name="sft", overrides={"train": {"device": "cpu"}})
    assert "download_data smoltalk" in str(err.value) and "--preset finetune" in str(err.value)
    assert not Path("models").exists()
    chats = [
        [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "yo"}] for i in range(40)
    ]
    Path("chats.jsonl").write_text(
        "".join(json.dumps({"messages": c}) + "\n" for c in chats), encoding="utf-8"
    )
    cfg = DownloadConfig(
        dataset="chats", data_files=["chats.jsonl"], conversations=True, tokenizer_path=BASE_TOKENIZER,
        data_root=Path("data"), val_tokens=50,
    )  # fmt: skip
    conversations = prepare(cfg, progress=False).out_dir
    assert preset_data_note("sft", conversations) is None and preset_data_note("tiny", tiny_data) is None
    note = preset_data_note("tiny", conversations)
    assert note is not None and "\n" not in note
    assert "--preset tiny is a recipe for plain text" in note and "on the assistant's replies only" in note


@pytest.mark.parametrize("saved", [True, False], ids=["after a save", "before any save"])
def test_a_divergence_says_which_checkpoint_is_kept_only_if_one_was_saved(
    tiny_data: Path, in_tmp: Path, saved: bool
) -> None:
    from test_loop import Sabotage, run_config

    from talm.train.loop import Trainer

    trainer = Trainer(
        run_config(tiny_data, max_steps=10, eval_every=100, save_every=4 if saved else 100), "models/m"
    )
    trainer.net = Sabotage(trainer.model, calls=5, action="nan")
    with pytest.raises(TalmError, match="diverged at step 6") as info:
        trainer.run()
    message = str(info.value)
    if saved:
        assert "the checkpoint of step 4 is kept in 'models/m/latest'" in message and "resume" in message
    else:
        assert "before any checkpoint was saved" in message and "kept" not in message
        assert "--restart" in message and not Path("models/m/latest").exists()


def test_a_damaged_checkpoints_fix_offers_only_a_checkpoint_that_can_be_resumed(tmp_path: Path) -> None:
    model_dir = tmp_path / "models" / "m"

    def resumable(which: str) -> None:
        (model_dir / which).mkdir(parents=True)
        for name in ("checkpoint.json", "model.safetensors", "trainer_state.pt"):
            (model_dir / which / name).write_bytes(b"")

    def fix(damaged: str) -> str:
        return rundir.damaged_fix(model_dir, model_dir / damaged / "model.safetensors")

    assert "(--restart)" in fix("latest") and "--resume-from" not in fix("latest")
    resumable("best")
    assert "resume from best/ (--resume-from best)" in fix("latest")
    assert "latest/ cannot be resumed either" in fix("best") and "--resume-from" not in fix("best")
    resumable("latest")
    assert "without --resume-from best" in fix("best")
    assert "--init-from" in rundir.damaged_fix(model_dir, tmp_path / "elsewhere" / "model.safetensors")

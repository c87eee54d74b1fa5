"""A run's checkpoint content (train/state.py): the model and optimizer go by parameter name whatever the
strategy (torch's get_state_dict), each other part saves and loads its own state, and checkpoints written when
the optimizer's state was numbered still resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_loop import run_config
from torch.distributed.checkpoint.state_dict import get_state_dict

from talm.model.config import ModelConfig
from talm.model.gpt import GPT
from talm.train.config import OptimConfig
from talm.train.loop import Trainer
from talm.train.optim import build_optimizer, inner_optimizers
from talm.train.state import by_name


def stepped(optimizer: str) -> tuple[GPT, object]:
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=64, n_layer=2, n_head=2, d_model=32, context_length=16))
    opt = build_optimizer(model, OptimConfig(name=optimizer), torch.device("cpu"))
    x = torch.randint(0, 64, (2, 16))
    for _ in range(2):
        model(x, x)[1].backward()
        opt.step()
        opt.zero_grad()
    return model, opt


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_a_numbered_optimizer_state_maps_to_the_names_get_state_dict_gives(optimizer: str) -> None:
    model, opt = stepped(optimizer)
    _, want = get_state_dict(model, inner_optimizers(opt))
    got = by_name(opt.state_dict(), opt, model)
    assert got["param_groups"] == want["param_groups"]
    assert set(got["state"]) == set(want["state"]) and got["state"]
    for name, entry in want["state"].items():
        assert set(got["state"][name]) == set(entry)
        assert all(
            torch.equal(torch.as_tensor(got["state"][name][k]), torch.as_tensor(v)) for k, v in entry.items()
        )
    assert by_name(want, opt, model) is want  # already by name: as it is


def test_a_numbered_state_of_another_model_is_a_misfit() -> None:
    model, opt = stepped("adamw")
    other, other_opt = stepped("adamw")
    saved = other_opt.state_dict()
    saved["param_groups"][0]["params"] = saved["param_groups"][0]["params"][:-1]
    with pytest.raises(ValueError, match="parameters, this model"):
        by_name(saved, opt, model)


def test_a_checkpoint_with_a_numbered_optimizer_state_resumes_as_one_saved_by_name(
    tiny_data: Path, in_tmp: Path
) -> None:
    """A checkpoint of an earlier talm (the optimizer's state numbered) continues the run with the same losses."""
    from talm.train.checkpoint import TRAINER_STATE
    from talm.train.metrics import read_metrics

    cfg = run_config(tiny_data, max_steps=4, save_every=2, eval_every=100, deterministic=True)
    Trainer(cfg, "models/m").run()
    latest = Path("models/m/latest")
    state = torch.load(latest / TRAINER_STATE, weights_only=True)
    resumed = Trainer(run_config(tiny_data, max_steps=6, deterministic=True), "models/m", resume_from=latest)
    numbered = resumed.optimizer.state_dict()  # what talm saved before, for the same state
    losses = {}
    for name, optimizer_state in (("by name", state["optimizer"]), ("numbered", numbered)):
        torch.save(state | {"optimizer": optimizer_state}, latest / TRAINER_STATE)
        cfg = run_config(tiny_data, max_steps=6, save_every=100, eval_every=100, deterministic=True)
        Trainer(cfg, f"models/{name}", resume_from=latest, restart=True).run()
        losses[name] = [r["train_loss"] for r in read_metrics(Path(f"models/{name}")) if "train_loss" in r]
    assert losses["by name"] == losses["numbered"] and len(losses["numbered"]) == 2

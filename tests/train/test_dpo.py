"""Preference tuning's arithmetic on hand-checkable tensors, the pair loader on real preference data, and a tiny
model that a few DPO steps must teach to prefer the chosen replies of held-out pairs."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from talm.data.config import DownloadConfig
from talm.data.manifest import read_data
from talm.data.prepare import prepare
from talm.errors import TalmError
from talm.tokenizer.api import Tokenizer
from talm.tokenizer.chat import ChatFormat
from talm.train.dpo import pair_terms, sequence_logps, stat_means, stat_sums
from talm.train.pairs import PairEval, PairLoader, PairSet

BASE = Path(__file__).resolve().parents[2] / "tokenizers" / "base.json"


def test_sequence_logps_sum_only_the_scored_targets() -> None:
    logits = torch.zeros(2, 3, 4)  # uniform over 4 ids: every token has log-probability -log 4
    logits[0, 2, 2] = math.log(3.0)  # position 2 gives id 2 probability 3/6
    targets = torch.tensor([[1, -1, 2], [-1, -1, -1]])
    sums, counts = sequence_logps(logits, targets)
    assert sums.tolist() == pytest.approx([-math.log(4) + math.log(0.5), 0.0])
    assert counts.tolist() == [2, 0]


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def test_dpo_loss_and_rewards_by_hand() -> None:
    """policy chosen -1, rejected -3; reference -2 and -2; beta 0.5: rewards +0.5 and -0.5, loss -log sigmoid(1)."""
    terms = pair_terms((t(-1.0), t(-3.0)), (t(-2.0), t(-2.0)), (t(1), t(1)), loss="dpo", beta=0.5)
    assert terms["chosen_reward"].item() == pytest.approx(0.5)
    assert terms["rejected_reward"].item() == pytest.approx(-0.5)
    assert terms["loss"].item() == pytest.approx(math.log(1 + math.exp(-1.0)))


def test_ipo_loss_by_hand() -> None:
    """log-ratio margin 1 - (-1) = 2, target 1 / (2 * 0.5) = 1: loss (2 - 1)^2 = 1; at the target it is 0."""
    terms = pair_terms((t(-1.0), t(-3.0)), (t(-2.0), t(-2.0)), (t(1), t(1)), loss="ipo", beta=0.5)
    assert terms["loss"].item() == pytest.approx(1.0)
    at_target = pair_terms((t(-1.5), t(-2.5)), (t(-2.0), t(-2.0)), (t(1), t(1)), loss="ipo", beta=0.5)
    assert at_target["loss"].item() == pytest.approx(0.0)


def test_simpo_is_reference_free_and_length_normalised() -> None:
    """chosen -2 over 2 tokens (-1 each), rejected -6 over 3 (-2 each); beta 2, gamma 0.5: rewards -2 and -4,
    loss -log sigmoid(2 - 0.5)."""
    terms = pair_terms((t(-2.0), t(-6.0)), None, (t(2), t(3)), loss="simpo", beta=2.0, gamma=0.5)
    assert terms["chosen_reward"].item() == pytest.approx(-2.0)
    assert terms["rejected_reward"].item() == pytest.approx(-4.0)
    assert terms["loss"].item() == pytest.approx(math.log(1 + math.exp(-1.5)))


def test_dpo_gradient_raises_chosen_and_lowers_rejected() -> None:
    policy = t(-2.0, -2.0).requires_grad_()
    terms = pair_terms((policy[:1], policy[1:]), (t(-2.0), t(-2.0)), (t(1), t(1)), beta=0.1)
    terms["loss"].sum().backward()
    assert policy.grad[0] < 0 < policy.grad[1]  # descent raises the chosen log-prob, lowers the rejected


def test_stats_sum_over_batches_and_count_ties_as_half() -> None:
    a = pair_terms(
        (t(-1.0, -2.0), t(-3.0, -2.0)), (t(-2.0, -2.0), t(-2.0, -2.0)), (t(1, 1), t(1, 1)), beta=1.0
    )
    b = pair_terms((t(-5.0), t(-1.0)), (t(-2.0), t(-2.0)), (t(1), t(1)), beta=1.0)
    means = stat_means(stat_sums(a) + stat_sums(b))
    # pair 1 won (margin 2), pair 2 tied (margin 0), pair 3 lost (margin -4): accuracy (1 + 0.5 + 0) / 3
    assert means["pref_accuracy"] == pytest.approx(0.5)
    assert means["reward_margin"] == pytest.approx((2 + 0 - 4) / 3)
    assert means["chosen_reward"] == pytest.approx((1 + 0 - 3) / 3)


def test_an_unknown_loss_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown preference loss 'kto'"):
        pair_terms((t(0.0), t(0.0)), (t(0.0), t(0.0)), (t(1), t(1)), loss="kto")


# ------------------------------------------------------------------------------------------------ on real data


def write_pairs(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def preference_data(root: Path, rows: list[dict], val_tokens: int) -> Path:
    write_pairs(root / "pairs.jsonl", rows)
    cfg = DownloadConfig(
        dataset="pairs", data_files=[str(root / "pairs.jsonl")], preferences=True, tokenizer_path=BASE,
        data_root=root / "data", val_tokens=val_tokens,
    )  # fmt: skip
    return prepare(cfg, progress=False).out_dir


def test_the_pair_set_cuts_long_prompts_from_the_left_and_skips_long_replies(tmp_path: Path) -> None:
    chat = ChatFormat(Tokenizer.from_file(BASE))
    rows = [
        {"prompt": "short", "chosen": "a", "rejected": "b"},
        {"prompt": "a much longer prompt that will not fit " * 3, "chosen": "a", "rejected": "b"},
        {"prompt": "short", "chosen": "a very long reply that does not fit in the row " * 3, "rejected": "b"},
    ]
    out = preference_data(tmp_path, rows, val_tokens=0)
    pairs = PairSet(read_data(out, splits=("train",)), "train", row_len=24, vocab_size=None)
    assert (pairs.count, pairs.truncated, pairs.skipped) == (2, 1, 1)
    assert "1 with the start of their prompt cut to fit; 1 whose reply alone is longer" in pairs.describe()
    x, y, index = pairs.batch(np.arange(2), pad_id=0, device=torch.device("cpu"))
    assert x.shape == (4, 23) and index.tolist() == [0, 1]
    # the cut side ends exactly as the whole conversation does, its reply scored in full
    ids, learn = chat.render(
        [{"role": "user", "content": rows[1]["prompt"]}, {"role": "assistant", "content": "a"}]
    )
    assert x[1].tolist() + [y[1, -1].item()] == ids[-24:]
    assert (y[1] != -1).sum().item() == sum(learn)
    short, short_learn = chat.render(
        [{"role": "user", "content": "short"}, {"role": "assistant", "content": "b"}]
    )
    assert x[2, : len(short) - 1].tolist() == short[:-1] and (y[2] != -1).sum().item() == sum(short_learn)


def test_the_loader_resumes_exactly_and_splits_pairs_over_ranks(tmp_path: Path) -> None:
    rows = [{"prompt": f"q{i}", "chosen": f"yes {i}", "rejected": f"no {i}"} for i in range(40)]
    data = read_data(preference_data(tmp_path, rows, val_tokens=0), splits=("train",))
    kw = {"batch_size": 3, "context_length": 32, "seed": 5, "pad_id": 0}
    a = PairLoader(data, **kw)
    for _ in range(7):
        a.next_batch()
    b = PairLoader(data, **kw)
    b.load_state_dict(a.state_dict())
    for _ in range(20):  # across the end of the epoch (40 pairs, 3 a step)
        assert all(torch.equal(p, q) for p, q in zip(a.next_batch(), b.next_batch(), strict=True))
    ranks = [PairLoader(data, **kw, rank=r, world_size=2) for r in range(2)]
    seen = [i for _ in range(6) for loader in ranks for i in loader.next_batch()[2].tolist()]
    assert len(seen) == len(set(seen)) == 36  # each pair once per epoch, no rank sharing one


def test_too_few_pairs_for_a_step_is_refused(tmp_path: Path) -> None:
    rows = [{"prompt": f"q{i}", "chosen": "y", "rejected": "n"} for i in range(3)]
    data = read_data(preference_data(tmp_path, rows, val_tokens=0), splits=("train",))
    with pytest.raises(TalmError, match="the train split holds 3 pairs, fewer than one step's 4 x 1"):
        PairLoader(data, batch_size=4, context_length=32, seed=0, pad_id=0)


def val_accuracy(model: torch.nn.Module, reference: torch.nn.Module, val: PairEval) -> float:
    sums = torch.zeros(6, dtype=torch.float64)
    with torch.no_grad():
        for x, y, _ in val:
            n = len(x) // 2
            p, counts = sequence_logps(model(x)[0], y)
            r, _ = sequence_logps(reference(x)[0], y)
            terms = pair_terms((p[:n], p[n:]), (r[:n], r[n:]), (counts[:n], counts[n:]), beta=0.1)
            sums += stat_sums(terms)
    return stat_means(sums)["pref_accuracy"]


def test_a_few_dpo_steps_teach_a_tiny_model_the_held_out_preference(tmp_path: Path) -> None:
    """Chosen replies agree ("yes, N"), rejected ones refuse ("no."): 10 DPO steps from random weights take the
    held-out pairs' accuracy from 50% (policy = reference: every reward 0) to at least 90%."""
    from talm.model.config import ModelConfig
    from talm.model.gpt import GPT

    rows = [
        {"prompt": f"Can you count to {i}?", "chosen": f"yes, {i}", "rejected": "no."} for i in range(120)
    ]
    data = read_data(preference_data(tmp_path, rows, val_tokens=300))
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=1024, context_length=32, n_layer=1, n_head=2, d_model=32))
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    loader = PairLoader(data, batch_size=8, context_length=32, seed=0, pad_id=0)
    val = PairEval(data, max_pairs=32, context_length=32, batch_size=16, pad_id=0)
    assert val.count >= 10
    assert val_accuracy(model, reference, val) == pytest.approx(0.5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(10):
        x, y, _ = loader.next_batch()
        n = len(x) // 2
        p, counts = sequence_logps(model(x)[0], y)
        with torch.no_grad():
            r, _ = sequence_logps(reference(x)[0], y)
        terms = pair_terms((p[:n], p[n:]), (r[:n], r[n:]), (counts[:n], counts[n:]), beta=0.1)
        optimizer.zero_grad()
        terms["loss"].mean().backward()
        optimizer.step()
    assert val_accuracy(model, reference, val) >= 0.9

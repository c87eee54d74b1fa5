"""Configs are strict at the edge: from TOML files and from Python a bool is not an int and a string is not a
number, every float of every config is finite, seeds fit torch's range; each refusal is one line naming the
field, the value and what is expected."""

from __future__ import annotations

import importlib
import inspect
import math
import types
import typing
from pathlib import Path

import pytest
from pydantic import ValidationError

from talm.config import Config, load_toml, validate
from talm.data.config import DownloadConfig
from talm.errors import TalmError
from talm.model.config import ModelConfig
from talm.tokenizer.config import TokenizerConfig
from talm.train.config import OptimConfig, RunConfig, TrainConfig
from talm.use.config import SampleConfig


def refusal(cls: type[Config], data: dict) -> str:
    """The one-line message `validate` gives for `data` (it must refuse it)."""
    with pytest.raises(TalmError) as info:
        validate(cls, data)
    message = str(info.value)
    assert "\n" not in message
    return message


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------ strict types


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[model]\nn_layer = true\n", "model.n_layer=True: must be an integer, not a boolean"),
        ('[train]\nmax_steps = "3"\n', "train.max_steps='3': must be an integer, not a string"),
        ("[train]\nmax_steps = 3.0\n", "train.max_steps=3.0: must be an integer, not a float"),
        ('[optim]\nlr = "6e-4"\n', "optim.lr='6e-4': must be a number, not a string"),
        ("[optim]\nlr = true\n", "optim.lr=True: must be a number, not a boolean"),
        ("[train]\ncompile = 1\n", "train.compile=1: must be true or false, not an integer"),
        ('[train]\ncompile = "yes"\n', "train.compile='yes': must be true or false, not a string"),
        ("[train]\ndevice = 1\n", "train.device=1"),
        ('[train]\nreport_to = "wandb"\n', "train.report_to='wandb': must be a list, not a string"),
        ("[model]\ndropout = nan\n", "model.dropout=nan: must be a finite number"),
        ("[optim]\nlr = inf\n", "optim.lr=inf: must be a finite number"),
        ("[train]\nseed = -1\n", "train.seed=-1: must be from 0 to 2**63-1"),
    ],
)
def test_toml_values_of_the_wrong_type_are_refused(tmp_path: Path, toml: str, message: str) -> None:
    assert refusal(RunConfig, load_toml(write_toml(tmp_path, toml))).startswith(message)


def test_toml_values_of_the_right_type_are_kept(tmp_path: Path) -> None:
    toml = "[model]\nn_layer = 3\nrope_theta = 500000\n[optim]\nlr = 1e-3\n[train]\nmax_steps = 7\ncompile = true\n"
    cfg = validate(RunConfig, load_toml(write_toml(tmp_path, toml)))
    assert (cfg.model.n_layer, cfg.optim.lr, cfg.train.max_steps, cfg.train.compile) == (3, 1e-3, 7, True)
    # an integer is a fine float (TOML `rope_theta = 500000`), and stays a float in the config
    assert cfg.model.rope_theta == 500000.0 and type(cfg.model.rope_theta) is float


def test_python_values_are_as_strict_as_toml() -> None:
    for make, message in [
        (lambda: ModelConfig(n_layer=True), "Input should be a valid integer"),
        (lambda: TrainConfig(max_steps="3"), "Input should be a valid integer"),
        (lambda: OptimConfig(lr="1e-3"), "Input should be a valid number"),
        (lambda: SampleConfig(temperature=math.inf), "finite number"),
        (lambda: TrainConfig(seed=True), "Input should be a valid integer"),
        (lambda: DownloadConfig(dataset="fineweb", max_tokens=True), "Input should be a valid integer"),
    ]:
        with pytest.raises(ValidationError, match=message):
            make()
    cfg = TrainConfig(max_steps=3)
    with pytest.raises(ValidationError, match="Input should be a valid integer"):
        cfg.max_steps = "4"  # assignment is validated too
    assert cfg.max_steps == 3
    assert OptimConfig(lr=1).lr == 1.0  # ints are numbers


def test_paths_may_be_given_as_strings() -> None:
    assert TokenizerConfig(vocab_size=300, name="t", text_files=["a.txt"]).text_files == [Path("a.txt")]
    cfg = DownloadConfig(dataset="fineweb", data_root="elsewhere", tokenizer_path="tok.json")
    assert (cfg.data_root, cfg.tokenizer_path) == (Path("elsewhere"), Path("tok.json"))


def test_token_counts_still_accept_count_text_but_not_other_types() -> None:
    assert DownloadConfig(dataset="fineweb", max_tokens="1e9").max_tokens == 1_000_000_000
    message = refusal(DownloadConfig, {"dataset": "fineweb", "max_tokens": "lots"})
    assert message.startswith("max_tokens='lots': must be an integer, not a string")
    assert refusal(DownloadConfig, {"dataset": "fineweb", "shard_size": 2.5}).startswith("shard_size=2.5")


def test_checkpoint_configs_written_as_json_still_load() -> None:
    """What the trainer saves (model_dump(mode="json")) validates again under the strict rules."""
    cfg = RunConfig(model=ModelConfig(vocab_size=300, n_kv_head=2), train=TrainConfig(report_to=["wandb"]))
    assert RunConfig.model_validate(cfg.model_dump(mode="json")) == cfg


# ------------------------------------------------------------------------------------------------ finite floats


def _is_float(annotation: object) -> bool:
    if typing.get_origin(annotation) is typing.Annotated:
        return _is_float(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_is_float(a) for a in typing.get_args(annotation))
    return annotation is float


STAGE_CONFIGS = [
    importlib.import_module(f"talm.{stage}.config")
    for stage in ("tokenizer", "data", "model", "train", "use")
]


def float_fields() -> list[tuple[type[Config], str]]:
    """Every float field of every config class the stages define (found, not listed: new ones are covered)."""
    classes = sorted(
        {
            c
            for module in STAGE_CONFIGS
            for _, c in inspect.getmembers(module, inspect.isclass)
            if issubclass(c, Config) and c is not Config
        },
        key=lambda c: c.__name__,
    )
    return [(c, name) for c in classes for name, f in c.model_fields.items() if _is_float(f.annotation)]


def test_every_config_float_field_is_found() -> None:
    found = {f"{c.__name__}.{name}" for c, name in float_fields()}
    assert {
        "OptimConfig.lr",
        "SampleConfig.temperature",
        "SampleConfig.top_p",
        "ModelConfig.rope_theta",
    } <= found
    assert len(found) >= 12


@pytest.mark.parametrize(("cls", "field"), float_fields(), ids=lambda x: getattr(x, "__name__", x))
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_every_float_field_refuses_non_finite_values(cls: type[Config], field: str, value: float) -> None:
    with pytest.raises(TalmError) as info:
        validate(cls, {field: value})  # other required fields may be missing: their errors are listed too
    assert f"{field}={value!r}: must be a finite number" in str(info.value)


# ------------------------------------------------------------------------------------------------ seeds


@pytest.mark.parametrize("cls", [TrainConfig, SampleConfig])
def test_seeds_must_fit_in_63_bits(cls: type[Config]) -> None:
    for bad in (-1, 2**63, 99999999999999999999999):
        message = refusal(cls, {"seed": bad})
        assert message == f"seed={bad}: must be from 0 to 2**63-1 ({2**63 - 1}): pass e.g. 0"
    for good in (0, 2**63 - 1):
        assert validate(cls, {"seed": good}).seed == good
    if cls is SampleConfig:
        assert validate(cls, {}).seed is None  # unset: a fresh seed each run


def test_a_refusal_quoting_a_nested_pydantic_error_carries_no_url_nor_type_tag() -> None:
    from pydantic import field_validator

    class Inner(Config):
        n: int = 1

    class Outer(Config):
        inner: dict = {}

        @field_validator("inner")
        @classmethod
        def _check(cls, value: dict) -> dict:
            try:
                Inner.model_validate(value)
            except ValidationError as err:
                raise ValueError(str(err)) from None
            return value

    message = refusal(Outer, {"inner": {"n": "x"}})
    assert "Input should be a valid integer" in message, message
    assert "http" not in message and "[type=" not in message and "pydantic" not in message

"""talm: train a language model, from raw text to a trained GPT, on your own hardware.

    import talm

    model, tokenizer = talm.load("models/shakespeare")            # or checkpoint="best"
    for piece in talm.generate(model, tokenizer, "ROMEO:", max_new_tokens=200, seed=0):
        print(piece, end="", flush=True)

The public API is re-exported here lazily, so `import talm` stays cheap: torch is imported only when a name
that needs it is first used (the tokenizer stage never imports torch).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "Tokenizer": "talm.tokenizer.api",
    "TalmError": "talm.errors",
    "ModelConfig": "talm.model.config",
    "SampleConfig": "talm.use.config",
    "GPT": "talm.model.gpt",
    "KVCache": "talm.model.gpt",
    "load": "talm.use.load",
    "generate": "talm.use.sample",
    "generate_ids": "talm.use.sample",
    "export_hf": "talm.use.export",
    "push_to_hub": "talm.use.export",
    "plot_runs": "talm.train.plots",
}

__all__ = [  # the names of _EXPORTS, spelled out for type checkers and linters
    "GPT",
    "KVCache",
    "ModelConfig",
    "SampleConfig",
    "TalmError",
    "Tokenizer",
    "__version__",
    "export_hf",
    "generate",
    "generate_ids",
    "load",
    "plot_runs",
    "push_to_hub",
]

if TYPE_CHECKING:
    from talm.errors import TalmError
    from talm.model.config import ModelConfig
    from talm.model.gpt import GPT, KVCache
    from talm.tokenizer.api import Tokenizer
    from talm.train.plots import plot_runs
    from talm.use.config import SampleConfig
    from talm.use.export import export_hf, push_to_hub
    from talm.use.load import load
    from talm.use.sample import generate, generate_ids


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'talm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(__all__)

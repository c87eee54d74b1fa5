"""talm checkpoints as an lm-evaluation-harness model (optional extra: pip install 'talm[eval]').

`TalmLM` implements the harness's LM interface (loglikelihood, loglikelihood_rolling, generate_until) on a talm
model and tokenizer, so every harness task runs on a checkpoint without exporting it. It encodes and scores
exactly as talm's own scorer does (`talm.eval.scoring`: the same token split, <|endoftext|> in front, the same
batched forward pass), so both give the same log-likelihoods on the same requests.

Importing this module registers the model as "talm" in the harness. The harness finds no models from other
packages on its own, so its command line is run through this module:

    python -m talm.use.lm_eval --model talm --model_args path=models/NAME --device cuda --batch_size 32 --tasks hellaswag

or `evaluate -m models/NAME --harness hellaswag` (run_harness below).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from talm.errors import TalmError

try:
    from datasets.exceptions import DatasetNotFoundError
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError:  # the extra is not installed: say how to get it, once, when something needs it
    raise TalmError("the lm-evaluation-harness is not installed: pip install 'talm[eval]'") from None

from talm.data.streaming import hub_unreachable
from talm.eval.scoring import encode_pair, score_tokens
from talm.use.load import load_checkpoint
from talm.use.sample import fit_prompt


@register_model("talm")
class TalmLM(TemplateLM):
    """A talm checkpoint for the harness: `--model talm --model_args path=models/NAME[,checkpoint=best]`."""

    def __init__(
        self,
        path: str,
        checkpoint: str = "latest",
        device: str | None = None,
        batch_size: int | str | None = 32,
        max_gen_toks: int = 256,
        **_: Any,  # the harness passes max_batch_size and others meant for its own models
    ) -> None:
        super().__init__()
        self.model, self.tokenizer, self.meta = load_checkpoint(
            path, checkpoint, device or "auto", for_generation=True
        )
        # "auto" (the harness's batch-size search) and None become talm's default
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 32
        self.max_gen_toks = max_gen_toks

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eot_id

    @property
    def max_length(self) -> int:
        return self.model.config.context_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.tokenizer.encode(string)

    def tok_decode(self, tokens: list[int], **kwargs: Any) -> str:
        return self.tokenizer.decode(tokens)

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        return encode_pair(self.tokenizer, context, continuation)

    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, **kwargs: Any) -> list:
        token_requests = [(list(context), list(continuation)) for _, context, continuation in requests]
        scores = score_tokens(
            self.model,
            token_requests,
            batch_size=self.batch_size,
            progress=None if disable_tqdm else "harness",
        )
        for (pair, _, _), result in zip(requests, scores, strict=True):
            self.cache_hook.add_partial("loglikelihood", pair, result)
        return scores

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """The log-likelihood of whole texts (perplexity tasks), from <|endoftext|>, in disjoint windows of the
        model's context."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        out = []
        for (text,) in [r.args for r in requests]:
            windows = [
                make_disjoint_window(w)
                for w in get_rolling_token_windows(
                    self.tok_encode(text), self.eot_token_id, self.max_length, context_len=1
                )
            ]
            scores = score_tokens(self.model, windows, batch_size=self.batch_size)
            out.append(sum(ll for ll, _ in scores))
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), out[-1])
        return out

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations of every request, generated together by the batched engine (`batch_size` at a
        time), each ending at <|endoftext|>, its token budget or the first of its `until` strings (cut off)."""
        from talm.model.engine import Engine, Settings

        prompts, settings, untils = [], [], []
        for context, gen_kwargs in [r.args for r in requests]:
            until = gen_kwargs.get("until") or []
            until = [u for u in ([until] if isinstance(until, str) else until) if u]
            max_new = int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))
            prompts.append(fit_prompt([self.eot_token_id, *self.tok_encode(context)], self.max_length)[0])
            end = (self.eot_token_id,)
            settings.append(Settings(max_new_tokens=max_new, temperature=0.0, end_ids=end, stop=tuple(until)))
            untils.append(until)
        engine = Engine(
            self.model, slots=self.batch_size, vocab_size=self.tokenizer.vocab_size, decode=self.tok_decode
        )
        out = []
        for request, until, new in zip(requests, untils, engine.generate(prompts, settings), strict=True):
            text = self.tok_decode([t for t in new if t != self.eot_token_id])
            for u in until:
                text = text.split(u)[0]
            out.append(text)
            self.cache_hook.add_partial("generate_until", request.args, text)
        return out


def run_harness(
    model_dir: str | Path,
    tasks: list[str],
    *,
    checkpoint: str = "latest",
    device: str = "auto",
    limit: int | None = None,
    batch_size: int = 32,
    include_path: str | None = None,
    include_defaults: bool = True,
    log_samples: bool = False,
) -> tuple[str, dict[str, Any]]:
    """Run harness tasks (names it knows, or from yamls under `include_path`) on a talm checkpoint: its results
    table and its results dict. Without `include_defaults`, only `include_path`'s yamls are indexed (the
    harness's own thousands take it many seconds to read)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import make_table

    lm = TalmLM(str(model_dir), checkpoint=checkpoint, device=device, batch_size=batch_size)
    manager = TaskManager(include_path=include_path, include_defaults=include_defaults or not include_path)
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        raise TalmError(
            f"the harness knows no task {', '.join(unknown)}: see `lm-eval ls tasks`, or pass the folder of your "
            "task yaml with --include-path"
        )
    repos = hub_datasets(manager, tasks)
    # one bounded request: datasets would retry an unreachable Hub for a minute, then end in a traceback
    why = hub_unreachable(repos[0] if repos else tasks[0]) if repos or not include_path else None
    with hub_offline(
        why is not None
    ):  # offline, a local or cached dataset still loads, a missing one fails at once
        try:
            results = simple_evaluate(
                model=lm, tasks=tasks, limit=limit, task_manager=manager, log_samples=log_samples
            )
        except (OSError, DatasetNotFoundError) as err:
            raise harness_data_error(repos or tasks, why, err) from None
    return make_table(results), results


def hub_datasets(manager: Any, tasks: list[str]) -> list[str]:
    """The Hub datasets (dataset_path, when not a local folder) of the named harness tasks that say theirs."""
    repos = []
    for name in tasks:
        cfg = getattr(manager.task_index.get(name), "cfg", None) or {}
        path = cfg.get("dataset_path") if isinstance(cfg, dict) else None
        if isinstance(path, str) and not Path(path).is_dir():
            repos.append(path)
    return list(dict.fromkeys(repos))


@contextmanager
def hub_offline(offline: bool) -> Iterator[None]:
    """Hugging Face libraries in offline mode (the cache and local folders only) while inside, if `offline`."""
    if not offline:
        yield
        return
    import datasets.config
    from huggingface_hub import constants

    saved = (os.environ.get("HF_HUB_OFFLINE"), datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE)
    os.environ["HF_HUB_OFFLINE"] = "1"
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        if saved[0] is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved[0]
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved[1], saved[2]


def harness_data_error(repos: list[str], why: str | None, err: BaseException) -> TalmError:
    """One line: which dataset could not be loaded, and the ways to a copy that loads without the Hub."""
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    where = f"the Hub is unreachable ({why}) and it is not in the datasets cache" if why else reason
    repo = repos[0] if repos else "OWNER/NAME"
    return TalmError(
        f"the harness cannot load the data of {', '.join(repos)}: {where}: run it once where the Hub is "
        "reachable (the datasets cache keeps it), or pass --include-path with a task yaml whose dataset_path is "
        f"a copy of the dataset (hf download {repo} --repo-type dataset --local-dir DIR)"
    )


def main() -> None:
    """The harness's own command line, with "talm" registered as a model."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv[0] = "lm_eval"
    cli_evaluate()


if __name__ == "__main__":
    main()

"""Runs train_model's Python entry point once per job, under torchrun: `torchrun ... dist_worker.py JOBS.json`.

JOBS.json is a list of {"name": model name, "data": data dir, "flags": {"train": {...}, ...}}. One launch runs
several tiny runs (DDP and FSDP, AdamW and Muon) so that a test pays for starting torch and the processes once.
The runs share one process group: each train_model would tear it down at its end, and a group created again
in the same processes may meet the previous group's addresses in torchrun's store (gloo then fails to connect).
"""

from __future__ import annotations

import json
import sys

from talm.train import dist
from talm.train.run import train_model


def main(jobs_file: str) -> None:
    teardown, dist.teardown = dist.teardown, lambda: None
    try:
        for job in json.loads(open(jobs_file, encoding="utf-8").read()):
            train_model(job["name"], job["data"], overrides=job["flags"])
    finally:
        teardown()


if __name__ == "__main__":
    main(sys.argv[1])

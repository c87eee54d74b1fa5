"""Benchmarks of a language model: the standard zero-shot tasks (HellaSwag, ARC, PIQA, WinoGrande, LAMBADA)
scored by the log-likelihood of each continuation, as EleutherAI's lm-evaluation-harness scores them.

tasks.py reads each task from the Hub (or a local copy laid out like its repository) into plain requests;
scoring.py computes log-likelihoods in batches and the metrics; runner.py runs tasks on a model, prints the table
and writes `models/NAME/evals/<step>.json`. This stage sits between `model` and `train`, so a training run can
score tasks as it goes; loading a model directory stays in `talm.use`.
"""

"""Stage 3, pretraining: the run, the loop, data loading, optimizer, checkpoints, processes, metrics, plots."""

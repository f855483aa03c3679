"""Functions run inside spawned processes by test_train.py (importable by name)."""
import torch

from helpers import set_dist_env


def train_worker(rank, world, runs, out_file):
    """Run kollama.train.train once per (port, kwargs) in ``runs``; rank 0 saves the summaries."""
    torch.set_num_threads(1)  # two processes on two cores
    from kollama.train import train

    summaries = []
    for port, kwargs in runs:
        set_dist_env(rank, world, port)  # a fresh port per run: train() starts and ends its own process group
        summaries.append(train(**kwargs))
    if rank == 0:
        torch.save(summaries, out_file)

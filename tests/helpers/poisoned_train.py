"""`avgalign train` with a NaN loss on one process at one micro-batch, for the multi-process
non-finite tests: run as `accelerate launch ... tests/helpers/poisoned_train.py CONFIG ...`.
POISON_RANK and POISON_CALL (1-based count of loss calls on that process) say where."""

import os
import sys

import avgalign.train as train_module
from avgalign.cli import main

real_loss = train_module.preference_loss
calls = {"n": 0}


def poisoned(*args, **kwargs):
    loss, metrics = real_loss(*args, **kwargs)
    if os.environ.get("RANK", "0") == os.environ["POISON_RANK"] and loss.requires_grad:
        calls["n"] += 1
        if calls["n"] == int(os.environ["POISON_CALL"]):
            loss = loss * float("nan")
    return loss, metrics


train_module.preference_loss = poisoned
sys.exit(main(["train", *sys.argv[1:]]))

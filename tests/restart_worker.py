"""A torchrun worker for tests/test_distributed_restart.py: attempt 0's rank 1 dies after the group is up;
attempt 1's rank 1 joins late, so rank 0 reads the store before rank 1 has written its new address."""

import os
import sys
import time

import torch
import torch.distributed as dist

from idm3d.training import distributed

attempt, rank = int(os.environ["TORCHELASTIC_RESTART_COUNT"]), int(os.environ["RANK"])
if attempt == 1 and rank == 1:
    time.sleep(float(sys.argv[1]))
ctx = distributed.setup("cpu")
total = torch.ones(1)
dist.all_reduce(total)
if attempt == 0 and rank == 1:
    os._exit(1)
print(f"attempt {attempt} rank {ctx.rank} sum {int(total.item())}", flush=True)
distributed.shutdown()

"""Comm-pass graphs run their collectives for real, on a gloo group of one rank: no torchrun needed."""

from __future__ import annotations

import pytest
import torch.distributed as dist
from torch.distributed.distributed_c10d import _register_process_group, _unregister_process_group

from xllm_compiler.models.parallel import TRACED_GROUP


@pytest.fixture(autouse=True, scope="module")
def single_rank_group():
    """The default group, of one rank, also under the name models trace their collectives with (the
    runtime binds that name to the real group at load; here torch's group registry does): an
    all-reduce over one rank is the identity, so before and after a rewrite must agree exactly."""
    assert not dist.is_initialized(), "another test left a process group up"
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    _register_process_group(TRACED_GROUP, dist.group.WORLD)
    yield
    _unregister_process_group(TRACED_GROUP)
    dist.destroy_process_group()

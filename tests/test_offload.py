"""HostCopy: weights that visit a device and come back without a copy."""

import torch
from torch import nn

from venhancer.offload import HostCopy


def test_visit_and_leave_swap_storage_without_copying_back():
    module = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).eval()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    copy = HostCopy(module)
    home_ptrs = [h.data_ptr() for h in copy.home]
    assert len(home_ptrs) == len(before)  # parameters and buffers
    assert [t.data_ptr() for t in copy.tensors] == home_ptrs  # a CPU module keeps one copy

    # The CPU stands in for the GPU here: a visit makes fresh copies the module then uses.
    copy.visit("cpu")
    visiting = [t.data_ptr() for t in copy.tensors]
    assert not set(visiting) & set(home_ptrs)
    with torch.no_grad():
        out = module(torch.ones(2, 3))
        module[0].weight.add_(1.0)  # a change to the visiting copy does not reach home
    copy.leave()
    assert [t.data_ptr() for t in copy.tensors] == home_ptrs
    after = module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        assert torch.equal(module(torch.ones(2, 3)), out)

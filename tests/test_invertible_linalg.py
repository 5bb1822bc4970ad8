"""The thread-safe solve helper, the one GroupNorm grouping, and the attention variant classes.

The multi-threaded behaviour itself (matrices above the failing size, 2 threads) runs in
tests/test_threads.py, in a process of its own.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch

from idm3d.invertible import (
    ChannelAttention3d,
    InvertibleAttention3d,
    SpatialAttention3d,
    group_count,
    invertible_attention,
    linalg,
)
from idm3d.invertible.coupling import ConditionedConvNet
from idm3d.nets.bookends import Head, Stem


@pytest.fixture
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def _system(batch: tuple[int, ...], n: int = 8):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(*batch, n, n, generator=g, dtype=torch.float64) + 3 * torch.eye(n, dtype=torch.float64)
    return a, torch.randn(*batch, n, 3, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("batch", [(), (1,), (3,), (2, 2)])
def test_solve_and_logabsdet_match_one_matrix_at_a_time(two_threads, batch):
    a, b = _system(batch)
    x = linalg.solve(a, b)
    assert torch.allclose(a @ x, b, atol=1e-12)
    flat = a.reshape(-1, 8, 8)
    alone = torch.stack([torch.linalg.slogdet(m).logabsdet for m in flat]).reshape(batch)
    assert torch.allclose(linalg.logabsdet(a), alone, atol=1e-12)
    assert torch.get_num_threads() == 2  # restored


def test_serial_lapack_switches_only_for_cpu_batches(two_threads):
    seen = []
    for a in (torch.zeros(4, 4), torch.zeros(1, 4, 4), torch.zeros(2, 4, 4)):
        with linalg.serial_lapack(a):
            seen.append(torch.get_num_threads())
    assert seen == [2, 2, 1]
    assert torch.get_num_threads() == 2


def test_concurrent_solves_restore_the_thread_count(two_threads):
    a, b = _system((4,))
    errors = []

    def work():
        for _ in range(50):
            if not torch.allclose(a @ linalg.solve(a, b), b, atol=1e-12):
                errors.append("wrong")

    workers = [threading.Thread(target=work) for _ in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors
    assert torch.get_num_threads() == 2


def test_solve_gradients_match_autograd_one_matrix_at_a_time(two_threads):
    a, b = _system((3,))
    a.requires_grad_(True)
    b.requires_grad_(True)
    (linalg.solve(a, b).sum() + linalg.logabsdet(a).sum()).backward()
    ga, gb = a.grad.clone(), b.grad.clone()
    a.grad = b.grad = None
    sum(torch.linalg.solve(a[i], b[i]).sum() + torch.linalg.slogdet(a[i]).logabsdet for i in range(3)).backward()
    assert torch.allclose(ga, a.grad, atol=1e-12)
    assert torch.allclose(gb, b.grad, atol=1e-12)


@pytest.mark.parametrize(("channels", "groups"), [(32, 8), (64, 8), (12, 6), (6, 6), (7, 7), (9, 3), (1, 1)])
def test_one_group_count_for_couplings_and_bookends(channels, groups):
    assert group_count(channels) == groups
    stem = Stem(1, 2 * channels)  # its GroupNorm is on width/2 = channels
    assert stem.body[1].num_groups == groups
    assert Head(channels, 1).body[0].num_groups == groups
    assert ConditionedConvNet(channels, 2, channels).norm1.num_groups == groups
    with pytest.raises(ValueError, match="group_count"):
        group_count(0)


@pytest.mark.parametrize(("variant", "cls"), [("channel", ChannelAttention3d), ("spatial", SpatialAttention3d)])
def test_the_factory_builds_the_variant_class(variant, cls):
    module = invertible_attention(8, variant=variant, heads=2, cond_dim=4)
    positional = invertible_attention(8, variant, 2)
    with pytest.deprecated_call():  # the old constructor call still works, with a warning
        assert type(InvertibleAttention3d(8, variant, 2)) is cls
    assert type(module) is cls
    assert type(positional) is cls
    assert isinstance(module, InvertibleAttention3d)
    assert module.variant == variant
    twin = copy.deepcopy(module)  # EMA copies, pickling: __new__ without arguments
    assert type(twin) is cls
    assert all(torch.equal(p, q) for p, q in zip(module.state_dict().values(), twin.state_dict().values()))
    direct = cls(8, heads=2, cond_dim=4)
    assert list(direct.state_dict()) == list(module.state_dict())
    other = "spatial" if variant == "channel" else "channel"
    with pytest.raises(ValueError, match=f"variant must be '{variant}'"):
        cls(8, variant=other)

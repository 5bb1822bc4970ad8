"""Invertible modules one by one: exact round trips, their initialisations, orthogonality, input errors."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from helpers import perturb, torch_threads
from idm3d.invertible import (
    AdditiveCoupling,
    Apply,
    ChannelMerge,
    ChannelSplit,
    InvertibleChannelMix3d,
    InvertibleModule,
    InvertibleSequence,
    OrthogonalDownsample3d,
    OrthogonalUpsample3d,
    haar_matrix_3d,
    orthogonal_from_skew,
)

DTYPES = [torch.float32, torch.float64]
SEEDS = [0, 1, 2]
# Max abs round-trip error for unit-scale input.
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
COND_DIM = 6


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny convolutions on a shared 2-core machine: extra threads only spin against each other.
    with torch_threads(1):
        yield


# name -> (factory, input shape, takes a conditioning vector)
MODULES: dict[str, tuple[Callable[[], InvertibleModule], tuple[int, ...], bool]] = {
    "coupling": (lambda: AdditiveCoupling(4), (2, 4, 8, 8, 8), False),
    "coupling_flip": (lambda: AdditiveCoupling(4, flip=True), (2, 4, 8, 8, 8), False),
    "coupling_cond": (lambda: AdditiveCoupling(4, cond_dim=COND_DIM), (2, 4, 8, 8, 8), True),
    "coupling_cond_flip": (lambda: AdditiveCoupling(4, cond_dim=COND_DIM, flip=True), (2, 4, 8, 8, 8), True),
    "coupling_uneven_split": (
        lambda: AdditiveCoupling(5, hidden_channels=16, split=2, flip=True),
        (2, 5, 6, 8, 4),
        False,
    ),
    "down_cayley": (lambda: OrthogonalDownsample3d(2, "cayley"), (2, 2, 8, 8, 8), False),
    "down_exp": (lambda: OrthogonalDownsample3d(2, "exp"), (2, 2, 8, 8, 8), False),
    "up_cayley": (lambda: OrthogonalUpsample3d(2, "cayley"), (2, 16, 4, 4, 4), False),
    "up_exp": (lambda: OrthogonalUpsample3d(2, "exp"), (2, 16, 4, 4, 4), False),
    "mix_cayley": (lambda: InvertibleChannelMix3d(6, "cayley"), (2, 6, 8, 8, 8), False),
    "mix_exp": (lambda: InvertibleChannelMix3d(6, "exp"), (2, 6, 8, 8, 8), False),
}


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
@pytest.mark.parametrize("name", list(MODULES))
def test_module_round_trip(name: str, dtype: torch.dtype, seed: int) -> None:
    factory, shape, has_cond = MODULES[name]
    torch.manual_seed(seed)
    fresh = factory().to(dtype)
    module = perturb(factory().to(dtype), seed)
    x = torch.randn(shape, dtype=dtype)
    cond = (torch.randn(shape[0], COND_DIM, dtype=dtype),) if has_cond else ()
    with torch.no_grad():
        y = module(x, *cond)
        # The perturbation must have changed the map, else the round trip proves little.
        assert (y - fresh(x, *cond)).abs().max() > 1e-2
        assert (module.inverse(y, *cond) - x).abs().max() <= TOL[dtype]
        # Inverse first, then forward: both compositions are the identity.
        assert (module(module.inverse(y, *cond), *cond) - y).abs().max() <= TOL[dtype] * max(1.0, y.abs().max())
        assert torch.equal(module.log_det(x, *cond), torch.zeros(shape[0], dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
def test_split_merge_round_trip(dtype: torch.dtype) -> None:
    x = torch.randn(2, 5, 4, 4, 4, dtype=dtype)
    split = InvertibleSequence([ChannelSplit((2, 3))])
    a, b = split(x)
    assert torch.equal(a, x[:, :2])
    assert torch.equal(b, x[:, 2:])
    assert torch.equal(split.inverse((a, b)), x)
    merge = InvertibleSequence([ChannelMerge((2, 3))])
    assert torch.equal(merge((a, b)), x)
    assert all(torch.equal(u, v) for u, v in zip(merge.inverse(x), (a, b)))
    # Split, work on both halves (Apply with an index below the top), merge: still invertible.
    torch.manual_seed(0)
    ops = [ChannelSplit((2, 3)), Apply(AdditiveCoupling(2), index=0), AdditiveCoupling(3, flip=True)]
    seq = InvertibleSequence([*ops, ChannelMerge((2, 3))]).to(dtype)
    perturb(seq, 0)
    with torch.no_grad():
        y = seq(x)
        assert y.shape == x.shape
        assert (y - x).abs().max() > 1e-2
        assert (seq.inverse(y) - x).abs().max() <= TOL[dtype]


def haar_reference(x: Tensor) -> Tensor:
    """3D Haar transform written out: output k = 4*kd + 2*kh + kw of channel c is
    sum over the 2x2x2 block of x * (-1)^(kd*bd + kh*bh + kw*bw) / sqrt(8)."""
    b, c, d, h, w = x.shape
    blocks = x.reshape(b, c, d // 2, 2, h // 2, 2, w // 2, 2)
    out = []
    for kd, kh, kw in itertools.product((0, 1), repeat=3):
        sign = torch.tensor(
            [[[(-1) ** (kd * bd + kh * bh + kw * bw) for bw in (0, 1)] for bh in (0, 1)] for bd in (0, 1)],
            dtype=x.dtype,
        )
        out.append(torch.einsum("bcxiyjzk,ijk->bcxyz", blocks, sign) / math.sqrt(8.0))
    return torch.stack(out, dim=2).reshape(b, 8 * c, d // 2, h // 2, w // 2)


@pytest.mark.parametrize("method", ["cayley", "exp"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
def test_fresh_downsample_is_haar(dtype: torch.dtype, method: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 6, 8, dtype=dtype)
    down = OrthogonalDownsample3d(3, method).to(dtype)
    with torch.no_grad():
        y = down(x)
        tol = 10 * torch.finfo(dtype).eps
        # The low-pass channel of each group is the block mean times sqrt(8).
        torch.testing.assert_close(y[:, ::8], F.avg_pool3d(x, 2) * math.sqrt(8.0), rtol=0, atol=tol)
        torch.testing.assert_close(y, haar_reference(x), rtol=0, atol=tol)
        torch.testing.assert_close(OrthogonalUpsample3d(3, method).to(dtype)(y), x, rtol=0, atol=tol)
    haar = haar_matrix_3d(torch.float64)
    torch.testing.assert_close(haar @ haar.T, torch.eye(8, dtype=torch.float64), rtol=0, atol=1e-15)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
@pytest.mark.parametrize(
    "module",
    [
        lambda: AdditiveCoupling(4),
        lambda: AdditiveCoupling(4, flip=True),
        lambda: AdditiveCoupling(4, cond_dim=COND_DIM),
        lambda: AdditiveCoupling(4, cond_dim=COND_DIM, flip=True, split=1),
        lambda: InvertibleChannelMix3d(4, "cayley"),
        lambda: InvertibleChannelMix3d(4, "exp"),
    ],
    ids=["coupling", "coupling_flip", "coupling_cond", "coupling_cond_flip_split1", "mix_cayley", "mix_exp"],
)
def test_fresh_module_is_identity(module: Callable[[], InvertibleModule], dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    m = module().to(dtype)
    x = torch.randn(2, 4, 4, 4, 4, dtype=dtype)
    cond = torch.randn(2, COND_DIM, dtype=dtype)
    with torch.no_grad():
        # The zero-initialised last layer gives F == 0 exactly (even with a non-zero FiLM).
        assert torch.equal(m(x, cond), x)
        assert torch.equal(m.inverse(x, cond), x)


@pytest.mark.parametrize("method", ["cayley", "exp"])
def test_resampling_stays_orthogonal_under_adam(method: str) -> None:
    torch.manual_seed(0)
    down, mix = OrthogonalDownsample3d(2, method), InvertibleChannelMix3d(16, method)
    # A learning rate far above what diffusion training uses, so the weights move far from Haar.
    opt = torch.optim.Adam([*down.parameters(), *mix.parameters()], lr=0.1)
    x, target = torch.randn(2, 2, 8, 8, 8), torch.randn(2, 16, 4, 4, 4)
    for _ in range(10):
        loss = (mix(down(x)) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        m, q = down.weight.matrices(), mix.matrix()
        assert (m - haar_matrix_3d()).abs().max() > 0.3  # it did move
        torch.testing.assert_close(m @ m.transpose(-1, -2), torch.eye(8).expand(2, 8, 8), rtol=0, atol=1e-5)
        torch.testing.assert_close(q @ q.T, torch.eye(16), rtol=0, atol=1e-5)
        up = OrthogonalUpsample3d(2, method)
        up.weight = down.weight  # shared kernel: the upsample is the downsample's inverse
        assert (up(down(x)) - x).abs().max() <= 1e-5
        assert (down(up(target)) - target).abs().max() <= 1e-5


@pytest.mark.parametrize("method", ["cayley", "exp"])
def test_orthogonal_from_skew(method: str) -> None:
    raw = torch.randn(3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    q = orthogonal_from_skew(raw, method)
    torch.testing.assert_close(q @ q.transpose(-1, -2), torch.eye(8, dtype=torch.float64).expand(3, 8, 8))
    assert (q - torch.eye(8, dtype=torch.float64)).abs().max() > 0.1
    torch.testing.assert_close(orthogonal_from_skew(torch.zeros(4, 4), method), torch.eye(4), rtol=0, atol=0)


def _x(*shape: int) -> Tensor:
    return torch.zeros(shape)


# (id, call that must raise, fragments the message must contain: the expected and the received value)
ERRORS: list[tuple[str, Callable[[], object], tuple[str, ...]]] = [
    ("coupling_rank", lambda: AdditiveCoupling(4)(_x(1, 4, 8, 8)), ("5D", "(1, 4, 8, 8)")),
    ("coupling_channels", lambda: AdditiveCoupling(4)(_x(1, 3, 4, 4, 4)), ("expected 4 channels", "got 3")),
    ("coupling_inv_channels", lambda: AdditiveCoupling(4).inverse(_x(1, 5, 4, 4, 4)), ("expected 4", "got 5")),
    (
        "coupling_cond_shape",
        lambda: AdditiveCoupling(4, cond_dim=6)(_x(1, 4, 4, 4, 4), _x(1, 5)),
        ("(B, 6)", "(1, 5)"),
    ),
    ("coupling_cond_missing", lambda: AdditiveCoupling(4, cond_dim=6)(_x(1, 4, 4, 4, 4)), ("size 6",)),
    ("coupling_too_few_channels", lambda: AdditiveCoupling(1), ("at least 2", "got 1")),
    ("coupling_split", lambda: AdditiveCoupling(4, split=4), ("[1, 3]", "got 4")),
    ("coupling_even_kernel", lambda: AdditiveCoupling(4, kernel_size=2), ("odd", "got 2")),
    ("down_rank", lambda: OrthogonalDownsample3d(2)(_x(2, 8, 8, 8)), ("5D", "(2, 8, 8, 8)")),
    ("down_channels", lambda: OrthogonalDownsample3d(2)(_x(1, 3, 4, 4, 4)), ("expected 2 channels", "got 3")),
    ("down_odd", lambda: OrthogonalDownsample3d(2)(_x(1, 2, 4, 5, 4)), ("even", "(4, 5, 4)")),
    ("down_inv_channels", lambda: OrthogonalDownsample3d(2).inverse(_x(1, 15, 2, 2, 2)), ("expected 16", "got 15")),
    ("down_method", lambda: OrthogonalDownsample3d(2, "qr"), ("'cayley' or 'exp'", "'qr'")),
    ("up_rank", lambda: OrthogonalUpsample3d(2)(_x(16, 2, 2, 2)), ("5D", "(16, 2, 2, 2)")),
    ("up_channels", lambda: OrthogonalUpsample3d(2)(_x(1, 8, 2, 2, 2)), ("expected 16 channels", "got 8")),
    ("up_inv_odd", lambda: OrthogonalUpsample3d(2).inverse(_x(1, 2, 3, 4, 4)), ("even", "(3, 4, 4)")),
    ("up_method", lambda: OrthogonalUpsample3d(2, "svd"), ("'cayley' or 'exp'", "'svd'")),
    ("mix_rank", lambda: InvertibleChannelMix3d(4)(_x(1, 4, 4, 4)), ("5D", "(1, 4, 4, 4)")),
    ("mix_channels", lambda: InvertibleChannelMix3d(4)(_x(1, 6, 2, 2, 2)), ("expected 4 channels", "got 6")),
    ("mix_inv_channels", lambda: InvertibleChannelMix3d(4).inverse(_x(1, 3, 2, 2, 2)), ("expected 4", "got 3")),
    ("mix_method", lambda: InvertibleChannelMix3d(4, "householder"), ("'cayley' or 'exp'", "'householder'")),
    ("skew_method", lambda: orthogonal_from_skew(torch.zeros(2, 2), "qr"), ("'cayley' or 'exp'", "'qr'")),
    (
        "split_channels",
        lambda: ChannelSplit((2, 3))((_x(1, 4, 2, 2, 2),), ()),
        ("expected 5 channels", "(1, 4, 2, 2, 2)"),
    ),
    ("split_rank", lambda: ChannelSplit((2, 3))((_x(5),), ()), ("expected 5 channels", "(5,)")),
    ("split_sizes", lambda: ChannelSplit((0, 3)), ("two positive", "(0, 3)")),
    (
        "merge_channels",
        lambda: ChannelMerge((2, 3))((_x(1, 2, 2, 2, 2), _x(1, 2, 2, 2, 2)), ()),
        ("(2, 3) channels", "(1, 2, 2, 2, 2)"),
    ),
    (
        "merge_one_tensor",
        lambda: ChannelMerge((2, 3))((_x(1, 5, 2, 2, 2),), ()),
        ("(2, 3) channels", "(1, 5, 2, 2, 2)"),
    ),
    ("merge_rank", lambda: ChannelMerge((2, 3))((_x(1, 2, 2, 2, 2), _x(3)), ()), ("(2, 3) channels", "(3,)")),
    (
        "merge_spatial",
        lambda: ChannelMerge((2, 3))((_x(1, 2, 2, 2, 2), _x(1, 3, 2, 2, 4)), ()),
        ("(2, 3) channels", "(1, 3, 2, 2, 4)"),
    ),
    ("apply_index", lambda: Apply(AdditiveCoupling(2), index=2)((_x(1, 2, 2, 2, 2),), ()), ("index 2", "of 1")),
    ("apply_type", lambda: Apply(nn.Conv3d(2, 2, 1)), ("InvertibleModule", "Conv3d")),
    ("sequence_type", lambda: InvertibleSequence([nn.Conv3d(2, 2, 1)]), ("invertible", "Conv3d")),
    (
        "sequence_memory_efficient",  # the error surfaces from inside the custom autograd function unchanged
        lambda: InvertibleSequence([AdditiveCoupling(4)])(_x(1, 3, 2, 2, 2).requires_grad_()),
        ("expected 4 channels", "got 3"),
    ),
]


@pytest.mark.parametrize(("call", "fragments"), [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_bad_input_names_expected_and_received(call: Callable[[], object], fragments: tuple[str, ...]) -> None:
    with pytest.raises(ValueError) as info:  # noqa: PT011 - the message is checked below
        call()
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"

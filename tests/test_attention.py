"""InvertibleAttention3d: exact inverse, log-determinant, memory-saving gradients, masks, validation."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from idm3d.errors import ConfigError
from idm3d.invertible.attention import InvertibleAttention3d, invertible_attention
from idm3d.invertible.attention_masks import pass_mask, voxel_split
from idm3d.invertible.base import InvertibleModule
from idm3d.invertible.checks import gradient_check
from idm3d.invertible.segment import InvertibleSequence

COND_DIM = 6
TOL_ROUND = {torch.float32: 1e-5, torch.float64: 1e-10}
TOL_GRAD = {torch.float32: 1e-5, torch.float64: 1e-10}


def make(
    variant: str,
    heads: int = 1,
    cond: bool = False,
    alternating: bool = False,
    dtype: torch.dtype = torch.float64,
    channels: int = 4,
    seed: int = 0,
    **kwargs,
) -> InvertibleAttention3d:
    """A module with random (non-initial) parameters so the attention is far from uniform."""
    torch.manual_seed(seed)
    module = invertible_attention(
        channels,
        variant=variant,
        heads=heads,
        cond_dim=COND_DIM if cond else None,
        channel_alternating=alternating,
        **kwargs,
    )
    with torch.no_grad():
        for lin in (module.to_q, module.to_k):
            lin.weight.normal_(0.0, 2.0 / math.sqrt(channels))
        module.temperature.uniform_(1.0, 4.0)
        module.scale_logit.uniform_(-0.5, 0.5)
        if module.film is not None:
            module.film.weight.normal_(0.0, 0.3)
            module.film.bias.normal_(0.0, 0.1)
    return module.to(dtype)


def inputs(module: InvertibleAttention3d, shape=(4, 4, 4), batch: int = 2, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    dtype = module.temperature.dtype
    x = torch.randn(batch, module.channels, *shape, generator=gen, dtype=dtype)
    cond = (torch.randn(batch, COND_DIM, generator=gen, dtype=dtype),) if module.cond_dim else ()
    return x, cond


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("alternating", [False, True])
@pytest.mark.parametrize("cond", [False, True])
@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("variant", ["channel", "spatial"])
def test_round_trip(variant, heads, cond, alternating, dtype):
    module = make(variant, heads, cond, alternating, dtype)
    x, c = inputs(module)
    with torch.no_grad():
        y = module(x, *c)
        x_back = module.inverse(y, *c)
    mask = pass_mask(module.channels, x.shape[2:], alternating, dtype)
    assert torch.equal(y * mask, x * mask), "pass-through entries must be bit-identical"
    moved = ((y - x).abs() > 1e-3) & (mask == 0)
    assert moved.float().mean() > 0.4 * (1 - mask).mean(), "the transformed half barely changed"
    assert (x_back - x).abs().max().item() <= TOL_ROUND[dtype]


@pytest.mark.parametrize("shape", [(3, 3, 3), (1, 1, 1), (5, 2, 3), (1, 3, 1)])
@pytest.mark.parametrize("variant", ["channel", "spatial"])
def test_round_trip_odd_sizes(variant, shape):
    module = make(variant, heads=1, alternating=True, dtype=torch.float32)
    x, _ = inputs(module, shape)
    with torch.no_grad():
        assert (module.inverse(module(x)) - x).abs().max().item() <= 1e-5


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cond", [False, True])
@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("variant", ["channel", "spatial"])
def test_memory_efficient_gradients(variant, heads, cond, dtype, seed):
    mods = [make(variant, heads, cond, alt, dtype, seed=seed + 10 * i) for i, alt in enumerate((False, True))]
    segment = InvertibleSequence(mods, memory_efficient=True)
    x, c = inputs(mods[0], seed=seed)
    errors = gradient_check(segment, x, *c, seed=seed)
    assert max(errors.values()) <= TOL_GRAD[dtype], errors


@pytest.mark.parametrize("cond", [False, True])
@pytest.mark.parametrize("alternating", [False, True])
@pytest.mark.parametrize("variant", ["channel", "spatial"])
def test_backward_pass_matches_default(variant, alternating, cond):
    """The cheaper override returns what the base class's invert-then-recompute returns."""
    module = make(variant, 2, cond, alternating)
    x, c = inputs(module)
    c = tuple(t.requires_grad_(True) for t in c)
    with torch.no_grad():
        y = module(x, *c)
    grad_y = torch.randn_like(y)
    ours = module.backward_pass(y, grad_y, c)
    ref = InvertibleModule.backward_pass(module, y, grad_y, c)
    assert torch.allclose(ours[0], ref[0], atol=1e-12)
    assert torch.allclose(ours[1], ref[1], atol=1e-11)
    for a, b in zip([*ours[2], *ours[3]], [*ref[2], *ref[3]]):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.allclose(a, b, atol=1e-11)
    if cond:
        assert ours[2][0].abs().sum() > 0


@pytest.mark.parametrize(
    ("shape", "normalize", "cond"), [((4, 2, 2), True, True), ((3, 3, 2), True, False), ((3, 3, 3), False, True)]
)
@pytest.mark.parametrize("alternating", [False, True])
@pytest.mark.parametrize(("variant", "heads"), [("channel", 1), ("channel", 2), ("spatial", 1), ("spatial", 2)])
def test_log_det_matches_jacobian(variant, heads, alternating, shape, normalize, cond):
    module = make(variant, heads, cond, alternating, channels=4, normalize=normalize)
    x, c = inputs(module, shape, batch=2)
    log_det = module.log_det(x, *c)
    assert log_det.shape == (2,)
    for b in range(2):
        cb = tuple(t[b : b + 1] for t in c)
        jac = torch.autograd.functional.jacobian(
            lambda v, b=b, cb=cb: module(v.view(1, *x.shape[1:]), *cb).flatten(), x[b].flatten(), vectorize=True
        )
        sign, ref = torch.linalg.slogdet(jac)
        assert sign.item() == 1.0
        assert abs(log_det[b].item() - ref.item()) <= 1e-9 * max(1.0, abs(ref.item()))
    # not the trivial "uniform attention" value: the attention really depends on x
    assert (module.log_det(3.0 * x + 1.0, *c) - log_det).abs().max() > 1e-6


@pytest.mark.parametrize(
    ("shape", "channels", "alternating", "passing"),
    [
        ((4, 4, 4), 3, False, 3 * 32),
        ((2, 6, 8), 4, True, 4 * 48),
        ((3, 3, 3), 2, False, 2 * 14),  # ceil(27/2) parity-0 voxels pass
        ((3, 3, 3), 3, True, 2 * 14 + 1 * 13),  # even channels at parity 0, odd at parity 1
        ((1, 1, 1), 1, False, 1),
    ],
)
def test_mask_counts(shape, channels, alternating, passing):
    mask = pass_mask(channels, shape, alternating)
    n = math.prod(shape)
    assert int(mask.sum()) == passing
    split = voxel_split(shape)
    assert split.counts == ((n + 1) // 2, n // 2)
    if any(s % 2 == 0 for s in shape):
        assert split.counts[0] == split.counts[1]
    # the forward leaves exactly the masked entries alone
    module = make("channel", 1, alternating=alternating, channels=channels)
    x = torch.randn(1, channels, *shape, dtype=torch.float64)
    with torch.no_grad():
        unchanged = (module(x) == x).squeeze(0)
    assert torch.equal(unchanged | (mask == 0), torch.ones_like(unchanged))
    if channels > 1:  # a 1-channel channel attention is the identity: nothing to compare
        assert int(unchanged.sum()) == passing


@pytest.mark.parametrize("variant", ["channel", "spatial"])
def test_fresh_module_well_conditioned(variant):
    """T is row-stochastic: constants are preserved; random inputs keep their scale."""
    torch.manual_seed(0)
    module = invertible_attention(8, variant=variant, heads=2, cond_dim=COND_DIM).double()
    emb = torch.randn(2, COND_DIM, dtype=torch.float64)
    const = torch.full((2, 8, 4, 4, 4), 1.5, dtype=torch.float64)
    assert torch.allclose(module(const, emb), const, atol=1e-12)
    x = torch.randn(2, 8, 4, 4, 4, dtype=torch.float64)
    y = module(x, emb)
    assert 0.6 < (y.std() / x.std()).item() <= 1.0
    # near-neutral conditioning, but a non-zero gradient for it
    assert (module(x, emb) - module(x, torch.zeros_like(emb))).abs().max() < 0.05
    emb.requires_grad_(True)
    (module(x, emb) * torch.randn_like(x)).sum().backward()
    assert emb.grad is not None
    assert emb.grad.abs().sum() > 0
    assert torch.allclose(module.scale, torch.full((2,), 2.0, dtype=torch.float64))


def test_spatial_constant_field_is_preserved():
    module = make("spatial", 2, alternating=False)
    x = torch.randn(1, 4, 1, 1, 1, dtype=torch.float64).expand(1, 4, 4, 4, 4).contiguous()
    assert torch.allclose(module(x), x, atol=1e-12)


def test_memory_efficient_segment_stores_no_activations():
    mods = [make("channel", 2, cond=True, alternating=a, seed=i) for i, a in enumerate((False, True, False))]
    x, c = inputs(mods[0], (8, 8, 8))
    x.requires_grad_(True)

    def saved_elements(memory_efficient: bool) -> int:
        count = 0

        def pack(t):
            nonlocal count
            count += t.numel()
            return t

        segment = InvertibleSequence(mods, memory_efficient=memory_efficient)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = segment(x, *c)
        out.sum().backward()  # (backward builds short-lived graphs of its own: not counted)
        assert x.grad is not None
        assert x.grad.abs().sum() > 0
        return count

    assert saved_elements(True) <= x.numel() + c[0].numel()
    assert saved_elements(False) > 3 * x.numel()


def test_spatial_max_tokens():
    module = invertible_attention(4, variant="spatial", max_tokens=500)
    module(torch.randn(1, 4, 8, 8, 7))  # 448 voxels: fine
    with pytest.raises(ValueError, match=r"512 voxels exceeds max_tokens=500"):
        module(torch.randn(1, 4, 8, 8, 8))
    with pytest.raises(ValueError, match="max_tokens=4096"):
        invertible_attention(4, variant="spatial").inverse(torch.randn(1, 4, 16, 16, 17))
    # the channel variant has no such limit
    invertible_attention(4, variant="channel", max_tokens=10)(torch.randn(1, 4, 8, 8, 8))


@pytest.mark.parametrize("variant", ["channel", "spatial"])
def test_bad_inputs(variant):
    module = invertible_attention(4, variant=variant, cond_dim=COND_DIM)
    emb = torch.randn(2, COND_DIM)
    with pytest.raises(ValueError, match=r"expected a 5D tensor.*got shape \(2, 4, 4, 4\)"):
        module(torch.randn(2, 4, 4, 4), emb)
    with pytest.raises(ValueError, match=r"expected 4 channels, got 3"):
        module.inverse(torch.randn(2, 3, 4, 4, 4), emb)
    with pytest.raises(ValueError, match=r"expected 4 channels, got 5"):
        module.log_det(torch.randn(2, 5, 4, 4, 4), emb)
    with pytest.raises(ValueError, match=r"conditioning vector of shape \(B, 6\)"):
        module(torch.randn(2, 4, 4, 4, 4))
    with pytest.raises(ValueError, match=r"conditioning of shape \(2, 6\), got \(2, 5\)"):
        module(torch.randn(2, 4, 4, 4, 4), torch.randn(2, 5))
    # an unconditioned module ignores conditioning tensors (a segment passes them to every op)
    plain = invertible_attention(4, variant=variant)
    x = torch.randn(2, 4, 4, 4, 4)
    assert torch.equal(plain(x, emb), plain(x))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"channels": 6, "heads": 4}, "channels=6, heads=4"),
        ({"channels": 4, "variant": "pixel"}, "variant must be one of"),
        ({"channels": 4, "mask": "stripes"}, "mask must be one of"),
        ({"channels": 4, "key_dim": 8}, "key_dim applies to variant='spatial'"),
        ({"channels": 4, "variant": "spatial", "key_dim": 0}, "key_dim must be >= 1"),
        ({"channels": 4, "init_scale": 1.0}, "init_scale must be > 1"),
        ({"channels": 4, "max_tokens": 0}, "max_tokens must be >= 1"),
        ({"channels": 4, "cond_dim": 0}, "cond_dim must be >= 1"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        invertible_attention(**kwargs)


@pytest.mark.parametrize("variant", ["channel", "spatial"])
def test_autocast_keeps_the_inverse_exact(variant):
    """Inside autocast the module still computes in its own dtype: round trip and gradients hold."""
    mods = [make(variant, 2, True, alt, torch.float32, seed=i) for i, alt in enumerate((False, True))]
    segment = InvertibleSequence(mods, memory_efficient=True)
    x, c = inputs(mods[0])
    bf16_cond = tuple(t.to(torch.bfloat16) for t in c)  # e.g. an embedding from an autocast MLP
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        y = segment(x, *bf16_cond)
        x_back = segment.inverse(y, *bf16_cond)
    assert y.dtype == torch.float32
    assert (x_back - x).abs().max().item() <= 1e-5

    params = list(segment.parameters())
    weight = torch.randn_like(x)

    def gradients(memory_efficient: bool) -> list[torch.Tensor]:
        segment.memory_efficient = memory_efficient
        leaves = [x.clone().requires_grad_(True), c[0].clone().requires_grad_(True)]
        with torch.autocast("cpu", dtype=torch.bfloat16):  # forward only, as autocast recommends
            out = segment(*leaves)
        return list(torch.autograd.grad((out * weight).sum(), [*leaves, *params]))

    for a, b in zip(gradients(True), gradients(False)):
        assert ((a - b).norm() / b.norm()).item() <= 1e-5


def _bench_args(*argv: str) -> argparse.Namespace:
    from benchmarks import attention as bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_bench_configurations():
    from benchmarks.attention import _configs

    args = _bench_args("--sizes", "8,32", "--spatial-sizes", "8", "--channels", "8,16", "--monai-max-tokens", "600")
    configs = _configs(args, "cpu")
    keys = {(c["module"], c["variant"], c["mode"], c["size"], c["channels"]) for c in configs}
    assert len(keys) == len(configs) == 2 * 2 * 2 + 1 * 2 * 2 + 1 * 2  # MONAI only where 8^3 <= 600
    assert {c["size"] for c in configs if c["mode"] == "monai"} == {8}
    with pytest.raises(ConfigError, match="--channels"):
        _configs(_bench_args("--channels", "6", "--heads", "4"), "cpu")
    with pytest.raises(ConfigError, match="--variants"):
        _configs(_bench_args("--variants", "pixel"), "cpu")


def test_bench_runs_one_configuration(capsys):
    from benchmarks.attention import run

    args = _bench_args(
        "--sizes", "8", "--variants", "channel", "--modes", "memory_efficient", "--channels", "4",
        "--depth", "2", "--repeats", "1", "--warmup", "0", "--no-flops", "--json", "--threads", "1",
    )  # fmt: skip
    assert run(args) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert row["status"] == "ok", row
    for key in ("module", "variant", "mode", "size", "channels", "step_s", "peak_growth_mib"):
        assert key in row
    assert row["step_s"] > 0
    assert row["peak_growth_mib"] >= 0

"""leaky_relu / LeakyReLU against torch's built-in, bit for bit."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from model import LeakyReLU, leaky_relu

SLOPES = [0.01, 0.2, 0.0, 1.5]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def special_values(dtype: torch.dtype, device: str = "cpu") -> torch.Tensor:
    info = torch.finfo(dtype)
    values = [
        0.0, -0.0, 1.0, -1.0, 3.5, -3.5, float("inf"), float("-inf"), float("nan"),
        info.tiny, -info.tiny, info.tiny / 4, -info.tiny / 4, info.max, -info.max, info.eps, -info.eps,
    ]  # fmt: skip
    rand = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 100
    return torch.cat([torch.tensor(values), rand]).to(device=device, dtype=dtype)


def assert_identical(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(torch.signbit(a), torch.signbit(b)), "signs of zeros differ"


def _check(dtype, slope, device):
    x = special_values(dtype, device)
    assert_identical(leaky_relu(x, slope), F.leaky_relu(x, slope))
    assert_identical(LeakyReLU(slope)(x), torch.nn.LeakyReLU(slope)(x))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("slope", SLOPES)
def test_values_match_builtin(dtype, slope):
    _check(dtype, slope, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("slope", SLOPES)
def test_values_match_builtin_cuda(dtype, slope):
    _check(dtype, slope, "cuda")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("slope", [0.01, 0.3])
def test_gradients_match_builtin_including_zero(dtype, slope):
    gen = torch.Generator().manual_seed(int(slope * 100))
    x = torch.cat([torch.tensor([0.0, -0.0, 1e-3, -1e-3]), torch.randn(100, generator=gen)]).to(dtype)
    upstream = torch.randn(x.shape, generator=gen).to(dtype)
    a = x.clone().requires_grad_()
    b = x.clone().requires_grad_()
    leaky_relu(a, slope).backward(upstream)
    F.leaky_relu(b, slope).backward(upstream)
    assert_identical(a.grad, b.grad)
    # The derivative at 0 is the slope: upstream * slope, computed in float32 and rounded
    # to the dtype once, as torch's kernels do (a product of two fp16-rounded factors
    # differed from it in the last bit for some random upstream values).
    assert a.grad[0] == (upstream[0].float() * slope).to(dtype)


def test_inplace_writes_into_and_returns_input():
    x = special_values(torch.float32)
    expected = F.leaky_relu(x.clone(), 0.1)
    out = leaky_relu(x, 0.1, inplace=True)
    assert out is x
    assert_identical(x, expected)
    y = torch.randn(10)
    module_out = LeakyReLU(0.1, inplace=True)(y)
    assert module_out.data_ptr() == y.data_ptr()


def test_inplace_gradient_matches_builtin():
    x = torch.randn(50)
    a = x.clone().requires_grad_()
    b = x.clone().requires_grad_()
    leaky_relu(a * 1.0, 0.1, inplace=True).sum().backward()
    F.leaky_relu(b * 1.0, 0.1, inplace=True).sum().backward()
    assert_identical(a.grad, b.grad)


def test_scriptable_and_same_values():
    scripted_fn = torch.jit.script(leaky_relu)
    scripted_mod = torch.jit.script(LeakyReLU(0.05))
    x = special_values(torch.float32)
    assert_identical(scripted_fn(x, 0.05, False), F.leaky_relu(x, 0.05))
    assert_identical(scripted_mod(x), F.leaky_relu(x, 0.05))


def test_module_repr_names_arguments():
    assert "negative_slope=0.2" in repr(LeakyReLU(0.2))
    assert "inplace=True" in repr(LeakyReLU(0.2, inplace=True))

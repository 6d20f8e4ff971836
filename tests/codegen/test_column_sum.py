"""The column-sum kernel that finishes a norm backward's weight gradient: the programs' partial rows added in
fixed order and cast, against ATen, for any row and column count, bitwise the same on every run."""
import pytest
import torch

from flashfx.codegen import column_sum


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows,columns", [(1, 1), (3, 40), (33, 70), (70, 129)])
def test_column_sum_matches_aten(rows, columns, dtype):
    partials = torch.randn(rows, columns)
    got = column_sum.sum_partials(partials, (columns,), dtype)
    want = partials.double().sum(0).to(dtype)
    assert got.dtype == dtype and got.shape == (columns,)
    tol = 1e-5 if dtype == torch.float32 else 1e-3
    torch.testing.assert_close(got, want, atol=tol * rows, rtol=tol)


def test_column_sum_reshapes_and_repeats_bitwise():
    partials = torch.randn(45, 6 * 7)
    first = column_sum.sum_partials(partials, (6, 7), torch.float32)
    assert first.shape == (6, 7)
    assert torch.equal(first, column_sum.sum_partials(partials, (6, 7), torch.float32))


@pytest.mark.parametrize("bad", [torch.randn(4, 8, dtype=torch.float64), torch.randn(8, 4).t(), torch.randn(8)])
def test_column_sum_rejects_what_it_cannot_read(bad):
    with pytest.raises(ValueError, match="contiguous 2-D float32"):
        column_sum.sum_partials(bad, (bad.shape[-1],), torch.float32)

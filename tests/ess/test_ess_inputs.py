"""ESS engine: bad inputs raise errors that name the problem; dtype rules; degenerate shapes."""

from __future__ import annotations

import pytest
import torch

from ess_train.ess import (
    DenseOperator,
    RecurrentOperator,
    entropy_ess,
    hankel_singular_values,
    tolerance_ess,
)

F32, F64 = torch.float32, torch.float64


def _rec(B=2, L=10, N=3, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(B, L, N, generator=g, dtype=dtype)
    return RecurrentOperator(
        a, torch.randn(B, L, N, generator=g, dtype=dtype), torch.randn(B, L, N, generator=g, dtype=dtype)
    )


# ----------------------------------------------------------------------------------------------
# bad operators


def test_non_square_T():
    with pytest.raises(ValueError, match=r"square.*\(4, 5\)"):
        entropy_ess(torch.zeros(4, 5))


def test_non_causal_T_reports_largest_entry():
    T = torch.tril(torch.ones(6, 6))
    T[1, 4] = 0.5
    T[0, 5] = 2.0
    with pytest.raises(ValueError, match=r"not causal.*2\.000e\+00.*\[0, 5\]"):
        entropy_ess(T)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite(bad):
    T = torch.tril(torch.ones(5, 5))
    T[3, 1] = bad
    with pytest.raises(ValueError, match="T .*non-finite"):
        entropy_ess(DenseOperator(T))
    op = _rec()
    b = op.b.clone()
    b[0, 2, 1] = bad
    with pytest.raises(ValueError, match="b .*non-finite"):
        RecurrentOperator(op.a, b, op.c)
    # operators built without validation are checked by the engine
    with pytest.raises(ValueError, match="b .*non-finite"):
        entropy_ess(RecurrentOperator(op.a, b, op.c, validate=False))
    with pytest.raises(ValueError, match="T .*non-finite"):
        tolerance_ess(DenseOperator(T, validate=False))


def test_integer_dtypes():
    with pytest.raises(TypeError, match="floating-point.*int64"):
        entropy_ess(torch.tril(torch.ones(4, 4, dtype=torch.long)))
    a = torch.ones(1, 4, 2, dtype=torch.int32)
    with pytest.raises(TypeError, match="a must be a floating-point"):
        RecurrentOperator(a, torch.ones(1, 4, 2), torch.ones(1, 4, 2))


def test_mismatched_recurrent_shapes():
    a, b, c = torch.ones(2, 8, 3), torch.ones(2, 8, 3), torch.ones(2, 8, 3)
    with pytest.raises(ValueError, match=r"b and c .*\(2, 8, 3\).*\(2, 8, 4\)"):
        RecurrentOperator(a, b, torch.ones(2, 8, 4))
    with pytest.raises(ValueError, match=r"a must have shape.*\(2, 7, 3\)"):
        RecurrentOperator(torch.ones(2, 7, 3), b, c)
    with pytest.raises(ValueError, match=r"a must have shape.*\(2, 8, 3, 2\)"):
        RecurrentOperator(torch.ones(2, 8, 3, 2), b, c)


def test_wrong_operator_type_and_method():
    with pytest.raises(TypeError, match="op must be .*list"):
        entropy_ess([[1.0]])
    with pytest.raises(ValueError, match="method must be"):
        entropy_ess(_rec(), method="svd")
    with pytest.raises(ValueError, match="gramian.*RecurrentOperator"):
        entropy_ess(torch.eye(4), method="gramian")
    with pytest.raises(ValueError, match="chunk_elements"):
        entropy_ess(_rec(), chunk_elements=0)


# ----------------------------------------------------------------------------------------------
# positions and thresholds


@pytest.mark.parametrize("pos,bad", [([3, 10], 10), ([-1, 2], -1), ([12], 12)])
def test_positions_out_of_range(pos, bad):
    for op in (_rec(L=10), torch.tril(torch.ones(10, 10))):
        with pytest.raises(ValueError, match=rf"position {bad} .*L=10"):
            hankel_singular_values(op, pos)


def test_positions_types():
    op = _rec()
    with pytest.raises(TypeError, match="integer tensor"):
        entropy_ess(op, torch.tensor([1.0, 2.0]))
    with pytest.raises(TypeError, match="ints"):
        entropy_ess(op, [1, 2.5])
    with pytest.raises(TypeError, match="bool"):
        entropy_ess(op, True)
    with pytest.raises(ValueError, match="1-D"):
        entropy_ess(op, torch.tensor([[1, 2]]))
    assert entropy_ess(op, torch.tensor(3)).shape == (2, 1)
    # one meaning of an int across the product: "k evenly spaced positions" (measure); the engine refuses it
    with pytest.raises(TypeError, match=r"positions=3 is ambiguous.*\[3\] for position 3"):
        entropy_ess(op, 3)


def test_threshold_arguments():
    op = _rec()
    with pytest.raises(ValueError, match="rtol"):
        tolerance_ess(op, rtol=-1.0)
    with pytest.raises(ValueError, match="scale"):
        tolerance_ess(op, scale=-1.0)
    # atol above every singular value: nothing counts; rtol = 0 and atol = 0: every non-zero one
    s = hankel_singular_values(op)
    assert bool((tolerance_ess(op, atol=float(s.max()) * 2) == 0).all())
    assert torch.equal(tolerance_ess(op, rtol=0.0), (s > 0).sum(-1))


# ----------------------------------------------------------------------------------------------
# dtypes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_float_dtypes_are_kept(dtype):
    op = _rec(dtype=dtype)
    assert hankel_singular_values(op).dtype == dtype
    assert entropy_ess(op).dtype == dtype
    assert entropy_ess(op.dense()).dtype == dtype
    assert tolerance_ess(op).dtype == torch.long


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtypes_computed_and_returned_in_float32(dtype):
    """A half-precision operator's ESS is its float32 values' ESS, in float32 (not rounded back: issue 22)."""
    op32 = _rec(dtype=torch.float32)
    op = RecurrentOperator(op32.a.to(dtype), op32.b.to(dtype), op32.c.to(dtype))
    ref = RecurrentOperator(*(x.float() for x in (op.a, op.b, op.c)))  # the same values, in float32
    for method in ("gramian", "dense"):
        e = entropy_ess(op, method=method)
        assert e.dtype == F32
        assert torch.equal(e, entropy_ess(ref, method=method))
        assert torch.equal(tolerance_ess(op, method=method), tolerance_ess(ref, method=method))
    T = ref.dense().to(dtype)
    assert hankel_singular_values(T).dtype == F32
    assert torch.equal(entropy_ess(T), entropy_ess(T.float()))


def test_mixed_dtypes_promote():
    op = _rec(dtype=torch.float32)
    mixed = RecurrentOperator(op.a.double(), op.b, op.c)
    assert entropy_ess(mixed).dtype == F64


# ----------------------------------------------------------------------------------------------
# degenerate shapes


def test_sequence_length_one():
    assert hankel_singular_values(torch.ones(2, 1, 1)).shape == (2, 1, 0)
    assert entropy_ess(torch.ones(2, 1, 1)).tolist() == [[0.0], [0.0]]
    assert tolerance_ess(torch.ones(2, 1, 1)).tolist() == [[0], [0]]
    op = RecurrentOperator(torch.ones(2, 1, 3), torch.ones(2, 1, 3), torch.ones(2, 1, 3))
    assert hankel_singular_values(op).shape == (2, 1, 3)
    for method in ("gramian", "dense"):
        assert entropy_ess(op, method=method).tolist() == [[0.0], [0.0]]
        assert tolerance_ess(op, method=method).tolist() == [[0], [0]]


def test_empty_batch():
    assert hankel_singular_values(torch.zeros(0, 6, 6)).shape == (0, 6, 3)
    assert entropy_ess(torch.zeros(0, 6, 6)).shape == (0, 6)
    assert tolerance_ess(torch.zeros(0, 6, 6)).shape == (0, 6)
    z = torch.zeros(0, 4, 6, 3)
    op = RecurrentOperator(z, z, z)
    for method in ("gramian", "dense"):
        assert hankel_singular_values(op, method=method).shape == (0, 4, 6, 3)
        assert entropy_ess(op, [1, 2], method=method).shape == (0, 4, 2)
        assert tolerance_ess(op, method=method).shape == (0, 4, 6)
    full = RecurrentOperator(torch.zeros(0, 6, 3, 3), torch.zeros(0, 6, 3), torch.zeros(0, 6, 3))
    assert entropy_ess(full).shape == (0, 6)


def test_no_batch_dims_and_zero_length():
    op = _rec(B=1)
    single = RecurrentOperator(op.a[0], op.b[0], op.c[0])
    torch.testing.assert_close(entropy_ess(single), entropy_ess(op)[0])
    assert entropy_ess(torch.zeros(3, 0, 0)).shape == (3, 0)
    assert entropy_ess(RecurrentOperator(*(torch.zeros(3, 0, 2) for _ in range(3)))).shape == (3, 0)


def test_no_forbidden_imports():
    """The engine imports torch, the standard library and itself only (every module, subpackages too)."""
    import ast
    import pathlib
    import sys

    import ess_train.ess as ess

    files = sorted(pathlib.Path(ess.__path__[0]).rglob("*.py"))
    assert len(files) >= 8  # the operators package is walked too
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                ok = top in ("torch", "__future__") or top in sys.stdlib_module_names
                ok = ok or name == "ess_train.ess" or name.startswith("ess_train.ess.")
                assert ok, f"{path.name} imports {name}: the engine imports torch and itself only"

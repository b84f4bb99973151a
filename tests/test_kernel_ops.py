"""The compiled kernels as PyTorch custom operators: their schemas and fake implementations pass
torch.library.opcheck, and compressed layers trace under torch.compile and torch.export."""

from __future__ import annotations

import pytest
import torch

from format_checks import assert_within_kernel_bound, outlier_weight
from matpress.formats import CodebookFormat, IntFormat, TernaryFormat
from matpress.kernels import build, lowbit
from matpress.nn.layers import CompressedLinear

OUT, IN = 37, 300
EPS = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def native():
    if build.compiler() is None:
        pytest.skip("no C++ compiler here: no operators are built (the formats' own matmul runs)")
    return build.load_library()


def layer(fmt) -> CompressedLinear:
    torch.manual_seed(1)
    return CompressedLinear(fmt, torch.randn(OUT))


FORMATS = {
    "int4-g64": lambda: IntFormat.encode(outlier_weight(0, OUT, IN), bits=4, group_size=64),
    "int3-g100": lambda: IntFormat.encode(outlier_weight(1, OUT, IN), bits=3, group_size=100),
    "int8-ch": lambda: IntFormat.encode(outlier_weight(2, OUT, IN), bits=8, group_size=None),
    "ternary-g64": lambda: TernaryFormat.encode(outlier_weight(3, OUT, IN), group_size=64),
    "codebook4-g32-iq4nl": lambda: CodebookFormat.encode(outlier_weight(4, OUT, IN), bits=4, group_size=32, table="iq4nl"),
}


def op_args(layout: lowbit.LowbitLayout, x: torch.Tensor) -> list:
    return [layout.codes, layout.scales, layout.zeros, layout.levels, x, layout.operator_geometry]


def test_the_geometry_argument_follows_its_field_order():
    layout = lowbit.layout_of(FORMATS["int3-g100"]())
    named = dict(zip(build.GEOMETRY_FIELDS, layout.operator_geometry, strict=True))
    geo = layout.geometry
    assert named == {"bits": 3, "n_blocks": geo.n_blocks, "padded": geo.padded, "in_features": IN, "group": 100,
                     "sub": geo.sub, "width": geo.width, "out_features": OUT, "scales_nonfinite": 0}


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_operators_pass_opcheck(name, native):
    layout = lowbit.layout_of(FORMATS[name]())
    for x in (torch.randn(1, IN), torch.randn(2, 5, IN), torch.randn(0, IN), torch.randn(3, IN).bfloat16()):
        torch.library.opcheck(native.matmul, op_args(layout, x))
    torch.library.opcheck(native.decode_bf16, (layout.codes, layout.scales, layout.zeros, layout.levels, layout.operator_geometry))


def test_operator_keeps_shape_and_dtype_of_the_input(native):
    fmt = FORMATS["int4-g64"]()
    layout = lowbit.layout_of(fmt)
    x = torch.randn(2, 3, IN)
    y = lowbit.lowbit_matmul(layout, x)
    assert y.shape == (2, 3, OUT) and y.dtype == torch.float32
    assert_within_kernel_bound(y, fmt, x, fmt.group)
    # a non-contiguous bf16 input is converted in the operator: the same numbers as its fp32 copy
    xb = torch.randn(IN, 4).bfloat16().T
    yb = lowbit.lowbit_matmul(layout, xb)
    assert yb.dtype == torch.bfloat16 and torch.equal(yb, lowbit.lowbit_matmul(layout, xb.float().contiguous()).bfloat16())


def test_operator_refuses_a_layout_that_does_not_match_its_geometry(native):
    layout = lowbit.layout_of(FORMATS["int4-g64"]())
    args = op_args(layout, torch.randn(1, IN))
    args[0] = layout.codes[:, :-1].contiguous()
    with pytest.raises(RuntimeError, match="codes hold"):
        native.matmul(*args)


def test_operator_refuses_lookup_tables_of_the_wrong_shape_or_width(native):
    layout = lowbit.layout_of(FORMATS["codebook4-g32-iq4nl"]())
    args = op_args(layout, torch.randn(1, IN))
    args[3] = layout.levels[:, :32].contiguous()
    with pytest.raises(RuntimeError, match="levels must be a contiguous uint8 CPU tensor of 64 bytes"):
        native.matmul(*args)
    eight = lowbit.layout_of(FORMATS["int8-ch"]())
    args = op_args(eight, torch.randn(1, IN))
    args[3] = layout.levels
    with pytest.raises(RuntimeError, match="lookup tables are for codes of up to 4 bits, not 8"):
        native.matmul(*args)


def test_layout_stores_codes_of_the_blocks_that_hold_columns_only():
    """300 columns in groups of 64 are 5 blocks; the scale arithmetic pads them to a quad of 8, the
    codes stay at 5 blocks of one 128-byte 4-bit chunk per tile."""
    layout = lowbit.layout_of(FORMATS["int4-g64"]())
    geo = layout.geometry
    assert (geo.code_blocks, geo.n_blocks) == (5, 8)
    assert layout.codes.shape == (-(-OUT // lowbit.TILE), 5 * 128)
    assert layout.scales.numel() == layout.codes.shape[0] * 8 * lowbit.TILE


def test_blocks_of_32_columns_share_their_chunks():
    """300 columns in groups of 32 are 10 blocks of 32 columns: 5 chunks of 64 columns (4-bit: 128
    bytes a tile each), none padded to 64 columns of its own."""
    layout = lowbit.layout_of(IntFormat.encode(outlier_weight(4, OUT, IN), bits=4, group_size=32))
    geo = layout.geometry
    assert (geo.padded, geo.code_blocks, geo.code_chunks, geo.n_blocks) == (32, 10, 5, 12)
    assert layout.codes.shape[1] == 5 * 128


def test_operator_refuses_an_input_of_another_width_or_a_bad_geometry(native):
    layout = lowbit.layout_of(FORMATS["int4-g64"]())
    with pytest.raises(RuntimeError, match=f"x must be a CPU tensor of {IN} features in its last dimension, not 128"):
        native.matmul(*op_args(layout, torch.randn(1, 128)))
    args = op_args(layout, torch.randn(1, IN))
    args[-1] = layout.operator_geometry[:-1]
    with pytest.raises(RuntimeError, match="the geometry is 9 integers .* not 8"):
        native.matmul(*args)
    wider = list(layout.operator_geometry)
    wider[build.IN_FEATURES] = 500  # 8 blocks of columns against the 5 the codes hold
    with pytest.raises(RuntimeError, match="codes hold 640 bytes per tile, the geometry needs 1024"):
        native.matmul(*op_args(layout, torch.randn(1, 500))[:-1], wider)


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_compressed_layer_compiles_in_one_graph_to_the_same_output(name, native):
    module = layer(FORMATS[name]())
    torch.manual_seed(2)
    x = torch.randn(3, IN)
    with torch.no_grad():
        eager = module(x)
        torch._dynamo.reset()
        compiled = torch.compile(module, fullgraph=True, backend="inductor")(x)
    # the kernel's output is the same; the compiled graph adds the bias in fp32 as eager does (one
    # rounding each, so at most eps |y| apart if a fused add rounds differently)
    assert bool(((compiled - eager).abs() <= EPS * eager.abs()).all())


def test_compressed_layer_exports_with_the_operator(native):
    module = layer(FORMATS["int4-g64"]())
    x = torch.randn(4, IN)
    with torch.no_grad():
        eager = module(x)  # builds the kernel layout from the weights' values, which tracing cannot read
    program = torch.export.export(module, (x,))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert f"{build.NAMESPACE}.matmul.default" in targets
    with torch.no_grad():
        assert torch.equal(program.module()(x), eager)

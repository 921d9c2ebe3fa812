"""Dense (fully connected) layers on the GPU: y = act(x @ W^T + b), W shaped (units, features).

The three matrix products run through the kernel family of conv_gemm.py (tiled through
shared memory, or one thread per element for products with fewer than
conv.SIMPLE_BELOW rows), with x (B, F), W (U, F) and y (B, U) read as flat arrays:

    forward        M = B, N = U, K = F: A = x, B = W^T; epilogue + b, activation
    input grad     M = B, N = F, K = U: A = g, B = W
    weight grad    M = U, N = F, K = B: A = g^T, B = x  (split along K for large batches)

where g = dy * act'(y) comes from `prepare`, one thread per unit looping over the batch:
it owns column u of g and the bias gradient db[u], so no two threads write one address.
The split weight gradient sums per-split slices in order (conv_gemm.reduce_splits):
race-free and deterministic.
"""

from __future__ import annotations

from typing import Any

from convdsl.codegen import cache
from convdsl.codegen.activations import apply_act
from convdsl.codegen.cuda import conv_gemm
from convdsl.codegen.cuda.activation import FusedAct, derivative
from convdsl.codegen.cuda.common import FLAT, JIT, DeviceArray, Launch, grid_for, zeros
from convdsl.codegen.cuda.conv import SIMPLE_BELOW
from convdsl.codegen.cuda.conv_gemm import Operand, Product, Tiles, unsigned
from convdsl.codegen.layer import KernelLayer, LayerSetup, Mode, builder
from convdsl.codegen.source import Code
from convdsl.codegen.spec import KernelSpec
from convdsl.ir.ops import DenseAttrs, Op


def _rows(stride: int, array: str) -> Operand:
    """An operand read along k from rows of length `stride`: array[mn * stride + k]."""
    def setup(code: Code, s: str, mn: str) -> None:
        code.line(f"row{s} = {mn} * {stride}")

    def load(code: Code, s: str, k: str, target: str) -> None:
        code.line(f"{target} = {array}[{unsigned(f'row{s} + {k}')}]")

    return Operand(True, setup, load)


def _columns(stride: int, array: str) -> Operand:
    """An operand read across rows: array[k * stride + mn]."""
    def setup(code: Code, s: str, mn: str) -> None:
        code.line(f"col{s} = {mn}")

    def load(code: Code, s: str, k: str, target: str) -> None:
        code.line(f"{target} = {array}[{unsigned(f'{k} * {stride} + col{s}')}]")

    return Operand(False, setup, load)


def products(spec: KernelSpec) -> tuple[Product, Product, Product]:
    (batch, features), (units, _), _ = spec.shapes
    bias = bool(spec.option("bias"))
    dtype = spec.dtype

    def forward_store(code: Code, m: str, n: str, value: str) -> None:
        code.line(f"v = {value} + b[{n}]" if bias else f"v = {value}")
        code.line(f"y[{m} * {units} + {n}] = {apply_act(spec, 'v')}")

    def input_store(code: Code, m: str, n: str, value: str) -> None:
        code.line(f"dx[{m} * {features} + {n}] = {value}")

    splits = int(spec.option("splits"))
    size = units * features

    def weight_store(code: Code, m: str, n: str, value: str) -> None:
        at = f"{m} * {features} + {n}"
        code.line(f"dw[split * {size} + {at}] = {value}" if splits > 1
                  else f"dw[{at}] = {value}")

    tiles = {name: Tiles.from_option(spec.option(f"{name}_tiles"))
             for name in ("forward", "input", "weight")}
    return (
        Product("forward", "x, w, b, y" if bias else "x, w, y", batch, units, features, 1,
                _rows(features, "x"), _rows(features, "w"), forward_store, dtype,
                tiles["forward"]),
        Product("input_grad", "gy, w, dx", batch, features, units, 1, _rows(units, "gy"),
                _columns(features, "w"), input_store, dtype, tiles["input"]),
        Product("weight_grad", "gy, x, dw", units, features, batch, 1, _columns(units, "gy"),
                _columns(features, "x"), weight_store, dtype, tiles["weight"], splits),
    )


def _render_prepare(code: Code, spec: KernelSpec) -> None:
    """prepare(y, dy, g[, db], act_grad): g = dy * act'(y) (dy when not act_grad), and
    db = the sum of g over the batch; one thread per unit."""
    (batch, _), (units, _), _ = spec.shapes
    bias = bool(spec.option("bias"))
    code.line(JIT)
    with code.block(f"def prepare(y, dy, g{', db' if bias else ''}, act_grad)"):
        code.line("u = cuda.grid(1)")
        with code.block(f"if u < {units}"):
            code.line(f"total = {conv_gemm.zero(spec.dtype)}")
            with code.block(f"for n in range({batch})"):
                code.line(f"at = n * {units} + u")
                code.line("v = dy[at]")
                if not _plain(spec):
                    with code.block("if act_grad"):
                        code.line("h = y[at]")
                        code.line(f"v = v * {derivative(spec, 'h')}")
                code.line("g[at] = v")
                code.line("total += v")
            if bias:
                code.line("db[u] = total")
    code.line()


def _plain(spec: KernelSpec) -> bool:
    """Whether the spec has no elementwise activation in its kernels."""
    return str(spec.option("act")) == "identity"


@cache.template("cuda_dense")
def render(spec: KernelSpec) -> str:
    code = Code()
    code.line(conv_gemm.prelude())
    for product in products(spec):
        conv_gemm.render(code, product)
    splits = int(spec.option("splits"))
    if splits > 1:
        (_, features), (units, _), _ = spec.shapes
        conv_gemm.render_reduce_splits(code, splits, units * features)
    _render_prepare(code, spec)
    return code.text()


def plan(setup: LayerSetup) -> tuple[dict[str, Any], str]:
    """Tiles per product and the weight gradient's K splits, as spec options; the reason."""
    attrs = setup.layer.attrs
    assert isinstance(attrs, DenseAttrs)
    batch, features, units = setup.batch, setup.in_shapes[0][0], attrs.units
    shapes = {"forward": (batch, units, features), "input": (batch, features, units),
              "weight": (units, features, batch)}
    options: dict[str, Any] = {}
    kinds = []
    for name, (m, n, k) in shapes.items():
        tiled = setup.algo == "gemm" or (setup.algo != "direct"
                                         and (m >= SIMPLE_BELOW or name == "weight"))
        tiles = conv_gemm.choose_tiles(m, n, k) if tiled else None
        options[f"{name}_tiles"] = None if tiles is None else tiles.as_option()
        kinds.append(f"{name} {'tiled' if tiles else 'simple'}")
        if name == "weight":
            options["splits"] = conv_gemm.choose_splits(m, n, k, 1, tiles)
    return options, f"matrix products on the GPU: {', '.join(kinds)}"


class DenseLayer(KernelLayer):
    def __init__(self, setup: LayerSetup) -> None:
        super().__init__(setup)
        attrs = setup.layer.attrs
        assert isinstance(attrs, DenseAttrs)
        self.algorithm = "gemm"
        options, self.reason = plan(setup)
        self.bias = attrs.bias
        self.act = FusedAct(attrs.act, setup.batched_output, setup.dtype)
        spec = KernelSpec.make("cuda_dense", setup.dtype,
                               (setup.batched_inputs[0], (attrs.units, setup.in_shapes[0][0]),
                                setup.batched_output),
                               bias=self.bias, **self.act.options(), **options)
        self.specs = [spec, *self.act.specs]
        module = cache.load(spec)
        forward, backward, weight = products(spec)
        self._forward = conv_gemm.configured(module, forward)
        self._input_grad = conv_gemm.configured(module, backward)
        self._weight_grad = conv_gemm.configured(module, weight)
        self.splits = weight.splits
        size = attrs.units * setup.in_shapes[0][0]
        self._part = zeros((self.splits * size,), setup.dtype) if self.splits > 1 else None
        self._reduce = (Launch(module.reduce_splits, *grid_for(size), every=FLAT)
                        if self.splits > 1 else None)
        self._prepare = Launch(module.prepare, *grid_for(attrs.units), every=FLAT)
        self.y = zeros(setup.batched_output, setup.dtype)
        self.g = zeros(setup.batched_output, setup.dtype)  # the gradient before the activation
        self.dx = zeros(setup.batched_inputs[0], setup.dtype)
        self.x: DeviceArray | None = None

    def forward(self, inputs: list[DeviceArray], params: dict[str, DeviceArray],
                mode: Mode) -> DeviceArray:
        self.x = inputs[0]
        bias = [params["bias"]] if self.bias else []
        self._forward(self.x, params["weight"], *bias, self.y)
        self.act.forward(self.y)
        return self.y

    def backward(self, grad_output: DeviceArray, params: dict[str, DeviceArray],
                 grads: dict[str, DeviceArray], skip_act: bool = False
                 ) -> list[DeviceArray | None]:
        if self.x is None:
            raise RuntimeError(f"'{self.name}': backward before forward")
        act_grad = self.act.backward(self.y, grad_output, skip_act)
        g = grad_output
        if self.bias or act_grad:
            bias = [grads["bias"]] if self.bias else []
            self._prepare(self.y, g, self.g, *bias, act_grad)
            g = self.g
        w = params["weight"]
        if self.input_grad_needed:
            self._input_grad(g, w, self.dx)
        dw = grads["weight"]
        if self._part is not None and self._reduce is not None:
            self._weight_grad(g, self.x, self._part)
            self._reduce(self._part, dw)
        else:
            self._weight_grad(g, self.x, dw)
        return [self.dx if self.input_grad_needed else None]


@builder(Op.DENSE, device="cuda")
def build_dense(setup: LayerSetup) -> KernelLayer:
    return DenseLayer(setup)

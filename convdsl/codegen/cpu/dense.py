"""Dense (fully connected) layers: y = act(x @ W.T + b), with W shaped (units, features).

The matrix products run through NumPy's `@` outside Numba, which calls BLAS directly
(inside @njit, `@` would need SciPy's BLAS bindings), into preallocated buffers. A
generated kernel does the rest: the bias and activation epilogue of forward, and in
backward the gradient through the activation together with the bias gradient (a sum over
the batch). That kernel runs in parallel over units, so every iteration owns one column
of the gradient and one bias entry.
"""

from __future__ import annotations

import numpy as np

from convdsl.codegen import cache
from convdsl.codegen.activations import FusedAct, apply_act, gradient_lines, is_identity
from convdsl.codegen.layer import KernelLayer, LayerSetup, Mode, builder
from convdsl.codegen.source import PRELUDE, Code, jit
from convdsl.codegen.spec import KernelSpec
from convdsl.ir.ops import DenseAttrs, Op


@cache.template("dense_epilogue", sized=False)
def _render_dense_epilogue(spec: KernelSpec) -> str:
    """forward(y[, b]): y = act(y + b) in place; backward(y, dy, g[, db], act_grad):
    g = dy * act'(y) and db = the sum of g over the batch. (N, units) of any size."""
    bias = bool(spec.option("bias"))
    code = Code()
    code.line(PRELUDE)
    code.line(jit())
    with code.block("def forward(y, b)" if bias else "def forward(y)"), \
            code.block("for n in prange(y.shape[0])"), code.block("for u in range(y.shape[1])"):
        code.line("v = y[n, u] + b[u]" if bias else "v = y[n, u]")
        code.line(f"y[n, u] = {apply_act(spec, 'v')}")
    code.line()
    code.line(jit())
    with code.block(f"def backward(y, dy, g{', db' if bias else ''}, act_grad)"), \
            code.block("for u in prange(y.shape[1])"):
        code.line("total = 0.0")
        with code.block("for n in range(y.shape[0])"):
            gradient_lines(code, spec, "gn", "dy[n, u]", "y[n, u]")
            code.line("g[n, u] = gn")
            code.line("total += gn")
        if bias:
            code.line("db[u] = total")
    return code.text()


class DenseLayer(KernelLayer):
    def __init__(self, setup: LayerSetup) -> None:
        super().__init__(setup)
        attrs = setup.layer.attrs
        assert isinstance(attrs, DenseAttrs)
        self.algorithm = "gemm"
        self.reason = "NumPy matmul (BLAS) with a generated bias and activation epilogue"
        self.bias = attrs.bias
        self.act = FusedAct(attrs.act, setup.batched_output, setup.dtype)
        self.out = setup.output_buffer()
        self.dx = setup.input_buffer()
        # the gradient before the activation: a workspace of the layer's own, never the
        # output (which a setup may hand in, see codegen/buffers.py)
        self.g = np.zeros(setup.batched_output, dtype=setup.dtype)
        self._module = None
        if self.bias or not is_identity(self.act.in_kernel):
            spec = KernelSpec.make("dense_epilogue", setup.dtype, (setup.batched_output,),
                                   bias=self.bias, **self.act.options())
            self.specs.append(spec)
            self._module = cache.load(spec)
        self.specs += self.act.specs
        self.x: np.ndarray | None = None

    def forward(self, inputs: list[np.ndarray], params: dict[str, np.ndarray],
                mode: Mode) -> np.ndarray:
        self.x = inputs[0]
        np.matmul(self.x, params["weight"].T, out=self.out)
        if self._module is not None:
            self._module.forward(self.out, *([params["bias"]] if self.bias else []))
        self.act.forward(self.out)
        return self.out

    def backward(self, grad_output: np.ndarray, params: dict[str, np.ndarray],
                 grads: dict[str, np.ndarray], skip_act: bool = False
                 ) -> list[np.ndarray | None]:
        if self.x is None:
            raise RuntimeError(f"'{self.name}': backward before forward")
        act_grad = self.act.backward(self.out, grad_output, skip_act)
        g = grad_output
        if self._module is not None and (self.bias or act_grad):
            self._module.backward(self.out, grad_output, self.g,
                                  *([grads["bias"]] if self.bias else []), act_grad)
            g = self.g
        np.matmul(g.T, self.x, out=grads["weight"])
        if not self.input_grad_needed:
            return [None]
        np.matmul(g, params["weight"], out=self.dx)
        return [self.dx]


@builder(Op.DENSE)
def build_dense(setup: LayerSetup) -> KernelLayer:
    return DenseLayer(setup)

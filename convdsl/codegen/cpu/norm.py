"""Batch normalisation kernels, training and inference, any spatial rank or a flat input.

The kernels see the input as (N, C, S): S positions per channel (S = 1 for a flat vector
of C features). Every statistic is per channel, so the parallel loop runs over channels:
each iteration reduces over its own (N, S) slice and writes only its own channel of the
output, of the input gradient, of the running statistics and of the parameter gradients.
Reductions accumulate in float64 (a channel may hold N*H*W values), the rest runs in the
array's dtype.

Training normalises with the batch mean and biased variance and updates the running
statistics in place with the unbiased variance, as PyTorch does; inference uses the running
statistics. Forward keeps the mean and 1/sqrt(var + eps) it used per channel, so backward
recomputes xhat = (x - mean) / std from the input instead of storing it.

Fused with the residual add after it (passes/fusion.py), the kernels take the residual
r as a second input, y = act(bn(x) + r), and backward writes r's gradient, the
gradient after the activation, in the pass that sums it anyway.
"""

from __future__ import annotations

import math

import numpy as np

from convdsl.codegen import cache
from convdsl.codegen.activations import FusedAct, apply_act, gradient_lines
from convdsl.codegen.layer import KernelLayer, LayerSetup, Mode, builder
from convdsl.codegen.source import PRELUDE, Code, jit
from convdsl.codegen.spec import KernelSpec
from convdsl.ir.ops import BatchNormAttrs, Op


@cache.template("batchnorm", sized=False)
def _render_batchnorm(spec: KernelSpec) -> str:
    """forward_train, forward_eval, backward_train, backward_eval over (N, C, S) arrays
    of any size (read from x): the loops wait on memory, not on their bounds."""
    affine = bool(spec.option("affine"))
    eps = float(spec.option("eps"))
    momentum = float(spec.option("momentum"))
    keep = 1.0 - momentum
    scale_arg, grad_args = ("w, b, ", ", dw, db") if affine else ("", "")
    residual = bool(spec.option("residual"))
    res_arg, dres_arg = ("res, ", "dres, ") if residual else ("", "")
    every_value = [("n", "range(batch)"), ("s", "range(positions)")]

    code = Code()
    code.line(PRELUDE)

    def sizes(count: bool) -> None:
        code.line("batch, channels, positions = x.shape")
        if count:  # what the batch statistics divide by
            code.line("count = batch * positions  # values per channel")

    def normalise_into_y() -> None:
        """y = act((x - mu) * r * w + b) over channel c, given mu and r."""
        code.line("scale = r * w[c]" if affine else "scale = r")
        code.line("shift = b[c]" if affine else "shift = 0.0")
        with code.loops(every_value):
            code.line("v = (x[n, c, s] - mu) * scale + shift")
            if residual:
                code.line("v = v + res[n, c, s]")
            code.line(f"y[n, c, s] = {apply_act(spec, 'v')}")

    code.line(jit())
    with code.block(f"def forward_train(x, {res_arg}{scale_arg}y, mean, inv, running_mean, "
                    "running_var)"):
        sizes(True)
        code.line("unbias = count / (count - 1)  # forward refuses a count of 1")
        with code.block("for c in prange(channels)"):
            code.line("total = 0.0")
            with code.loops(every_value):
                code.line("total += x[n, c, s]")
            code.line("mu = total / count")
            code.line("spread = 0.0")  # two passes: no cancellation in E[x^2] - E[x]^2
            with code.loops(every_value):
                code.line("d = x[n, c, s] - mu")
                code.line("spread += d * d")
            code.line("var = spread / count")  # biased: what normalises the batch
            code.line(f"r = 1.0 / math.sqrt(var + {eps!r})")
            code.line("mean[c] = mu")
            code.line("inv[c] = r")
            # PyTorch's update, with the unbiased variance
            code.line(f"running_mean[c] = {keep!r} * running_mean[c] + {momentum!r} * mu")
            code.line(f"running_var[c] = {keep!r} * running_var[c] + {momentum!r} * var * "
                      "unbias")
            normalise_into_y()
    code.line()
    code.line(jit())
    with code.block(f"def forward_eval(x, {res_arg}{scale_arg}y, mean, inv, running_mean, "
                    "running_var)"):
        sizes(False)
        with code.block("for c in prange(channels)"):
            code.line("mu = running_mean[c]")
            code.line(f"r = 1.0 / math.sqrt(running_var[c] + {eps!r})")
            code.line("mean[c] = mu")
            code.line("inv[c] = r")
            normalise_into_y()

    def sums() -> None:
        """sum_g = sum of g, sum_gx = sum of g * xhat over channel c."""
        code.line("mu = mean[c]")
        code.line("r = inv[c]")
        code.line("sum_g = 0.0")
        code.line("sum_gx = 0.0")
        with code.loops(every_value):
            gradient_lines(code, spec, "g", "dy[n, c, s]", "y[n, c, s]")
            if residual:
                code.line("dres[n, c, s] = g")
            code.line("sum_g += g")
            code.line("sum_gx += g * (x[n, c, s] - mu) * r")
        if affine:
            code.line("dw[c] = sum_gx")
            code.line("db[c] = sum_g")
        code.line("gain = r * w[c]" if affine else "gain = r")

    w_arg = "w, " if affine else ""
    signature = f"(x, y, dy, {w_arg}mean, inv, {dres_arg}dx{grad_args}, act_grad)"
    code.line()
    code.line(jit())
    with code.block(f"def backward_train{signature}"):
        sizes(True)
        with code.block("for c in prange(channels)"):
            sums()
            # the batch statistics depend on x too: remove g's mean and its xhat part
            code.line("mean_g = sum_g / count")
            code.line("mean_gx = sum_gx / count")
            with code.loops(every_value):
                gradient_lines(code, spec, "g", "dy[n, c, s]", "y[n, c, s]")
                code.line("xhat = (x[n, c, s] - mu) * r")
                code.line("dx[n, c, s] = (g - mean_g - xhat * mean_gx) * gain")
    code.line()
    code.line(jit())
    with code.block(f"def backward_eval{signature}"):
        sizes(False)
        with code.block("for c in prange(channels)"):
            sums()  # fixed statistics: a per-channel affine map
            with code.loops(every_value):
                gradient_lines(code, spec, "g", "dy[n, c, s]", "y[n, c, s]")
                code.line("dx[n, c, s] = g * gain")
    return code.text()


class BatchNormLayer(KernelLayer):
    def __init__(self, setup: LayerSetup, residual: LayerSetup | None = None) -> None:
        """residual: the setup of a residual add fused after this layer (its other
        input is this layer's second input; its gradient buffer is that add's)."""
        super().__init__(setup)
        attrs = setup.layer.attrs
        assert isinstance(attrs, BatchNormAttrs)
        self.affine = attrs.affine
        batch, channels, *sizes = setup.batched_inputs[0]
        self.view = (batch, channels, math.prod(sizes))  # 1 position for a flat input
        self.count = batch * self.view[2]
        self.act = FusedAct(attrs.act, setup.batched_output, setup.dtype)
        self.spec = KernelSpec.make("batchnorm", setup.dtype, (self.view,), eps=attrs.eps,
                                    momentum=attrs.momentum, affine=attrs.affine,
                                    residual=residual is not None, **self.act.options())
        self.specs = [self.spec, *self.act.specs]
        self._module = cache.load(self.spec)
        self.out = setup.output_buffer()
        self.out_view = self.out.reshape(self.view)
        # True: backward writes the input's gradient over grad_output (which a backward
        # may overwrite, see KernelLayer; each value is read just before its gradient is
        # written) instead of into a buffer of the layer's own, made at the first
        # backward that needs it. A stage of a product and batch norm sets it
        # (codegen/fused.py): the product reads the gradient at once.
        self.in_place = False
        self._dx: np.ndarray | None = None
        # the statistics forward used, kept as computed
        self.mean = np.zeros(channels, dtype=np.float64)
        self.inv = np.zeros(channels, dtype=np.float64)
        self.x: np.ndarray | None = None
        self.train = False
        self._residual_grad: np.ndarray | None = None
        if residual is not None:  # the add's gradient buffer for its other input
            (chain,) = [index for index, source in enumerate(residual.layer.inputs)
                        if source == setup.layer.name]
            self._residual_grad = residual.input_buffer(1 - chain)

    def forward(self, inputs: list[np.ndarray], params: dict[str, np.ndarray],
                mode: Mode) -> np.ndarray:
        self.x = inputs[0].reshape(self.view)
        self.train = mode.train
        # the kernels' arguments after x: the residual (if fused), then w and b
        residual = [inputs[1].reshape(self.view)] if self._residual_grad is not None else []
        scale = residual + ([params["weight"], params["bias"]] if self.affine else [])
        if mode.train:
            if self.count < 2:
                raise ValueError(f"'{self.name}': batch norm in training needs more than "
                                 "one value per channel")
            self._module.forward_train(self.x, *scale, self.out_view, self.mean, self.inv,
                                       params["running_mean"], params["running_var"])
            tracked = params["num_batches_tracked"]
            tracked[...] += 1
        else:
            self._module.forward_eval(self.x, *scale, self.out_view, self.mean, self.inv,
                                      params["running_mean"], params["running_var"])
        self.act.forward(self.out)
        return self.out

    def backward(self, grad_output: np.ndarray, params: dict[str, np.ndarray],
                 grads: dict[str, np.ndarray], skip_act: bool = False
                 ) -> list[np.ndarray | None]:
        if self.x is None:
            raise RuntimeError(f"'{self.name}': backward before forward")
        act_grad = self.act.backward(self.out, grad_output, skip_act)
        weight = [params["weight"]] if self.affine else []
        param_grads = [grads["weight"], grads["bias"]] if self.affine else []
        run = self._module.backward_train if self.train else self._module.backward_eval
        dy = grad_output.reshape(self.view)
        if self.in_place and np.shares_memory(dy, grad_output):
            dx = grad_output
        else:
            if self._dx is None:
                self._dx = self.setup.input_buffer()
            dx = self._dx
        residual = ([] if self._residual_grad is None
                    else [self._residual_grad.reshape(self.view)])
        run(self.x, self.out_view, dy, *weight, self.mean, self.inv, *residual,
            dx.reshape(self.view), *param_grads, act_grad)
        return [dx, self._residual_grad] if self._residual_grad is not None else [dx]


@builder(Op.BATCHNORM)
def build_batchnorm(setup: LayerSetup) -> KernelLayer:
    return BatchNormLayer(setup)

"""Kernels for fused groups (convdsl/passes/fusion.py): one stage, several layers.

- product/norm/merge + activation: the host layer is built with the activation as
  its epilogue (its `act` option), so the generated kernel applies it before the
  value leaves cache, and its backward starts from the activation's derivative.
- convolution or dense + batch norm (+ activation): in training the product runs,
  then batch norm with the activation as its epilogue (batch statistics need the
  whole product first). In inference the normalisation is folded into the weights,
  w' = w * gamma / sqrt(var + eps) and b' = (b - mean) * gamma / sqrt(var + eps) + beta,
  and one product kernel with bias and activation computes the whole group.

- convolution or dense + batch norm + a residual add (+ activation): on the CPU batch
  norm's kernels add the residual before the activation and write its gradient going
  back; in inference the folded twin's epilogue adds it (Winograd), or the add's
  kernel runs in place after the twin. CUDA runs the add's kernel after batch norm.
- any of these + max or average pooling: the group before the pooling runs, then the
  pooling reads its output. Going back, the pooling's kernel scatters the gradient and
  multiplies it by the activation's derivative in one pass (on the CPU; CUDA runs the
  pooling's backward and then the activation's as before), and the group before it
  starts from the gradient before its activation.

A stage receives one dictionary of arrays: the host's own fields (`weight`,
`bias`), and the batch norm's under `bn.` (`bn.weight`, `bn.running_mean`, ...).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from convdsl.codegen import cache
from convdsl.codegen.activations import act_options
from convdsl.codegen.buffers import SharedSetup, with_buffers
from convdsl.codegen.cpu.conv import ConvLayer, lend_scratch
from convdsl.codegen.cpu.norm import BatchNormLayer
from convdsl.codegen.cpu.pool import pool_after
from convdsl.codegen.layer import KernelLayer, LayerSetup, Mode, build_layer
from convdsl.codegen.spec import KernelSpec
from convdsl.ir.ops import ActSpec, BatchNormAttrs, ConvAttrs, DenseAttrs, Layer
from convdsl.passes.fusion import FusionGroup
from convdsl.runtime.devices import device_named

NORM_PREFIX = "bn."
Arrays = dict[str, np.ndarray]


def build_stage(group: FusionGroup, setups: Mapping[str, LayerSetup]) -> KernelLayer:
    """The kernel layer that computes a whole group."""
    if group.pool is not None:
        return PooledLayer(build_stage(group.before_pool, setups), setups[group.pool.name],
                           group.before_pool.last_act)
    head = setups[group.head.name]
    if not group.fused:
        return build_layer(head)
    act = group.last_act  # a fused group's head has no activation of its own
    if group.norm is None:
        return build_layer(dataclasses.replace(head, layer=_with_act(head.layer, act),
                                               out_shape=setups[group.name].out_shape))
    add = group.residual
    if add is None:
        return ProductNormLayer(head, setups[group.norm.name], act)
    if head.device == "cpu":
        return ProductNormLayer(head, setups[group.norm.name], act, setups[add.name])
    # CUDA's batch norm takes no residual: the add runs after it, in the same stage
    return ResidualLayer(ProductNormLayer(head, setups[group.norm.name], None),
                         build_layer(dataclasses.replace(
                             setups[add.name], layer=_with_act(add, act))),
                         add.inputs.index(group.norm.name))


def stage_arrays(group: FusionGroup, by_layer: Mapping[str, Arrays]) -> Arrays:
    """The arrays a group's stage reads (or, for gradients, writes), by the names
    build_stage's kernels use; the same array objects as `by_layer` holds."""
    arrays = dict(by_layer.get(group.head.name, {}))
    if group.norm is not None:
        arrays.update({NORM_PREFIX + field: array
                       for field, array in by_layer.get(group.norm.name, {}).items()})
    return arrays


def _with_act(layer: Layer, act: ActSpec | None) -> Layer:
    if act is None:
        return layer
    attrs: Any = layer.attrs  # an op with an `act` option (see fusion.EPILOGUE_HOSTS)
    return dataclasses.replace(layer, attrs=dataclasses.replace(attrs, act=act))


def _split(arrays: Mapping[str, np.ndarray]) -> tuple[Arrays, Arrays]:
    own = {k: v for k, v in arrays.items() if not k.startswith(NORM_PREFIX)}
    norm = {k[len(NORM_PREFIX):]: v for k, v in arrays.items() if k.startswith(NORM_PREFIX)}
    return own, norm


class ProductNormLayer(KernelLayer):
    """A convolution or dense layer followed by batch norm (and an activation), on the
    CPU also by a residual add before the activation: inputs [x, residual]."""

    def __init__(self, product: LayerSetup, norm: LayerSetup, act: ActSpec | None,
                 residual: LayerSetup | None = None) -> None:
        super().__init__(product)
        attrs = norm.layer.attrs
        assert isinstance(attrs, BatchNormAttrs)
        self.eps = attrs.eps
        self.affine = attrs.affine
        act = act if act is not None else attrs.act
        self.device = device_named(product.device)
        # On the CPU the folded twin writes its output where the training product goes,
        # or into the concatenation's channels the executor gave batch norm as the
        # stage's output (fusion.concat_writes): a forward runs one of the two paths,
        # never both (backward() puts the folded output back after the one path that
        # needs both). Not into other memory handed to batch norm: a transient output's
        # (passes/memory.py) is free for the next once its readers have run, while a
        # backward after an inference recomputes from this stage's inputs, which may be
        # such an output. CUDA layers allocate their own.
        self._twin_output: np.ndarray | None = None
        twin = product  # the folded twin's setup
        if self.device.name == "cpu":
            joined = isinstance(norm, SharedSetup) and norm.into_concat
            self._twin_output = norm.output_buffer() if joined else product.output_buffer()
            twin = with_buffers(product, output=self._twin_output)
            if not joined:
                product = twin  # the training product shares the twin's memory
        self.product = build_layer(product)
        norm = dataclasses.replace(norm, layer=_with_act(norm.layer, act))
        self.norm = (build_layer(norm) if residual is None
                     else BatchNormLayer(norm, residual))  # the CPU's, with the residual
        if isinstance(self.norm, BatchNormLayer):  # the CPU's: its gradient over dy
            self.norm.in_place = True
        # Inference with a residual: the folded twin without its activation, which
        # adds the residual and applies the activation in its epilogue (Winograd), or
        # the add's kernel does, in place, after it (the same sums as the add's).
        self._residual_add: Any = None
        folded_act = act if residual is None else None
        weight_shape = dict(product.param_shapes)["weight"]
        channels = weight_shape[0]
        product_attrs = product.layer.attrs
        assert isinstance(product_attrs, (ConvAttrs, DenseAttrs))
        folded_layer = dataclasses.replace(
            product.layer, attrs=dataclasses.replace(product_attrs, bias=True, act=folded_act))
        self.folded = build_layer(dataclasses.replace(
            twin, layer=folded_layer,
            param_shapes=(("weight", weight_shape), ("bias", (channels,)))))
        self._weight_shape = weight_shape
        self.folded_params = {"weight": (self._folded_weight() if self.device.name == "cpu"
                                         else self.device.zeros(weight_shape, product.dtype)),
                              "bias": self.device.zeros((channels,), product.dtype)}
        add_specs: list[KernelSpec] = []
        if residual is not None and not (isinstance(self.folded, ConvLayer)
                                         and self.folded.take_residual(act)):
            size = math.prod(product.batched_output)
            add_specs = [KernelSpec.make("add", product.dtype, ((size,),), inputs=2,
                                         **act_options(act))]
            self._residual_add = cache.load(add_specs[0])
        self.specs = [*self.product.specs, *self.norm.specs, *self.folded.specs, *add_specs]
        self.algorithm = self.product.algorithm
        self.reason = (self.product.reason + "; batch norm folded into the weights for "
                       "inference" if self.product.reason else
                       "batch norm folded into the weights for inference")
        self._inputs: list[np.ndarray] = []
        self._folded_last = False

    def forward(self, inputs: list[np.ndarray], params: dict[str, np.ndarray],
                mode: Mode) -> np.ndarray:
        own, norm = _split(params)
        self._inputs = inputs
        sources, extra = inputs[:1], inputs[1:]  # extra: the residual, if fused
        if mode.train:
            self._folded_last = False
            product = self.product.forward(sources, own, mode)
            return self.norm.forward([product, *extra], norm, mode)
        if self.device.name == "cpu":
            self.folded_params["weight"] = self._folded_weight()
        self._fold(own, norm)
        self._folded_last = True
        if self._residual_add is None:  # the twin adds the residual, if there is one
            return self.folded.forward(inputs, self.folded_params, mode)
        out = self.folded.forward(sources, self.folded_params, mode)
        flat = out.reshape(-1)
        self._residual_add.forward(flat, extra[0].reshape(-1), flat)
        return out

    def _folded_weight(self) -> np.ndarray:
        """Where the folded weight goes on the CPU: memory lent by the GEMM layers'
        scratch (codegen/cpu/conv.py), which every stage's folded weight shares, since
        _fold writes it just before the folded kernel reads it, and nothing reads it
        after."""
        return lend_scratch(self.setup.dtype, self._weight_shape)

    def _fold(self, own: Arrays, norm: Arrays) -> None:
        """Batch norm's inference affine map, moved into the weights (scale and bias
        computed in float64)."""
        if self.device.name == "cuda":
            from convdsl.codegen.cuda.arrays import fold_batch_norm

            fold_batch_norm(own["weight"], own.get("bias"), norm, self.eps, self.affine,
                            self.folded_params["weight"], self.folded_params["bias"])
            return
        scale = 1.0 / np.sqrt(norm["running_var"].astype(np.float64) + self.eps)
        shift = -norm["running_mean"].astype(np.float64) * scale
        if self.affine:
            scale = scale * norm["weight"]
            shift = shift * norm["weight"] + norm["bias"]
        weight = own["weight"]
        # The scale is computed in float64 and rounded once to the weight's dtype; the
        # products are taken in that dtype. In float64 for float32 weights (each product
        # rounded once rather than twice) NumPy took 2.3 ms for a 512x512x3x3 weight,
        # about 10 ms of a ResNet-18-CIFAR inference at batch 32, against 0.3 ms.
        per_output = scale.astype(weight.dtype).reshape(-1, *([1] * (weight.ndim - 1)))
        np.multiply(weight, per_output, out=self.folded_params["weight"])
        bias = shift + (own["bias"] * scale if "bias" in own else 0.0)
        np.copyto(self.folded_params["bias"], bias, casting="unsafe")

    def backward(self, grad_output: np.ndarray, params: dict[str, np.ndarray],
                 grads: dict[str, np.ndarray], skip_act: bool = False
                 ) -> list[np.ndarray | None]:
        if not self._folded_last:
            return self._backward(grad_output, params, grads, skip_act)
        # The folded kernel kept no batch norm values: compute them the unfused way
        # (inference mode, as the forward was) before going back, at every backward
        # until the next forward. On the CPU the product or batch norm writes over the
        # folded output, the stage's output, which outlives backward(): it is kept aside
        # and put back.
        kept = (self.device.duplicate(self._twin_output)
                if self._twin_output is not None else None)
        evaluate = Mode(train=False)
        product = self.product.forward(self._inputs[:1], _split(params)[0], evaluate)
        self.norm.forward([product, *self._inputs[1:]], _split(params)[1], evaluate)
        results = self._backward(grad_output, params, grads, skip_act)
        if kept is not None and self._twin_output is not None:
            self.device.copy(kept, self._twin_output)
        return results

    def _backward(self, grad_output: np.ndarray, params: dict[str, np.ndarray],
                  grads: dict[str, np.ndarray], skip_act: bool) -> list[np.ndarray | None]:
        """Back through batch norm, then the product, from their last forward."""
        own, norm = _split(params)
        own_grads, norm_grads = _split(grads)
        grad_product, *grad_residual = self.norm.backward(grad_output, norm, norm_grads,
                                                          skip_act)
        assert grad_product is not None
        self.product.input_grad_needed = self.input_grad_needed
        return [*self.product.backward(grad_product, own, own_grads), *grad_residual]


class ResidualLayer(KernelLayer):
    """A stage followed by a residual add (inputs: the stage's, then the residual), run
    as the two layers' kernels in turn: where batch norm cannot add the residual."""

    def __init__(self, inner: KernelLayer, add: KernelLayer, chain: int) -> None:
        """chain: which of the add's two inputs the inner stage computes."""
        super().__init__(inner.setup)
        self.inner, self.add, self._chain = inner, add, chain
        self.specs = [*inner.specs, *add.specs]
        self.algorithm, self.reason = inner.algorithm, inner.reason

    def forward(self, inputs: list[np.ndarray], params: dict[str, np.ndarray],
                mode: Mode) -> np.ndarray:
        *sources, residual = inputs
        value = self.inner.forward(sources, params, mode)
        pair = [residual, residual]
        pair[self._chain] = value
        return self.add.forward(pair, {}, mode)

    def backward(self, grad_output: np.ndarray, params: dict[str, np.ndarray],
                 grads: dict[str, np.ndarray], skip_act: bool = False
                 ) -> list[np.ndarray | None]:
        grads_add = self.add.backward(grad_output, {}, {}, skip_act)
        self.inner.input_grad_needed = self.input_grad_needed
        grad_inner = grads_add[self._chain]
        assert grad_inner is not None
        inner = self.inner.backward(grad_inner, params, grads)
        return [*inner, grads_add[1 - self._chain]]


class PooledLayer(KernelLayer):
    """A stage (one layer, or a fused group) followed by max or average pooling, whose
    backward folds in the derivative of the stage's last activation (on the CPU)."""

    def __init__(self, inner: KernelLayer, pool: LayerSetup, act: ActSpec | None) -> None:
        super().__init__(pool)
        self.inner = inner
        on_cpu = pool.device == "cpu"
        # CUDA's pooling kernels fold nothing: the inner stage applies its derivative
        self._folds = on_cpu and act is not None
        self.pool = pool_after(pool, act) if self._folds else build_layer(pool)
        self.specs = [*inner.specs, *self.pool.specs]
        self.algorithm, self.reason = inner.algorithm, inner.reason

    def forward(self, inputs: list[np.ndarray], params: dict[str, np.ndarray],
                mode: Mode) -> np.ndarray:
        return self.pool.forward([self.inner.forward(inputs, params, mode)], {}, mode)

    def backward(self, grad_output: np.ndarray, params: dict[str, np.ndarray],
                 grads: dict[str, np.ndarray], skip_act: bool = False
                 ) -> list[np.ndarray | None]:
        (grad_inner,) = self.pool.backward(grad_output, {}, {})
        assert grad_inner is not None
        self.inner.input_grad_needed = self.input_grad_needed
        return self.inner.backward(grad_inner, params, grads, skip_act=self._folds)

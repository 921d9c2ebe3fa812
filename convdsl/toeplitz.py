"""A 1-D convolution as a matrix: the lecture's sparse, weight-shared Toeplitz form.

A convolution layer is linear in its input, so for one example it is a matrix M with

    ravel(y) = M @ ravel(x)        (bias and activation left out)

where x is C_in x L_in and y is C_out x L_out, both raveled channel by channel. Each block
M[o, c] (L_out x L_in) is a banded Toeplitz matrix: with stride 1 every NW-SE diagonal is
constant (one kernel weight), which is locality (the band) and weight sharing (the
constant diagonals). Stride keeps every s-th row, dilation spreads the band, padding
shifts it, and groups leave the blocks between unrelated channels zero.

The matrix is built straight from the definition, entry by entry, so that tests can hold
the convolution code against it.
"""

from __future__ import annotations

import numpy as np

from convdsl.ir import ops
from convdsl.ir.ops import Op
from convdsl.network import Network
from convdsl.runtime.params import init_params


def toeplitz(network: Network, layer: str, params: dict[str, np.ndarray] | None = None
             ) -> np.ndarray:
    """The (C_out*L_out, C_in*L_in) matrix of the 1-D conv or filter layer `layer`.

    `params` maps full names ('layer.weight') to arrays, as ReferenceNetwork.params; by
    default the network's seed-0 initial parameters. A filter needs none."""
    if layer not in network.graph:
        raise ValueError(f"'{network.name}' has no layer named '{layer}'")
    node = network.graph.layer(layer)
    if node.op not in (Op.CONV, Op.FILTER):
        raise ValueError(f"'{layer}' is a {node.op.value} layer; a Toeplitz matrix needs a "
                         "conv or filter layer")
    (source,) = node.inputs
    in_shape, out_shape = network.shapes[source], network.shapes[layer]
    if len(in_shape) != 2:
        axes = len(in_shape) - 1
        raise ValueError(f"'{layer}' works on {axes} spatial axes; the Toeplitz matrix here is "
                         "for 1-D signals only (input C x L)")
    (c_in, l_in), (c_out, l_out) = in_shape, out_shape
    weight, groups, flip = _kernel(network, node, c_in, params)
    if flip:
        weight = weight[:, :, ::-1]  # convolution proper reads the kernel backwards
    window = network.windows[layer]
    (k,), (stride,), (dilation,) = window.window, window.stride, window.dilation
    ((before, _),) = window.pads

    per_group_in, per_group_out = c_in // groups, c_out // groups
    matrix = np.zeros((c_out * l_out, c_in * l_in))
    i = np.arange(l_out)
    for o in range(c_out):
        group = o // per_group_out
        for c in range(per_group_in):
            column_channel = group * per_group_in + c
            for t in range(k):
                # y[o, i] += w[o, c, t] * x[c, i*stride + t*dilation - before], inside x only
                j = i * stride + t * dilation - before
                inside = (j >= 0) & (j < l_in)
                matrix[o * l_out + i[inside], column_channel * l_in + j[inside]] += \
                    weight[o, c, t]
    return matrix


def _kernel(network: Network, node: ops.Layer, c_in: int,
            params: dict[str, np.ndarray] | None) -> tuple[np.ndarray, int, bool]:
    """The weight as (C_out, C_in/groups, k), the groups, and whether to flip it."""
    attrs = node.attrs
    if isinstance(attrs, ops.FilterAttrs):
        # one fixed kernel for every channel: a depthwise convolution
        kernel = np.array(attrs.kernel, dtype=np.float64)
        return np.broadcast_to(kernel, (c_in, 1, kernel.size)), c_in, attrs.flip
    assert isinstance(attrs, ops.ConvAttrs)
    arrays = init_params(network) if params is None else params
    name = f"{node.name}.weight"
    if name not in arrays:
        raise ValueError(f"no parameter '{name}' given for the Toeplitz matrix of '{node.name}'")
    return np.asarray(arrays[name], dtype=np.float64), attrs.groups, attrs.flip


__all__ = ["toeplitz"]

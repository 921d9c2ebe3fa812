"""Fusion: which layers run together as one stage.

A group starts at a layer and swallows the layer after it while that is legal:

    conv | dense | filter    [-> bn]    [-> activation]    [-> pooling]
    bn | add | concat                   [-> activation]    [-> pooling]

- Batch norm joins only a convolution or dense layer without an activation of its
  own: in inference it folds into the weights (w * gamma / sigma, a new bias), and
  in training it runs right after the product with its activation as the epilogue.
- A standalone activation (`-> relu`) becomes the epilogue of the layer before it,
  which then applies it while its output is still in cache, and folds its
  derivative into its backward pass.
- A layer is swallowed only if its output has exactly one reader, the next member,
  and it is not a network output: otherwise someone else needs the value the fused
  stage never writes. Fusion stops at the next convolution, dense layer, or anything
  else not listed (soft pooling and dropout keep stages of their own).
- Max or average pooling (windowed or global) ends a group whose last activation is
  elementwise: the pooling's backward scatters the gradient and multiplies it by that
  activation's derivative in one pass, reading the pooling's own input (the
  activation's output), so the product's backward starts from the gradient before
  the activation. A softmax (over channels) keeps the pooling out.
"""

from __future__ import annotations

from dataclasses import dataclass

from convdsl.ir.ops import Activation, ActSpec, Layer, Op
from convdsl.network import Network

PRODUCTS = (Op.CONV, Op.DENSE, Op.FILTER)  # layers whose epilogue can take bn or an activation
EPILOGUE_HOSTS = (*PRODUCTS, Op.BATCHNORM, Op.ADD, Op.CONCAT)  # ops with an `act` option
# Poolings that can end a group: their backward can fold in an activation's derivative.
FUSED_POOLS = (Op.MAXPOOL, Op.AVGPOOL, Op.GLOBAL_MAXPOOL, Op.GLOBAL_AVGPOOL)


@dataclass(frozen=True)
class FusionGroup:
    """Layers computed by one stage; the last one's output is the stage's output."""

    layers: tuple[Layer, ...]

    @property
    def name(self) -> str:
        return self.layers[-1].name

    @property
    def head(self) -> Layer:
        return self.layers[0]

    @property
    def inputs(self) -> tuple[str, ...]:
        return self.head.inputs

    @property
    def norm(self) -> Layer | None:
        """The batch norm folded into the head, if any."""
        return next((layer for layer in self.layers[1:] if layer.op is Op.BATCHNORM), None)

    @property
    def activation(self) -> Layer | None:
        """The standalone activation layer that became the epilogue, if any."""
        return next((layer for layer in self.layers[1:] if layer.op is Op.ACTIVATION), None)

    @property
    def pool(self) -> Layer | None:
        """The pooling that ends the group, if any."""
        last = self.layers[-1]
        return last if len(self.layers) > 1 and last.op in FUSED_POOLS else None

    @property
    def before_pool(self) -> FusionGroup:
        """The group without its pooling (itself if it has none)."""
        return FusionGroup(self.layers[:-1]) if self.pool is not None else self

    @property
    def fused(self) -> bool:
        return len(self.layers) > 1

    def describe(self) -> str:
        kinds = "+".join(kind(layer) for layer in self.layers)
        return f"{' + '.join(layer.name for layer in self.layers)} ({kinds})"


def fusion_groups(network: Network, fuse: bool = True) -> list[FusionGroup]:
    """Every layer but the inputs, in one group each (fuse=False) or grouped as the
    module's rules allow, in an order where each group's inputs come before it."""
    outputs = {output.name for output in network.outputs}
    graph = network.graph
    members: dict[str, list[Layer]] = {}  # group head -> its layers so far
    head_of: dict[str, str] = {}  # layer -> the head of the group that swallowed it
    order: list[str] = []
    for layer in network.layers:
        if layer.op is Op.INPUT:
            continue
        source = layer.inputs[0]
        head = head_of.get(source) if len(layer.inputs) == 1 else None
        if (fuse and head is not None and source not in outputs
                and graph.consumers(source) == [layer.name]
                and _may_follow(members[head], layer)):
            members[head].append(layer)
            head_of[layer.name] = head
            continue
        members[layer.name] = [layer]
        head_of[layer.name] = layer.name
        order.append(layer.name)
    return [FusionGroup(tuple(members[head])) for head in order]


def _may_follow(group: list[Layer], layer: Layer) -> bool:
    head, last = group[0], group[-1]
    if last.op in FUSED_POOLS:
        return False  # a pooling ends its group
    if layer.op is Op.BATCHNORM:
        return len(group) == 1 and head.op in (Op.CONV, Op.DENSE) and head.act is None
    if layer.op is Op.ACTIVATION:
        return last.op in EPILOGUE_HOSTS and last.act is None
    if layer.op in FUSED_POOLS:
        return head.op in EPILOGUE_HOSTS and _elementwise(_group_act(group))
    return False


def _group_act(group: list[Layer]) -> ActSpec | None:
    """The activation a group applies last: a standalone one, or its last layer's own."""
    for layer in reversed(group):
        if layer.act is not None and layer.act.kind is not Activation.IDENTITY:
            return layer.act
    return None


def _elementwise(act: ActSpec | None) -> bool:
    return act is None or act.kind is not Activation.SOFTMAX


def kind(layer: Layer) -> str:
    """A layer's short name in descriptions: its op, its activation's name, or bn."""
    if layer.op is Op.ACTIVATION and layer.act is not None:
        return layer.act.kind.value
    return {Op.BATCHNORM: "bn"}.get(layer.op, layer.op.value)

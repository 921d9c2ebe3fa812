"""Fusion: which layers run together as one stage.

A group starts at a layer and swallows the layer after it while that is legal:

    conv | dense | filter    [-> bn [-> add]]    [-> activation]    [-> pooling]
    bn | add | concat                            [-> activation]    [-> pooling]

- Batch norm joins only a convolution or dense layer without an activation of its
  own: in inference it folds into the weights (w * gamma / sigma, a new bias), and
  in training it runs right after the product with its activation as the epilogue.
- A residual add of two inputs joins a product and its batch norm (without an
  activation) that computed one of them: batch norm adds the other input, the
  residual, before its activation, and its backward writes the residual's gradient
  (the gradient after the activation) as it goes. The stage reads the residual as an
  input after the head's, and runs where the add would have run, once both exist.
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

Beyond the groups, a concatenation can be written where it stands (concat_writes): a
branch's last stage writes its output straight into the concatenation's channels, and
the concatenation copies only the branches that did not.
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
        """What the stage reads: the head's inputs, then a fused add's residual."""
        residual = self.residual_source
        return self.head.inputs + ((residual,) if residual is not None else ())

    @property
    def residual(self) -> Layer | None:
        """The residual add fused after a product and its batch norm, if any."""
        return next((layer for layer in self.layers[1:] if layer.op is Op.ADD), None)

    @property
    def residual_source(self) -> str | None:
        """The input of the fused add that is not computed in the group."""
        add = self.residual
        if add is None:
            return None
        members = {layer.name for layer in self.layers}
        return next(source for source in add.inputs if source not in members)

    @property
    def norm(self) -> Layer | None:
        """The batch norm folded into the head, if any."""
        return next((layer for layer in self.layers[1:] if layer.op is Op.BATCHNORM), None)

    @property
    def last_act(self) -> ActSpec | None:
        """The activation the group applies last: a standalone one, or a layer's own."""
        for layer in reversed(self.layers):
            if layer.act is not None and layer.act.kind is not Activation.IDENTITY:
                return layer.act
        return None

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
        # the input a group may extend through: the only one, or either of an add's two
        sources = (layer.inputs if layer.op is Op.ADD and len(set(layer.inputs)) == 2
                   else layer.inputs[:1] if len(layer.inputs) == 1 else ())
        joined = next((head_of[source] for source in sources
                       if fuse and source in head_of and source not in outputs
                       and members[head_of[source]][-1].name == source
                       and graph.consumers(source) == [layer.name]
                       and _may_follow(members[head_of[source]], layer)), None)
        if joined is not None:
            members[joined].append(layer)
            head_of[layer.name] = joined
            continue
        members[layer.name] = [layer]
        head_of[layer.name] = layer.name
        order.append(layer.name)
    # A group runs where its last layer ran: a fused add's residual may be computed
    # after the group's head. Every input of a group precedes its last layer, and every
    # reader of its output follows it, so this order keeps inputs before their readers.
    position = {layer.name: index for index, layer in enumerate(network.layers)}
    groups = [FusionGroup(tuple(members[head])) for head in order]
    return sorted(groups, key=lambda group: position[group.name])


@dataclass(frozen=True)
class ConcatWrite:
    """Where a stage writes its output: channels [offset, offset + channels) of the
    concatenation `concat`, instead of memory of its own."""

    concat: str
    offset: int
    channels: int


def concat_writes(network: Network, groups: list[FusionGroup]) -> dict[str, ConcatWrite]:
    """The stages (by name) that write their output into a concatenation's channels.

    A branch of shape (N, C_i, ...) is the channel slice [:, offset:offset + C_i] of the
    concatenation's (N, C, ...) array: not one contiguous block, but one per example, and
    the kernels that write such a slice by subscript are those of a convolution and of
    batch norm (with an elementwise activation), so a stage qualifies when it is
    - a convolution or filter, or one with batch norm (no residual, no pooling), ending
      in an elementwise activation or none;
    - read by the concatenation alone, once, and not a network output: nothing else
      may see the value, nor a second copy of it be wanted;
    and the concatenation's own stage applies no activation (the slices are its values).
    """
    declared = {output.name for output in network.outputs}
    by_name = {group.name: group for group in groups}
    writes: dict[str, ConcatWrite] = {}
    for group in groups:
        concat = group.head
        if concat.op is not Op.CONCAT or group.last_act is not None:
            continue
        offset = 0
        for source in concat.inputs:
            channels = network.shapes[source][0]
            producer = by_name.get(source)
            if (producer is not None and source not in declared
                    and concat.inputs.count(source) == 1
                    and network.graph.consumers(source) == [concat.name]
                    and _writes_by_subscript(producer)):
                writes[source] = ConcatWrite(concat.name, offset, channels)
            offset += channels
    return writes


def _writes_by_subscript(group: FusionGroup) -> bool:
    """Whether a stage's last kernel writes its output element by element (see
    concat_writes): a convolution's, or batch norm's after one."""
    return (group.head.op in (Op.CONV, Op.FILTER) and group.residual is None
            and group.pool is None and _elementwise(group.last_act))


def _may_follow(group: list[Layer], layer: Layer) -> bool:
    head, last = group[0], group[-1]
    if last.op in FUSED_POOLS:
        return False  # a pooling ends its group
    if layer.op is Op.BATCHNORM:
        return len(group) == 1 and head.op in (Op.CONV, Op.DENSE) and head.act is None
    if layer.op is Op.ADD:  # the residual of a product and its plain batch norm
        return (len(group) == 2 and last.op is Op.BATCHNORM and _elementwise(layer.act)
                and (last.act is None or last.act.kind is Activation.IDENTITY))
    if layer.op is Op.ACTIVATION:  # a softmax never follows a fused residual add
        return (last.op in EPILOGUE_HOSTS and last.act is None
                and (last.op is not Op.ADD or len(group) == 1 or _elementwise(layer.act)))
    if layer.op in FUSED_POOLS:
        return head.op in EPILOGUE_HOSTS and _elementwise(FusionGroup(tuple(group)).last_act)
    return False


def _elementwise(act: ActSpec | None) -> bool:
    return act is None or act.kind is not Activation.SOFTMAX


def kind(layer: Layer) -> str:
    """A layer's short name in descriptions: its op, its activation's name, or bn."""
    if layer.op is Op.ACTIVATION and layer.act is not None:
        return layer.act.kind.value
    return {Op.BATCHNORM: "bn"}.get(layer.op, layer.op.value)

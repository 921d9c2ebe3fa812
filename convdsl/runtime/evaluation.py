"""Scoring a classifier: class scores for many examples, loss, accuracy, confusion.

A compiled network runs a fixed batch, so examples go through in batches of that
size and the last one is padded with zeros; in inference mode every example is
computed on its own, so the padding changes nothing and is cut off again.
Only the main output is scored: auxiliary heads help training and are dropped here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from convdsl.errors import RunError
from convdsl.ir.ops import Activation, Loss
from convdsl.network import Network
from convdsl.runtime import losses
from convdsl.runtime.executor import CompiledNetwork


def classes_of(network: Network) -> int:
    """The number of classes, read off the main output; every output with a loss must
    give one score per class, since they all learn from the same labels."""
    main = next(o for o in network.outputs if not o.aux)
    shape = network.shapes[main.name]
    if len(shape) != 1:
        raise RunError(f"training and testing classify, so the main output '{main.name}' must "
                       f"be a vector of class scores, but its shape is "
                       f"{'x'.join(map(str, shape))}", "end the network with flatten -> dense(N)")
    for output in network.outputs:
        if output.loss is not Loss.NONE and network.shapes[output.name] != shape:
            raise RunError(f"output '{output.name}' has shape "
                           f"{'x'.join(map(str, network.shapes[output.name]))} but the main "
                           f"output '{main.name}' has {shape[0]} classes",
                           "every output with a loss learns the same labels")
    return shape[0]


def targets_for(network: Network, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Each lossy output's targets for a batch of class labels: the labels for
    cross-entropy, one-hot rows for squared error."""
    targets: dict[str, np.ndarray] = {}
    for output in network.outputs:
        if output.loss is Loss.CROSS_ENTROPY:
            targets[output.name] = labels
        elif output.loss is Loss.MSE:
            classes = network.shapes[output.name][0]
            targets[output.name] = np.eye(classes)[labels]
    return targets


def main_scores(net: CompiledNetwork, x: np.ndarray) -> np.ndarray:
    """The main output for every example of x, in inference mode."""
    count = len(x)
    scores = np.empty((count, *net.output_shape), dtype=net.dtype)
    batch = np.zeros((net.batch, *x.shape[1:]), dtype=net.dtype)
    for start in range(0, count, net.batch):
        part = x[start:start + net.batch]
        batch[:len(part)] = part
        batch[len(part):] = 0
        scores[start:start + len(part)] = net.forward(batch)[:len(part)]
    return scores


def probabilities(network: Network, scores: np.ndarray) -> np.ndarray:
    """Class probabilities: the scores themselves after a softmax layer, else their softmax."""
    main = network.graph.layer(next(o.name for o in network.outputs if not o.aux))
    if main.act is not None and main.act.kind is Activation.SOFTMAX:
        return scores.astype(np.float64)
    shifted = scores.astype(np.float64) - scores.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    result: np.ndarray = exp / exp.sum(axis=1, keepdims=True)
    return result


@dataclass(frozen=True)
class Scores:
    loss: float  # the main output's loss, mean over the examples
    accuracy: float  # share of examples whose highest score is the true class
    predictions: np.ndarray  # (N,) predicted class
    labels: np.ndarray  # (N,) true class
    classes: int

    def confusion(self) -> np.ndarray:
        """counts[true, predicted]."""
        counts = np.zeros((self.classes, self.classes), dtype=np.int64)
        np.add.at(counts, (self.labels, self.predictions), 1)
        return counts

    def per_class_accuracy(self) -> np.ndarray:
        """Recall of each class; NaN for a class with no examples."""
        counts = self.confusion()
        totals = counts.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            recall: np.ndarray = np.diag(counts) / totals
        return recall


def score(net: CompiledNetwork, x: np.ndarray, labels: np.ndarray) -> Scores:
    network = net.network
    classes = classes_of(network)
    if len(x) == 0:
        return Scores(float("nan"), float("nan"), np.zeros(0, np.int64), labels, classes)
    scores = main_scores(net, x)
    main = next(o for o in network.outputs if not o.aux)
    layer = network.graph.layer(main.name)
    softmax = layer.act is not None and layer.act.kind is Activation.SOFTMAX
    target = targets_for(network, labels).get(main.name, labels)
    loss = losses.evaluate(main.loss, scores, target, softmax).value
    predictions = scores.argmax(axis=1)
    accuracy = float(np.mean(predictions == labels))
    return Scores(loss, accuracy, predictions, labels, classes)

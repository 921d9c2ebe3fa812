"""convdsl: a compiler for a small language that describes convolutional networks.

    import convdsl
    net = convdsl.load("networks/lenet5.cnn")
    print(net.params, net.output_shape)

    compiled = convdsl.compile("networks/lenet5.cnn", batch=64)
    scores = compiled.forward(images)
"""

from convdsl.errors import ConvDslError, Diagnostic
from convdsl.network import Network, load, loads
from convdsl.runtime.executor import CompiledNetwork, compile
from convdsl.toeplitz import toeplitz

__version__ = "0.1.0"
__all__ = ["CompiledNetwork", "ConvDslError", "Diagnostic", "Network", "__version__", "compile",
           "load", "loads", "toeplitz"]

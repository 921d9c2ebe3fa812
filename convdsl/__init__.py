"""convdsl: a compiler for a small language that describes convolutional networks.

    import convdsl
    net = convdsl.load("networks/lenet5.cnn")
    print(net.params, net.output_shape)
"""

from convdsl.errors import ConvDslError, Diagnostic
from convdsl.network import Network, load, loads

__version__ = "0.1.0"
__all__ = ["ConvDslError", "Diagnostic", "Network", "__version__", "load", "loads"]

"""convdsl: a compiler for a small language that describes convolutional networks.

    import convdsl
    net = convdsl.load("networks/lenet5.cnn")
    print(net.params, net.output_shape)

    compiled = convdsl.compile("networks/lenet5.cnn", batch=64)
    scores = compiled.forward(images)
"""

from convdsl.threads import quiet_blas_threads

quiet_blas_threads()  # before NumPy loads OpenBLAS: see convdsl/threads.py

from convdsl.errors import ConvDslError, Diagnostic  # noqa: E402
from convdsl.network import Network, load, loads  # noqa: E402
from convdsl.runtime.executor import CompiledNetwork, compile  # noqa: E402
from convdsl.toeplitz import toeplitz  # noqa: E402

__version__ = "0.1.0"
__all__ = ["CompiledNetwork", "ConvDslError", "Diagnostic", "Network", "__version__", "compile",
           "load", "loads", "toeplitz"]

"""The CUDA target: numba.cuda kernels for every op, generated from the same kernel
specs as the CPU's. Importing this package checks that numba.cuda can run (a GPU, or
the simulator) and registers the builders."""

from convdsl.codegen.cuda.common import cuda

cuda()  # a clear error now, rather than a failed launch later

from convdsl.codegen.cuda import (  # noqa: E402, F401
    conv,
    dense,
    merge,
    norm,
    pool,
    shape,
    unary,
)

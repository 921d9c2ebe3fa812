"""The CPU target: Numba kernels for every op. Importing this package registers them."""

from convdsl.codegen.cpu import conv, dense, merge, norm, pool, shape, unary  # noqa: F401

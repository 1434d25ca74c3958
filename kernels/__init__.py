"""fastwm's Triton kernels and their launchers, installed as ``fastwm.kernels``.

Importing this package imports triton but never queries a GPU driver; the public API in :mod:`fastwm` imports it
lazily, the first time a call runs on the Triton backend.
"""

"""A Triton interpreter whose programs run concurrently, for kernels that synchronise their programs.

The stock interpreter (TRITON_INTERPRET=1) runs a launch's programs one after another, so a program that waits for
another at a grid barrier would wait forever. Inside :func:`concurrent_programs` every program of a launch runs in
a thread of its own (``tl.program_id`` answers per thread) and the launch returns when all have finished. Atomics
yield the interpreter lock briefly, so that a program spinning at a barrier lets the others run. Written against
Triton 3.6's interpreter (the version the tests pin): ``GridExecutor.__call__`` with its grid loop threaded.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
import time
from collections.abc import Iterator

import numpy as np
import triton
from triton.runtime import interpreter as _interp

_local = threading.local()
_cancelled = threading.Event()  # set when a launch timed out: its programs stop at their next atomic
# The interpreter rewrites each @triton.jit function called from a kernel on its first call and caches the result;
# two programs reaching a function first at once raced there (a KeyError naming the function). One at a time.
_rewrite_lock = threading.RLock()


def _run_concurrently(self: _interp.GridExecutor, *args_dev, timeout_s: float, **kwargs) -> None:
    # Triton 3.6's GridExecutor.__call__, with one thread per program instead of the loop over the grid.
    argspec = inspect.getfullargspec(self.fn)
    kwargs = {k: v for k, v in kwargs.items() if k in argspec.args}
    args_hst, kwargs_hst = self._init_args_hst(args_dev, kwargs)
    for hook in self.pre_run_hooks:
        hook(*args_hst, **kwargs_hst)
    patch_scope = _interp._patch_lang(self.fn)
    try:
        args = inspect.getcallargs(self.fn, *args_hst, **kwargs_hst)
        args = {name: arg if name in self.constexprs else _interp._implicit_cvt(arg) for name, arg in args.items()}
        grid = self.grid(args) if callable(self.grid) else self.grid
        grid = tuple(grid) + (1,) * (3 - len(grid))
        _interp.interpreter_builder.set_grid_dim(*grid)
        errors: list[BaseException] = []

        def program(idx: tuple[int, int, int]) -> None:
            _local.grid_idx = idx
            try:
                self.fn(**args)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the launching thread
                errors.append(exc)

        threads = [threading.Thread(target=program, args=((x, y, z),), daemon=True)
                   for x in range(grid[0]) for y in range(grid[1]) for z in range(grid[2])]
        for th in threads:
            th.start()
        deadline = time.monotonic() + timeout_s
        for th in threads:
            th.join(max(0.0, deadline - time.monotonic()))
        if any(th.is_alive() for th in threads):
            _cancelled.set()  # stop the stuck programs (at their next atomic) instead of leaving them spinning
            for th in threads:
                th.join(60.0)
            _cancelled.clear()
            raise TimeoutError(f"{self.fn.__name__}: a program was still running after {timeout_s:.0f} s "
                               "(a grid barrier that never opened?)")
        if errors:
            raise errors[0]
    finally:
        patch_scope.restore()
    self._restore_args_dev(args_dev, args_hst, kwargs, kwargs_hst)


@contextlib.contextmanager
def concurrent_programs(timeout_s: float = 600.0) -> Iterator[None]:
    """Run every Triton launch inside the block with its programs concurrent (TRITON_INTERPRET=1 only)."""
    builder = _interp.InterpreterBuilder
    saved = builder.create_get_program_id, builder.create_atomic_rmw, _interp.GridExecutor.__call__
    saved_rewrite = _interp.InterpretedFunction.rewrite

    def rewrite(self):
        with _rewrite_lock:
            return saved_rewrite(self)

    def create_get_program_id(self, axis):
        idx = getattr(_local, "grid_idx", None)
        if idx is None:
            return saved[0](self, axis)
        return _interp.TensorHandle(np.array([idx[axis]], dtype=np.int32), triton.language.int32)

    def create_atomic_rmw(self, *args):
        if _cancelled.is_set():
            raise TimeoutError("cancelled: the launch timed out")
        out = saved[1](self, *args)
        time.sleep(1e-4)  # let the other programs run while this one polls a barrier
        return out

    def call(self, *args, **kwargs):
        return _run_concurrently(self, *args, timeout_s=timeout_s, **kwargs)

    builder.create_get_program_id, builder.create_atomic_rmw = create_get_program_id, create_atomic_rmw
    _interp.GridExecutor.__call__ = call
    _interp.InterpretedFunction.rewrite = rewrite
    try:
        yield
    finally:
        builder.create_get_program_id, builder.create_atomic_rmw, _interp.GridExecutor.__call__ = saved
        _interp.InterpretedFunction.rewrite = saved_rewrite

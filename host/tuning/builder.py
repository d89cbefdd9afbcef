"""A MetaSchedule builder with warm, long-lived workers that link for the board's toolchain.

MetaSchedule's ``LocalBuilder`` starts fresh worker processes for every batch, and each imports TVM's
tensor intrinsics (~25-50 s on a 2-core machine, longer than its default timeout, so every candidate
fails). Here the workers start once and serve every batch of the session, and they skip that import:
a candidate reaches the builder already scheduled (tensorized blocks included), so lowering it
needs no intrinsic registry. Candidates are exported as shared libraries with the board's compiler,
because a board has no compiler of its own to link TVM's default ``.tar`` export.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from typing import Any

from tvm.s_tir.meta_schedule.builder import BuilderInput, BuilderResult, PyBuilder
from tvm.ir.utils import derived_object
from tvm.support.popen_pool import PopenPoolExecutor, StatusKind

from .. import config
from ..toolchain import Toolchain

logger = logging.getLogger(__name__)


def _warm_worker() -> None:
    """Runs once in each build worker: the imports every build needs."""
    import tvm  # noqa: F401
    import tvm.driver  # noqa: F401
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock  # noqa: F401
    from tvm.support import cc  # noqa: F401


def build_candidate(mod, target, compiler: str, options: tuple[str, ...], root: str | None = None) -> str:
    """Build one candidate and link it as a shared library for the board, in a new folder under ``root``.
    Returns its path; a candidate that fails to link leaves no folder behind.

    Module-level so it pickles into the worker processes.
    """
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    # What MetaSchedule's default_build does, minus its import of every tensor intrinsic.
    rt_mod = tvm_build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)
    folder = tempfile.mkdtemp(prefix="edgetune-cand-", dir=root)
    path = os.path.join(folder, "candidate.so")
    try:
        rt_mod.export_library(path, fcompile=Toolchain(compiler, tuple(options)).fcompile())
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return path


@derived_object
class WarmBuilder(PyBuilder):
    """Builds candidates in a pool of warm workers kept for the whole session.

    Candidates are linked under one folder of the session (``edgetune-build-*`` in the temp dir); the
    runner removes each after measuring it, and :meth:`shutdown` removes the folder with whatever was
    never measured (a session stopped or interrupted between build and measurement, a worker killed
    while linking).
    """

    def __init__(self, toolchain: Toolchain, max_workers: int | None = None,
                 timeout_sec: float | None = None) -> None:
        super().__init__()
        self.toolchain = toolchain
        self.max_workers = max_workers or max(1, os.cpu_count() or 1)
        self.timeout_sec = config.BUILD_CANDIDATE_SEC if timeout_sec is None else timeout_sec
        self._pool: PopenPoolExecutor | None = None
        self.root: str | None = None  # this session's candidates, created with the pool
        self.builds = 0

    def _ensure_pool(self) -> PopenPoolExecutor:
        if self.root is None:
            self.root = tempfile.mkdtemp(prefix="edgetune-build-")
        if self._pool is None:
            self._pool = PopenPoolExecutor(
                max_workers=self.max_workers, timeout=self.timeout_sec, initializer=_warm_worker,
            )
        return self._pool

    def warm_up(self) -> None:
        """Start the workers and wait for their imports (so the first batch is not slowed down)."""
        pool = self._ensure_pool()
        futures = [pool.submit(_warm_worker) for _ in range(self.max_workers)]
        for future in futures:
            future.result(timeout=config.BUILDER_WARMUP_SEC)

    def build(self, build_inputs: list[BuilderInput]) -> list[BuilderResult]:
        pool = self._ensure_pool()
        jobs: list[tuple[Any, ...]] = [
            (inp.mod, inp.target, self.toolchain.compiler, self.toolchain.options, self.root) for inp in build_inputs
        ]
        results: list[BuilderResult] = []
        for outcome in pool.map_with_error_catching(lambda job: build_candidate(*job), jobs):
            self.builds += 1
            if outcome.status == StatusKind.COMPLETE:
                results.append(BuilderResult(outcome.value, None))
            elif outcome.status == StatusKind.TIMEOUT:
                results.append(BuilderResult(None, f"build timed out after {self.timeout_sec:g} s"))
            elif isinstance(outcome.value, ChildProcessError):
                # The worker died (e.g. SIGSEGV in code generation); the pool starts a new one.
                results.append(BuilderResult(None, "build failed: the build worker crashed on this candidate"))
            else:
                message = str(outcome.value).strip().splitlines()
                results.append(BuilderResult(None, "build failed: " + (message[-1] if message else "unknown error")))
        return results

    def shutdown(self) -> None:
        """Stop the workers and remove the session's candidates that were never measured."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

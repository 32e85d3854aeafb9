"""Where sample tasks run: worker processes on this machine, or a Ray cluster.

An executor has one method, ``run(fn, args_list)``, a generator that calls ``fn(*args)`` for
every ``args`` of ``args_list`` and yields ``(index, result)`` as each call finishes (in
completion order), so the caller can store each result at once and an interrupted run
keeps what finished. ``fn`` must be a top-level (importable, picklable) function taking and
returning plain values, such as :func:`leanconv.prune3d.samples.run_task`. A task that
raises stops the run: pending tasks are cancelled and the error is raised in the driver.

* :class:`LocalExecutor` (``workers`` processes, spawned, each with ``threads`` torch
  threads; ``workers=0`` runs the tasks one by one in this process).
* :class:`RayExecutor` (``address=None`` starts a private local Ray instance with
  ``workers`` CPUs and shuts it down afterwards; ``address="host:port"`` or ``"auto"``
  joins a running cluster, whose nodes must see the checkpoint path and the dataset).
"""

from __future__ import annotations

import logging
import multiprocessing
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Any, Callable, Iterator, Protocol, Sequence

import torch

from leanconv.errors import LeanconvError

__all__ = ["Executor", "LocalExecutor", "RayExecutor", "create_executor", "one_at_a_time", "EXECUTORS"]

log = logging.getLogger(__name__)
EXECUTORS = ("local", "ray")


class Executor(Protocol):
    """Runs picklable tasks and yields ``(index, result)`` as they finish."""

    def run(self, fn: Callable[..., Any], args_list: Sequence[tuple]) -> Iterator[tuple[int, Any]]: ...


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def _check(workers: int | None, threads: int, allow_zero: bool) -> None:
    low = 0 if allow_zero else 1
    if workers is not None and (int(workers) != workers or workers < low):
        raise LeanconvError(f"workers must be a whole number >= {low}, got {workers}")
    if int(threads) != threads or threads < 1:
        raise LeanconvError(f"threads per worker must be a whole number >= 1, got {threads}")


class LocalExecutor:
    """Tasks in ``workers`` spawned worker processes (``workers=0``: in this process)."""

    def __init__(self, workers: int = 1, threads: int = 1):
        _check(workers, threads, allow_zero=True)
        self.workers, self.threads = int(workers), int(threads)

    def run(self, fn: Callable[..., Any], args_list: Sequence[tuple]) -> Iterator[tuple[int, Any]]:
        if not args_list:
            return
        if self.workers == 0:
            for i, args in enumerate(args_list):
                yield i, fn(*args)
            return
        pool = ProcessPoolExecutor(max_workers=min(self.workers, len(args_list)),
                                   mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_worker, initargs=(self.threads,))
        try:
            futures = {pool.submit(fn, *args): i for i, args in enumerate(args_list)}
            pending = set(futures)
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    yield futures[future], future.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def _ray_call(fn: Callable[..., Any], threads: int, *args: Any) -> Any:
    torch.set_num_threads(threads)
    return fn(*args)


def _import_ray():
    try:
        import ray
    except ImportError as exc:
        raise LeanconvError("the Ray executor needs the ray package (pip install ray); or use --executor local") from exc
    return ray


class RayExecutor:
    """Tasks as Ray remote functions, each reserving ``threads`` CPUs.

    ``address=None`` starts a new local Ray instance (``workers`` CPUs, default: all; no
    dashboard, worker logs not forwarded) and shuts it down when the run ends; otherwise
    ``ray.init(address=...)`` joins that cluster and leaves it running. A Ray instance this
    process had already started is reused and left running.
    """

    def __init__(self, address: str | None = None, workers: int | None = None, threads: int = 1):
        _check(workers, threads, allow_zero=False)
        self.address, self.workers, self.threads = address, workers, int(threads)

    def _start(self, ray) -> bool:
        if ray.is_initialized():
            return False
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                  "logging_level": logging.WARNING}
        if self.address is None:
            kwargs.update(address="local", num_cpus=self.workers)
        else:
            kwargs["address"] = self.address
        try:
            ray.init(**kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = self.address or "a local instance"
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise LeanconvError(f"cannot start or reach Ray at {where}: {first}") from exc
        return True

    def run(self, fn: Callable[..., Any], args_list: Sequence[tuple]) -> Iterator[tuple[int, Any]]:
        if not args_list:
            return
        ray = _import_ray()
        started = self._start(ray)
        pending: list = []
        try:
            remote = ray.remote(num_cpus=self.threads)(_ray_call)
            refs = {remote.remote(fn, self.threads, *args): i for i, args in enumerate(args_list)}
            pending = list(refs)
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                yield refs[ready[0]], _get(ray, ready[0])
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)
            if started:
                ray.shutdown()


def _get(ray, ref) -> Any:
    """``ray.get`` that re-raises a task's ``LeanconvError`` as one line (not Ray's traceback)."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, LeanconvError):
            raise LeanconvError(str(exc.cause)) from None
        raise


def create_executor(kind: str = "local", *, workers: int | None = None, address: str | None = None,
                    threads: int = 1) -> LocalExecutor | RayExecutor:
    """``"local"`` (``workers`` processes, default 1; 0 = in this process) or ``"ray"``."""
    if kind == "local":
        if address is not None:
            raise LeanconvError("a Ray address applies only to the ray executor (--executor ray)")
        return LocalExecutor(1 if workers is None else workers, threads)
    if kind == "ray":
        return RayExecutor(address, workers, threads)
    raise LeanconvError(f"unknown executor {kind!r}; choose one of: {', '.join(EXECUTORS)}")


def one_at_a_time(executor: Any) -> bool:
    """Whether ``executor`` (None: tasks in this process) runs one task at a time on this
    machine, so that a task may time a model without another task running beside it."""
    return executor is None or (isinstance(executor, LocalExecutor) and executor.workers <= 1)

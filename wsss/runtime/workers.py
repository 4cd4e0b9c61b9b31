"""Worker processes that die with the process that uses them, by any signal (SIGKILL included).

Workers are forked from a fork server (a fresh process that imports torch once, so workers start in
milliseconds) or, where there is none, spawned; either way they inherit none of the caller's open files (journal,
outputs) or pipes. A worker holds both ends of its own task queue, so it never sees EOF there; instead it arms
a parent-death signal (Linux ``prctl``; elsewhere a thread polls the parent pid). The fork server arms one too,
as it preloads this module: caller dies -> server dies -> workers die. Should the server be someone else's, it
still exits once its clients are gone (workers drop their copy of its keep-alive pipe, as they are no clients).

A parent-death signal fires when the *thread* that started the process ends: create pools and loaders, and
under spawn also submit to them or iterate them, from a long-lived thread (the main one).
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from multiprocessing import forkserver
from multiprocessing.context import BaseContext

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
PRELOAD = ("torch",)  # imported once by the fork server instead of by every worker
_SERVER_PARENT = "WSSS_FORKSERVER_PARENT"  # set while this process starts the fork server


def context(preload: Sequence[str] = ()) -> BaseContext:
    """The fork-server context (its server imports ``PRELOAD`` and ``preload`` when it starts), else spawn."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__, *PRELOAD, *preload])  # ignored by a server already running
    return ctx


def _forker(ctx: BaseContext) -> int:
    """Pid of the workers' parent: the fork server (started now if need be), or this process under spawn."""
    if ctx.get_start_method() != "forkserver":
        return os.getpid()
    os.environ[_SERVER_PARENT] = str(os.getpid())  # read by the server as it imports this module
    try:
        forkserver.ensure_running()
    finally:
        del os.environ[_SERVER_PARENT]
    return forkserver._forkserver._forkserver_pid  # no public accessor


def die_with_parent(parent: int) -> None:
    """Worker initializer: the worker exits as soon as ``parent``, the process that started it, is gone."""
    armed = False
    if sys.platform.startswith("linux"):
        armed = ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    if not armed:
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True, name="watch-parent").start()
    server = forkserver._forkserver
    if getattr(server, "_forkserver_alive_fd", None) is not None:  # forked by the server: let it exit with its clients
        os.close(server._forkserver_alive_fd)
        server._forkserver_alive_fd = None
    if os.getppid() != parent:  # it died before the signal was armed
        os._exit(1)


def _watch_parent(parent: int, poll_s: float = 0.5) -> None:
    while os.getppid() == parent:
        time.sleep(poll_s)
    os._exit(1)


def _init_loader_worker(parent: int, worker_id: int) -> None:
    die_with_parent(parent)


def worker_pool(n: int, preload: Sequence[str] = ()) -> ProcessPoolExecutor:
    """A pool of ``n`` processes that die with this one; submitted functions must be importable by name."""
    ctx = context(preload)
    return ProcessPoolExecutor(n, mp_context=ctx, initializer=die_with_parent, initargs=(_forker(ctx),))


def loader_options(n: int, preload: Sequence[str] = ()) -> dict:
    """``DataLoader`` keyword arguments for ``n`` worker processes that die with this one."""
    if n == 0:
        return {"num_workers": 0}
    ctx = context(preload)
    init = partial(_init_loader_worker, _forker(ctx))
    return {"num_workers": n, "multiprocessing_context": ctx, "worker_init_fn": init}


if os.environ.pop(_SERVER_PARENT, None) == str(os.getppid()):  # a fork server preloading this module
    die_with_parent(os.getppid())

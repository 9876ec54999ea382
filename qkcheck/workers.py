"""The worker processes that draw figures (qkcheck.figures.write_figures).

Workers are forked from a fork server that has imported the drawing code once
(``qkcheck.plots``: matplotlib, numpy; never torch). A spawned worker starts a fresh
interpreter and imports matplotlib itself — ~0.8 s of CPU each, a fifth of the figures'
cost at the reference scale. Forking the validating process would be cheaper still, but
it holds torch's thread pools; a fork server is safe with threads. Where the platform has
no fork server (Windows), workers are spawned.

:func:`start` starts the server ahead of need (it imports in the background while the
caller goes on); :func:`context` is what the pools use.
"""

from __future__ import annotations

import multiprocessing
from multiprocessing.context import BaseContext

#: imported once by the fork server, inherited by every worker
PRELOAD = ["qkcheck.plots"]


def context() -> BaseContext:
    """The start method of the drawing workers: a fork server with :data:`PRELOAD`, else
    spawn."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        return ctx
    return multiprocessing.get_context("spawn")


def start() -> None:
    """Start the fork server now, if workers come from one; returns at once (the server
    imports :data:`PRELOAD` in its own process). Idempotent; failures are left to the pool
    that needs the workers, which reports them per item."""
    ctx = context()
    if ctx.get_start_method() != "forkserver":
        return
    from multiprocessing import forkserver

    try:
        forkserver.ensure_running()
    except OSError:
        pass

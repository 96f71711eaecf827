"""How a sweep driver stops: SIGTERM as Ctrl-C, one way to resume.

Ctrl-C (SIGINT) during ``Tuner.fit`` reaches Tune's own handler: it saves the experiment, ends the trials and lets
``fit`` return, and the sweep's summary says ``interrupted: continue with --resume``. SIGTERM — what a job
scheduler, ``timeout`` or Kubernetes sends — must do the same, but ``ray.init`` sets its own SIGTERM handler
(``sys.exit`` from wherever the driver is, then a native stack dump while Ray's threads are torn down). So the
driver's handler (:func:`sigterm_as_interrupt`) is set around the whole run, kept over ``ray.init``
(:func:`keep_sigterm_handler`), and hands a SIGTERM to whatever handles SIGINT at that moment: Tune's during ``fit``,
else Python's KeyboardInterrupt (the LM stage, the pool's start, a second signal while Tune stops).

When ``fit`` returns after such a stop, Tune logs "Experiment has been interrupted ... Resume experiment with:
Tuner.restore(...)", which ``dilm sweep --resume`` replaces: :func:`watch_tune_stop` drops it, and remembers it —
the one sign that the fit was interrupted (Tune marks the trials it stops TERMINATED, as if they had finished).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading

RESUME_HINT = "interrupted: continue with --resume"  # the summary's first line says it too (tune.report)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()  # the only thread that may set handlers


@contextlib.contextmanager
def sigterm_as_interrupt(terminated: list):
    """SIGTERM does what SIGINT does now (Tune's graceful stop, or a KeyboardInterrupt); ``terminated`` gets the
    signal's number, so that the caller exits with 128 + it."""
    def on_term(signum, frame):
        terminated.append(signum)
        interrupt = signal.getsignal(signal.SIGINT)
        if not callable(interrupt):  # SIG_IGN or SIG_DFL: nobody to hand it to
            raise KeyboardInterrupt
        interrupt(signal.SIGINT, frame)

    if not _main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def keep_sigterm_handler():
    """Around ``ray.init``: a SIGTERM handler set in Python before it (:func:`sigterm_as_interrupt`) is set again
    after it, over Ray's."""
    before = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        if callable(before) and _main_thread():
            signal.signal(signal.SIGTERM, before)


class TuneStop(logging.Filter):
    """Drops Tune's restore hint (logged by ``ray.tune.tune`` at WARNING) and sets ``interrupted`` when it comes."""

    def __init__(self):
        super().__init__()
        self.interrupted = False

    def filter(self, record: logging.LogRecord) -> bool:
        if "Tuner.restore(" in record.getMessage():
            self.interrupted = True
            return False
        return True


@contextlib.contextmanager
def watch_tune_stop():
    """Around ``Tuner.fit``: yields a :class:`TuneStop` whose ``interrupted`` says, after it, whether a signal
    stopped the fit (its trials then are not finished, whatever their status)."""
    stop, logger = TuneStop(), logging.getLogger("ray.tune.tune")
    logger.addFilter(stop)
    try:
        yield stop
    finally:
        logger.removeFilter(stop)

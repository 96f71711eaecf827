"""A trial the scheduler stops must not die with a native stack trace.

What happens (Ray 2.60, seen in a worker's log). Tune runs a function trainable in a daemon thread of the trial's
actor (``ray.train._internal.session``'s ``RunnerThread``). When ASHA stops a trial, the thread, waiting in
``tune.report``, gets a ``SystemExit(0)`` and unwinds — through distill's ``finally`` blocks and the MLflow child
run's flush, torch operators and sqlite writes that release the GIL — while the actor is sent SIGTERM: Ray's
handler shuts the core worker down and calls ``sys.exit``, and the raylet SIGKILLs the process ~200 ms later.
In between, the interpreter finalises: a daemon thread that takes the GIL back then is ended by ``pthread_exit``,
whose forced unwind cannot pass the C++ frame of the operator it returns from (a noexcept GIL re-acquire):
``std::terminate``, and Ray's handler prints ``*** SIGABRT received ***`` and a 40-line C++ trace into the sweep's
console.

:func:`join_at_exit`, called in the training thread, makes the interpreter's shutdown wait for that thread first
(``threading._register_atexit``: before finalisation starts, hence before any daemon thread is ended): the thread
finishes unwinding, or the raylet's SIGKILL ends the process — quietly — while it waits. It also keeps tqdm's
monitor thread (a daemon that wakes every 10 s to take the GIL) out of the process.
"""

from __future__ import annotations

import threading

STOP_WAIT_S = 300.0  # a bound on the wait (the raylet's SIGKILL comes long before)


def join_at_exit(timeout: float = STOP_WAIT_S) -> None:
    """Call from a trial's training thread: at interpreter shutdown, wait up to ``timeout`` s for it to end before
    finalisation; and no tqdm monitor thread in this process."""
    import tqdm

    tqdm.tqdm.monitor_interval = 0
    if tqdm.tqdm.monitor is not None:  # started by an earlier bar
        tqdm.tqdm.monitor.exit()
    thread = threading.current_thread()
    if thread is not threading.main_thread():
        threading._register_atexit(thread.join, timeout)  # run by threading._shutdown, before finalisation

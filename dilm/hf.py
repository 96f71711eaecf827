"""The Hugging Face libraries' manners, as dilm wants them: whether the hub can be asked now (else a hub id is looked up
in the local cache only), and transformers' notices and progress bars off while a model loads or saves."""

from __future__ import annotations

import contextlib
import functools


@functools.lru_cache(maxsize=1)
def hub_unreachable(timeout_s: float = 3.0) -> str | None:
    """Why the Hugging Face hub cannot be asked now (``HF_HUB_OFFLINE`` is set, or no connection to it within
    ``timeout_s``), else None; asked once per process. Unreachable, a hub id is looked up in the local cache only:
    the hub client would otherwise retry with back-off for ~25 s before failing."""
    import socket
    import threading
    from urllib.parse import urlparse

    from huggingface_hub import constants, is_offline_mode

    if is_offline_mode():
        return "HF_HUB_OFFLINE is set"
    url = urlparse(constants.ENDPOINT)
    reached = []

    def connect() -> None:  # in a thread: a name lookup ignores socket timeouts
        with contextlib.suppress(OSError), socket.create_connection(
                (url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=timeout_s):
            reached.append(True)

    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(timeout_s)
    return None if reached else f"{url.hostname} is unreachable"


@contextlib.contextmanager
def quiet_transformers():
    """transformers' own notices (verbosity: errors only) and its progress bars ("Loading weights", "Writing model
    shards") off while a model loads or saves, as they were after: a sweep loads models in every Ray worker, each
    load a bar and notices otherwise."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()

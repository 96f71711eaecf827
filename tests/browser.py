"""Headless Chromium for tests, driven over the DevTools protocol (CDP) with aiohttp's websocket client (aiohttp comes
with ``ray[default]``: no browser-automation package needed).

``render(url, expect, ...)`` opens ``url`` in a fresh profile, waits until the page's *rendered* text
(``document.body.innerText``: what a reader sees, after the app's scripts ran, not the HTML source) holds every
string of ``expect``, optionally saves a PNG screenshot, and returns that text. :func:`chromium` is None where no
browser can be had (the test skips): the distribution's ``chromium`` (Debian: ``apt-get install chromium``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

# Chromium as root in a container: no sandbox, no GPU, and no calls home (updates, sync, QUIC probes).
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--remote-debugging-port=0", "--window-size=1600,1000")


def chromium() -> str | None:
    """The browser's executable, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    return None


def _devtools_port(profile: Path, proc: subprocess.Popen, timeout: float) -> int:
    """Chromium writes the port it picked (``--remote-debugging-port=0``) into the profile's DevToolsActivePort."""
    marker = profile / "DevToolsActivePort"
    deadline = time.monotonic() + timeout
    while not (marker.exists() and marker.read_text().strip()):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"chromium did not open its DevTools port (exit code {proc.poll()})")
        time.sleep(0.1)
    return int(marker.read_text().split()[0])


async def _session(ws_url: str, url: str, expect: list[str], screenshot: Path | None, timeout: float) -> str:
    import aiohttp

    ids = iter(range(1, 1 << 30))
    async with aiohttp.ClientSession() as http, http.ws_connect(ws_url, max_msg_size=0) as ws:

        async def call(method: str, **params) -> dict:
            n = next(ids)
            await ws.send_str(json.dumps({"id": n, "method": method, "params": params}))
            async for msg in ws:  # events of other domains may come first: skip them
                data = json.loads(msg.data)
                if data.get("id") == n:
                    if "error" in data:
                        raise RuntimeError(f"{method}: {data['error']}")
                    return data["result"]
            raise RuntimeError("the DevTools connection closed")

        await call("Page.enable")
        await call("Page.navigate", url=url)
        deadline, text = time.monotonic() + timeout, ""
        while time.monotonic() < deadline:
            res = await call("Runtime.evaluate", expression="document.body ? document.body.innerText : ''",
                             returnByValue=True)
            text = res["result"].get("value") or ""
            if all(s in text for s in expect):
                break
            await asyncio.sleep(0.5)
        else:
            missing = [s for s in expect if s not in text]
            raise AssertionError(f"not in the rendered page after {timeout:.0f} s: {missing}\n--- page text:\n"
                                 f"{text[:3000]}")
        if screenshot is not None:
            await asyncio.sleep(1.0)  # let the last rows paint
            shot = await call("Page.captureScreenshot", format="png")
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            screenshot.write_bytes(base64.b64decode(shot["data"]))
        return text


def render(url: str, expect: list[str], screenshot: Path | None = None, timeout: float = 90) -> str:
    """The rendered text of ``url`` once it holds every string of ``expect`` (AssertionError with the text after
    ``timeout`` s); ``screenshot``: a PNG of the window then."""
    exe = chromium()
    if exe is None:
        raise RuntimeError("no chromium")
    with tempfile.TemporaryDirectory(prefix="dilm-chromium-") as tmp:
        profile = Path(tmp)
        proc = subprocess.Popen([exe, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            port = _devtools_port(profile, proc, timeout=60)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
                [page, *_] = [t for t in json.loads(r.read()) if t["type"] == "page"]
            return asyncio.run(_session(page["webSocketDebuggerUrl"], url, expect, screenshot, timeout))
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            with contextlib.suppress(OSError):
                shutil.rmtree(profile, ignore_errors=True)

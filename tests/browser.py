"""A real headless Chromium driven over the DevTools protocol, with no client library.

Chromium's ``--remote-debugging-pipe`` reads protocol messages on fd 3 and writes them on
fd 4, each a JSON object ended by a NUL byte: enough to open a page, record every network
request, run JavaScript in the page and take screenshots.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time

CHROMIUM = "/usr/bin/chromium"
TIMEOUT_S = 60


class Browser:
    def __init__(self, executable: str = CHROMIUM, width: int = 1280, height: int = 900):
        self.width, self.height = width, height
        self.profile = tempfile.mkdtemp(prefix="nsd-chromium-")
        to_child, self._out = os.pipe()
        self._in, from_child = os.pipe()

        def wire():  # in the child: the pipes as fd 3 (commands) and fd 4 (replies)
            a = fcntl.fcntl(to_child, fcntl.F_DUPFD, 10)  # above 4, so the dup2s cannot clobber them
            b = fcntl.fcntl(from_child, fcntl.F_DUPFD, 10)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen(
            [executable, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
             "--disable-background-networking", "--disable-component-update", "--no-first-run",
             "--disable-sync", "--disable-extensions", "--mute-audio", f"--user-data-dir={self.profile}",
             "about:blank"],
            preexec_fn=wire, close_fds=False, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # close_fds=False: subprocess would close fds 3 and 4 after wire(); every other fd of
        # this process is non-inheritable (PEP 446) and is closed at exec anyway.
        os.close(to_child)
        os.close(from_child)
        self._buf, self._id, self.events = b"", 0, []

    # -- protocol ---------------------------------------------------------------------

    def _recv(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._in], [], [], left)[0]:
                raise TimeoutError("chromium did not answer in time")
            chunk = os.read(self._in, 1 << 20)
            if not chunk:
                raise EOFError("chromium closed the DevTools pipe")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def call(self, method: str, session: str | None = None, **params) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        os.write(self._out, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            reply = self._recv(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, session: str) -> dict:
        deadline = time.monotonic() + TIMEOUT_S
        seen = 0
        while True:
            for ev in self.events[seen:]:
                if ev.get("method") == method and ev.get("sessionId") == session:
                    return ev
            seen = len(self.events)
            self.events.append(self._recv(deadline))

    # -- pages ------------------------------------------------------------------------

    def open(self, url: str) -> str:
        """Load URL in a new tab with network events on; returns the tab's session after 'load'."""
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Network.enable", session)
        self.call("Page.enable", session)
        self.call("Emulation.setDeviceMetricsOverride", session, width=self.width, height=self.height,
                  deviceScaleFactor=1, mobile=False)
        self.call("Page.navigate", session, url=url)
        self.wait_for("Page.loadEventFired", session)
        return session

    def requests(self, session: str) -> list[str]:
        """URLs of every request the tab made (data: URLs included)."""
        return [ev["params"]["request"]["url"] for ev in self.events
                if ev.get("method") == "Network.requestWillBeSent" and ev.get("sessionId") == session]

    def evaluate(self, session: str, expression: str):
        out = self.call("Runtime.evaluate", session, expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in out:
            raise RuntimeError(f"page script failed: {out['exceptionDetails']}")
        return out["result"].get("value")

    def screenshot(self, session: str, full_page: bool = True) -> bytes:
        """PNG of the whole page (or the viewport), at CSS pixel scale."""
        params = {"format": "png"}
        if full_page:
            size = self.call("Page.getLayoutMetrics", session)["cssContentSize"]
            params.update(captureBeyondViewport=True,
                          clip={"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1})
        return base64.b64decode(self.call("Page.captureScreenshot", session, **params)["data"])

    def close(self) -> None:
        try:
            self.call("Browser.close")
            self.proc.wait(10)
        except Exception:
            self.proc.kill()
            self.proc.wait(10)
        finally:
            for fd in (self._in, self._out):
                try:
                    os.close(fd)
                except OSError:
                    pass
            shutil.rmtree(self.profile, ignore_errors=True)

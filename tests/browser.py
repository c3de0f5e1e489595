"""Headless Chromium driven through the DevTools protocol over a pipe (standard library only): load a page, see
every request the page made, evaluate JavaScript in it and take a screenshot."""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

CHROMIUM = next((path for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
                 if (path := shutil.which(name))), None)


class BrowserError(Exception):
    """Chromium did not answer as expected."""


class HeadlessChromium:
    """One headless Chromium process with one page. The page can reach loopback only: every other host goes to a
    proxy address where nothing listens, and no name but 127.0.0.1 resolves."""

    def __init__(self, profile: Path, *, dead_port: int, width: int = 1280, height: int = 2000) -> None:
        if CHROMIUM is None:
            raise BrowserError("no Chromium binary on PATH")
        self._to_browser_read, self._to_browser = os.pipe()
        self._from_browser, self._from_browser_write = os.pipe()
        command = [
            CHROMIUM, "--headless", "--remote-debugging-pipe", "--no-sandbox", "--disable-gpu",
            "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--no-first-run", "--no-default-browser-check",
            f"--window-size={width},{height}", f"--proxy-server=http://127.0.0.1:{dead_port}",
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", "about:blank",
        ]
        # The protocol's pipe is fixed: Chromium reads commands from fd 3 and writes answers to fd 4. dup2 makes
        # those two inheritable; every other descriptor Python opened is closed at exec as usual.
        self._process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, close_fds=False,
            preexec_fn=self._plug_pipe)
        os.close(self._to_browser_read)
        os.close(self._from_browser_write)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict] = []
        target = self._call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self._session = self._call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.call("Network.enable")
        self.call("Page.enable")

    def _plug_pipe(self) -> None:
        # Copied out of the way first: one of the pipe's ends may itself be fd 3 or 4.
        read, write = os.dup(self._to_browser_read), os.dup(self._from_browser_write)
        os.dup2(read, 3)
        os.dup2(write, 4)

    def call(self, method: str, params: dict | None = None, timeout: float = 30.0) -> dict:
        """Send a command to the page and return its result."""
        return self._call(method, params, timeout, session=self._session)

    def _call(self, method: str, params: dict | None = None, timeout: float = 30.0,
              session: str | None = None) -> dict:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            answer = self._read(deadline - time.monotonic())
            if answer is None:
                raise BrowserError(f"no answer to {method} within {timeout} s")
            if answer.get("id") == self._next_id:
                if "error" in answer:
                    raise BrowserError(f"{method}: {answer['error']}")
                return answer.get("result", {})
            if "method" in answer:
                self.events.append(answer)

    def _read(self, timeout: float) -> dict | None:
        """The next message from Chromium, or None when none arrives in time."""
        while b"\0" not in self._buffer:
            ready, _, _ = select.select([self._from_browser], [], [], max(timeout, 0))
            if not ready:
                return None
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise BrowserError(f"Chromium exited: {self._process.stderr.read().decode(errors='replace')[-2000:]}")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def open(self, url: str) -> None:
        """Navigate the page to a URL."""
        self.call("Page.navigate", {"url": url})

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page."""
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30.0) -> Any:
        """Poll a JavaScript expression until it is truthy; its value, or BrowserError after the timeout."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise BrowserError(f"{expression} still false after {timeout} s")
            time.sleep(0.2)

    def requests(self) -> list[tuple[str, str | None]]:
        """Every request the page made so far (documents, scripts, styles, images, fonts, fetches): its URL, and why
        the browser refused to send it (such as "csp": the page's Content-Security-Policy), None when it was sent."""
        # Drain what arrived since the last command.
        while (message := self._read(0.1)) is not None:
            if "method" in message:
                self.events.append(message)
        blocked = {event["params"]["requestId"]: event["params"].get("blockedReason") for event in self.events
                   if event["method"] == "Network.loadingFailed"}
        return [(event["params"]["request"]["url"], blocked.get(event["params"]["requestId"]))
                for event in self.events if event["method"] == "Network.requestWillBeSent"]

    def screenshot(self, path: Path) -> None:
        """Save the page as a PNG."""
        data = self.call("Page.captureScreenshot", {"format": "png"})["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        """End the browser."""
        try:
            self._call("Browser.close", timeout=5)
        except BrowserError:
            pass
        try:
            self._process.wait(10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(5)
        for fd in (self._to_browser, self._from_browser):
            os.close(fd)
        self._process.stderr.close()

    def __enter__(self) -> "HeadlessChromium":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

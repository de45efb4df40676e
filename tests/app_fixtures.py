"""Start the real app (python app.py) in a subprocess for the app tests; import the fixtures you need.

The bundled toy family is used when assets/toy has it; otherwise a --smoke family (seconds, loadable,
untrained) is generated once per test session and passed with MERGE_LAB_TOY_DIR.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.paths import ROOT, TOY

STARTUP_S = 120
CHROMIUM = Path("/usr/bin/chromium")
SHOTS = Path(__file__).resolve().parent / "_output"  # the browser tests' screenshots
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-sync"]


@contextlib.contextmanager
def chromium():
    """A headless Debian Chromium for Playwright. Without /usr/bin/chromium the test is skipped, unless
    LAB_REQUIRE_BROWSER=1 (CI), where it fails."""
    if not CHROMIUM.exists():
        if os.environ.get("LAB_REQUIRE_BROWSER") == "1":
            pytest.fail(f"LAB_REQUIRE_BROWSER=1 but {CHROMIUM} is missing (apt-get install -y chromium)")
        pytest.skip(f"{CHROMIUM} not found: install Debian's chromium to run the browser test")
    # lazy: playwright is only installed for the browser tests' machines; the other tests never need it
    from playwright.sync_api import sync_playwright

    SHOTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def toy_ready(folder: Path) -> bool:
    return all((folder / p).exists() for p in ("vlm/config.json", "math/config.json", "base/config.json",
                                                "samples/samples.json", "eval"))


@pytest.fixture(scope="session")
def toy_dir(tmp_path_factory) -> Path:
    if toy_ready(TOY):
        return TOY
    out = tmp_path_factory.mktemp("toy")
    subprocess.run([sys.executable, str(ROOT / "tools" / "make_toy_family.py"), "--out", str(out), "--smoke",
                    "--threads", "1"], check=True, cwd=ROOT, capture_output=True, timeout=300)
    return out


def start_app(toy: Path, cache_dir: Path, log_path: Path, extra_args=()) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
           "MERGE_LAB_TOY_DIR": str(toy), "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
           # the app's private upload folder is made in here, where a test can look into it
           "GRADIO_TEMP_DIR": str(cache_dir.parent / "gradio-tmp")}
    log = open(log_path, "w")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen([sys.executable, "app.py", "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
                             "--cache-dir", str(cache_dir), "--threads", "1", *extra_args],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    t0 = time.monotonic()
    while time.monotonic() - t0 < STARTUP_S:
        if proc.poll() is not None:
            raise RuntimeError(f"app exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.5)
    stop_app(proc)
    raise RuntimeError(f"app did not answer within {STARTUP_S} s:\n{log_path.read_text()[-3000:]}")


def stop_app(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)  # the app and its worker (same process group)
        proc.wait(10)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def worker_pids(app_pid: int) -> list[int]:
    """Live (not zombie) worker processes the app spawned: children running multiprocessing's spawn_main."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == app_pid and fields[0] != "Z" and "spawn_main" in cmd:
            out.append(int(d.name))
    return out


def wait_worker(app_pid: int, not_pid: int | None = None, timeout: float = 60) -> int:
    """The worker's pid once there is exactly one (other than not_pid)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        pids = [p for p in worker_pids(app_pid) if p != not_pid]
        if len(pids) == 1:
            return pids[0]
        time.sleep(0.2)
    raise AssertionError(f"no worker process under the app (pid {app_pid}) within {timeout} s")


@dataclass
class RunningApp:
    proc: subprocess.Popen
    url: str
    cache: Path
    log: Path


@pytest.fixture(scope="session")
def app_handle(toy_dir, tmp_path_factory):
    """One app for the whole session (a start costs 5-10 s): a test that needs an app of its own
    (other flags, a killed server) starts it with start_app."""
    tmp = tmp_path_factory.mktemp("app")
    proc, url = start_app(toy_dir, tmp / "cache", tmp / "app.log")
    yield RunningApp(proc, url, tmp / "cache", tmp / "app.log")
    stop_app(proc)


@pytest.fixture(scope="session")
def app_url(app_handle):
    return app_handle.url


def press_cancel(client, api_name: str = "/cancel") -> str | None:
    """Call a Cancel endpoint through gradio_client; None when the client lost its answer.

    When the job being cancelled finishes at that very moment, the session's event stream closes (nothing
    was pending any more) just after the cancel joined it, and gradio_client raises CancelledError for a
    call the server did run. The caller then judges by the job's own result."""
    try:
        return client.predict(api_name=api_name)
    except concurrent.futures.CancelledError:
        return None

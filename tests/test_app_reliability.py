"""Odd inputs and faults against the real app (python app.py in a subprocess, driven with gradio_client).

Bad images and overlong prompts are refused or cut with a visible message; a worker killed with
SIGKILL mid-job is noticed, restarted, its jobs fail with a clear message and the next merge works;
an export that is cancelled or killed leaves no partial folder. Security cases: tests/test_app_security.py.
"""

from __future__ import annotations

import os
import signal
import struct
import time
import zlib
from pathlib import Path

import pytest

from tests.app_fixtures import press_cancel, wait_worker
from webapp.presets import DEFAULT as TOY_PRESET

pytestmark = pytest.mark.slow


# -- images that must be refused ----------------------------------------------------------------
def _png(path: Path, width: int, height: int, rows=None, mode_1bit: bool = False) -> Path:
    """A PNG written by hand (streamed, so a huge declared size costs no memory)."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    depth, color, row_bytes = (1, 0, (width + 7) // 8) if mode_1bit else (8, 2, width * 3)
    comp = zlib.compressobj(9)
    row = b"\0" * (row_bytes + 1)
    body = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0))
                     + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def bad_images(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    d = tmp_path_factory.mktemp("bad_images")
    big = _png(d / "big_file.png", 32, 32)
    with open(big, "ab") as f:  # a valid image with 21 MB of trailing bytes
        f.write(b"\0" * (21 * 2**20))
    fake = d / "not_an_image.png"
    fake.write_text("hello, I am text pretending to be a PNG\n" * 20)
    return {
        "oversized": (_png(d / "wide.png", 5000, 8), "5000×8 px; the limit is 4096 px a side"),
        "big file": (big, "the limit is 20 MB per image"),
        "bomb": (_png(d / "bomb.png", 20000, 20000, mode_1bit=True), "decompression bomb"),
        "not an image": (fake, "is not an image"),
    }


@pytest.fixture(scope="module")
def client(app_url):
    from gradio_client import Client

    return Client(app_url, verbose=False)


def _chat(client, text, image=None, **kw):
    from gradio_client import handle_file

    message = {"text": text, "files": [handle_file(str(image))] if image else []}
    merged, original, *_ = client.predict(message=message, preset=TOY_PRESET, max_new_tokens=8,
                                          api_name="/chat", **kw)
    return merged, original


def _text(message: dict) -> str:
    """A chatbot message's text (content is a string or a list of parts, by gradio version)."""
    content = message["content"]
    if isinstance(content, str):
        return content
    parts = content if isinstance(content, list) else [content]
    return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in parts)


def _merge(client, alpha=0.5, method="task_arithmetic"):
    return client.predict(preset=TOY_PRESET, method=method, knob1=alpha, api_name="/merge")[0]


def test_chat_refuses_bad_images_and_keeps_working(client, bad_images, toy_dir):
    for case, (path, expected) in bad_images.items():
        merged, original = _chat(client, f"what is in {case}?", path)
        answer = _text(original[-1])
        assert answer.startswith("✗ image refused:") and expected in answer, (case, answer)
        assert "\n" not in answer, answer  # one line
    sample = sorted((toy_dir / "samples").glob("*.png"))[0]
    merged, original = _chat(client, "what color is it ?", sample)
    answer = _text(original[-1])
    assert original[-1]["role"] == "assistant" and "✗" not in answer and "error" not in answer, answer


def test_attention_refuses_bad_images(client, bad_images):
    from gradio_client import handle_file

    for case, (path, expected) in bad_images.items():
        status, *_ = client.predict(preset=TOY_PRESET, images=[handle_file(str(path))],
                                    question="describe the image .", api_name="/attention")
        assert status.startswith("✗ image refused:") and expected in status, (case, status)
    status, *_ = client.predict(preset=TOY_PRESET, rank=4, api_name="/similarity")
    assert status.startswith("✓"), status


def test_overlong_prompt_is_cut_with_notice(client):
    merged, original = _chat(client, "what is two plus three ? " * 400)  # ~2,400 tokens; context 128
    answer = _text(original[-1])
    assert "_Note: the question was cut from" in answer and "the question was cut from" in answer and "to fit the model's context" in answer, answer
    merged, original = _chat(client, "x" * 30_000)  # over the UI's character cap as well
    assert "30,000 characters long" in _text(original[-1]), _text(original[-1])


def _wait_for(job, needle: str, timeout: float = 60) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        outs = job.outputs()
        if (outs and needle in str(outs[-1][0])) or job.done():
            return
        time.sleep(0.1)
    raise AssertionError(f"never saw {needle!r}: {job.outputs()[-1:]}")


def test_worker_sigkill_mid_job_restarts_and_next_merge_works(client, app_handle):
    pid = wait_worker(app_handle.proc.pid)
    slow = client.submit(preset=TOY_PRESET, items_per_suite=40, live=True, api_name="/knockout")  # live: not the shipped one
    _wait_for(slow, "Computing")
    queued = client.submit(preset=TOY_PRESET, method="linear", knob1=0.15, api_name="/merge")
    _wait_for(queued, "Waiting for the worker")
    os.kill(pid, signal.SIGKILL)
    running, waiting = slow.result(timeout=60)[0], queued.result(timeout=60)[0]
    for status in (running, waiting):
        assert "the worker stopped unexpectedly" in status and "restarted" in status, status
    assert waiting.startswith("✗ **Merge failed:**"), waiting
    new_pid = wait_worker(app_handle.proc.pid, not_pid=pid)
    assert new_pid != pid
    assert "Merged with linear" in _merge(client, 0.3, "linear")
    assert app_handle.proc.poll() is None  # the app itself never stopped


def _assert_no_partial_exports(cache: Path) -> list[Path]:
    exports = cache / "exports"
    leftovers = [p for p in exports.glob(".*")] if exports.exists() else []
    assert not leftovers, f"partial export folders left behind: {leftovers}"
    done = sorted(p for p in exports.iterdir()) if exports.exists() else []
    for folder in done:  # every folder that exists is a complete model folder
        assert (folder / "config.json").is_file() and list(folder.glob("*.safetensors")), folder
    return done


def test_cancel_mid_export_leaves_no_partial_folder(client, app_handle):
    assert "Merged with" in _merge(client, 0.25)
    before = _assert_no_partial_exports(app_handle.cache)
    job = client.submit(api_name="/export")
    _wait_for(job, "Writing the merged model", timeout=30)
    press_cancel(client)  # its answer may be lost if the export ends just then: judged below
    status = job.result(timeout=60)
    status = status[0] if isinstance(status, (list, tuple)) else status
    after = _assert_no_partial_exports(app_handle.cache)
    if "cancelled" in status:
        assert after == before, status
    else:  # finished before the cancel arrived: then it is complete
        assert status.startswith("✓ Exported") and len(after) == len(before) + 1, status


def test_worker_killed_mid_export_leaves_no_partial_folder(client, app_handle):
    pid = wait_worker(app_handle.proc.pid)
    before = _assert_no_partial_exports(app_handle.cache)
    stale = app_handle.cache / "exports" / ".linear-deadbeef.tmp-0000"  # as a killed export leaves it
    stale.mkdir(parents=True)
    (stale / "model-00001-of-00002.safetensors").write_bytes(b"\0" * 1024)
    job = client.submit(api_name="/export")
    _wait_for(job, "Writing the merged model", timeout=30)
    os.kill(pid, signal.SIGKILL)
    status = job.result(timeout=60)
    status = status[0] if isinstance(status, (list, tuple)) else status
    wait_worker(app_handle.proc.pid, not_pid=pid)
    t0 = time.monotonic()
    while stale.exists() and time.monotonic() - t0 < 60:  # the new worker sweeps temp folders
        time.sleep(0.2)
    after = _assert_no_partial_exports(app_handle.cache)
    if status.startswith("✓ Exported"):
        assert len(after) == len(before) + 1
    else:
        assert "the worker stopped unexpectedly" in status and after == before, status
    assert "Merged with" in _merge(client, 0.35)

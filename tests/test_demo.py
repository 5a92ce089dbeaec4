"""`blackbird demo` and `blackbird chat`, run as a shell runs them: subprocesses in an empty folder,
on the embedded default (a nats-server of their own), with no BLACKBIRD_* settings but the log level.

The demo's promise is that it exits 0 in under a minute in an empty folder, first run included
(when the local embedding model is loaded), so its wall time is part of what is checked."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

CLI = [sys.executable, "-m", "blackbird._cli"]
DEMO_DEADLINE = 60.0  # seconds: the demo's promise


def _env() -> dict[str, str]:
    """This environment without BLACKBIRD_* settings, as a new user's shell would be."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLACKBIRD_")}
    env["BLACKBIRD_LOG_LEVEL"] = "warning"
    return env


def test_demo_in_an_empty_folder_exits_0_within_a_minute_and_shows_every_step(tmp_path: Path) -> None:
    started = time.monotonic()
    result = subprocess.run(
        [*CLI, "demo"], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=DEMO_DEADLINE + 30
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stdout + result.stderr
    assert elapsed < DEMO_DEADLINE, f"the demo took {elapsed:.1f} s\n{result.stdout}"
    out = result.stdout
    for heading in ("1. Sessions", "2. Usage", "3. A quota refusal", "4. Rate limiting", "5. Concurrency",
                    "6. A conversation that learns", "7. A second session recalls it", "8. A live stream",
                    "9. An audit of what happened", "demo finished"):
        assert heading in out, f"missing {heading!r}:\n{out}"
    assert "QuotaExceededError" in out
    assert "RateLimitError" in out
    assert "My name is Ada and I live in Paris" in out
    recalled = out[out.index("7. A second session recalls it"):out.index("8. A live stream")]
    assert "Paris" in recalled, out  # the second session was given what the first one taught
    streamed = out[out.index("8. A live stream"):out.index("9. An audit")]
    assert all(text in streamed for text in ("build started", "tests passed", "deployed")), out
    assert "refused" in out[out.index("9. An audit"):]  # the audit shows the refusals and why
    assert list(tmp_path.iterdir()) == []  # the default data folder is a temporary one, removed


def test_demo_refuses_a_data_folder_that_is_not_empty(tmp_path: Path) -> None:
    (tmp_path / "something").write_text("x")
    result = subprocess.run(
        [*CLI, "demo", "--data-dir", str(tmp_path)], env=_env(), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "expected an empty folder" in result.stderr


def test_chat_answers_a_line_and_ends_at_quit(tmp_path: Path) -> None:
    result = subprocess.run(
        [*CLI, "chat", "--user", "ada", "--data-dir", str(tmp_path / "data")],
        input="hello\n/quit\nnot sent\n", env=_env(), capture_output=True, text=True, timeout=90,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("session ") and "'ada'" in lines[0]
    replies = [line for line in lines if line.startswith("agent> ")]
    assert len(replies) == 1, result.stdout  # "hello" answered; nothing after /quit was sent
    assert replies[0].removeprefix("agent> ").strip(), result.stdout


def test_chat_ends_at_end_of_input(tmp_path: Path) -> None:
    result = subprocess.run(
        [*CLI, "chat", "--user", "ada", "--data-dir", str(tmp_path / "data")],
        input="", env=_env(), capture_output=True, text=True, timeout=90,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("session ")


def test_chat_prints_a_refused_admission_and_goes_on(tmp_path: Path) -> None:
    # the free tier admits 2 send_message calls a second: lines sent back to back are refused
    lines = "".join(f"line {i}\n" for i in range(8))
    result = subprocess.run(
        [*CLI, "chat", "--user", "ada", "--tier", "free", "--data-dir", str(tmp_path / "data")],
        input=lines, env=_env(), capture_output=True, text=True, timeout=90,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "error: RateLimitError: " in result.stderr
    assert result.stdout.count("agent> ") == 8  # every line was tried, the refused ones too

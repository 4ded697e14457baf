"""A short run of the chaos benchmark (bench/chaos.py) as a test: real receiver, two workers
SIGKILLed every 2-3 s, Redis SIGKILLed once and restarted on its AOF, a faulty sandbox.

Bounded: 60 clients x 3 versions x 2 providers (~200 events). Asserts what issue 11 demands:
nothing lost, duplicated, stale or stuck. The seed is printed with the report on failure.
"""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO, clean_env


def test_short_chaos_run_loses_duplicates_and_strands_nothing() -> None:
    out = subprocess.run(
        [sys.executable, "bench/chaos.py", "--clients", "60", "--versions", "3", "--rate", "30",
         "--redis-kill-after", "3", "--drain-timeout", "240", "--seed", "11"],
        capture_output=True, text=True, env=clean_env(), timeout=600, cwd=REPO,
    )
    report = out.stdout + out.stderr[-3000:]
    assert "lost             0 " in out.stdout, report
    assert "duplicated       0 " in out.stdout, report
    assert "stale            0 " in out.stdout, report
    assert "stuck            0" in out.stdout, report
    assert out.returncode == 0, report

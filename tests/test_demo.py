"""`clientsync demo` (what `make demo` runs) exits 0 with every change applied and Qonto's refusal shown."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.conftest import REPO, clean_env
from worker.models import PROVIDER_NAMES


def test_the_demo_applies_every_change_and_shows_the_one_rejection() -> None:
    out = subprocess.run([sys.executable, "-m", "worker", "demo", "--timeout", "90"], cwd=REPO, env=clean_env(),
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert "as a signed webhook -> HTTP 202" in text and "as a Celery job" in text
    rows = re.findall(r"^\s{4}(\w+)\s+(succeeded|dead|skipped|retrying|queued|running)\s", text, re.M)
    assert len(rows) == 3 * len(PROVIDER_NAMES)
    # Changes 1 and 2 reach all five providers; change 3 all but Qonto, which refuses it.
    assert rows[:10] == [(p, "succeeded") for p in PROVIDER_NAMES] * 2
    assert rows[10:] == [(p, "dead" if p == "qonto" else "succeeded") for p in PROVIDER_NAMES]
    assert "region" in text.split("qonto")[-1]  # the rejection names the field
    assert "@" not in text.replace("***@", "")  # emails are masked

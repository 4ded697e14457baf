"""No log line carries a full email or a secret: Celery's own lines included, in a real process."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.conftest import REPO, clean_env
from worker.logsafe import Masker, env_secrets

EMAIL = "jane.doe@example.com"


def test_celerys_invalid_message_lines_are_masked_in_a_worker_process() -> None:
    # The lines Celery writes for a message it cannot take, through Celery's own loggers, in a
    # process that imported the worker's app (which installs the masking) as `celery worker` does.
    script = textwrap.dedent(f"""
        import logging, sys
        logging.basicConfig(stream=sys.stdout, level=logging.INFO)
        import tasks.app
        from celery.worker.consumer import consumer
        body = '{{"client": {{"email": "{EMAIL}"}}}}'
        consumer.logger.error(consumer.INVALID_TASK_ERROR, ValueError("bad"), body)
        consumer.logger.critical(consumer.MESSAGE_DECODE_ERROR, ValueError("x"), "application/json", "utf-8",
                                 "{{}}", body)
        try:
            raise KeyError("{EMAIL}")
        except KeyError:
            logging.getLogger("kombu").exception("unhandled %s", "{EMAIL}")
        logging.getLogger("x").info("token %s", "whsec_c2VjcmV0c2VjcmV0c2VjcmV0")
    """)
    env = clean_env(CLIENTSYNC_MONITOR_TOKEN="t" * 40, CLIENTSYNC_QONTO_TOKEN="qonto-secret-token-value")
    out = subprocess.run([sys.executable, "-c", script + "logging.getLogger('y').warning('q %s', "
                          "'qonto-secret-token-value')"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=60, check=True)
    text = out.stdout + out.stderr
    assert "The full contents of the message body was" in text and "j***@e***.com" in text
    assert EMAIL not in text
    assert "whsec_c2Vj" not in text and "qonto-secret-token-value" not in text
    assert text.count("***") >= 5


def test_the_masker_hides_configured_secrets_and_emails() -> None:
    secrets = env_secrets({"CLIENTSYNC_MONITOR_TOKEN": "abcdefghijklmnop", "CLIENTSYNC_QUEUE": "celery",
                           "CLIENTSYNC_WEBHOOK_SECRET": "whsec_a,whsec_bbbbbbbbbb"})
    assert secrets == ["abcdefghijklmnop", "whsec_bbbbbbbbbb"]
    mask = Masker(secrets)
    assert mask("x abcdefghijklmnop y celery a@b.example.org") == "x *** y celery a***@b***.org"
    assert mask("Authorization: Bearer sometokenvalue") == "Authorization: Bearer ***"

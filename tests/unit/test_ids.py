"""Every id and name pattern matches the whole string: a trailing newline passes
Python's ``$`` and would put a raw LF into a request line, a path or a unit name."""

from __future__ import annotations

import re

import pytest

from ssw.batch.app import WINDOW
from ssw.batch.store import BATCH_ID, FILE_ID, JOB_ID
from ssw.common.contract import NAME_RE, valid_name
from ssw.common.routes import RESPONSE_ID
from ssw.loader.app import JOB_ID as PULL_JOB_ID

CASES = [
    (WINDOW, "24h"),
    (FILE_ID, "file-" + "0" * 24),
    (BATCH_ID, "batch_" + "0" * 24),
    (JOB_ID, "job_" + "0" * 24),
    (PULL_JOB_ID, "pull-" + "0" * 12),
    (NAME_RE, "qwen3-8b"),
    (RESPONSE_ID, "resp_x"),
]


@pytest.mark.parametrize(("pattern", "good"), CASES)
@pytest.mark.parametrize("tail", ["\n", "\r\n", "\nGET / HTTP/1.1", " "])
def test_an_id_with_anything_after_it_is_refused(pattern: re.Pattern[str], good: str, tail: str) -> None:
    assert pattern.match(good)
    assert not pattern.match(good + tail)


def test_a_model_name_with_a_newline_is_not_a_name() -> None:
    assert valid_name("alpha") and not valid_name("alpha\n")

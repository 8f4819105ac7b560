"""The batch runner's result segments: a failed write leaves nothing behind, and a
batch is collected only from whole result lines."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import orjson
import pytest

from ssw.batch.input import Line
from ssw.batch.results import ResultsCorrupt, _append_synced, _check_result
from ssw.batch.store import Done


def result(custom_id: str) -> bytes:
    return orjson.dumps({"custom_id": custom_id, "response": {"status_code": 200}, "error": None}) + b"\n"


def test_appends_return_where_each_result_starts(tmp_path: Path) -> None:
    segment = tmp_path / "runner.jsonl"
    first, second = result("a"), result("b")
    assert _append_synced(segment, first) == 0
    assert _append_synced(segment, second) == len(first)
    assert segment.read_bytes() == first + second


def test_a_write_past_the_file_size_limit_leaves_the_segment_as_it_was(tmp_path: Path) -> None:
    """A short write (the disk full; here RLIMIT_FSIZE, in a child so the test's own
    process keeps its limits) is cut back: the next result starts where the last ended."""
    segment = tmp_path / "runner.jsonl"
    script = textwrap.dedent(
        f"""
        import resource, sys
        from pathlib import Path
        from ssw.batch.results import _append_synced
        segment = Path({str(segment)!r})
        first = b'{{"custom_id": "a"}}' + b"\\n"
        _append_synced(segment, first)
        resource.setrlimit(resource.RLIMIT_FSIZE, (len(first) + 10, len(first) + 10))
        try:
            _append_synced(segment, b'{{"custom_id": "b", "pad": "' + b"x" * 100 + b'"}}\\n')
        except OSError as exc:
            print("refused:", exc.strerror)
        print(segment.stat().st_size == len(first))
        print(_append_synced(segment, b'{{"c": 1}}\\n') == len(first))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30, check=True)
    assert out.stdout.splitlines() == ["refused: File too large", "True", "True"], out.stderr
    assert segment.read_bytes() == b'{"custom_id": "a"}\n{"c": 1}\n'


@pytest.mark.parametrize(
    "data",
    [
        b'{"custom_id": "a", "resp',  # cut short
        b'{"custom_id": "a"}',  # no newline
        b'{"custom_id": "a"}\n{"custom_id": "b"}\n',  # two lines
        b'{"custom_id": "b"}\n',  # another line's result
        b"\x00\x00\x00\x00\n",  # not JSON
        b'["custom_id"]\n',  # not an object
    ],
)
def test_a_slice_that_is_not_the_lines_whole_result_is_refused(data: bytes) -> None:
    line = Line(index=3, custom_id="a", model="m", offset=0, length=1)
    with pytest.raises(ResultsCorrupt, match="line 4: bytes 10-"):
        _check_result(data, line, Done("runner.jsonl", 10, len(data), True))


def test_the_lines_whole_result_passes() -> None:
    line = Line(index=0, custom_id="a", model="m", offset=0, length=1)
    data = result("a")
    _check_result(data, line, Done("runner.jsonl", 0, len(data), True))

from __future__ import annotations

import pytest

from ssw.common.prom import label_host


@pytest.mark.parametrize(
    ("line", "labelled"),
    [
        (
            b'ssw_requests_total{model="a",status="200"} 3.0',
            b'ssw_requests_total{host="h1",model="a",status="200"} 3.0',
        ),
        (b"ssw_fleet_connected 1.0", b'ssw_fleet_connected{host="h1"} 1.0'),
        (b"ssw_x{} 2.0", b'ssw_x{host="h1"} 2.0'),
        (b'ssw_err{why="a}b"} 1.0', b'ssw_err{host="h1",why="a}b"} 1.0'),
        (b"# HELP ssw_x Something.", b"# HELP ssw_x Something."),
        (b"", b""),
    ],
)
def test_every_sample_gets_the_host_label(line: bytes, labelled: bytes) -> None:
    assert label_host(line, "h1") == labelled


def test_without_a_fleet_nothing_changes() -> None:
    text = b'ssw_requests_total{model="a"} 3.0\n'
    assert label_host(text, None) is text

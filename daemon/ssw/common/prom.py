"""What every role's metrics share: the exposition format's content type and the
host label a fleet puts on every sample. Names follow Prometheus conventions:
the ``ssw_`` prefix, base units (seconds, bytes), ``_total`` for counters."""

from __future__ import annotations

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def label_host(text: bytes, host: str | None) -> bytes:
    """Every sample labelled host="<host>" (in a fleet: one Prometheus scrapes many hosts
    through the same names). Without a host, the text as it was."""
    if not host:
        return text
    label = b'host="' + host.encode() + b'"'
    out = []
    for line in text.split(b"\n"):
        if line and not line.startswith(b"#"):
            name_end = min((i for i in (line.find(b"{"), line.find(b" ")) if i >= 0), default=-1)
            if name_end >= 0:
                if line[name_end : name_end + 1] == b"{":
                    closing = line.rfind(b"}")
                    inner = line[name_end + 1 : closing]
                    line = line[: name_end + 1] + label + (b"," + inner if inner else b"") + line[closing:]
                else:
                    line = line[:name_end] + b"{" + label + b"}" + line[name_end:]
        out.append(line)
    return b"\n".join(out)

"""Which network interface holds an address of this host: torch.distributed's gloo
(and NCCL's bootstrap) bind to the interface they are given, not to an address, and
left to themselves take the one the host name resolves to, often loopback. A
rank of a model across hosts is told the interface of its fleet address."""

from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct
from pathlib import Path

SIOCGIFADDR = 0x8915
IF_INET6 = Path("/proc/net/if_inet6")


def interface_of(address: str) -> str | None:
    """The name of the interface that carries ``address``; None when none does. Blocking
    (ioctls and /proc): run it in a thread."""
    wanted = ipaddress.ip_address(address)
    if wanted.version == 6:
        try:
            lines = IF_INET6.read_text().splitlines()
        except OSError:
            return None
        for line in lines:
            fields = line.split()
            if len(fields) == 6 and ipaddress.IPv6Address(int(fields[0], 16)) == wanted:
                return fields[5]
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue  # no IPv4 address on it
            if ipaddress.IPv4Address(packed[20:24]) == wanted:
                return name
    return None

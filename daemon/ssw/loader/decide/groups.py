"""Which hosts run a model across hosts with this one as its head, and on which
master port (pure).

The head's loader decides, from the host records the fleet's Redis holds: the
members are hosts of the same fleet (live records only) that have the model on
disk, say where its ranks listen, and have room for one rank now (their own
placement's preview, measured free memory and evictions included). Fewest
evictions first, then the most memory left, then the name, so that the choice
is the same whoever makes it.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from ssw.errors import NoCapacity


@dataclass(frozen=True)
class MemberOption:
    """A host that might run one rank: None for what it lacks."""

    host: str
    address: str | None  # where its ranks listen; None: not set up for ranks
    has_model: bool
    free_after: int | None  # bytes its GPU keeps free after the rank and its evictions; None: no room
    victims: int = 0


def choose_members(model: str, wanted: int, options: Sequence[MemberOption]) -> list[MemberOption]:
    """``wanted`` hosts besides the head for ``model``; NoCapacity naming what each
    host lacks when there are not enough."""
    fit = [o for o in options if o.address and o.has_model and o.free_after is not None]
    if len(fit) >= wanted:
        return sorted(fit, key=lambda o: (o.victims, -(o.free_after or 0), o.host))[:wanted]
    why = []
    for o in sorted(options, key=lambda o: o.host):
        if o in fit:
            why.append(f"{o.host}: room")
        elif not o.has_model:
            why.append(f"{o.host}: no {model} on disk")
        elif not o.address:
            why.append(f"{o.host}: no rank address (fleet.listen)")
        else:
            why.append(f"{o.host}: no room for a rank")
    seen = "; ".join(why) if why else "no other host is in the fleet"
    raise NoCapacity(
        f"{model} spans {wanted + 1} hosts, but only {len(fit)} other host(s) can take a rank now ({seen})"
    )


def choose_port(ports: tuple[int, int], avoid: Collection[int], rng: random.Random) -> int:
    """A master port for a new start: in the configured range, and none an earlier group
    used (a rank left from it must never find the new group on its port)."""
    low, high = ports
    free = high - low + 1 - sum(1 for p in set(avoid) if low <= p <= high)
    if free <= 0:
        raise NoCapacity(f"every port of fleet.rank_ports {low}-{high} was used by a recent group")
    while True:
        port = rng.randint(low, high)
        if port not in avoid:
            return port

"""The README and docs/ as a reader meets them: every relative link leads to a file
that exists (and to a heading there, when it names one), and every configuration
key they name in backticks (``section.key``) is a key of the config."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from ssw.config import Config
from tests.harness.stack import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "bench" / "README.md"]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
KEY = re.compile(r"`([a-z_]+(?:\.[a-z0-9_]+)+)`")


def prose(text: str) -> str:
    """The text outside fenced code blocks (links in code are not links)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)


def anchors(path: Path) -> set[str]:
    """The anchors GitHub gives a page's headings."""
    out: set[str] = set()
    for heading in re.findall(r"^#{1,6} (.+)$", prose(path.read_text()), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        n = 0
        while (candidate := slug if n == 0 else f"{slug}-{n}") in out:
            n += 1
        out.add(candidate)
    return out


def links() -> list[tuple[Path, str]]:
    return [(page, target) for page in PAGES for target in LINK.findall(prose(page.read_text()))]


@pytest.mark.parametrize(("page", "target"), links(), ids=lambda v: v.name if isinstance(v, Path) else v)
def test_every_link_leads_somewhere(page: Path, target: str) -> None:
    if re.match(r"^[a-z]+:", target):
        return  # an absolute URL: not this repository's to check
    path, _, anchor = target.partition("#")
    destination = (page.parent / path).resolve() if path else page
    assert destination.exists(), f"{page.relative_to(REPO)} links to {target}, which does not exist"
    if anchor and destination.suffix == ".md":
        assert anchor in anchors(destination), f"{page.relative_to(REPO)}: no heading #{anchor} in {path or page.name}"


def config_keys() -> list[tuple[Path, str]]:
    sections = set(Config.model_fields)
    out = []
    for page in PAGES:
        for key in sorted(set(KEY.findall(page.read_text()))):
            if key.split(".", 1)[0] in sections and not key.endswith((".py", ".yaml", ".json", ".md")):
                out.append((page, key))
    return out


def resolve(model: type[BaseModel], dotted: str) -> Any:
    field_name, _, rest = dotted.partition(".")
    field = model.model_fields.get(field_name)
    assert field is not None, field_name
    annotation = field.annotation
    if not rest:
        return annotation
    assert isinstance(annotation, type) and issubclass(annotation, BaseModel), f"{field_name} has no keys"
    return resolve(annotation, rest)


def test_the_docs_name_config_keys_at_all() -> None:
    assert len(config_keys()) > 50  # the check below would pass vacuously otherwise


@pytest.mark.parametrize(("page", "key"), config_keys(), ids=lambda v: v.name if isinstance(v, Path) else v)
def test_every_config_key_named_exists(page: Path, key: str) -> None:
    try:
        resolve(Config, key)
    except AssertionError as exc:
        raise AssertionError(f"{page.relative_to(REPO)} names `{key}`, which is no key of the config ({exc})") from None


PATH_NAMED = re.compile(r"`((?:daemon/)?ssw/[\w/]+\.py)`")


@pytest.mark.parametrize(
    ("page", "path"),
    [(page, p) for page in PAGES for p in sorted(set(PATH_NAMED.findall(page.read_text())))],
    ids=lambda v: v.name if isinstance(v, Path) else v,
)
def test_every_module_named_exists(page: Path, path: str) -> None:
    where = REPO / (path if path.startswith("daemon/") else "daemon/" + path)
    assert where.exists(), f"{page.relative_to(REPO)} names {path}, which does not exist (moved?)"

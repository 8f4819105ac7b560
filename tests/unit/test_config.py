from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from ssw.config import Config, load_config
from ssw.errors import ConfigError
from ssw.loader.models.registry import ModelOverride
from tests.harness.stack import REPO


def test_shipped_config_validates_and_documents_every_default() -> None:
    path = REPO / "etc/ssw/config.yaml"
    assert load_config(path) == Config()
    # Every setting appears in the documented example, so it cannot drift.
    raw = yaml.safe_load(path.read_text())

    def keys(model: type, prefix: str = "") -> list[str]:
        out = []
        for name, field in model.model_fields.items():
            out.append(prefix + name)
            ann = field.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields") and name not in ("public", "admin"):
                out += keys(ann, prefix + name + ".")
        return out

    for dotted in keys(Config):
        node = raw
        for part in dotted.split("."):
            assert isinstance(node, dict) and part in node, f"{dotted} is not documented in etc/ssw/config.yaml"
            node = node[part]


def test_shipped_models_file_documents_every_key() -> None:
    header = (REPO / "models.yaml").read_text().split("\nmodels:", 1)[0]
    documented = {line[1:].split()[0] for line in header.splitlines() if line.startswith("#   ") and line[4] != " "}
    assert documented == set(ModelOverride.model_fields)


def test_defaults_match_the_ssw_design() -> None:
    cfg = Config()
    assert (cfg.public.host, cfg.public.port) == ("0.0.0.0", 8000)
    assert (cfg.admin.host, cfg.admin.port) == ("127.0.0.1", 8001)
    assert cfg.models_dir == Path("/data/models")
    assert cfg.gateway.wait_timeout_s == 180


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("admin: {host: 0.0.0.0, port: 8001}", "admin"),
        ("public: {host: 0.0.0.0, port: 99999}", "public.port"),
        ("gpus: {source: simulated}", "gpus"),
        ("gpus: {source: cuda}", "gpus.source"),
        ("workers: {user: root}", "workers.user"),
        ("workers: {socket_dir: run/ssw}", "workers.socket_dir"),
        ("workers: {socket_dir: /" + "x" * 70 + "}", "workers.socket_dir"),
        ("workers: {slice: ssw.service}", "workers.slice"),
        ("gateway: {not_loaded: maybe}", "gateway.not_loaded"),
        ("health: {interval_s: -1}", "health.interval_s"),
        ("no_such_key: 1", "no_such_key"),
        ("vllm: {pyhton: /x}", "vllm.pyhton"),
    ],
)
def test_errors_name_the_failing_key(tmp_path: Path, text: str, key: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert f"{path}: {key}:" in str(err.value)


def test_relative_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("models_dir: models\nmodels_file: models.yaml\n")
    cfg = load_config(path)
    assert cfg.models_dir == tmp_path / "models"
    assert cfg.models_file == tmp_path / "models.yaml"


def test_unreadable_and_malformed_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


FLEET = {
    "redis_url": "rediss://:pw@10.0.0.1:6380/0",
    "host": "a",
    "advertise_url": "https://10.0.0.2:8443",
    "listen": {"host": "10.0.0.2", "port": 8443},
    "tls_ca_file": "/etc/ssw/fleet/ca.pem",
    "tls_cert_file": "/etc/ssw/fleet/host.pem",
    "tls_key_file": "/etc/ssw/fleet/host.key",
}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"advertise_url": "http://10.0.0.2:8443"}, "advertise_url: 'http://10.0.0.2:8443' is not https://"),
        ({"redis_url": "redis://:pw@10.0.0.1:6379/0"}, "redis_url: the fleet's Redis is not rediss://"),
        ({"tls_cert_file": None}, "tls_cert_file is required"),
        ({"listen": None}, "listen (the fleet listener"),
    ],
)
def test_a_fleet_in_clear_is_refused_unless_insecure_is_said(change: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(message)):
        Config.model_validate({"fleet": {**FLEET, **change}})
    if "listen" not in change:
        Config.model_validate({"fleet": {**FLEET, **change, "insecure": True}})


def test_a_fleet_over_tls_validates() -> None:
    assert Config.model_validate({"fleet": FLEET}).fleet.enabled

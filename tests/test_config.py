"""Settings: typed, frozen, from TOML with env overrides; errors name file, key and reason."""
from __future__ import annotations

import pytest

from oms_pipeline import config


def write(tmp_path, text):
    path = tmp_path / "oms.toml"
    path.write_text(text)
    return path


def test_the_shipped_default_loads():
    s = config.load()
    assert s.store.url.startswith("sqlite:///") and s.http.host == "127.0.0.1"
    assert s.stage_defaults.io.pool >= 1


def test_unknown_key_stops_startup_naming_file_and_key(tmp_path):
    path = write(tmp_path, "[http]\nprot = 80\n")
    with pytest.raises(config.ConfigError, match=r"oms.toml: key http.prot: unknown key"):
        config.load(path, env={})


def test_bad_value_names_the_key(tmp_path):
    path = write(tmp_path, "[stages.fill]\npool = 0\n")
    with pytest.raises(config.ConfigError, match=r"key stages.fill.pool: Expected `int` >= 1"):
        config.load(path, env={})


def test_postgres_writers_are_bounded_by_the_pool(tmp_path):
    assert config.from_mapping({}).store.writers == 2
    path = write(tmp_path, "[store]\nwriters = 8\n")
    with pytest.raises(config.ConfigError, match=r"key store.writers: Expected `int` <= 7"):
        config.load(path, env={})


def test_environment_overrides_the_file(tmp_path):
    path = write(tmp_path, "[http]\nport = 8000\n")
    s = config.load(path, env={"OMS__HTTP__PORT": "9001", "OMS__STORE__URL": "memory://"})
    assert s.http.port == 9001 and s.store.url == "memory://"


def test_settings_are_frozen():
    s = config.from_mapping({})
    with pytest.raises(AttributeError):
        s.http.port = 1


def test_not_toml_is_a_clear_error(tmp_path):
    with pytest.raises(config.ConfigError, match="not valid TOML"):
        config.load(write(tmp_path, "[http\n"), env={})

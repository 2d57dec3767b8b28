from pathlib import Path

import pytest

from gateway.config import load_config
from gateway.errors import ConfigError


def test_layers_later_wins(tmp_path):
    user = tmp_path / "user.yaml"
    user.write_text("local: {cpus: 3, kill_grace_s: 1}\nagent: {interval_s: 5}\n")
    env = {"HPCGW_CONFIG": str(user), "HPCGW_LOCAL__CPUS": "7", "HPCGW_DATA_DIR": str(tmp_path / "d"),
           "HOME": str(tmp_path)}
    config = load_config({"agent": {"interval_s": 0.5}}, environ=env)
    assert config.local.cpus == 7            # env beats the user file
    assert config.local.kill_grace_s == 1    # user file beats the defaults
    assert config.agent.interval_s == 0.5    # caller beats everything
    assert config.data_path == Path(tmp_path / "d")
    assert config.store_path == Path(tmp_path / "d" / "hpcgw.db")
    with pytest.raises(Exception):
        config.local = None  # frozen


def test_unknown_keys_and_missing_files_fail_loudly(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("locl: {cpus: 2}\n")
    with pytest.raises(ConfigError, match="locl"):
        load_config(environ={"HPCGW_CONFIG": str(bad), "HOME": str(tmp_path)})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(environ={"HPCGW_CONFIG": str(tmp_path / "nope.yaml"), "HOME": str(tmp_path)})


def test_default_data_dir_follows_xdg(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    config = load_config(environ={"HOME": str(tmp_path), "HPCGW_CONFIG": ""})
    assert config.data_path == tmp_path / "xdg" / "hpcgw"

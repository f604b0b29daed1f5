"""Configuration from the environment fails loudly on bad values."""

from __future__ import annotations

import subprocess
import sys

import pytest
from django.core.exceptions import ImproperlyConfigured

from tests.conftest import ROOT
from tgpadmin.env import env_bool, env_float, env_int, env_list


@pytest.mark.parametrize(
    ("reader", "value"),
    [(env_bool, "maybe"), (env_int, "ten"), (env_float, "fast")],
)
def test_bad_values_name_the_variable(monkeypatch, reader, value):
    monkeypatch.setenv("TGP_SOMETHING", value)
    with pytest.raises(ImproperlyConfigured, match="TGP_SOMETHING"):
        reader("TGP_SOMETHING", 1) if reader is not env_bool else reader("TGP_SOMETHING")


def test_values_below_minimum_are_refused(monkeypatch):
    monkeypatch.setenv("TGP_N", "0")
    with pytest.raises(ImproperlyConfigured, match="minimum of 1"):
        env_int("TGP_N", 5, minimum=1)


def test_readers_parse_good_values(monkeypatch):
    monkeypatch.setenv("TGP_B", "yes")
    monkeypatch.setenv("TGP_L", "a, b,,c")
    assert env_bool("TGP_B") is True
    assert env_list("TGP_L") == ["a", "b", "c"]
    assert env_int("TGP_UNSET_X", 7) == 7


def test_a_bad_setting_stops_manage_py_with_a_clear_message():
    env = {"PATH": "/usr/bin:/bin", "TGP_RUN_STALL_TIMEOUT": "soon", "DJANGO_SECRET_KEY": "x" * 50}
    proc = subprocess.run([sys.executable, "manage.py", "check"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "TGP_RUN_STALL_TIMEOUT='soon' is not a number" in proc.stderr

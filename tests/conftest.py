"""Tests never write into the working tree: figures, runs and datasets go to a temporary folder."""
import os
import tempfile

import pytest

_TMP = tempfile.mkdtemp(prefix="nc-tests-")
for _name, _sub in (("NC_FIGURES_DIR", "figures"), ("NC_RUNS_DIR", "runs"), ("NC_DATA_DIR", "data")):
    os.environ[_name] = os.path.join(_TMP, _sub)


@pytest.fixture
def figures_tmp(tmp_path, monkeypatch):
    """A fresh, empty figures folder for one test."""
    path = tmp_path / "figures"
    monkeypatch.setenv("NC_FIGURES_DIR", str(path))
    return path


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    """Expose each phase's report on the test item (used to take a screenshot when a browser test fails)."""
    rep = yield
    setattr(item, "rep_" + rep.when, rep)
    return rep

import os

import pytest

from nsd.engine.store import Store


@pytest.fixture(autouse=True)
def _isolate(tmp_path, monkeypatch):
    # Keep every test off the user's store and Hugging Face cache.
    monkeypatch.delenv("NSD_STORE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "store")
    s.init()
    return s

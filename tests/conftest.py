import pytest

from helpers import new_store
from servers import S3, Postgres


@pytest.fixture(autouse=True)
def _isolate(tmp_path, monkeypatch):
    # Keep every test off the user's store and Hugging Face cache.
    monkeypatch.delenv("NSD_STORE", raising=False)
    monkeypatch.delenv("NSD_DATA_PATH", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def store(tmp_path):
    """A fresh, empty store of this test's own."""
    return new_store(tmp_path / "store")


# Real servers on loopback, started once for the session by the first test that needs them
# (tests/servers.py). A server that cannot start makes those tests fail, never skip.


@pytest.fixture(scope="session")
def pg_server():
    pg = Postgres().start()
    yield pg
    pg.stop()


@pytest.fixture(scope="session")
def s3_server():
    s3 = S3().start()
    yield s3
    s3.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """The standard AWS_* settings of the test S3 server, in this process's environment."""
    for key in ("AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL_S3", "NSD_S3_URL_STYLE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    return s3_server

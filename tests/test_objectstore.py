"""S3 settings: the standard AWS_* variables become one DuckDB secret (fsspec reads them itself)."""

import pytest

from nsd.engine.errors import UsageError
from nsd.engine.objectstore import is_remote, s3_settings, secret_sql
from nsd.engine.store import Store


def test_endpoint_gives_path_style_and_ssl_from_its_scheme():
    env = {"AWS_ACCESS_KEY_ID": "AK", "AWS_SECRET_ACCESS_KEY": "it's", "AWS_ENDPOINT_URL": "http://minio:9000",
           "AWS_DEFAULT_REGION": "eu-west-1", "AWS_SESSION_TOKEN": "tok"}
    settings = s3_settings(env)
    assert settings == {"region": "eu-west-1", "key_id": "AK", "secret": "it's", "session_token": "tok",
                        "endpoint": "minio:9000", "use_ssl": False, "url_style": "path"}
    assert secret_sql(settings) == (
        "CREATE OR REPLACE TEMPORARY SECRET nsd_s3 (TYPE s3, REGION 'eu-west-1', KEY_ID 'AK', SECRET 'it''s', "
        "SESSION_TOKEN 'tok', ENDPOINT 'minio:9000', URL_STYLE 'path', USE_SSL false)")
    https = s3_settings({"AWS_ENDPOINT_URL_S3": "https://storage.googleapis.com/", "AWS_REGION": "auto",
                         "AWS_ENDPOINT_URL": "http://ignored:1", "NSD_S3_URL_STYLE": "vhost"})
    assert https == {"region": "auto", "endpoint": "storage.googleapis.com", "use_ssl": True, "url_style": "vhost"}


def test_aws_without_endpoint_keeps_duckdb_defaults():
    assert s3_settings({}) is None  # nothing set: a persistent DuckDB secret or ~/.aws applies
    settings = s3_settings({"AWS_ACCESS_KEY_ID": "AK", "AWS_SECRET_ACCESS_KEY": "SK"})
    assert settings == {"region": "us-east-1", "key_id": "AK", "secret": "SK"}
    assert "ENDPOINT" not in secret_sql(settings) and "URL_STYLE" not in secret_sql(settings)


@pytest.mark.parametrize("bad", ["ftp://host", "http://", "s3://bucket"])
def test_bad_endpoint_is_a_usage_error(bad):
    with pytest.raises(UsageError, match="AWS_ENDPOINT_URL"):
        s3_settings({"AWS_ENDPOINT_URL": bad})


def test_remote_paths_and_a_local_store_on_s3_makes_no_local_directory(tmp_path, monkeypatch):
    assert is_remote("s3://b/x") and is_remote("gs://b") and not is_remote("/tmp/x") and not is_remote("file:///x")
    monkeypatch.chdir(tmp_path)
    store = Store(tmp_path / "store", "s3://bucket/lake")
    assert store.data_path == "s3://bucket/lake/" and store.remote_data
    assert store.path("checkpoints", "m") == "s3://bucket/lake/checkpoints/m"
    assert sorted(p.name for p in tmp_path.iterdir()) == []

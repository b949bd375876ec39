import os

import pytest

from sora_tune.uris import existing_store, local_store_path, resolve_tracking_uri


@pytest.mark.parametrize(
    "uri, expected",
    [
        ("sqlite:///mlflow.db", "sqlite:///{cwd}/mlflow.db"),
        ("sqlite:///runs/m.db?timeout=30", "sqlite:///{cwd}/runs/m.db?timeout=30"),
        ("sqlite:////srv/m.db", "sqlite:////srv/m.db"),
        ("file:mlruns", "file://{cwd}/mlruns"),
        ("file:./mlruns", "file://{cwd}/mlruns"),
        ("./mlruns", "file://{cwd}/mlruns"),
        ("file:///srv/mlruns", "file:///srv/mlruns"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("postgresql://mlflow@db/mlflow", "postgresql://mlflow@db/mlflow"),
        ("databricks", "databricks"),
    ],
)
def test_relative_local_stores_are_taken_from_the_current_folder(uri, expected, tmp_path):
    assert resolve_tracking_uri(uri) == expected.format(cwd=tmp_path)
    assert resolve_tracking_uri(resolve_tracking_uri(uri)) == resolve_tracking_uri(uri)


def test_local_store_path():
    assert str(local_store_path("sqlite:///a.db")) == os.path.join(os.getcwd(), "a.db")
    assert local_store_path("https://mlflow.example.com") is None


def test_a_missing_store_is_refused_and_not_created(tmp_path):
    (tmp_path / "search.db").touch()
    with pytest.raises(FileNotFoundError, match=r"no MLflow store at .*mlflow\.db .*search\.db"):
        existing_store("sqlite:///mlflow.db")
    assert not (tmp_path / "mlflow.db").exists()
    assert existing_store("sqlite:///search.db") == f"sqlite:///{tmp_path / 'search.db'}"
    assert existing_store("http://127.0.0.1:9") == "http://127.0.0.1:9"  # asked, not looked for

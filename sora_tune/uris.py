"""Checks on tracking and storage URIs that need nothing but the standard library (and SQLAlchemy
for a database URI), so that the CLI can refuse a bad URI or a dead server within seconds,
before it imports torch or starts Ray."""

from __future__ import annotations

import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path


def check_no_password(name: str, uri: str) -> None:
    """Refuse a URI with a password in it: credentials come from the environment, so that they
    never reach MLflow params, Ray's experiment state or a log.

    Raises:
        ValueError: naming the setting, with the password masked.
    """
    if urllib.parse.urlsplit(uri).password is None:
        return
    raise ValueError(
        f"{name} {redact_uri(uri)} carries a password: pass credentials through the environment "
        "instead (MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD for an MLflow server, "
        "PGPASSWORD for PostgreSQL, AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY for s3://)"
    )


# Database schemes MLflow and Optuna take through SQLAlchemy, and the extra of sora-tune that
# installs the driver SQLAlchemy picks for the bare scheme (SQLAlchemy 2.1: psycopg for
# postgresql://).
DATABASE_SCHEMES = ("postgresql", "postgres", "mysql", "mssql")
DRIVER_EXTRAS = {"postgresql": "postgres"}
DRIVER_PACKAGES = {"MySQLdb": "mysqlclient"}  # driver modules not named as their package


def check_database_driver(name: str, uri: str) -> None:
    """Refuse a database URI (`postgresql://`, `mysql://`, ...) whose driver is not installed,
    in one line naming what to install, instead of the traceback SQLAlchemy raises at first use.

    Raises:
        ValueError: naming the setting, the driver and the extra (or package) to install.
    """
    if urllib.parse.urlsplit(uri).scheme.split("+")[0] not in DATABASE_SCHEMES:
        return
    from sqlalchemy.engine import make_url  # only for a database: it is not a light import

    url = make_url(uri)
    try:
        url.get_dialect().import_dbapi()
    except ImportError as err:
        # The extra brings the default driver; a driver named in the URI (`+pg8000`) is the
        # user's choice, installed by its own package.
        extra = DRIVER_EXTRAS.get(url.get_backend_name()) if "+" not in url.drivername else None
        package = DRIVER_PACKAGES.get(err.name, err.name)
        fix = f"pip install 'sora-tune[{extra}]'" if extra else f"pip install {package}"
        raise ValueError(
            f"{name} {redact_uri(uri)}: its database driver ({err.name}) is not installed: {fix}"
        ) from None


def redact_uri(uri: str) -> str:
    """`uri` with the password of its user info, if any, replaced by `***`."""
    parts = urllib.parse.urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = f"{parts.username}:***@{parts.netloc.rpartition('@')[2]}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def check_tracking_uri(uri: str, timeout: float = 5.0) -> None:
    """Fail within seconds, before any trial, when the MLflow tracking URI carries a password
    (`check_no_password`), names a database whose driver is missing (`check_database_driver`)
    or a server that does not answer.

    Raises:
        ValueError: the URI carries a password.
        ConnectionError: naming the URI and what went wrong.
    """
    check_no_password("--mlflow-uri", uri)
    check_database_driver("--mlflow-uri", uri)
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
            if response.status != 200:
                raise ConnectionError(
                    f"MLflow server {redact_uri(uri)} answered /health with {response.status}"
                )
    except (TimeoutError, urllib.error.URLError, OSError) as err:
        raise ConnectionError(f"MLflow server {redact_uri(uri)} is unreachable: {err}") from None


# The store every command uses when no --mlflow-uri is given: a sqlite file in the folder the
# command runs from (MLflow's own suggestion for a local store; its file store is deprecated).
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
_SQLITE = "sqlite:///"


def default_tracking_uri() -> str:
    """What every command uses without --mlflow-uri: `MLFLOW_TRACKING_URI`, as MLflow itself
    does, else the sqlite file `DEFAULT_TRACKING_URI`."""
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


# Scheme-less URIs that MLflow reads as a service, not as a folder.
_SERVICES = {"databricks", "databricks-uc", "uc"}


def local_store_path(uri: str) -> Path | None:
    """The absolute path of a local tracking store, the sqlite file or the file store's folder
    (relative paths taken from the current folder); `None` for a server or a remote database."""
    if uri.startswith(_SQLITE):
        path = uri[len(_SQLITE) :].partition("?")[0]
        return Path(os.path.abspath(path)) if path else None
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme == "file" and not parts.netloc:
        return Path(os.path.abspath(urllib.parse.unquote(parts.path) or "."))
    if not parts.scheme and uri not in _SERVICES:
        return Path(os.path.abspath(uri))
    return None


def resolve_tracking_uri(uri: str) -> str:
    """`uri` with a relative local store made absolute against the current folder.

    `sqlite:///mlflow.db` (three slashes: a relative path) becomes `sqlite:////abs/mlflow.db`;
    `file:mlruns`, `file:./mlruns` and a bare path become `file:///abs/mlruns`. Servers,
    databases and absolute paths come back unchanged. Ray starts every trial in a folder of its
    own, so a store opened there by a relative path would be another, empty store.
    """
    path = local_store_path(uri)
    if path is None:
        return uri
    if uri.startswith(_SQLITE):
        question, query = uri.partition("?")[1:]
        return f"{_SQLITE}{path}{question}{query}"
    return path.as_uri()


def existing_store(uri: str) -> str:
    """`uri` made absolute (`resolve_tracking_uri`), for commands that work on a search's store
    and must not create one (`pareto`, `register`, `predict`): a local store that does not exist
    is refused, where MLflow would create an empty one.

    Raises:
        FileNotFoundError: naming the file looked for and the stores that are there.
    """
    path = local_store_path(uri)
    if path is None or path.exists():
        return resolve_tracking_uri(uri)
    nearby = (
        sorted(
            p.name
            for p in path.parent.glob("*")
            if p.suffix in (".db", ".sqlite") or p.name == "mlruns"
        )
        if path.parent.is_dir()
        else []
    )
    found = (
        f"stores in {path.parent}: {', '.join(nearby)}"
        if nearby
        else f"{path.parent} holds no MLflow store"
    )
    raise FileNotFoundError(
        f"no MLflow store at {path} (--mlflow-uri {uri}); {found}: run the command from the "
        "folder of the search, or pass the search's --mlflow-uri"
    )

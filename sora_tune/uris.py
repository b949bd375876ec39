"""Checks on tracking and storage URIs that need nothing but the standard library, so that the CLI
can refuse a bad URI or a dead server within seconds, before it imports torch or starts Ray."""

from __future__ import annotations

import urllib.error
import urllib.parse
import urllib.request


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


def redact_uri(uri: str) -> str:
    """`uri` with the password of its user info, if any, replaced by `***`."""
    parts = urllib.parse.urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = f"{parts.username}:***@{parts.netloc.rpartition('@')[2]}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def check_tracking_uri(uri: str, timeout: float = 5.0) -> None:
    """Fail within seconds, before any trial, when the MLflow tracking URI carries a password
    (`check_no_password`) or its server does not answer.

    Raises:
        ValueError: the URI carries a password.
        ConnectionError: naming the URI and what went wrong.
    """
    check_no_password("--mlflow-uri", uri)
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

"""orchestrator.core.redaction: URL userinfo and storage_options values never reach a message."""

from __future__ import annotations

import errno
import pickle
import traceback

import pytest

from orchestrator.core.redaction import carries_secret, redact, redact_exception, redact_values

SECRET = "s3cr3t/VALUE+do-not-leak"


@pytest.mark.parametrize("text,expected", [
    # userinfo is everything up to the LAST '@' before the host, '/' and '@' in the password included
    ("s3://alice:hunter2/x@bucket", "s3://***@bucket"),
    ("s3://alice:p@ss@bucket", "s3://***@bucket"),
    ("s3://alice:p@ss@bucket/runs/r", "s3://***@bucket/runs/r"),
    ("s3://alice:pa/ss@w@bucket/runs", "s3://***@bucket/runs"),
    ("https://u:pw@minio.local:9000/b", "https://***@minio.local:9000/b"),
    ("ftp://bob@host/x", "ftp://***@host/x"),
    ("_s3://u:p@h/x", "_s3://***@h/x"),
    # whitespace, quotes and angle brackets end a URL
    ("'s3://alice:pw@bucket' and 'x'", "'s3://***@bucket' and 'x'"),
    ('{"url": "s3://alice:p@ss@bucket/x", "mail": "me@example.com"}',
     '{"url": "s3://***@bucket/x", "mail": "me@example.com"}'),
    ("<Endpoint>http://u:p@h</Endpoint>", "<Endpoint>http://***@h</Endpoint>"),
    ("s3://a:b@h1/x then s3://c:d@h2/y", "s3://***@h1/x then s3://***@h2/y"),
    # no userinfo: unchanged, also with '@' or ':' in the path
    ("s3://bucket/runs/r", "s3://bucket/runs/r"),
    ("s3://bucket/models/run@3/x.pt", "s3://bucket/models/run@3/x.pt"),
    ("http://host:9000/x", "http://host:9000/x"),
    ("s3://bucket/2024-01-01T10:00:00/x@y", "s3://bucket/2024-01-01T10:00:00/x@y"),
    ("write to me@example.com", "write to me@example.com"),
])
def test_redact_removes_url_userinfo_up_to_the_last_at_before_the_host(text, expected):
    assert redact(text) == expected


@pytest.mark.parametrize("shown", [
    SECRET,
    "s3cr3t%2FVALUE%2Bdo-not-leak",  # percent-encoded, as HTTP clients put it in URLs
    "s3cr3t/VALUE%2Bdo-not-leak",
])
def test_redact_removes_an_option_value_however_it_is_encoded(shown):
    out = redact(f"error: {shown} rejected", {"secret": SECRET})
    assert "VALUE" not in out and out.startswith("error: ") and out.endswith(" rejected")


def test_redact_removes_nested_option_values_and_endpoint_urls_with_or_without_userinfo():
    options = {"client_kwargs": {"endpoint_url": "https://u:pw@minio.local:9000"}, "tokens": ["tok-abcdef"],
               "use_ssl": True, "acl": "rw"}
    out = redact("https://u:pw@minio.local:9000/b https://minio.local:9000/b tok-abcdef rw True", options)
    assert "minio.local" not in out and "tok-abcdef" not in out and "pw" not in out
    assert out.endswith(" rw True")  # short values and non-strings are left alone


def test_redact_values_cleans_every_string_of_a_json_like_value():
    cleaned = redact_values({"a": [f"key {SECRET}", 3], "b": {"url": "s3://u:p@w@h/x"}}, {"secret": SECRET})
    assert cleaned == {"a": ["key ***", 3], "b": {"url": "s3://***@h/x"}}


def _raised(exc: BaseException, cause: BaseException | None = None) -> BaseException:
    try:
        try:
            if cause is not None:
                raise cause
        except BaseException as inner:  # noqa: BLE001
            raise exc from inner
        raise exc
    except BaseException as caught:  # noqa: BLE001
        return caught


def test_an_exception_without_secrets_is_kept_as_is():
    exc = _raised(ValueError("bad shape"), cause=KeyError("x"))
    assert redact_exception(exc, {"secret": SECRET}) is exc
    assert not carries_secret(exc, {"secret": SECRET})


@pytest.mark.parametrize("exc,expected_type", [
    (PermissionError(errno.EACCES, f"denied for {SECRET}"), PermissionError),
    (FileNotFoundError(f"s3://u:{SECRET}@h/x"), FileNotFoundError),
    (RuntimeError(f"token {SECRET}"), RuntimeError),
    (KeyError(SECRET), KeyError),
])
def test_an_exception_carrying_a_secret_is_rebuilt_with_its_type_and_a_redacted_message(exc, expected_type):
    clean = redact_exception(_raised(exc), {"secret": SECRET})
    assert type(clean) is expected_type
    assert "***" in str(clean) and "VALUE" not in "".join(traceback.format_exception(clean))
    if isinstance(exc, OSError):
        assert clean.errno == exc.errno
    assert pickle.loads(pickle.dumps(clean)).args == clean.args


def test_a_secret_only_in_the_chained_cause_is_not_shown_either():
    exc = _raised(OSError("list failed"), cause=ConnectionError(f"http://127.0.0.1:1/{SECRET}"))
    assert carries_secret(exc, {"secret": SECRET})
    clean = redact_exception(exc, {"secret": SECRET})
    assert type(clean) is OSError and str(clean) == "list failed"
    assert "VALUE" not in "".join(traceback.format_exception(clean))


def test_an_exception_type_that_needs_other_arguments_becomes_its_nearest_builtin_base():
    class ServiceError(ConnectionError):
        def __init__(self, code: int, detail: str) -> None:
            super().__init__(f"{code}: {detail}")

    clean = redact_exception(ServiceError(503, f"token={SECRET}"), {"secret": SECRET})
    assert type(clean) is ConnectionError and str(clean) == "503: token=***"


def test_a_worker_failure_sent_to_the_driver_carries_no_option_value_in_message_traceback_or_exception():
    from orchestrator.cluster.worker import failure_of  # imports ray, starts nothing

    endpoint = f"http://127.0.0.1:1/{SECRET}"
    exc = _raised(OSError(f"upload to {endpoint}/b/k failed"), cause=ConnectionError(f"token={SECRET}"))
    failure = failure_of(1, exc, {"client_kwargs": {"endpoint_url": endpoint}, "secret": SECRET})
    assert (failure.rank, failure.error_type, failure.message) == (1, "OSError", "upload to ***/b/k failed")
    assert "Traceback" in failure.traceback and "ConnectionError: token=***" in failure.traceback
    assert isinstance(failure.exception, OSError)
    shown = failure.message + failure.traceback + "".join(traceback.format_exception(failure.exception))
    assert "VALUE" not in shown and "127.0.0.1:1" not in shown
    assert pickle.loads(pickle.dumps(failure)).message == failure.message

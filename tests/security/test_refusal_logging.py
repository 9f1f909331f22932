"""A request the inference process refuses (a 4xx) logs one quiet line without the prompt."""

import logging
import uuid

import pytest
from asgiref.sync import async_to_sync

from inference import messages as m
from inference.client import inference_client
from millm_site.errors import MillmError
from tests.api.conftest import inference_worker  # noqa: F401 - shared fixture

pytestmark = pytest.mark.django_db

PROMPT = "please keep this prompt out of the log"


@pytest.fixture
def own_channel(settings):
    """A fresh inference channel: calls left queued by earlier tests must not be counted here."""
    settings.INFERENCE_CHANNEL = f"inference-logging-{uuid.uuid4().hex[:8]}"


def test_a_refused_generation_logs_one_line_without_the_prompt(own_channel, inference_worker, caplog, settings):  # noqa: F811
    settings.INFERENCE_TIMEOUT_S = 10
    caplog.set_level(logging.DEBUG, logger="millm.inference")
    with pytest.raises(MillmError) as refused:
        call = m.Generate(request_id="r-1", model="no-such-model", prompt=PROMPT, params={"max_tokens": 4})
        async_to_sync(inference_client().call)(call, m.Started)
    assert 400 <= refused.value.status < 500
    lines = [r for r in caplog.records if r.name == "millm.inference" and "inference_call" in str(r.msg)]
    assert len(lines) == 1, [str(r.msg) for r in caplog.records]
    assert lines[0].levelno in (logging.INFO, logging.WARNING)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert all(PROMPT not in str(r.msg) and not r.exc_info for r in caplog.records)


def project_formatter() -> logging.Formatter:
    import structlog

    handlers = [h for h in logging.getLogger().handlers if isinstance(h.formatter, structlog.stdlib.ProcessorFormatter)]
    assert handlers, "the LOGGING setting's console handler is on the root logger"
    return handlers[0].formatter


def test_the_refusal_line_renders_as_one_line(own_channel, inference_worker, caplog, settings):  # noqa: F811
    settings.INFERENCE_TIMEOUT_S = 10
    caplog.set_level(logging.INFO, logger="millm.inference")
    with pytest.raises(MillmError):
        call = m.Generate(request_id="r-2", model="no-such-model", prompt=PROMPT)
        async_to_sync(inference_client().call)(call, m.Started)
    [record] = [r for r in caplog.records if r.name == "millm.inference" and "inference_call" in str(r.msg)]
    text = project_formatter().format(record)
    assert len(text.splitlines()) == 1 and "inference_call_refused" in text and PROMPT not in text


def test_a_real_failure_logs_its_traceback_without_local_variables():
    def fail(prompt: str) -> None:
        raise RuntimeError("boom")

    try:
        fail(PROMPT)
    except RuntimeError:
        record = logging.LogRecord("millm.inference", logging.ERROR, __file__, 1, {"event": "inference_call_failed"},
                                   None, exc_info=__import__("sys").exc_info())
    text = project_formatter().format(record)
    assert "RuntimeError: boom" in text
    assert PROMPT not in text and len(text.splitlines()) < 20, text

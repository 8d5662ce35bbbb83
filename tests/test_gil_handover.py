import logging
import sys

import pytest

from clip_runner.gil_handover import hand_over_gil_after


@pytest.fixture()
def restored_interval():
    interval = sys.getswitchinterval()
    yield
    sys.setswitchinterval(interval)


def test_the_interval_is_set_in_ms_and_logged_with_the_process_role(restored_interval, caplog):
    with caplog.at_level(logging.INFO, logger="clip_runner.gil_handover"):
        hand_over_gil_after(0.2, "runner")
    assert sys.getswitchinterval() == pytest.approx(0.0002)
    assert "runner: a thread running Python yields the GIL to a waiting one after 0.2 ms" in (
        caplog.text
    )
    hand_over_gil_after(5.0, "API worker")
    assert sys.getswitchinterval() == pytest.approx(0.005)

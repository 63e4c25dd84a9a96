"""GracefulInterrupt: SIGINT and SIGTERM are recorded instead of raised, repeated signals
during a save are ignored, and the previous handlers come back afterwards."""

import os
import signal
import threading

import pytest

from minigpt.training.interrupt import GracefulInterrupt


def _press(signum: int = signal.SIGINT) -> None:
    os.kill(os.getpid(), signum)  # the handler runs before the next line


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_is_recorded_not_raised(signum, code):
    with GracefulInterrupt() as interrupt:
        assert not interrupt.requested and interrupt.exit_code == 0
        _press(signum)
        assert interrupt.requested and interrupt.signum == signum
    assert interrupt.exit_code == code


def test_the_previous_handlers_come_back():
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with GracefulInterrupt():
        assert signal.getsignal(signal.SIGINT) is not before[signal.SIGINT]
    assert {s: signal.getsignal(s) for s in before} == before
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C raises again, as usual
        _press()


def test_the_previous_handlers_come_back_after_an_error():
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(RuntimeError), GracefulInterrupt():
        raise RuntimeError("boom")
    assert signal.getsignal(signal.SIGINT) is before


def test_repeated_signals_during_a_save_are_ignored():
    with GracefulInterrupt() as interrupt:
        _press()
        with interrupt.save_guard():
            assert interrupt.saving
            for _ in range(5):
                _press()  # impatient presses while the checkpoint is written
        assert not interrupt.saving and interrupt.count == 6 and interrupt.signum == signal.SIGINT


def test_outside_a_save_the_second_signal_warns_and_the_third_stops_at_once(caplog):
    with GracefulInterrupt() as interrupt:
        _press()
        _press()
        assert "press Ctrl-C once more" in caplog.text
        with pytest.raises(KeyboardInterrupt):
            _press()
    assert interrupt.requested


def test_a_first_signal_during_a_save_still_requests_the_stop():
    with GracefulInterrupt() as interrupt:
        with interrupt.save_guard():
            _press(signal.SIGTERM)
        assert interrupt.requested and interrupt.exit_code == 143


def test_outside_the_main_thread_it_changes_nothing():
    before = signal.getsignal(signal.SIGINT)
    seen = {}

    def run():
        with GracefulInterrupt() as interrupt:
            seen["handler"] = signal.getsignal(signal.SIGINT)
            seen["requested"] = interrupt.requested

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert seen == {"handler": before, "requested": False}

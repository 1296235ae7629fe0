"""CaptureGuard: graph captures exclude other threads' GPU work; that work runs side by side."""

import threading
import time

from ttsbatch.engine import CaptureGuard


def test_sharers_run_together_and_a_capture_waits_for_them():
    g = CaptureGuard()
    inside = threading.Barrier(4, timeout=5)  # three sharers inside at once (and this test), or this fails
    events = []

    def share(name):
        with g.using():
            inside.wait()
            time.sleep(0.05)
            events.append(("left", name))

    threads = [threading.Thread(target=share, args=(n,)) for n in "abc"]
    for t in threads:
        t.start()
    inside.wait()  # all three are inside before the capture asks

    def capture():
        with g.capturing():
            events.append(("capture", None))

    cap = threading.Thread(target=capture)
    cap.start()
    for t in threads + [cap]:
        t.join(5)
    assert events[-1] == ("capture", None) and len(events) == 4


def test_a_capture_keeps_sharers_out_until_it_ends():
    g = CaptureGuard()
    order = []
    started = threading.Event()

    def capture():
        with g.capturing():
            started.set()
            time.sleep(0.1)
            order.append("capture done")

    def share():
        started.wait(5)
        with g.using():
            order.append("shared")

    t1, t2 = threading.Thread(target=capture), threading.Thread(target=share)
    t1.start(), t2.start()
    t1.join(5), t2.join(5)
    assert order == ["capture done", "shared"]


def test_reentrant_and_a_lone_sharer_may_capture():
    g = CaptureGuard()
    with g.using():
        with g.using():
            with g.capturing():  # S3Gen capturing its own CFM graph inside its batch
                with g.capturing():
                    with g.using():
                        pass
    # and free afterwards: another thread can capture at once
    done = threading.Event()

    def capture():
        with g.capturing():
            done.set()

    t = threading.Thread(target=capture)
    t.start()
    t.join(5)
    assert done.is_set()

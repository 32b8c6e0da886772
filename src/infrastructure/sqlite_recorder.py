"""A subscribable SQLite application recorder.

The stock recorder cannot be subscribed to (``NotImplementedError``). This one polls, and is
also woken at once by any insert made through a recorder on the same file in this process, so
in-process projections follow writes without the poll delay.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence
from typing import Any

from eventsourcing.persistence import ApplicationRecorder, ListenNotifySubscription, Subscription
from eventsourcing.sqlite import SQLiteApplicationRecorder

_subscriptions: dict[str, weakref.WeakSet[PollingSubscription]] = {}
_lock = threading.Lock()


def _wake(dbname: str) -> None:
    with _lock:
        subs = list(_subscriptions.get(dbname, ()))
    for sub in subs:
        sub.wake()


class PollingSubscription(ListenNotifySubscription[SQLiteApplicationRecorder]):
    POLL_INTERVAL = 0.25

    def __init__(self, recorder: SQLiteApplicationRecorder, gt: int | None = None, topics: Sequence[str] = ()):
        super().__init__(recorder=recorder, gt=gt, topics=topics)
        self._dbname = recorder.datastore.pool.db_name
        with _lock:
            _subscriptions.setdefault(self._dbname, weakref.WeakSet()).add(self)
        self._stop_polling = threading.Event()
        self._poll_thread = threading.Thread(target=self._poll, daemon=True, name="sqlite-poll")
        self._poll_thread.start()

    def wake(self) -> None:
        self._has_been_notified.set()

    def _poll(self) -> None:
        while not self._stop_polling.wait(self.POLL_INTERVAL):
            self._has_been_notified.set()

    def stop(self) -> None:
        self._stop_polling.set()
        with _lock:
            _subscriptions.get(self._dbname, weakref.WeakSet()).discard(self)
        super().stop()

    def __exit__(self, *args: Any, **kwargs: Any) -> None:
        try:
            super().__exit__(*args, **kwargs)
        finally:
            self._poll_thread.join()


class PollingSQLiteApplicationRecorder(SQLiteApplicationRecorder):
    def subscribe(self, gt: int | None = None, topics: Sequence[str] = ()) -> Subscription[ApplicationRecorder]:
        return PollingSubscription(recorder=self, gt=gt, topics=topics)

    def insert_events(self, stored_events: Any, **kwargs: Any) -> Any:
        result = super().insert_events(stored_events, **kwargs)
        _wake(self.datastore.pool.db_name)
        return result

"""The engine as a service: a decoder stepping in a thread of its own, fed from any other thread.

submit() hands a request over and returns a Future; between steps the engine thread takes every request handed
over since, so new requests join the running batch as rows finish, however the callers batch them. The Ray
decode actor keeps several Ray Data batches in flight this way (as Ray Data LLM feeds vLLM), so the engine
always has requests waiting.

A step that raises (a model that crashes on one input, or an engine bug) leaves the batch in an unknown state.
The decoder is rebuilt, and the requests that were in flight are decoded again in halves until the ones that
fail alone are isolated: they get an error result, every other request its output.
"""

from __future__ import annotations

import logging
import queue
import threading
import traceback
from collections.abc import Callable
from concurrent.futures import Future

from specvlm.specdec.decode import SpeculativeDecoder
from specvlm.specdec.requests import Request, Result

SNAPSHOT_EVERY = 64  # engine steps between snapshots of its operating point


class EngineService:
    def __init__(self, make_decoder: Callable[[], SpeculativeDecoder]):
        self.make_decoder = make_decoder
        self.decoder = make_decoder()
        self.inbox: queue.SimpleQueue[tuple[Request, Future] | None] = queue.SimpleQueue()
        self.in_flight: dict[int, tuple[Request, Future]] = {}  # decoder's request id -> request, its future
        self.isolations = 0  # failures isolated so far
        self.failure: BaseException | None = None  # what stopped the engine thread, if it stopped
        self.snapshot: dict = {}
        self.handing: list[tuple[Request, Future]] = []  # being handed to the decoder
        self.steps = 0
        self.thread = threading.Thread(target=self._serve, name="engine", daemon=True)
        self.thread.start()

    def submit(self, request: Request) -> Future:
        future: Future = Future()
        if self.failure is not None:
            future.set_exception(self.failure)
        else:
            self.inbox.put((request, future))
        return future

    def describe(self) -> dict:
        """Where this engine runs and what it settled on: its batch shape and the controller's cost model (as
        of the last snapshot the engine thread took: the decoder itself belongs to that thread)."""
        import os
        import socket

        return {"actor": f"{socket.gethostname()}:{os.getpid()}", "isolated_failures": self.isolations, **self.snapshot}

    def close(self) -> None:
        self.inbox.put(None)
        self.thread.join()

    def _serve(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # the thread is going away: nobody may wait for it forever
            self.failure = exc
            waiting = [future for _, future in (*self.in_flight.values(), *self.handing)]
            while True:
                try:
                    item = self.inbox.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    waiting.append(item[1])
            for future in waiting:
                if not future.done():
                    future.set_exception(exc)
            logging.getLogger(__name__).exception("the engine stopped; every request now fails with this error")

    def _loop(self) -> None:
        while True:
            # Wait for work when idle; otherwise take what arrived and go on stepping.
            items = [self.inbox.get()] if not self.decoder.busy else []
            while True:
                try:
                    items.append(self.inbox.get_nowait())
                except queue.Empty:
                    break
            if None in items:
                return
            self.handing = items
            for request, future in items:
                self.in_flight[self.decoder.submit(request)] = (request, future)
            self.handing = []
            try:
                finished = self.decoder.step()
            except Exception:  # a failure of one input must not fail the others: isolate it
                self._isolate()
                continue
            self.steps += 1
            # Also when the engine drains, before its last results are handed back: a caller that reports the
            # operating point once its rows are done (the job's decode actors) then sees the whole run, not the
            # first step of a run shorter than SNAPSHOT_EVERY steps.
            if self.steps % SNAPSHOT_EVERY == 1 or not self.decoder.busy:
                self.snapshot = self.decoder.describe()
            for rid, result in finished:
                self.in_flight.pop(rid)[1].set_result(result)

    def _isolate(self) -> None:
        self.isolations += 1
        items = list(self.in_flight.values())
        self.in_flight.clear()
        for (_, future), result in zip(items, self._decode_apart([r for r, _ in items])):
            future.set_result(result)
        self.decoder = self.make_decoder()

    def _decode_apart(self, requests: list[Request]) -> list[Result]:
        """Decode on a fresh decoder; on failure, in halves, until a request that fails alone is found."""
        try:
            return self.make_decoder().generate(requests)
        except Exception:
            if len(requests) == 1:
                return [Result.failed(f"decoding failed: {traceback.format_exc(limit=1).strip()}")]
            half = len(requests) // 2
            return self._decode_apart(requests[:half]) + self._decode_apart(requests[half:])

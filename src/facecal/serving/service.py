"""What every request handler shares: runtime, batcher, detector, decode slots, limits."""

from __future__ import annotations

import asyncio
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import cast

import numpy as np

from facecal.serving.batching import MicroBatcher
from facecal.serving.classifier_runtime import ClassifierRuntime
from facecal.serving.preparation import Generated, Item, run_items
from facecal.serving.runtime import GeneratorRuntime
from facecal.serving.settings import ServeParams


class Service:
    """Everything a request handler needs: runtime, batcher, detector, limits."""

    def __init__(
        self,
        runtime: GeneratorRuntime,
        params: ServeParams,
        detector=None,
        classifier: ClassifierRuntime | None = None,
    ):
        self.runtime = runtime
        self.classifier = classifier  # /v1/classify; optional
        self.params = params
        self.batcher = (
            MicroBatcher(
                lambda items: run_items(runtime, list(items)),
                params.max_batch,
                params.max_wait_ms / 1000.0,
                params.max_queue,
                params.max_inflight,
            )
            if params.batching and params.max_batch > 1
            else None
        )
        self._detector = detector
        self._detector_lock = threading.Lock()
        self._decodes = asyncio.Semaphore(params.max_decodes)
        self.started = time.time()

    @asynccontextmanager
    async def decode_slot(self, needed: bool = True):
        """One of ``max_decodes`` slots for work that decodes an upload (others wait, up to
        ``request_timeout_s``: then 503 like any request the model cannot answer in time)."""
        if not needed:
            yield
            return
        await asyncio.wait_for(self._decodes.acquire(), self.params.request_timeout_s)
        try:
            yield
        finally:
            self._decodes.release()

    def detector(self):
        with self._detector_lock:
            if self._detector is None:
                from facecal.detector import LandmarkDetector

                self._detector = LandmarkDetector(self.params.detector_upsample)
            return self._detector

    def detect(self, image: np.ndarray):
        det = self.detector()
        with self._detector_lock:  # dlib objects are not documented as thread-safe
            return det.detect(image)

    async def _submit(self, item: Item) -> Generated:
        timeout = self.params.request_timeout_s
        if self.batcher is not None:
            return await asyncio.wait_for(self.batcher.submit(item), timeout)
        return await asyncio.wait_for(
            asyncio.to_thread(lambda: run_items(self.runtime, [item])[0]), timeout
        )

    async def generate_item(self, item: Item) -> np.ndarray:
        """The face for `item` (S×S×3 uint8)."""
        return cast(np.ndarray, await self._submit(replace(item, parts=False)))

    async def generate_parts(self, item: Item) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A point arch's (face, painted, mask) for `item` (see `GeneratorRuntime.generate_parts`)."""
        out = await self._submit(replace(item, parts=True))
        return cast(tuple[np.ndarray, np.ndarray, np.ndarray], out)

"""The seven stages in one model: the fused funnel (``serving.batching.fuse_stages``).

The default export runs each stage of ``serving/stages.py`` as its own Triton model, chained by the
``funnel`` ensemble: every stage can be scaled, batched, versioned and watched on its own, and each
hop costs a round trip from tritonserver to that stage's Python stub (tensor copies through shared
memory, a wakeup, the stub's bookkeeping). On CPU that cost is most of a request: at 1M items the
seven stages' own work takes about 2.7 ms per request in one process, and 6.5-7.7 ms inside the
server.

``FusedFunnel`` runs the same stage objects one after the other inside one model, so a request
costs one hop. It maps the funnel's request (``user_id``, ``k``, ``exclude_item_ids``) to the
funnel's response exactly as the ensemble does: each stage's outputs join the tensors the later
stages read, under the same names. ``run_batch`` passes a whole batch through each stage's own
``run_batch`` (one model call per stage for the batch), and each stage's time per call is kept in
``timings`` (and summed, failed calls included, in ``spent``) so the adapter
(``serving/triton_model.py``) still records every stage's metrics.

A user the models never saw (``user_known`` false at the feature lookup) skips the candidate stages
(``CANDIDATE_STAGES``: towers, retrieval, filters, rankers), whose lists the ordering stage does not
read for them: the same items, scores and ``served_by`` as the ensemble, which runs them anyway, for
a fraction of the cost (in process, the test suite's world: 3.0 ms per unknown user's request before
2026-12-07, 0.12 ms after; a known user's 3.4 ms either way). Those stages' metrics do not count that
request (``serving.metrics.SKIPPED_STAGES``).

Exported layout (``deployment/export.py``): ``fused_funnel/<version>/<stage>/`` holds what
``<stage>/<version>/`` holds in the default layout; ``funnel`` and ``funnel_v<version>`` are
one-step ensembles calling ``fused_funnel``, so clients, the A/B router and rollouts see the same
models either way.
"""

from __future__ import annotations

import time

import numpy as np
from tritonclient.utils import triton_to_np_dtype

from serving.interface import FUNNEL_INPUTS, FUNNEL_OUTPUTS, FUSED
from serving.metrics import SKIPPED_STAGES
from serving.stages import FUNNEL, STAGES, FeatureLookup, Filtering, Ordering, Stage, live_store_of, user_known

# The stages between the feature lookup and the ordering: a user the models never saw
# (``user_known`` false) is served from their history or the popularity fallback, which read none of
# their outputs, so the fused funnel skips them for that user (their outputs empty: what ordering's
# ``stage_counts`` say, 0). The seven-model ensemble cannot branch and runs them anyway.
CANDIDATE_STAGES = tuple(FUNNEL[1:-1])


class FusedFunnel(Stage):
    """Every stage of the funnel, in the ensemble's order, inside one model."""

    name = FUSED
    inputs = FUNNEL_INPUTS
    outputs = FUNNEL_OUTPUTS

    def __init__(self, artifacts, live_store: str | None = None):
        super().__init__(artifacts)
        # The live store belongs to the repository holding this folder (<repo>/fused_funnel/<version>).
        live = live_store or live_store_of(self.artifacts)
        self.stages: list[Stage] = []
        for name in FUNNEL:
            folder = self.artifacts / name
            if STAGES[name] in (FeatureLookup, Filtering):
                stage = STAGES[name](folder, live_store=live)
            elif STAGES[name] is Ordering:
                stage = Ordering(folder, live_store=live, retrieval_artifacts=self.artifacts / "retrieval")
            else:
                stage = STAGES[name](folder)
            self.stages.append(stage)
        self.timings: dict[str, float] = {}  # seconds each stage took in the last run / run_batch
        # seconds each stage has taken since loading, failed calls included: what a call that falls
        # back from a batch to one request at a time spent in each stage (``FusedFunnelModel``)
        self.spent: dict[str, float] = {stage.name: 0.0 for stage in self.stages}

    def run(self, inputs):
        """The funnel's response for one request, with every tensor the stages passed between them
        (what the ensemble's steps would have exchanged; the adapter sends only ``outputs``)."""
        x, timings = dict(inputs), {}
        for stage in self.stages:
            if self.skips(stage, x):
                continue
            start = time.perf_counter()
            try:
                x.update(stage.run(x))
            finally:
                timings[stage.name] = time.perf_counter() - start
                self.spent[stage.name] += timings[stage.name]
        self.timings = timings
        return x

    def run_batch(self, batch):
        """Each stage once for the whole batch (its ``run_batch``): each request gets what ``run``
        gives it alone, since every stage's ``run_batch`` does."""
        xs, timings = [dict(inputs) for inputs in batch], {}
        for stage in self.stages:
            served = [x for x in xs if not self.skips(stage, x)]
            if not served:
                continue
            start = time.perf_counter()
            try:
                for x, out in zip(served, stage.run_batch(served)):
                    x.update(out)
            finally:
                timings[stage.name] = time.perf_counter() - start
                self.spent[stage.name] += timings[stage.name]
        self.timings = timings
        return xs

    @staticmethod
    def skips(stage: Stage, x: dict) -> bool:
        """Whether ``stage`` is skipped for the request ``x`` (a candidate stage, a user the models never
        saw); if so, ``x`` gets its outputs, each empty, and the stage's name under ``SKIPPED_STAGES``."""
        if stage.name not in CANDIDATE_STAGES or user_known(x):
            return False
        x.update({t.name: np.zeros(0, dtype=triton_to_np_dtype(t.dtype)) for t in stage.outputs})
        x[SKIPPED_STAGES] = (*x.get(SKIPPED_STAGES, ()), stage.name)
        return True

    def close(self) -> None:
        """Close every stage (each closes the stores it opened: the online store, the live store)."""
        for stage in self.stages:
            stage.close()

"""The funnel's interface in one place: model names, the request and response tensors, files.

Each Triton model declares the tensors it takes and returns in code, the way a Merlin Systems
operator declares its input and output schema: the stage classes (``serving/stages.py``:
``Stage.inputs`` / ``Stage.outputs``), the A/B router and the feedback endpoint (``online/router.py``),
all built from the ``Tensor`` values below. The gRPC client (``serving/client.py``) reads the
response's names from here. ``tests/test_interface.py`` checks that every ``triton_repo/*/config.pbtxt``
says the same (names, datatypes, shapes, which inputs are optional) and that the ensemble wires each
step's outputs to inputs that exist.

Datatypes are Triton's names without the ``TYPE_`` prefix; ``dims`` as in ``config.pbtxt``
(``-1``: any length), per request: the checked-in configs have ``max_batch_size: 0``; the export
writes the stages' dynamic batching (``serving.batching``), which adds a leading batch dimension
inside the server only (the ensemble adds it and strips it, ``docs/serving.md``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from models.registry import MANIFEST  # noqa: F401  (the manifest's file name, defined by the registry)

FUNNEL = "funnel"  # the served ensemble: every stage of one model version
FUSED = "fused_funnel"  # every stage in one model (serving.batching.fuse_stages; serving/fused.py)
ROUTER = "ab_router"  # the A/B router: the arm's version-pinned ensemble, plus arm and request id
FEEDBACK = "feedback"  # reactions to one router response
EXPERIMENT_FILE = "experiment.json"  # the router version's rollout (``serving/assignment.py``)
# config.pbtxt parameter: how often a stub sends its queued metric updates (``serving.metrics_interval_s``).
METRICS_INTERVAL_PARAMETER = "metrics_interval_s"
# What each count of a response's ``stage_counts`` is: items the stage had or passed on toward the
# served list. A user the models never saw is served from their history or the popularity fallback, not
# from the candidate stages: retrieval, filters and light_ranker count 0 for them (a known user's counts
# are the stages' even where the filters left nothing and the whole list is the fallback's).
STAGE_COUNTS = ("catalog", "retrieval", "filters", "light_ranker", "final")


def ensemble_name(version: int | str) -> str:
    """The ensemble that runs every stage at exactly ``version`` (A/B arms call these)."""
    return f"{FUNNEL}_v{int(version)}"


def stage_folder(repo: str | Path, stage: str, version: int | str) -> Path:
    """Where ``stage``'s artifacts of ``version`` live in an exported repository: ``<stage>/<version>/``,
    or ``fused_funnel/<version>/<stage>/`` where that version was exported fused."""
    fused = Path(repo) / FUSED / str(version)
    return fused / stage if fused.is_dir() else Path(repo) / stage / str(version)


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str  # Triton's datatype name: INT64, INT32, FP32, BOOL, STRING
    dims: tuple[int, ...] = (-1,)
    optional: bool = False


USER_ID = Tensor("user_id", "INT64", (1,))
K = Tensor("k", "INT32", (1,))
EXCLUDE = Tensor("exclude_item_ids", "INT64", (-1,), optional=True)  # request context: raw ids never to return
USER_FEATURES = (Tensor("user_categorical", "INT64"), Tensor("user_continuous", "FP32"))
SEEN = Tensor("seen_items", "INT64")

FUNNEL_INPUTS = (USER_ID, K, EXCLUDE)
FUNNEL_OUTPUTS = (
    Tensor("item_ids", "INT64"),
    Tensor("scores", "FP32"),
    Tensor("model_version", "STRING", (1,)),
    Tensor("served_by", "STRING", (1,)),  # "model" or "fallback"
    Tensor("stage_counts", "INT64", (len(STAGE_COUNTS),)),
)


def names(tensors) -> list[str]:
    return [t.name for t in tensors]

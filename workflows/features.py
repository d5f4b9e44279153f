"""The NVTabular feature workflow: categorical encodings, continuous features, time features, labels.

The workflow has two named sub-workflows, ``user_features`` and ``item_features``. Serving applies
them alone to the user and item tables (``Workflow.get_subworkflow``), so the features a model is
trained on and the features it is served with come from the same fitted operators.

    user_features   user_id (USER_ID), age_band/gender/location (USER, CATEGORICAL),
                    user_click_rate_before (USER, CONTINUOUS; point-in-time, from the counts
                    user_events_before/user_clicks_before, which are features themselves with
                    ``features.point_in_time_features: [counts]``; the default is ``[rates]``)
                    user_events_last_<w>/user_clicks_last_<w> (USER, CONTINUOUS, "activity"; windowed
                    activity, ``workflows/activity.py``: log1p of the count, no fitted statistics)
    item_features   item_id (ITEM_ID), category (ITEM, CATEGORICAL),
                    duration_seconds, item_click_rate_before (ITEM, CONTINUOUS; the same from
                    item_events_before/item_clicks_before)
    context         hour_of_day, day_of_week (CONTEXT, CATEGORICAL) from the event timestamp

Those are the raw schema's columns; with a dataset spec (``workflows/spec.py``) the attribute
columns are the spec's: every categorical and list column of the user (item) table is Categorify-ed
and tagged USER (ITEM) + CATEGORICAL, every continuous one normalised (``log1p`` first where the spec
says ``log``; a missing value becomes 0, the mean) and tagged USER (ITEM) + CONTINUOUS. The models
select their inputs by these tags, so a new column in the spec is a new model input and a new column
of the serving tables without a code change. Text columns are not features.
    labels          see ``workflows/labels.py`` (TARGET, BINARY_CLASSIFICATION)

Categorify reserves 0 (padding), 1 (null) and 2 (out of vocabulary). ``id_freq_threshold`` sends
rare ids to OOV; ``attribute_freq_threshold`` / ``attribute_num_buckets`` do the same for attributes,
hashing rare values into buckets when a vocabulary is too large to keep whole.
"""

from __future__ import annotations

from pathlib import Path

import nvtabular as nvt
from merlin.dag.ops.subgraph import Subgraph
from merlin.schema import Tags

from configs import WorkflowConfig
from workflows import merlin_patches  # noqa: F401  (distributed fit alignment fix, see the module)
from workflows.activity import ACTIVITY_TAG, Encode, column_names
from workflows.labels import LABELS, label_graph
from workflows.point_in_time import ITEM_COUNTS, USER_COUNTS
from workflows.spec import RAW_LAYOUT, Layout

__all__ = ["LABELS", "build_feature_workflow", "hour_of_day", "day_of_week"]


def hour_of_day(col, df):
    return ((col // 3600) % 24).astype("int64")


def day_of_week(col, df):
    return (((col // 86400) + 3) % 7).astype("int64")  # 1970-01-01 was a Thursday: Monday is 0


def _continuous(columns: list[str], entity: Tags):
    return columns >> nvt.ops.LogOp() >> nvt.ops.Normalize() >> nvt.ops.AddTags([entity, Tags.CONTINUOUS])


class SmoothedRate:
    """Picklable ``(clicks + 1) / (events + 2)``: a click rate that is defined from the first event on."""

    def __init__(self, events_column: str):
        self.events_column = events_column

    def __call__(self, col, df):
        return ((col + 1.0) / (df[self.events_column] + 2.0)).astype("float64")


def point_in_time_features(counts: list[str], kinds: list[str], entity: Tags):
    """Counts (log, normalised) and/or the click rate derived from them, tagged entity + CONTINUOUS.

    Raw counts only grow with time, so their scale at serving (end of training) and in validation is
    beyond most training rows; the rate is stationary. Which to use is ``features.point_in_time_features``.
    """
    events, clicks = counts
    graph = None
    if "counts" in kinds:
        graph = _continuous(counts, entity)
    if "rates" in kinds:
        name = clicks.replace("_clicks_before", "_click_rate_before")
        rate = [clicks] >> nvt.ops.LambdaOp(SmoothedRate(events), dependency=[events]) >> nvt.ops.Rename(name=name)
        rate = rate >> nvt.ops.Normalize() >> nvt.ops.AddTags([entity, Tags.CONTINUOUS])
        graph = rate if graph is None else graph + rate
    return graph


def activity_features(windows: list[int]):
    """The windowed activity counts as model inputs: ``workflows/activity.py`` ``encode`` (log1p), the
    very function serving applies to the counts it computes at request time."""
    encoded = column_names(windows) >> nvt.ops.LambdaOp(Encode(), dtype="float32")
    return encoded >> nvt.ops.AddTags([Tags.USER, Tags.CONTINUOUS, ACTIVITY_TAG])


def _continuous_features(columns: list[tuple[str, bool]], entity: Tags):
    """Attribute columns as continuous features: ``log1p`` first where the spec says ``log``, then
    normalised; a missing value becomes the mean (0 after normalising)."""
    graph = None
    for log, names in ((True, [c for c, lg in columns if lg]), (False, [c for c, lg in columns if not lg])):
        if not names:
            continue
        part = names >> nvt.ops.LogOp() if log else names
        part = part >> nvt.ops.Normalize() >> nvt.ops.FillMissing(fill_val=0.0)
        part = part >> nvt.ops.AddTags([entity, Tags.CONTINUOUS])
        graph = part if graph is None else graph + part
    return graph


def _add(graph, part):
    return part if graph is None else (graph if part is None else graph + part)


def build_feature_workflow(
    config: WorkflowConfig, categories_dir: str | Path, layout: Layout = RAW_LAYOUT
) -> nvt.Workflow:
    """Build (unfitted) the workflow that turns the joined event log into model inputs.

    ``layout`` (``workflows/spec.py``) names the attribute columns: each categorical (and each
    position of a list column) is a ``Categorify``-ed USER / ITEM feature, each continuous one a
    normalised USER / ITEM feature; the default is the raw schema's.
    """
    out = str(categories_dir)  # Categorify writes its vocabularies here, never into the cwd
    feats = config.features
    ids = dict(out_path=out, freq_threshold=feats.id_freq_threshold)
    attrs = dict(
        out_path=out,
        freq_threshold=feats.attribute_freq_threshold,
        num_buckets=feats.attribute_num_buckets or None,
    )

    user_graph = ["user_id"] >> nvt.ops.Categorify(**ids) >> nvt.ops.TagAsUserID()
    if layout.user_categorical:
        user_attributes = list(layout.user_categorical) >> nvt.ops.Categorify(**attrs) >> nvt.ops.TagAsUserFeatures()
        user_graph = user_graph + user_attributes
    user_graph = _add(user_graph, _continuous_features(list(layout.user_continuous), Tags.USER))
    if feats.point_in_time:
        user_graph = user_graph + point_in_time_features(USER_COUNTS, feats.point_in_time_features, Tags.USER)
    if feats.activity_windows:
        user_graph = user_graph + activity_features(feats.activity_window_seconds)
    user_features = Subgraph("user_features", user_graph)

    item_graph = ["item_id"] >> nvt.ops.Categorify(**ids) >> nvt.ops.TagAsItemID()
    if layout.item_categorical:
        item_attributes = list(layout.item_categorical) >> nvt.ops.Categorify(**attrs) >> nvt.ops.TagAsItemFeatures()
        item_graph = item_graph + item_attributes
    item_graph = _add(item_graph, _continuous_features(list(layout.item_continuous), Tags.ITEM))
    if feats.point_in_time:
        item_graph = item_graph + point_in_time_features(ITEM_COUNTS, feats.point_in_time_features, Tags.ITEM)
    item_features = Subgraph("item_features", item_graph)

    graph = user_features + item_features + label_graph(config, layout)
    if feats.time_features:
        hour = ["timestamp"] >> nvt.ops.LambdaOp(hour_of_day) >> nvt.ops.Rename(name="hour_of_day")
        day = ["timestamp"] >> nvt.ops.LambdaOp(day_of_week) >> nvt.ops.Rename(name="day_of_week")
        context = (hour + day) >> nvt.ops.Categorify(out_path=out) >> nvt.ops.AddTags([Tags.CONTEXT])
        graph = graph + context
    return nvt.Workflow(graph)

"""The rankers as classifiers: ROC-AUC and PR-AUC of every head on the validation part.

The funnel's end-to-end figures (``evaluation/offline.py``) say how good the served lists are; this
says how well each ranker separates the validation impressions a head labels positive from the rest
(the light ranker's one target, every head of each heavy-ranker member). PR-AUC is average precision
(``evaluation/metrics.py``); a ranker that orders at random scores the positive share, which the
table gives beside it, so PR-AUC is read against that and ROC-AUC against 0.5.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from evaluation.metrics import pr_auc, roc_auc


def ranker_specs(manifest: dict) -> list[tuple[str, list[str], list[str]]]:
    """``(artifact, features, heads)`` of every ranker a model version holds."""
    light, heavy = manifest["light_ranker"], manifest["heavy_ranker"]
    specs = [("light_ranker", list(light["features"]), [light["target"]])]
    for name in heavy.get("members", ["heavy_ranker"]):
        specs.append((name, list(heavy["features"]), list(heavy["weights"])))
    return specs


def ranker_table(model_dir, manifest: dict, valid) -> pd.DataFrame:
    """One row per ranker and head: validation rows, positive share, ROC-AUC and PR-AUC.

    ``model_dir`` is the registry version folder (the saved Keras rankers), ``valid`` the dataset
    pipeline's validation part (a Merlin ``Dataset``). A head whose labels are all one class gets NaN."""
    import merlin.models.tf  # noqa: F401  (registers Merlin's layers before load_model)
    import tensorflow as tf
    from merlin.io import Dataset

    from models import merlin_patches  # noqa: F401  (saved DCNs reload as they were trained)
    from models.ranker import binary_targets, predict_heads

    rows = []
    frame = valid.to_ddf()
    if len(frame) == 0:  # a split without a validation part: nothing to score, every AUC not applicable
        nan = float("nan")
        rows = [
            {"ranker": a, "head": h, "validation rows": 0, "positive share": nan, "ROC-AUC": nan, "PR-AUC": nan}
            for a, _, heads in ranker_specs(manifest)
            for h in heads
        ]
        return pd.DataFrame(rows).astype({"validation rows": np.int64})
    for artifact, features, heads in ranker_specs(manifest):
        model = tf.keras.models.load_model(str(model_dir / artifact))
        # the columns and tags the ranker was validated with in training (heads tagged as targets)
        columns = features + heads
        data = Dataset(frame[columns], schema=binary_targets(valid.schema.select_by_name(columns), heads))
        scores, labels = predict_heads(model, data, features, heads)
        for head in heads:
            y, s = labels[head].astype(bool), scores[head]
            both = 0 < y.sum() < len(y)
            rows.append(
                {
                    "ranker": artifact,
                    "head": head,
                    "validation rows": int(len(y)),
                    "positive share": round(float(y.mean()), 4) if len(y) else float("nan"),
                    "ROC-AUC": round(roc_auc(y, s), 4) if both else float("nan"),
                    "PR-AUC": round(pr_auc(y, s), 4) if both else float("nan"),
                }
            )
    return pd.DataFrame(rows).astype({"validation rows": np.int64})

"""A gRPC client for the funnel ensemble (tritonclient)."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

MODEL_NAME = "funnel"
STAGE_NAMES = ["catalog", "retrieval", "filters", "light_ranker", "final"]


@dataclass
class Recommendations:
    user_id: int
    item_ids: list[int]
    scores: list[float]
    model_version: str
    served_by: str
    stage_counts: dict[str, int]

    def to_dict(self) -> dict:
        return asdict(self)


class FunnelClient:
    """Ask the served funnel for a user's top-k items over gRPC."""

    def __init__(self, url: str = "127.0.0.1:8001", model_name: str = MODEL_NAME, timeout_s: float = 30.0):
        import tritonclient.grpc as grpcclient

        self._grpc = grpcclient
        self.client = grpcclient.InferenceServerClient(url)
        self.model_name = model_name
        self.timeout_s = timeout_s

    def recommend(self, user_id: int, k: int = 10) -> Recommendations:
        g = self._grpc
        user = g.InferInput("user_id", [1], "INT64")
        user.set_data_from_numpy(np.array([user_id], dtype=np.int64))
        top_k = g.InferInput("k", [1], "INT32")
        top_k.set_data_from_numpy(np.array([k], dtype=np.int32))
        names = ["item_ids", "scores", "model_version", "served_by", "stage_counts"]
        result = self.client.infer(
            self.model_name,
            [user, top_k],
            outputs=[g.InferRequestedOutput(n) for n in names],
            client_timeout=self.timeout_s,
        )
        counts = result.as_numpy("stage_counts").tolist()
        return Recommendations(
            user_id=int(user_id),
            item_ids=result.as_numpy("item_ids").tolist(),
            scores=[float(s) for s in result.as_numpy("scores")],
            model_version=result.as_numpy("model_version")[0].decode(),
            served_by=result.as_numpy("served_by")[0].decode(),
            stage_counts=dict(zip(STAGE_NAMES, (int(c) for c in counts))),
        )

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> "FunnelClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

"""Reference recommenders trained and evaluated on the same split as our funnel.

All peers share one tiny interface over an implicit-feedback matrix ``train`` (scipy CSR,
``[num_users, num_items]``, 1 where the user interacted):

    peer.fit(train) -> peer
    peer.scores(user_rows) -> dense [len(user_rows), num_items] scores (higher is better)

    Popularity  how many users interacted with the item; the same list for everyone

    EASE        Steck 2019, "Embarrassingly Shallow Autoencoders": a closed-form item-item model
                B = I - P / diag(P), P = (X^T X + lambda I)^-1, diag(B) = 0
    ALS         implicit's alternating least squares matrix factorisation (Hu, Koren, Volinsky 2008)

``serves_cold_users``: whether the peer has a list of its own for a user without a training row.
Popularity does (the same list); EASE and ALS rank from the user's own history and have none, so the
evaluation serves such a user the popularity list from them (``offline.evaluate_scorer``'s
``cold_user_scores``), as the funnel's fallback does, rather than their all-tied scores.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp


class Popularity:
    name = "Pop"
    serves_cold_users = True

    def fit(self, train: sp.csr_matrix) -> Popularity:
        self.counts = np.asarray(train.astype(bool).sum(axis=0), dtype=np.float32).ravel()
        return self

    def scores(self, user_rows) -> np.ndarray:
        return np.tile(self.counts, (len(user_rows), 1))


class EASE:
    """``reg_weight`` 250 is RecBole's default for EASE, the setting its published figures use."""

    name = "EASE"
    serves_cold_users = False

    def __init__(self, reg_weight: float = 250.0):
        self.reg_weight = reg_weight

    def fit(self, train: sp.csr_matrix) -> EASE:
        from models.item_affinity import ease_weights  # the same closed form the funnel's affinity uses

        self.item_weights = ease_weights(train, self.reg_weight)
        self.train = train.astype(np.float32).tocsr()
        return self

    def scores(self, user_rows) -> np.ndarray:
        return np.asarray(self.train[user_rows] @ self.item_weights)


class ALS:
    name = "ALS"
    serves_cold_users = False

    def __init__(
        self, factors: int = 64, regularization: float = 0.05, iterations: int = 15, alpha: float = 10.0, seed: int = 0
    ):
        self.params = dict(
            factors=factors, regularization=regularization, iterations=iterations, alpha=alpha, random_state=seed
        )

    def fit(self, train: sp.csr_matrix) -> ALS:
        from implicit.als import AlternatingLeastSquares
        from threadpoolctl import threadpool_limits

        # implicit's own threads; BLAS threads would oversubscribe. The constructor checks the BLAS
        # config (and warns), so it is built inside the limit too.
        with threadpool_limits(1, "blas"):
            self.model = AlternatingLeastSquares(**self.params)
            self.model.fit(train.astype(np.float32).tocsr(), show_progress=False)
        return self

    def scores(self, user_rows) -> np.ndarray:
        return np.asarray(self.model.user_factors[user_rows] @ self.model.item_factors.T)


PEERS = {"Pop": Popularity, "EASE": EASE, "ALS": ALS}


def interaction_matrix(users, items, num_users: int, num_items: int) -> sp.csr_matrix:
    """Binary user-item matrix from parallel arrays of row and column indices."""
    data = np.ones(len(users), dtype=np.float32)
    m = sp.csr_matrix((data, (np.asarray(users), np.asarray(items))), shape=(num_users, num_items))
    m.data[:] = 1.0  # duplicates summed by the constructor count once
    return m

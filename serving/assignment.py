"""Deterministic experiment assignment by hashing the user id with a per-experiment salt.

The same user always lands in the same arm of an experiment (no state to store, every server agrees),
and different experiments (different salts) assign independently. A ``holdout`` share of users is
carved out first and stays on the control model even after the treatment is rolled out to everyone
else: the long-term holdout is what shows whether a model degrades once it mostly learns from its
own logs.

The holdout may be drawn with a salt of its own (``holdout_salt``): a deployment that starts one
experiment after another (every retraining candidate, ``online/retraining.py``) keeps the same users in
the holdout across them, while the arms outside it are reshuffled by each experiment's salt.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from configs import MAX_HOLDOUT

BUCKETS = 10_000
HOLDOUT = "holdout"


def bucket(user_id: int | str, salt: str, buckets: int = BUCKETS) -> int:
    """A stable bucket in ``[0, buckets)`` from SHA-256 of ``salt:user_id``.

    A number is hashed as the integer it is: user 7 read from a float column (7.0) once hashed as
    "7.0", another bucket and possibly another arm than the 7 the router served. A number that is
    not a whole one is no user id."""
    if not isinstance(user_id, str):
        number = float(user_id)
        if not number.is_integer():
            raise ValueError(f"user id {user_id!r} is not an integer")
        user_id = int(number) if abs(number) < 2**53 else int(user_id)  # exact for int64 ids
    digest = hashlib.sha256(f"{salt}:{user_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % buckets


@dataclass
class Experiment:
    """``arms`` maps arm name to its share of the non-holdout traffic (shares sum to 1).

    ``holdout_salt`` (None: ``salt``) decides who is held out. With the experiment's own salt the holdout
    is the lowest buckets of ``salt`` and the arms share the rest; with another salt a user is held out by
    that salt's bucket, and the arm of everyone else comes from ``salt``'s bucket over all buckets, so
    the holdout stays the same users across experiments that share a ``holdout_salt``."""

    name: str
    salt: str
    arms: dict[str, float] = field(default_factory=lambda: {"control": 0.5, "treatment": 0.5})
    holdout: float = 0.01
    control: str = "control"
    holdout_salt: str | None = None

    def __post_init__(self) -> None:
        # '' is the feedback log's "unknown experiment", which every experiment's analysis reads as its own
        # (``online.ab_report.of_experiment``): an experiment of that name was counted into every other one.
        if not isinstance(self.name, str) or self.name == "":
            raise ValueError(
                f"an experiment needs a name ('' marks rows of unknown experiment in the log), got {self.name!r}"
            )
        if not 0.0 <= self.holdout <= MAX_HOLDOUT:
            raise ValueError(f"holdout must be in [0, {MAX_HOLDOUT}] (1-2% is usual), got {self.holdout}")
        if self.control not in self.arms:
            raise ValueError(f"control arm {self.control!r} is not among the arms {sorted(self.arms)}")
        if HOLDOUT in self.arms:  # assign() could not tell its users from the holdout's
            raise ValueError(f"{HOLDOUT!r} is the holdout's name, not an arm's: rename the arm")
        shares = list(self.arms.values())
        # Written so that a NaN share fails: with "> 1e-9 or <= 0" it passed both comparisons.
        if not (all(share > 0 for share in shares) and abs(sum(shares) - 1.0) <= 1e-9):
            raise ValueError(f"arm shares must be positive and sum to 1, got {self.arms}")
        # Users are assigned by bucket, so a share smaller than one bucket got no user at all.
        # (A positive holdout always holds bucket 0.)
        served = self.expected_shares()
        empty = [arm for arm in self.arms if served[arm] == 0]
        if empty:
            raise ValueError(
                f"{empty} would get no user: assignment is by {BUCKETS:,} buckets, and a share below one "
                f"bucket (1/{BUCKETS:,} of the traffic) gets none (holdout {self.holdout}, arms {self.arms})"
            )

    def holds_out_the_same_users(self, other: Experiment) -> bool:
        """Whether ``other`` holds out exactly this experiment's holdout: the same positive share, drawn
        by the same salt (``holdout_salt``, None meaning ``salt``)."""
        return 0 < self.holdout == other.holdout and (self.holdout_salt or self.salt) == (
            other.holdout_salt or other.salt
        )

    def _own_holdout_salt(self) -> bool:
        return self.holdout_salt is not None and self.holdout_salt != self.salt

    def assign(self, user_id: int | str) -> str:
        u = bucket(user_id, self.salt) / BUCKETS
        if not self._own_holdout_salt():
            return self._arm_at(u)
        if bucket(user_id, self.holdout_salt) / BUCKETS < self.holdout:
            return HOLDOUT
        return self._arm_of(u)

    def _arm_at(self, u: float) -> str:
        """The arm of bucket ``u`` when the holdout is the lowest buckets of the experiment's salt."""
        if u < self.holdout:
            return HOLDOUT
        return self._arm_of((u - self.holdout) / (1.0 - self.holdout))

    def _arm_of(self, position: float) -> str:
        """The arm at ``position`` in [0, 1) of the traffic outside the holdout."""
        cumulative = 0.0
        for arm, share in self.arms.items():
            cumulative += share
            if position < cumulative:
                return arm
        return list(self.arms)[-1]

    def expected_shares(self) -> dict[str, float]:
        """The share of users each arm (and the holdout) gets: the share of the buckets ``assign`` puts
        in it. That is the design's share rounded to whole buckets; the sample-ratio check compares
        with it, since a share of a bucket and a half (holdout 0.00015) is served as one or two.

        With a ``holdout_salt`` of its own the two buckets are independent hashes: an arm gets its share
        of ``salt``'s buckets times the share of users outside the holdout (``holdout_salt``'s buckets)."""
        counts: dict[str, int] = {arm: 0 for arm in self.arms}
        counts[HOLDOUT] = 0
        if not self._own_holdout_salt():
            for b in range(BUCKETS):
                counts[self._arm_at(b / BUCKETS)] += 1
            return {arm: n / BUCKETS for arm, n in counts.items()}
        for b in range(BUCKETS):
            counts[self._arm_of(b / BUCKETS)] += 1
        held = sum(1 for b in range(BUCKETS) if b / BUCKETS < self.holdout) / BUCKETS
        shares = {arm: (1.0 - held) * counts[arm] / BUCKETS for arm in self.arms}
        shares[HOLDOUT] = held
        return shares


@dataclass
class Rollout:
    """Which model version each arm is served by; the holdout gets ``control_version``: the control arm's
    version in ``ab_rollout``, an earlier one where the retraining pipeline keeps the holdout on its model."""

    experiment: Experiment
    versions: dict[str, int]  # arm -> model version
    control_version: int

    def __post_init__(self) -> None:
        # Checked here, not only when read from experiment.json: start_experiment takes a Rollout as
        # built, and an arm without a version failed its users only at request time.
        missing = set(self.experiment.arms) - set(self.versions)
        if missing:
            raise ValueError(f"arms {sorted(missing)} have no model version")
        unknown = set(self.versions) - set(self.experiment.arms)
        if unknown:
            raise ValueError(f"versions name arms {sorted(unknown)} the experiment lacks")

    def version_for(self, user_id: int | str) -> tuple[str, int]:
        arm = self.experiment.assign(user_id)
        if arm == HOLDOUT:
            return arm, self.control_version
        return arm, self.versions[arm]

    def versions_by_arm(self) -> dict[str, int]:
        """Every arm a request can land in, the holdout included (when it has a share), and its version."""
        arms = dict(self.versions)
        if self.experiment.holdout > 0:
            arms[HOLDOUT] = self.control_version
        return arms

    def roll_out(self, arm: str) -> Rollout:
        """Everyone but the holdout moves to ``arm``'s version."""
        version = self.versions[arm]
        return Rollout(self.experiment, {a: version for a in self.versions}, self.control_version)

    def to_dict(self) -> dict:
        e = self.experiment
        return {
            "experiment": {
                "name": e.name,
                "salt": e.salt,
                "arms": dict(e.arms),
                "holdout": e.holdout,
                "control": e.control,
                # Only when set: an experiment.json without it reads as before (the holdout by ``salt``).
                **({"holdout_salt": e.holdout_salt} if e.holdout_salt is not None else {}),
            },
            "versions": {arm: int(v) for arm, v in self.versions.items()},
            "control_version": int(self.control_version),
        }

    @classmethod
    def from_dict(cls, values: dict) -> Rollout:
        return cls(
            Experiment(**values["experiment"]),
            {a: int(v) for a, v in values["versions"].items()},
            int(values["control_version"]),
        )


def ab_rollout(
    name: str,
    salt: str,
    control_version: int,
    treatment_version: int,
    holdout: float = 0.02,
    treatment_share: float = 0.5,
    holdout_salt: str | None = None,
) -> Rollout:
    """A two-arm test: ``control`` on the current model, ``treatment`` on the candidate, and a holdout
    (drawn by ``holdout_salt`` when given, so that it stays the same users across experiments)."""
    if name == NO_EXPERIMENT:  # roll_out would read it as no experiment and move the holdout off control
        raise ValueError(f"{NO_EXPERIMENT!r} names the state without an experiment: give the A/B test another name")
    experiment = Experiment(
        name, salt, {"control": 1.0 - treatment_share, "treatment": treatment_share}, holdout, holdout_salt=holdout_salt
    )
    return Rollout(
        experiment, {"control": int(control_version), "treatment": int(treatment_version)}, int(control_version)
    )


NO_EXPERIMENT = "none"


def single_version(version: int) -> Rollout:
    """No experiment: every user on ``version`` (what a fresh export serves)."""
    return Rollout(
        Experiment(NO_EXPERIMENT, NO_EXPERIMENT, {"control": 1.0}, 0.0), {"control": int(version)}, int(version)
    )

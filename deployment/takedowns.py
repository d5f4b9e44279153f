"""Takedowns: an item found unsafe after export leaves every served list within seconds, without
retraining or restarting, and stays out of the next training run.

A takedown is one row in the live store's takedown list (``workflows/live_store.py``), written with
the time, the reason and who asked. Every serving process re-reads the list at least every
``serving.live.takedown_refresh_s`` (1 s) and drops the item from the model's list, the
fresh-history list and the popularity fallback (``serving/stages.py`` ``Ordering``); the dataset
pipeline's content filter reads the same list (``workflows/content_filter.py``). Undo restores the
item, with its own reason, and both stay in the takedown log.

An id that no version on disk serves (in no exported catalog, and no known duplicate's) is taken
down all the same, since an item can be blocked before it reaches an export (the content filter then
keeps it out of training too), but with a warning naming it: a mistyped id takes nothing down. An
undo of an item that is not down is refused (``NotTakenDownError``) and writes nothing; the check is
in the undo's transaction, so of two undos at once one restores the item and the other is refused.

Changing what is served is the control plane's business: it takes the deployment's admin key
(``deployment/security.py``), the same one that loads models.
"""

from __future__ import annotations

import getpass
import logging
import secrets
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from deployment.security import AdminKeyError, read_admin_key
from workflows.live_store import LiveStore, is_postgres, store_location
from workflows.local_parquet import read_parquet

log = logging.getLogger(__name__)


class NotTakenDownError(ValueError):
    """An undo of an item that is not down (by this id or, through the aliases, another): nothing to undo."""


def check_admin_key(repository: str | Path, key: str) -> None:
    """``AdminKeyError`` unless ``key`` is the admin key of the deployment serving ``repository``."""
    expected = read_admin_key(repository)
    if not secrets.compare_digest(str(key).strip().encode(), expected.encode()):
        raise AdminKeyError(f"wrong admin key for {Path(repository).resolve()}: nothing was changed")


def set_takedown(
    repository: str | Path,
    item_id: int,
    reason: str,
    key: str,
    undo: bool = False,
    actor: str | None = None,
    store: str | None = None,
) -> dict:
    """Take ``item_id`` (raw id) down, or restore it with ``undo``, in the live store of
    ``repository`` (``store`` overrides where that is); return its new state. Durable on return.

    Serving reads a takedown of either id of a duplicated item as its canonical item's
    (``serving/item_aliases.py``), so an undo restores the item: it also undoes the active takedowns
    of its other ids in every version on disk (A/B arms, a version added for ``roll_out``). An undo
    by the other id used to leave the item down.

    An undo of an item not down raises ``NotTakenDownError`` and writes nothing (it used to log an
    undo of nothing); a takedown of an id no version on disk serves logs a warning naming it (it
    used to be silent, so a typo looked like a takedown). The check and the undo are one transaction
    (``LiveStore.undo_takedown``): two undos at once both passed a check made before the write."""
    check_admin_key(repository, key)
    if isinstance(item_id, bool) or not float(item_id).is_integer():  # int() would take another item down
        raise ValueError(f"item_id must be a whole number, got {item_id!r}")
    if not isinstance(reason, str) or not reason.strip():
        raise ValueError("a takedown (and its undo) needs a reason")
    actor = actor or getpass.getuser()
    if not undo and not in_catalog(repository, int(item_id)):
        log.warning(
            "item %d is in no exported version's catalog in %s (nor a known duplicate): taken down "
            "anyway, so it is kept out if it arrives, but check the id: a mistyped one takes nothing down",
            int(item_id),
            Path(repository),
        )
    same_item = same_item_picker(repository, int(item_id)) if undo else None  # reads the alias tables
    live = LiveStore(store or store_location(repository))
    try:
        if not undo:
            live.set_takedown(int(item_id), True, reason, actor)
        elif not live.undo_takedown(int(item_id), reason, actor, same_item=same_item):
            # Checked in the undo's own transaction: of two undos at once, the later one lands here.
            raise NotTakenDownError(f"item {int(item_id)} is not taken down: nothing to undo, nothing was changed")
        state = live.takedowns()
    finally:
        live.close()
    return state[state["item_id"] == int(item_id)].iloc[0].to_dict()


def same_item_picker(repository: str | Path, item_id: int) -> Callable[[np.ndarray], list[int]]:
    """A function of the raw ids down now that picks the other ids among them that a version on disk
    in ``repository`` reads as ``item_id``'s item: every version, not only ``export.json``'s, since an
    A/B arm or a version added for ``roll_out`` serves beside it with aliases of its own (a newer dedup
    may know more copies). The alias tables are read once, here: an undo calls the function inside its
    transaction (``LiveStore.undo_takedown``)."""
    from serving.item_aliases import ItemAliases

    folders = ordering_folders(repository)
    if folders is None:  # not an export yet: no alias table, every id its own item
        return lambda down: []
    tables = [ItemAliases.load(folder) for folder in folders]

    def pick(down: np.ndarray) -> list[int]:
        down = np.asarray(down, dtype=np.int64)
        same = np.zeros(len(down), dtype=bool)
        for aliases in tables:
            same |= aliases.canonical_ids(down) == aliases.canonical_ids([item_id])[0]
        return [int(i) for i in down[same] if int(i) != item_id]

    return pick


def ordering_folders(repository: str | Path) -> list[Path] | None:
    """The ordering stage's folder of every version on disk in ``repository`` (both layouts); None
    where it is no export yet (no ``export.json``)."""
    from deployment.export import exported_version
    from serving.interface import FUSED

    repository = Path(repository)
    try:
        exported_version(repository)
    except FileNotFoundError:
        return None
    folders = [p for p in (repository / "ordering").glob("*") if p.name.isdigit()]
    return folders + [p / "ordering" for p in (repository / FUSED).glob("*") if p.name.isdigit()]


def in_catalog(repository: str | Path, item_id: int) -> bool:
    """Whether a version on disk in ``repository`` serves ``item_id`` (raw): in its catalog, or a
    duplicate's id its aliases know. True where that cannot be told (no export yet)."""
    from serving.item_aliases import ItemAliases

    folders = ordering_folders(repository)
    if folders is None:
        return True
    for folder in folders:
        if np.isin(int(item_id), ItemAliases.load(folder).raw):
            return True
        items = folder / "item_features.parquet"
        if items.exists() and (read_parquet(items, columns=["item_id_raw"])["item_id_raw"] == int(item_id)).any():
            return True
    return False


def list_takedowns(repository: str | Path, store: str | None = None) -> pd.DataFrame:
    """Every item ever taken down and its current state (reading needs no key). A SQLite store that
    does not exist yet lists nothing and is not created: a read leaves no state behind."""
    location = store or store_location(repository)
    if not is_postgres(location) and not Path(location).exists():
        return pd.DataFrame(
            {
                "item_id": pd.Series(dtype="int64"),
                "active": pd.Series(dtype="int64"),
                "ts": pd.Series(dtype="float64"),
                "reason": pd.Series(dtype=object),
                "actor": pd.Series(dtype=object),
            }
        )
    live = LiveStore(location)
    try:
        return live.takedowns()
    finally:
        live.close()

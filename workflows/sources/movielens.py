"""MovieLens-100K in the project's raw schema, from the RecBole wheel or the original GroupLens folder.

Where the data comes from (it is never committed: the GroupLens terms forbid redistribution):

* the ``recbole==1.2.1`` wheel ships RecBole's atomic files
  ``recbole/dataset_example/ml-100k/ml-100k.{inter,user,item}``; ``fetch_wheel`` downloads the wheel
  with ``pip download --no-deps`` and ``read_recbole_wheel`` reads the files straight from the zip
  (RecBole itself is never installed: it wants torch and ray);
* the GroupLens folder ``ml-100k/`` with ``u.data``, ``u.user``, ``u.item`` (``read_grouplens``).

Mapping ratings to the raw schema's signals (a rating is one impression the user acted on):

    click          rating >= ``click_min_rating`` (default 3: the user chose the film and did not
                   dislike it; 1: every rating, as protocols that count every rating a positive do)
    watch_seconds  duration * rating/5  when clicked, else 0: so "watched >= 75%" <=> rating >= 4
    like           rating == 5
    share          0                    MovieLens records no sharing; none is invented
    duration       ``duration_seconds`` for every film (default 6000 s): MovieLens has no runtime

Users: age -> the synthetic data's age bands (plus "<18"), gender as is, US zip code -> one of ten
regions by its first digit (the USPS national areas), anything else -> "outside_us"; occupation is
not part of the raw schema and is dropped. Items: category = the first listed genre ("unknown" when
none), title = "Title (year)", so a film listed twice under two ids has one content signature.
"""

from __future__ import annotations

import glob
import io
import json
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

RECBOLE_VERSION = "1.2.1"
WHEEL_PREFIX = "recbole/dataset_example/ml-100k/ml-100k"
DEFAULT_DURATION_SECONDS = 6000
GENRES = [
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
]
ZIP_REGIONS = {
    "0": "northeast",
    "1": "new_york_pennsylvania",
    "2": "mid_atlantic",
    "3": "southeast",
    "4": "great_lakes",
    "5": "upper_midwest",
    "6": "central",
    "7": "south_central",
    "8": "mountain",
    "9": "pacific",
}
AGE_EDGES = [18, 25, 35, 45, 55]
AGE_LABELS = ["<18", "18-24", "25-34", "35-44", "45-54", "55+"]


# Beside the tables: the mapping's settings they were written with (the click label depends on one).
MAPPING_FILE = "movielens.json"


@dataclass
class MovieLensData:
    events: pd.DataFrame
    users: pd.DataFrame
    items: pd.DataFrame
    click_min_rating: int = 3
    duration_seconds: int = DEFAULT_DURATION_SECONDS

    def write_parquet(self, out_dir) -> dict[str, str]:
        """Write ``events``, ``users`` and ``items`` as parquet, with the mapping's settings
        (``movielens.json``, read by ``written_click_min_rating``); return their paths."""
        from workflows.sources import write_raw_tables

        paths = write_raw_tables(self, out_dir, name="movielens")
        mapping = {"click_min_rating": int(self.click_min_rating), "duration_seconds": int(self.duration_seconds)}
        (Path(out_dir) / MAPPING_FILE).write_text(json.dumps(mapping))
        return paths


def written_click_min_rating(raw_dir: str | Path) -> int | None:
    """The ``click_min_rating`` the tables in ``raw_dir`` were written with (None: tables written before
    it was recorded). Tables of another threshold carry other click labels than a config asks for."""
    path = Path(raw_dir) / MAPPING_FILE
    if not path.is_file():
        return None
    return int(json.loads(path.read_text())["click_min_rating"])


def zip_to_region(zip_code: pd.Series) -> pd.Series:
    """US five-digit zip -> region by its first digit; Canadian and other codes -> ``outside_us``."""
    code = zip_code.astype(str).str.strip()
    us = code.str.fullmatch(r"\d{5}")
    return code.str[0].map(ZIP_REGIONS).where(us, "outside_us").fillna("outside_us")


def age_band(age: pd.Series) -> pd.Series:
    idx = np.searchsorted(AGE_EDGES, age.astype(int).values, side="right")
    return pd.Series(np.array(AGE_LABELS)[idx], index=age.index)


def to_raw_schema(
    ratings: pd.DataFrame,
    users: pd.DataFrame,
    items: pd.DataFrame,
    duration_seconds: int = DEFAULT_DURATION_SECONDS,
    click_min_rating: int = 3,
) -> MovieLensData:
    """``ratings: user_id, item_id, rating, timestamp``; ``users: user_id, age, gender, zip_code``;
    ``items: item_id, title, year, genre`` (first genre) -> the raw schema (see module docstring)."""
    if ratings.empty:
        raise ValueError("MovieLens ratings are empty")
    bad = ~ratings["rating"].between(1, 5)
    if bad.any():
        raise ValueError(
            f"MovieLens ratings must be 1..5; {int(bad.sum())} row(s) are not, e.g. {ratings[bad].iloc[0].to_dict()}"
        )
    rating = ratings["rating"].astype(float)
    if not 1 <= click_min_rating <= 5:
        raise ValueError(f"click_min_rating must be 1..5, got {click_min_rating}")
    click = (rating >= click_min_rating).astype("int64")
    events = pd.DataFrame(
        {
            "user_id": ratings["user_id"].astype("int64"),
            "item_id": ratings["item_id"].astype("int64"),
            "timestamp": ratings["timestamp"].astype("int64"),
            "click": click,
            "watch_seconds": (np.round(duration_seconds * rating / 5.0).astype("int64") * click).astype("int64"),
            "like": (rating == 5).astype("int64"),
            "share": np.zeros(len(ratings), dtype="int64"),
        }
    ).sort_values(["timestamp", "user_id", "item_id"], kind="stable", ignore_index=True)
    user_table = pd.DataFrame(
        {
            "user_id": users["user_id"].astype("int64"),
            "age_band": age_band(users["age"]).values,
            "gender": users["gender"].astype(str).values,
            "location": zip_to_region(users["zip_code"]).values,
        }
    )
    year = items["year"].astype(str).str.strip()
    title = items["title"].astype(str).str.strip()
    # A title ending in "(1995)" has its year; "Seven (Se7en)" ends in an alternative title, not a year.
    has_year = year.str.fullmatch(r"\d{4}") & ~title.str.contains(r"\(\d{4}\)$")
    item_table = pd.DataFrame(
        {
            "item_id": items["item_id"].astype("int64"),
            "category": items["genre"].fillna("unknown").astype(str).values,
            "duration_seconds": np.full(len(items), duration_seconds, dtype="int64"),
            "title": title.where(~has_year, title + " (" + year + ")").values,
        }
    )
    return MovieLensData(events, user_table, item_table, click_min_rating, duration_seconds)


def _read_atomic(text: str) -> pd.DataFrame:
    """A RecBole atomic file: tab-separated, header ``name:type``; names lose their ``:type``."""
    frame = pd.read_csv(io.StringIO(text), sep="\t", dtype=str, keep_default_na=False, quoting=3)
    frame.columns = [c.split(":")[0] for c in frame.columns]
    return frame


def read_recbole_wheel(
    wheel: str | Path, duration_seconds: int = DEFAULT_DURATION_SECONDS, click_min_rating: int = 3
) -> MovieLensData:
    """Read ml-100k from the RecBole wheel (a zip) without installing it."""
    wheel = Path(wheel)
    if not wheel.is_file():
        raise FileNotFoundError(f"RecBole wheel {str(wheel)!r} not found; run scripts/fetch_movielens.py")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        texts = {}
        for ext in ("inter", "user", "item"):
            member = f"{WHEEL_PREFIX}.{ext}"
            if member not in names:
                raise ValueError(f"{wheel.name} has no {member}; expected recbole=={RECBOLE_VERSION}")
            texts[ext] = z.read(member).decode("utf-8")  # UTF-8 in the wheel (u.item is latin-1)
    inter, user, item = (_read_atomic(texts[e]) for e in ("inter", "user", "item"))
    ratings = pd.DataFrame(
        {
            "user_id": inter["user_id"].astype("int64"),
            "item_id": inter["item_id"].astype("int64"),
            "rating": inter["rating"].astype(float),
            "timestamp": inter["timestamp"].astype(float).astype("int64"),
        }
    )
    users = user[["user_id", "age", "gender", "zip_code"]]
    users = users.assign(user_id=users["user_id"].astype("int64"), age=users["age"].astype(int))
    items = pd.DataFrame(
        {
            "item_id": item["item_id"].astype("int64"),
            "title": item["movie_title"],
            "year": item["release_year"],
            "genre": item["class"].str.split(" ").str[0].replace("", "unknown"),
        }
    )
    return to_raw_schema(ratings, users, items, duration_seconds, click_min_rating)


def read_grouplens(
    folder: str | Path, duration_seconds: int = DEFAULT_DURATION_SECONDS, click_min_rating: int = 3
) -> MovieLensData:
    """Read the original GroupLens ``ml-100k`` folder (``u.data``, ``u.user``, ``u.item``)."""
    folder = Path(folder)
    missing = [f for f in ("u.data", "u.user", "u.item") if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{str(folder)!r} is not a GroupLens ml-100k folder: missing {missing}")
    ratings = pd.read_csv(folder / "u.data", sep="\t", header=None, names=["user_id", "item_id", "rating", "timestamp"])
    users = pd.read_csv(
        folder / "u.user",
        sep="|",
        header=None,
        names=["user_id", "age", "gender", "occupation", "zip_code"],
        dtype={"zip_code": str},
    )
    raw_items = pd.read_csv(
        folder / "u.item",
        sep="|",
        header=None,
        encoding="latin-1",
        names=["item_id", "title", "release_date", "video_release_date", "url", *GENRES],
    )
    flags = raw_items[GENRES].values.astype(bool)
    first = np.where(flags.any(axis=1), flags.argmax(axis=1), 0)
    # GroupLens titles already end in "(year)"; the year column stays empty so it is not added twice.
    items = pd.DataFrame(
        {
            "item_id": raw_items["item_id"],
            "title": raw_items["title"].fillna("unknown"),
            "year": "",
            "genre": np.array(GENRES)[first],
        }
    )
    return to_raw_schema(
        ratings, users[["user_id", "age", "gender", "zip_code"]], items, duration_seconds, click_min_rating
    )


def find_wheel(cache_dir: str | Path) -> Path | None:
    found = sorted(glob.glob(str(Path(cache_dir) / f"recbole-{RECBOLE_VERSION}-*.whl")))
    return Path(found[0]) if found else None


def fetch_wheel(cache_dir: str | Path, timeout: int = 300) -> Path:
    """Download the RecBole wheel into ``cache_dir`` with pip (once); return its path."""
    existing = find_wheel(cache_dir)
    if existing:
        return existing
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        f"recbole=={RECBOLE_VERSION}",
        "-d",
        str(cache_dir),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    wheel = find_wheel(cache_dir)
    if result.returncode != 0 or wheel is None:
        raise RuntimeError(f"pip could not download recbole=={RECBOLE_VERSION}: {result.stderr.strip()[-500:]}")
    return wheel


def check_source(source: str | Path) -> None:
    """Raise the ``FileNotFoundError`` ``load`` would for ``source`` (no wheel file, or a folder
    without ``u.data``, ``u.user``, ``u.item``), before any work (scripts/evaluate.py)."""
    source = Path(source)
    if source.is_dir():
        missing = [f for f in ("u.data", "u.user", "u.item") if not (source / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{str(source)!r} is not a GroupLens ml-100k folder: missing {missing}")
    elif not source.is_file():
        raise FileNotFoundError(f"RecBole wheel {str(source)!r} not found; run scripts/fetch_movielens.py")


def load(
    source: str | Path, duration_seconds: int = DEFAULT_DURATION_SECONDS, click_min_rating: int = 3
) -> MovieLensData:
    """``source``: a RecBole wheel file, or a GroupLens folder."""
    source = Path(source)
    if source.is_dir():
        return read_grouplens(source, duration_seconds, click_min_rating)
    return read_recbole_wheel(source, duration_seconds, click_min_rating)

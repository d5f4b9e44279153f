"""MovieLens-100K source: the GroupLens parser on a tiny handmade folder (always), and the real data
from the RecBole wheel through the whole pipeline (when pip can download the wheel)."""

import os
from pathlib import Path

import pytest

from workflows.sources import movielens

GENRE_FLAGS = {"Action": 1, "Comedy": 5, "Drama": 8}


def _flags(*genres):
    bits = ["0"] * 19
    for g in genres:
        bits[GENRE_FLAGS[g]] = "1"
    return "|".join(bits)


@pytest.fixture
def grouplens(tmp_path):
    folder = tmp_path / "ml-100k"
    folder.mkdir()
    ratings = [(1, 10, 5, 100), (1, 11, 2, 200), (2, 10, 3, 150), (2, 12, 4, 160), (3, 13, 1, 170), (3, 12, 5, 180)]
    (folder / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in ratings))
    (folder / "u.user").write_text("1|24|M|technician|85711\n2|15|F|student|T8H1N\n3|60|M|retired|02139\n")
    items = [
        (10, "Toy Story (1995)", ("Comedy",)),
        (11, "GoldenEye (1995)", ("Action", "Drama")),
        (12, "Chasing Amy (1997)", ("Drama",)),
        (13, "Chasing Amy (1997)", ("Drama",)),  # ML-100K lists some films twice
    ]
    (folder / "u.item").write_text(
        "".join(f"{i}|{t}|01-Jan-1995||http://x|{_flags(*g)}\n" for i, t, g in items), encoding="latin-1"
    )
    return folder


def test_grouplens_folder_maps_ratings_to_signals(grouplens):
    data = movielens.load(grouplens)
    e = data.events.set_index(["user_id", "item_id"])
    assert list(data.events.columns) == ["user_id", "item_id", "timestamp", "click", "watch_seconds", "like", "share"]
    assert e.loc[(1, 10), ["click", "like"]].tolist() == [1, 1]  # 5 stars: clicked and liked
    assert e.loc[(1, 11), ["click", "watch_seconds"]].tolist() == [0, 0]  # 2 stars: not a click
    assert e.loc[(2, 10), "watch_seconds"] == 3600  # 3/5 of 6000 s: below the 75% "watched" mark
    assert e.loc[(2, 12), "watch_seconds"] >= 0.75 * 6000  # 4 stars: watched
    assert (data.events["share"] == 0).all()
    u = data.users.set_index("user_id")
    # 85711 is Tucson, AZ; T8H1N is Canadian; 02139 is Cambridge, MA.
    assert (
        u.loc[1, "location"] == "mountain"
        and u.loc[2, "location"] == "outside_us"
        and u.loc[3, "location"] == "northeast"
    )
    assert u.loc[2, "age_band"] == "<18" and u.loc[3, "age_band"] == "55+"
    i = data.items.set_index("item_id")
    assert i.loc[11, "category"] == "Action" and i.loc[10, "title"] == "Toy Story (1995)"


def test_click_threshold_makes_every_rating_a_click(grouplens):
    e = movielens.load(grouplens, click_min_rating=1).events.set_index(["user_id", "item_id"])
    assert (e["click"] == 1).all()  # 1..5 stars: every rating is a click, as the RecBole protocol counts
    assert e.loc[(1, 11), "watch_seconds"] == 2400 and e.loc[(1, 11), "like"] == 0  # 2 stars: 2/5 watched
    with pytest.raises(ValueError, match="click_min_rating"):
        movielens.load(grouplens, click_min_rating=0)


def test_duplicate_film_ids_share_a_signature(grouplens):
    from workflows.dedup import canonical_item_map

    mapping = canonical_item_map(movielens.load(grouplens).items, ["title"])
    assert dict(zip(mapping["item_id"], mapping["canonical_item_id"]))[13] == 12


def test_bad_inputs_are_named(tmp_path, grouplens):
    with pytest.raises(FileNotFoundError, match="u.data"):
        movielens.load(tmp_path)
    (grouplens / "u.data").write_text("1\t10\t7\t100\n")
    with pytest.raises(ValueError, match="1..5"):
        movielens.load(grouplens)


@pytest.fixture(scope="module")
def recbole_wheel(tmp_path_factory):
    cache = Path(os.environ.get("MOVIELENS_CACHE", "data/cache"))
    try:
        return movielens.fetch_wheel(cache, timeout=180)
    except Exception as err:  # no network to PyPI: say why instead of failing
        pytest.skip(f"cannot download recbole=={movielens.RECBOLE_VERSION} with pip: {err}")


@pytest.mark.slow  # downloads the recbole wheel (pip) and runs the whole pipeline
def test_real_movielens_100k_from_the_wheel_through_the_pipeline(recbole_wheel, tmp_path):
    from configs import load_config
    from workflows.pipeline import run_dataset_pipeline

    data = movielens.load(recbole_wheel)
    assert (len(data.events), len(data.users), len(data.items)) == (100_000, 943, 1682)
    # The stated mapping, checked on the real ratings: 55% of ML-100K ratings are 4 or 5 stars.
    watched = data.events["watch_seconds"] >= 0.75 * 6000
    assert 0.5 < watched.mean() < 0.6 and (data.events["like"] <= data.events["click"]).all()
    paths = data.write_parquet(tmp_path / "raw")
    config = load_config(Path("configs/movielens.yaml"))
    out = run_dataset_pipeline(paths["events"], paths["users"], paths["items"], tmp_path / "proc", config.workflow)
    s = out.summary
    # ML-100K lists 18 films twice under two ids; each pair becomes one canonical item.
    assert s["duplicate_items"] == 18
    steps = {st["step"]: st for st in s["steps"]}
    assert steps["dedup_canonical_items"]["items_removed"] == 18
    assert s["train_rows"] > 50_000 and s["valid_rows"] > 5_000 and s["known_users"] > 500
    assert {c["check"] for c in s["checks"]} >= {
        "temporal_split",
        "labels_agree",
        "point_in_time",
        "no_duplicate_pairs",
    }


def _fake_wheel(path, item_rows):
    """A zip holding RecBole's three ml-100k atomic files, UTF-8 as the recbole==1.2.1 wheel has them."""
    import zipfile

    files = {
        "inter": "user_id:token\titem_id:token\trating:float\ttimestamp:float\n1\t1\t5\t100\n1\t2\t3\t200\n",
        "user": "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n1\t24\tM\twriter\t85711\n",
        "item": "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
        + "".join(f"{i}\t{t}\t{y}\t{c}\n" for i, t, y, c in item_rows),
    }
    with zipfile.ZipFile(path, "w") as z:
        for ext, text in files.items():
            z.writestr(f"{movielens.WHEEL_PREFIX}.{ext}", text.encode("utf-8"))
    return path


def test_wheel_titles_are_read_as_utf8(tmp_path):
    wheel = _fake_wheel(tmp_path / "recbole-1.2.1-py3-none-any.whl", [(1, "Misérables, Les", 1995, "Drama")])
    titles = movielens.load(wheel).items.set_index("item_id")["title"]
    assert titles[1] == "Misérables, Les (1995)"  # as GroupLens's u.item has it, not "MisÃ©rables"


def test_wheel_titles_get_their_year_after_an_alternative_title(tmp_path):
    land = "Land Before Time III: The Time of the Great Giving (1995)"  # RecBole's release_year: "V"
    rows = [(1, "Seven (Se7en)", 1995, "Crime"), (2, land, "V", "")]
    titles = movielens.load(_fake_wheel(tmp_path / "w.whl", rows)).items.set_index("item_id")["title"]
    assert titles[1] == "Seven (Se7en) (1995)"  # "Title (year)", as u.item has it
    assert titles[2] == land  # a year already: not twice


def test_prepare_data_refuses_tables_written_with_another_click_threshold(tmp_path):
    """fetch_movielens.py wrote click = rating >= 3 whatever the config, and prepare_data.py
    --source movielens reused tables already in place: with configs/movielens-recbole.yaml (every
    rating a click) it trained on the >= 3 labels, silently. The tables record their threshold now;
    fetch_movielens.py takes it from --config, and prepare_data.py refuses tables of another one."""
    import json
    import subprocess
    import sys

    import pandas as pd

    cache, raw = tmp_path / "cache", tmp_path / "raw"
    cache.mkdir()
    _fake_wheel(
        cache / f"recbole-{movielens.RECBOLE_VERSION}-py3-none-any.whl", [(1, "A", 1995, "Drama"), (2, "B", 1996, "")]
    )
    env = {**os.environ, "PYTHONPATH": os.getcwd()}

    def run(*args):
        return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=300)

    fetched = run("scripts/fetch_movielens.py", "--cache", str(cache), "--out", str(raw))
    assert fetched.returncode == 0, fetched.stderr
    assert json.loads(fetched.stdout)["click_min_rating"] == 3 and movielens.written_click_min_rating(raw) == 3
    assert pd.read_parquet(raw / "events.parquet")["click"].tolist() == [1, 1]  # ratings 5 and 3
    recbole = ["--source", "movielens", "--raw", str(raw), "--config", "configs/movielens-recbole.yaml"]
    refused = run("scripts/prepare_data.py", *recbole, "--out", str(tmp_path / "out"))
    assert refused.returncode == 2, refused.stderr
    assert "written with movielens.click_min_rating 3, the config says 1" in refused.stderr
    assert not (tmp_path / "out").exists()
    config = ["--config", "configs/movielens-recbole.yaml"]
    again = run("scripts/fetch_movielens.py", "--cache", str(cache), "--out", str(raw), *config)
    assert again.returncode == 0 and movielens.written_click_min_rating(raw) == 1, again.stderr

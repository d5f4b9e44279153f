import pytest

from configs import Config, load_config


def test_default_file_matches_dataclass_defaults():
    # The YAML documents the defaults; drift between the two would confuse users.
    assert load_config() == Config()


def test_overrides_merge_over_the_file():
    cfg = load_config(overrides={"heavy_ranker": {"epochs": 9}})
    assert cfg.heavy_ranker.epochs == 9
    assert cfg.heavy_ranker.cross_depth == Config().heavy_ranker.cross_depth


def test_unknown_key_is_named():
    with pytest.raises(ValueError, match="epoch"):
        load_config(overrides={"heavy_ranker": {"epoch": 1}})


def test_wrong_type_is_named():
    with pytest.raises(TypeError, match="heavy_ranker.epochs"):
        load_config(overrides={"heavy_ranker": {"epochs": "many"}})
    with pytest.raises(TypeError, match=r"tower_layers\[1\]"):
        load_config(overrides={"candidate_generator": {"tower_layers": [64, "x"]}})


def test_invalid_split_is_rejected():
    with pytest.raises(ValueError, match="valid_fraction"):
        load_config(overrides={"workflow": {"split": {"valid_fraction": 1.5}}})

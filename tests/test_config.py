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


NAN = float("nan")


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"workflow": {"split": {"ratios": [NAN, 0.1, 0.1]}}}, "split.ratios"),
        ({"workflow": {"active_users": {"days": NAN}}}, "active_users"),
        ({"workflow": {"recency_window": {"days": NAN}}}, "recency_window.days"),
        ({"workflow": {"labels": {"duration_buckets": [60, NAN, 10]}}}, "labels.duration_buckets"),
        ({"workflow": {"negative_sampling": {"ratio": NAN}}}, "negative_sampling.ratio"),
        ({"workflow": {"negative_sampling": {"ratio": float("inf")}}}, "negative_sampling.ratio"),
        ({"serving": {"ordering": {"exploration_temperature": NAN}}}, "exploration_temperature"),
        ({"heavy_ranker": {"targets": [{"name": "click", "weight": NAN}]}}, "heavy_ranker.targets"),
        ({"heavy_ranker": {"member_weights": [NAN]}}, "heavy_ranker.member_weights"),
        ({"tuning": {"member_weights": [[NAN]]}}, "tuning.member_weights"),
    ],
)
def test_nan_and_inf_are_refused_by_the_range_checks(overrides, key):
    # YAML reads .nan and .inf as floats; every comparison with NaN is False, so a check written as
    # "refuse if x < 0" let NaN through.
    with pytest.raises(ValueError, match=key):
        load_config(overrides=overrides)


def test_a_mapping_field_is_type_checked_with_its_key(tmp_path):
    # serving.batching.stage_instances is a dict[str, int]: a list or null there crashed with
    # AttributeError in __post_init__ (a traceback from --config, not an error naming the key).
    import argparse

    from configs.cli import config_file

    with pytest.raises(TypeError, match="serving.batching.stage_instances: expected a mapping"):
        load_config(overrides={"serving": {"batching": {"stage_instances": ["heavy_ranker"]}}})
    with pytest.raises(TypeError, match="serving.batching.stage_instances: expected a mapping"):
        load_config(overrides={"serving": {"batching": {"stage_instances": None}}})
    with pytest.raises(TypeError, match="serving.batching.stage_instances.heavy_ranker: expected int"):
        load_config(overrides={"serving": {"batching": {"stage_instances": {"heavy_ranker": "2"}}}})
    path = tmp_path / "c.yaml"
    path.write_text("serving:\n  batching:\n    stage_instances: [heavy_ranker]\n")
    with pytest.raises(argparse.ArgumentTypeError, match="stage_instances"):
        config_file(str(path))
    assert load_config(
        overrides={"serving": {"batching": {"stage_instances": {"heavy_ranker": 2}}}}
    ).serving.batching.stage_instances == {"heavy_ranker": 2}

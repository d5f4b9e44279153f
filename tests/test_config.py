from pathlib import Path

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
    # A random split with no training or validation share: every user's part was empty, and the
    # pipeline failed on it (int(NaN) in the split, a KeyError at the attribute join) instead of here.
    for ratios in ([0.9, 0.0, 0.1], [0.0, 1.0, 0.0]):
        with pytest.raises(ValueError, match="split.ratios: a random split needs training and validation"):
            load_config(overrides={"workflow": {"split": {"kind": "random", "ratios": ratios}}})
    assert load_config(overrides={"workflow": {"split": {"kind": "random", "ratios": [0.8, 0.2, 0.0]}}})


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


def test_treatment_overrides_are_validated_when_the_config_loads(tmp_path):
    # They were built only when the A/B test reached the treatment, after the control had trained:
    # a typo in a config file passed --config and cost a whole control training run.
    import argparse

    from configs.cli import config_file

    def treatment(overrides):
        return {"online": {"experiment": {"treatment_overrides": overrides}}}

    with pytest.raises(
        ValueError, match=r"online.experiment.treatment_overrides: unknown key\(s\) \['candidate_generatr'\]"
    ):
        load_config(overrides=treatment({"candidate_generatr": {"logq_correction": False}}))
    with pytest.raises(TypeError, match="online.experiment.treatment_overrides.candidate_generator.epochs"):
        load_config(overrides=treatment({"candidate_generator": {"epochs": "x"}}))
    with pytest.raises(ValueError, match="online.experiment.treatment_overrides: .*valid_fraction"):
        load_config(overrides=treatment({"workflow": {"split": {"valid_fraction": 1.5}}}))
    path = tmp_path / "c.yaml"
    path.write_text("online:\n  experiment:\n    treatment_overrides: {heavy_rankr: {epochs: 1}}\n")
    with pytest.raises(argparse.ArgumentTypeError, match="heavy_rankr"):
        config_file(str(path))
    assert load_config(overrides=treatment({"heavy_ranker": {"epochs": 1}})).online.experiment.treatment_overrides


def test_a_treatment_override_of_what_both_arms_share_is_refused():
    # One synthetic world, one experiment and one simulation serve both arms (online/ab_experiment.py):
    # a treatment overriding synthetic or online loaded, trained, and was tested exactly like the control.
    from online.ab_experiment import treatment_of

    for section, values in (("synthetic", {"num_users": 10}), ("online", {"simulation": {"days": 1}})):
        overrides = {"online": {"experiment": {"treatment_overrides": {section: values}}}}
        with pytest.raises(ValueError, match=rf"treatment_overrides: \['{section}'\] cannot differ between the arms"):
            load_config(overrides=overrides)
        config = load_config()  # scripts/ab_test.py --treatment sets them after loading, then asks treatment_of
        config.online.experiment.treatment_overrides = {section: values, "heavy_ranker": {"epochs": 1}}
        with pytest.raises(ValueError, match=rf"\['{section}'\] cannot differ between the arms"):
            treatment_of(config)
    config.online.experiment.treatment_overrides = {"tuning": {"enabled": False}, "serving": {"retrieval_k": 50}}
    assert treatment_of(config).serving.retrieval_k == 50  # the rest is each version's own


def test_an_override_of_a_mapping_valued_key_replaces_it_like_a_config_file_does(tmp_path):
    # Sections merge key by key, but treatment_overrides and stage_instances are values: merged, the
    # default treatment's logq_correction change stayed in a treatment that named only item_affinity,
    # and stage_instances could not be emptied.
    from configs import with_overrides

    treatment = {"item_affinity": {"reg_weight": 100.0}}
    overrides = {"online": {"experiment": {"treatment_overrides": treatment}}}
    assert load_config(overrides=overrides).online.experiment.treatment_overrides == treatment
    path = tmp_path / "c.yaml"
    path.write_text("online:\n  experiment:\n    treatment_overrides: {item_affinity: {reg_weight: 100.0}}\n")
    assert load_config(path).online.experiment.treatment_overrides == treatment
    two = load_config(overrides={"serving": {"batching": {"stage_instances": {"heavy_ranker": 2}}}})
    assert (
        with_overrides(two, {"serving": {"batching": {"stage_instances": {}}}}).serving.batching.stage_instances == {}
    )
    assert with_overrides(two, {"serving": {"batching": {"instances": 3}}}).serving.batching.stage_instances == {
        "heavy_ranker": 2
    }


@pytest.mark.parametrize("lift", [0.0, -0.02, float("nan"), float("inf")])
def test_min_detectable_ctr_lift_is_a_ctr_difference(lift):
    # It divides the A/B test's sample size: 0 or NaN was accepted and crashed the analysis at the
    # end of the test (int of inf / NaN), after both arms had trained and served.
    with pytest.raises(ValueError, match="online.experiment.min_detectable_ctr_lift"):
        load_config(overrides={"online": {"experiment": {"min_detectable_ctr_lift": lift}}})


def test_config_flag_errors_are_one_line_naming_the_problem(tmp_path):
    # A folder given as --config raised IsADirectoryError (a traceback); a file that is a YAML list
    # or an unknown top-level key was reported under an empty key path (": expected a mapping").
    import argparse

    from configs.cli import config_file

    with pytest.raises(argparse.ArgumentTypeError, match="directory"):
        config_file(str(tmp_path))
    path = tmp_path / "c.yaml"
    path.write_text("- seed\n")
    with pytest.raises(argparse.ArgumentTypeError, match="top level: expected a mapping"):
        config_file(str(path))
    with pytest.raises(ValueError, match=r"^top level: unknown key\(s\) \['sead'\]"):
        load_config(overrides={"sead": 1})


INF = float("inf")
# Every numeric knob that had no range check: (dotted key, bad values). A bad value passed the loader and
# failed only deep inside training or serving (tower_layers []: IndexError in the model builder; cross_depth
# 0: Merlin's ValueError once the data was processed), or silently did the wrong thing (light_ranker_k 0:
# every funnel list emptied by the light ranker, -1 dropped its last candidate; watch_threshold 0: every
# impression "watched").
UNCHECKED = [
    *(
        (f"{stage}.{key}", bad)
        for stage in ("candidate_generator", "light_ranker", "heavy_ranker")
        for key, bad in (("epochs", [0, -1]), ("batch_size", [0, -1]), ("learning_rate", [0, -0.01, NAN, INF]))
    ),
    ("candidate_generator.embedding_dim", [0, -1]),
    ("candidate_generator.tower_layers", [[], [64, 0], [-1]]),
    ("light_ranker.deep_layers", [[32, 0], [-1]]),
    ("heavy_ranker.deep_layers", [[128, 0]]),
    ("light_ranker.cross_depth", [0, -1]),  # Merlin's CrossBlock: "depth should be positive"
    ("heavy_ranker.cross_depth", [0, -1]),
    ("training.early_stopping_patience", [-1]),
    ("workflow.watch_threshold", [0, -0.5, 1.5, NAN, INF]),
    ("workflow.features.id_freq_threshold", [-1]),
    ("workflow.features.attribute_freq_threshold", [-1]),
    ("workflow.features.attribute_num_buckets", [-1]),
    ("workflow.split.seed", [-1]),
    ("workflow.negative_sampling.seed", [-1]),
    ("embeddings.multiplier", [0, -1, NAN, INF]),
    ("serving.retrieval_k", [0, -1]),
    ("serving.light_ranker_k", [0, -1]),
    ("serving.exact_index_max_items", [-1]),
    ("serving.fallback_window_days", [0, -1, NAN]),
    ("online.simulation.concurrency", [0, -1]),
    ("synthetic.num_users", [0, -1]),
    ("synthetic.num_items", [0]),
    ("synthetic.num_categories", [0]),
    ("synthetic.latent_dim", [0]),
    ("synthetic.days", [0]),
    ("synthetic.events_per_user", [0, -1, NAN, INF]),
    ("synthetic.popularity_skew", [-1, NAN, INF]),
    ("synthetic.personalized_exposure", [-0.1, 1.5, NAN]),
    ("synthetic.exposure_sharpness", [NAN, INF]),
    ("synthetic.preference_strength", [NAN, INF]),
    ("synthetic.long_item_watch_penalty", [NAN, INF]),
    ("synthetic.interest_drift", [-0.1, 1.5, NAN]),
    ("synthetic.inactive_user_fraction", [-0.1, 1.5, NAN]),
    ("synthetic.one_off_user_fraction", [-0.1, 1.5]),
    ("synthetic.duplicate_item_fraction", [-0.1, 1.5]),
    ("synthetic.unsafe_item_fraction", [-0.1, 1.5]),
    ("synthetic.clickbait_item_fraction", [-0.1, 1.5]),
    ("synthetic.repeated_event_fraction", [-0.1, 1.5]),
    ("synthetic.seed", [-1]),
    ("seed", [-1]),
]


def _nested(key: str, value) -> dict:
    *path, last = key.split(".")
    out: dict = {last: value}
    for part in reversed(path):
        out = {part: out}
    return out


@pytest.mark.parametrize("key, bad", [(k, v) for k, values in UNCHECKED for v in values], ids=str)
def test_every_numeric_knob_is_range_checked_naming_its_key(key, bad):
    with pytest.raises(ValueError) as err:
        load_config(overrides=_nested(key, bad))
    # The dotted key as the section's existing messages write it (workflow's sub-sections without "workflow.").
    named = key.removeprefix("workflow.") if key.count(".") == 2 and key.startswith("workflow.") else key
    assert named in str(err.value), str(err.value)


@pytest.mark.parametrize(
    "key, good",
    [
        ("training.early_stopping_patience", 0),  # Keras: stop at the first epoch without improvement
        ("workflow.watch_threshold", 1.0),
        ("serving.light_ranker_k", 400),  # more than retrieval_k: keeps every filtered candidate
        ("serving.max_k", 250),  # more than light_ranker_k: the ordering stage tops short lists up
        ("online.simulation.position_decay", 1.0),
        ("synthetic.interest_drift", 1.0),
        ("embeddings.multiplier", 0.5),
    ],
)
def test_the_edges_of_the_new_ranges_still_load(key, good):
    load_config(overrides=_nested(key, good))


def test_inactive_and_one_off_users_together_are_at_most_every_user():
    # Drawn from one permutation: 0.7 + 0.6 made 70% inactive users and 30% (not 60%) one-off ones.
    with pytest.raises(ValueError, match=r"inactive_user_fraction \+ synthetic\.one_off_user_fraction .* 0\.7 \+ 0\.6"):
        load_config(overrides={"synthetic": {"inactive_user_fraction": 0.7, "one_off_user_fraction": 0.6}})
    load_config(overrides={"synthetic": {"inactive_user_fraction": 0.5, "one_off_user_fraction": 0.5}})


def test_simulated_requests_must_fit_serving_max_k():
    # serving/request.py refuses k above serving.max_k: every simulated request of the A/B test failed.
    with pytest.raises(ValueError, match=r"online\.simulation\.k .*serving\.max_k"):
        load_config(overrides={"online": {"simulation": {"k": 20}}, "serving": {"max_k": 10}})


@pytest.mark.parametrize("path", sorted(Path(__file__).parents[1].joinpath("configs").glob("*.yaml")), ids=str)
def test_every_shipped_config_loads(path):
    load_config(path)


def test_an_unknown_stage_in_stage_instances_is_refused_when_the_config_loads():
    # A typo there ({heavy_rankr: 2}) was refused only by the export (deployment/export.py), after the
    # training run it configures had finished.
    with pytest.raises(ValueError, match=r"serving.batching.stage_instances names \['heavy_rankr'\]"):
        load_config(overrides={"serving": {"batching": {"stage_instances": {"heavy_rankr": 2}}}})
    fused = load_config(
        overrides={"serving": {"batching": {"fuse_stages": True, "stage_instances": {"fused_funnel": 2}}}}
    )
    assert fused.serving.batching.instances_of("fused_funnel") == 2


def test_the_config_knows_the_models_the_export_writes():
    from configs import BATCHED_MODELS
    from deployment.export import STAGE_ARTIFACTS
    from serving.interface import FUSED

    assert sorted(BATCHED_MODELS) == sorted([*STAGE_ARTIFACTS, FUSED])


def test_duplicate_and_content_checks_need_a_column_to_read():
    # dedup.signature_columns: [] gave every item the same null signature, and canonical_items removed
    # the whole catalog (no item its own canonical id). content_filter.columns: [] with the keyword
    # denylist stopped the pipeline at the filter step (AttributeError: 'NoneType' ... 'fillna').
    with pytest.raises(ValueError, match="workflow.dedup.signature_columns"):
        load_config(overrides={"workflow": {"dedup": {"signature_columns": []}}})
    with pytest.raises(ValueError, match="workflow.content_filter.columns"):
        load_config(overrides={"workflow": {"content_filter": {"columns": []}}})
    # Off, or with nothing to look for, no column is needed (workflows/adapt.py switches them off so).
    load_config(overrides={"workflow": {"dedup": {"signature_columns": [], "canonical_items": False}}})
    load_config(overrides={"workflow": {"content_filter": {"columns": [], "denylist": []}}})


def test_a_float_written_with_an_exponent_and_no_dot_is_a_float(tmp_path):
    """PyYAML reads YAML 1.1, where ``1e-3`` is a string: ``learning_rate: 1e-3`` was refused with
    "expected float, got '1e-3'". YAML 1.2 and the other readers parse it as a number, and so do we."""
    path = tmp_path / "c.yaml"
    path.write_text("candidate_generator:\n  learning_rate: 1e-3\nheavy_ranker:\n  learning_rate: 5E-3\n")
    config = load_config(path)
    assert config.candidate_generator.learning_rate == 0.001 and config.heavy_ranker.learning_rate == 0.005
    path.write_text('online:\n  experiment:\n    salt: "1e-3"\n')  # quoted: still the string
    assert load_config(path).online.experiment.salt == "1e-3"


def test_a_workflow_section_error_names_the_key_as_it_is_written():
    """Errors of the workflow's sections read "split.kind must be ..." while the key is
    ``workflow.split.kind`` (a top-level ``split:`` is refused as an unknown key)."""
    for overrides, key in (
        ({"split": {"kind": "bogus"}}, "workflow.split.kind"),
        ({"recency_window": {"days": -1}}, "workflow.recency_window.days"),
        ({"labels": {"duration_watch_quantile": 2.0}}, "workflow.labels.duration_watch_quantile"),
        ({"negative_sampling": {"ratio": -1.0}}, "workflow.negative_sampling.ratio"),
        ({"features": {"activity_windows": ["1d", "1d"]}}, "workflow.features.activity_windows"),
    ):
        with pytest.raises(ValueError, match=rf"^{key} "):
            load_config(overrides={"workflow": overrides})


def test_the_endpoint_instance_counts_are_typed_and_checked_when_the_config_loads():
    loaded = load_config(overrides={"serving": {"batching": {"router_instances": 8}}}).serving.batching
    assert (loaded.router_instances, loaded.feedback_instances) == (8, 1)
    assert (load_config().serving.batching.router_instances, load_config().serving.batching.feedback_instances) == (
        2,
        1,
    )
    with pytest.raises(TypeError, match="serving.batching.router_instances: expected int"):
        load_config(overrides={"serving": {"batching": {"router_instances": "8"}}})
    with pytest.raises(ValueError, match=r"got \{'feedback_instances': 0\}"):
        load_config(overrides={"serving": {"batching": {"feedback_instances": 0}}})


def test_a_key_given_twice_is_refused_naming_its_path(tmp_path):
    """PyYAML keeps the last of two equal keys without a word: a section written twice had the first
    one's values silently dropped (here serving.retrieval_k 50 loaded as the default 300)."""
    import argparse

    from configs.cli import config_file
    from workflows.spec import SpecError, load_spec

    path = tmp_path / "c.yaml"
    path.write_text("serving:\n  retrieval_k: 50\ntuning:\n  enabled: false\nserving:\n  max_k: 20\n")
    with pytest.raises(ValueError, match=r"^serving: key given twice \(lines 1 and 5\)"):
        load_config(path)
    with pytest.raises(argparse.ArgumentTypeError, match="serving: key given twice"):
        config_file(str(path))
    path.write_text("candidate_generator:\n  epochs: 3\n  epochs: 30\n")
    with pytest.raises(ValueError, match=r"^candidate_generator.epochs: key given twice \(lines 2 and 3\)"):
        load_config(path)
    path.write_text("heavy_ranker:\n  targets:\n    - {name: click, weight: 0.5, weight: 1.0}\n")
    with pytest.raises(ValueError, match=r"^heavy_ranker.targets\[0\].weight: key given twice"):
        load_config(path)
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: a\nevents:\n  path: e.parquet\nname: b\n")
    with pytest.raises(SpecError, match="name: key given twice"):
        load_spec(spec)
    # Anchors and merge keys are not duplicates: a key overriding a merged one is YAML's intent.
    path.write_text("light_ranker: &r\n  epochs: 3\nheavy_ranker:\n  <<: *r\n  epochs: 4\n")
    config = load_config(path)
    assert (config.light_ranker.epochs, config.heavy_ranker.epochs) == (3, 4)


def test_default_yaml_gives_and_so_documents_every_key():
    """configs/default.yaml is where a user looks up the keys: movielens.click_min_rating,
    synthetic.latent_dim, workflow.negative_sampling.valid and candidate_generator.early_stopping
    were missing from it (documented only in the dataclasses or in measurement notes)."""
    import dataclasses
    import typing

    from configs import DEFAULT_CONFIG_PATH, load_yaml

    given = load_yaml(DEFAULT_CONFIG_PATH.read_text())

    def missing(cls, values, where):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            path = f"{where}.{f.name}" if where else f.name
            if f.name not in values:
                yield path
            elif dataclasses.is_dataclass(hints[f.name]):
                yield from missing(hints[f.name], values[f.name], path)

    assert list(missing(Config, given, "")) == []


def test_a_timeout_longer_than_a_grpc_deadline_can_carry_is_refused():
    """``--timeout inf`` was refused (gRPC's deadline overflowed: every call 'Deadline Exceeded' at once),
    but 1e10 s passed and failed the same way: scripts/query.py said the server 'did not answer funnel
    within 1e+10 s' after 0.2 s."""
    import argparse

    from configs.cli import positive_seconds, seconds_or_none

    assert positive_seconds("300") == 300.0 and positive_seconds("1e9") == 1e9  # about 31 years: taken
    for parse in (positive_seconds, seconds_or_none):
        with pytest.raises(argparse.ArgumentTypeError, match="must be at most 1e\\+09 seconds"):
            parse("1e10")

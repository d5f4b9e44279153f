"""The training run's tuning step (models/tuning.py, evaluation/tuning.py): the grid, the choice on
the validation part (the test part is never read), and the chosen values in the manifest, MLflow and
the served ordering."""

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from configs import TUNING_DOMAINS, TuningConfig, domain_text, in_domain, load_config, with_overrides
from models import tuning


def test_grid_leaves_out_blends_above_one_and_keeps_unlisted_knobs():
    config = load_config(
        overrides={"tuning": {"retrieval_weight": [0.0, 0.5], "affinity_weight": [0.3, 0.6], "reg_weight": []}}
    )
    grid = tuning.grid(config)
    pairs = [(p["serving.ordering.retrieval_weight"], p["serving.ordering.affinity_weight"]) for p in grid]
    assert pairs == [(0.0, 0.3), (0.0, 0.6), (0.5, 0.3)]  # 0.5 + 0.6 > 1 is not a valid blend
    assert {p["item_affinity.reg_weight"] for p in grid} == {config.item_affinity.reg_weight}
    assert {p["item_affinity.dropout"] for p in grid} == {config.item_affinity.dropout} == {0.0}


def test_best_trial_is_the_argmax_first_on_ties_and_applies_to_the_config():
    trials = [
        {"params": {"serving.ordering.affinity_weight": 0.2}, "ndcg_at_10": 0.1},
        {"params": {"serving.ordering.affinity_weight": 0.4}, "ndcg_at_10": 0.3},
        {"params": {"serving.ordering.affinity_weight": 0.6}, "ndcg_at_10": 0.3},
    ]
    best = tuning.best_trial(trials, "ndcg_at_10")
    assert best is trials[1]
    config = tuning.apply(load_config(), best["params"])
    assert config.serving.ordering.affinity_weight == 0.4
    manifest = {"tuning": {"chosen": {"serving.ordering.retrieval_weight": 0.3}}}
    assert tuning.chosen_config(config, manifest).serving.ordering.retrieval_weight == 0.3
    with pytest.raises(ValueError, match="no tuning trial"):
        tuning.best_trial([], "ndcg_at_10")


def test_a_choice_is_described_in_one_line_member_weights_included():
    """``make demo`` prints the tuning step's choice; a list-valued knob (member weights) crashed it."""
    chosen = {
        "serving.ordering.retrieval_weight": 0.2,
        "item_affinity.reg_weight": 250.0,
        "heavy_ranker.member_weights": [0.25, 0.75],
    }
    assert tuning.describe(chosen) == "retrieval_weight 0.2, reg_weight 250, member_weights [0.25, 0.75]"


def test_a_choice_at_the_end_of_its_range_is_flagged_where_the_knob_could_go_further():
    config = load_config(
        overrides={
            "tuning": {
                "retrieval_weight": [0.0, 0.25, 0.5],
                "affinity_weight": [0.0, 0.5, 1.0],
                "reg_weight": [100.0, 250.0],
                "affinity_dropout": [0.0, 0.5],
                "logq_strength": [1.0, 1.5],
                "sampled_negatives": [0, 4096],
            }
        }
    )
    chosen = {
        "serving.ordering.retrieval_weight": 0.5,  # the largest searched, and 1 is allowed: flagged
        "serving.ordering.affinity_weight": 0.5,  # inside its range
        "item_affinity.reg_weight": 100.0,  # the smallest searched, and any penalty above 0 is allowed
        "item_affinity.dropout": 0.0,  # the smallest searched, and the smallest allowed: not flagged
        "candidate_generator.logq_strength": 1.0,
        "candidate_generator.sampled_negatives": 0,
    }
    edges = tuning.at_edge(config, chosen)
    assert [(e["knob"], e["side"]) for e in edges] == [
        ("serving.ordering.retrieval_weight", "largest"),
        ("item_affinity.reg_weight", "smallest"),
        ("candidate_generator.logq_strength", "smallest"),
    ]
    text = tuning.edge_text(edges)
    assert text.startswith("retrieval_weight 0.5 is the largest value searched; reg_weight 100 is the smallest")
    # At the domain's end (affinity 1.0), searched over one value (the default's empty lists), or not
    # part of the choice: nothing to widen.
    assert tuning.at_edge(config, {"serving.ordering.affinity_weight": 1.0}) == []
    assert tuning.at_edge(load_config(overrides={"tuning": {"reg_weight": [500.0]}}), chosen) == []
    assert tuning.edge_text([]) == ""


def test_the_default_blend_search_covers_every_weight_the_ordering_accepts():
    """The demo chose retrieval 0.5 / affinity 0.5 when 0.5 was the largest retrieval weight searched;
    the default range now runs to 1, so such a choice is inside the search, not at its edge."""
    config = load_config()
    pairs = {
        (p["serving.ordering.retrieval_weight"], p["serving.ordering.affinity_weight"]) for p in tuning.grid(config)
    }
    assert max(config.tuning.retrieval_weight) == 1.0 and (1.0, 0.0) in pairs and (0.5, 0.5) in pairs
    demo_choice = {"serving.ordering.retrieval_weight": 0.5, "serving.ordering.affinity_weight": 0.5}
    assert tuning.at_edge(config, demo_choice) == []
    assert TuningConfig().retrieval_weight == config.tuning.retrieval_weight  # a config file without the list


def test_tuning_config_is_validated():
    with pytest.raises(ValueError, match="tuning.affinity_weight"):
        load_config(overrides={"tuning": {"affinity_weight": [1.5]}})
    with pytest.raises(ValueError, match="tuning.reg_weight"):
        load_config(overrides={"tuning": {"reg_weight": [0]}})
    with pytest.raises(ValueError, match="tuning.affinity_dropout"):
        load_config(overrides={"tuning": {"affinity_dropout": [1.0]}})
    with pytest.raises(ValueError, match="item_affinity.dropout"):
        load_config(overrides={"item_affinity": {"dropout": -0.1}})
    with pytest.raises(TypeError, match=r"tuning.sampled_negatives\[0\]: expected int"):  # the loader's type check
        load_config(overrides={"tuning": {"sampled_negatives": [1.5]}})
    with pytest.raises(ValueError, match="tuning.sampled_negatives values must be integers"):  # built in code
        TuningConfig(sampled_negatives=[1.5])
    # Each end of each domain: allowed where it is closed, refused where it is open.
    TuningConfig(retrieval_weight=[0.0, 1.0], affinity_dropout=[0.0], logq_strength=[0.0], sampled_negatives=[0])
    with pytest.raises(ValueError, match=r"tuning.logq_strength values must be in \[0, inf\)"):
        load_config(overrides={"tuning": {"logq_strength": [-0.5]}})


def test_a_blend_search_with_nothing_to_try_is_refused_by_the_config():
    """Every pair above 1 (or a list against the configured other weight): the grid was empty and the
    tuning step failed with "no tuning trial to choose from" at the end of the training run."""
    for overrides in (
        {"tuning": {"retrieval_weight": [0.6, 0.8], "affinity_weight": [0.5]}},
        {
            "tuning": {"retrieval_weight": [0.8], "affinity_weight": []},
            "serving": {"ordering": {"affinity_weight": 0.5}},
        },
    ):
        with pytest.raises(ValueError, match="the blend search would have nothing to try"):
            load_config(overrides=overrides)
    both = {"tuning": {"retrieval_weight": [0.6, 0.8], "affinity_weight": [0.5]}}
    assert tuning.grid(load_config(overrides={**both, "tuning": {**both["tuning"], "affinity_weight": [0.0, 0.5]}}))
    load_config(overrides={"tuning": {**both["tuning"], "enabled": False}})  # not searched: not judged


def test_every_scalar_knob_has_one_domain_that_the_config_and_the_edge_check_share():
    # configs.TUNING_DOMAINS is the one place the bounds live: the knobs' own configs, the tuning step's
    # candidates and the edge check read it (models.tuning used to keep a copy).
    for section, key, bad, text in (
        ("item_affinity", "reg_weight", 0.0, r"\(0, inf\)"),
        ("item_affinity", "dropout", 1.0, r"\[0, 1\)"),
        ("candidate_generator", "logq_strength", -1.0, r"\[0, inf\)"),
        ("candidate_generator", "sampled_negatives", -1, r"\[0, inf\)"),
    ):
        with pytest.raises(ValueError, match=rf"{section}.{key} must be in {text}, got {bad}"):
            load_config(overrides={section: {key: bad}})
    with pytest.raises(ValueError, match=r"serving.ordering.retrieval_weight must be in \[0, 1\], got 1.5"):
        load_config(overrides={"serving": {"ordering": {"retrieval_weight": 1.5}}})
    scalar = {field for _, field in (*tuning.KNOBS, *tuning.RETRAINED_KNOBS)} - {"member_weights"}
    assert scalar == set(TUNING_DOMAINS)
    assert domain_text(TUNING_DOMAINS["affinity_dropout"]) == "[0, 1)"
    assert domain_text(TUNING_DOMAINS["reg_weight"]) == "(0, inf)"
    assert not in_domain(0.0, TUNING_DOMAINS["reg_weight"]) and in_domain(1e-6, TUNING_DOMAINS["reg_weight"])
    # logq_strength's domain has no upper end, so its largest searched value is always worth a look.
    config = load_config(overrides={"tuning": {"logq_strength": [0.5, 1.5]}})
    edges = tuning.at_edge(config, {"candidate_generator.logq_strength": 1.5})
    assert edges == [{"knob": "candidate_generator.logq_strength", "value": 1.5, "side": "largest"}]


def test_member_weights_are_validated_and_average_the_heads_as_weighted():
    from models.heads import ensemble_heads, served_members, with_member_weights

    with pytest.raises(ValueError, match="one weight per heavy_ranker member"):
        load_config(overrides={"tuning": {"member_weights": [[1.0, 0.0]]}})  # the default has one member
    with pytest.raises(ValueError, match="tuning.member_weights"):
        load_config(overrides={"tuning": {"member_weights": [[0.0]]}})
    with pytest.raises(ValueError, match="2 weights for 1 members"):
        load_config(overrides={"heavy_ranker": {"member_weights": [1.0, 1.0]}})
    a = {"click": np.array([0.2, 0.8], dtype=np.float32)}
    b = {"click": np.array([0.6, 0.4], dtype=np.float32)}
    np.testing.assert_allclose(ensemble_heads([a, b])["click"], [0.4, 0.6], rtol=1e-6)
    np.testing.assert_allclose(ensemble_heads([a, b], [3.0, 1.0])["click"], [0.3, 0.7], rtol=1e-6)
    spec = {"members": ["heavy_ranker", "heavy_ranker_1"], "weights": {"click": 1.0}}
    assert served_members(spec) == [("heavy_ranker", None), ("heavy_ranker_1", None)]
    weighted = with_member_weights(spec, [0.0, 2.0])
    assert served_members(weighted) == [("heavy_ranker_1", 2.0)]
    assert "member_weights" not in with_member_weights(weighted, [])  # back to the plain mean
    with pytest.raises(ValueError, match="1 weights for the members"):
        with_member_weights(spec, [1.0])


@pytest.fixture
def processed_without_test(processed, tmp_path):
    """The shared processed dataset, minus any test part: whatever reads it fails."""
    from workflows.pipeline import ProcessedData

    root = tmp_path / "processed"
    shutil.copytree(processed.root, root, ignore=shutil.ignore_patterns("test", "test_events.parquet", ".complete"))
    return ProcessedData(root)


def test_training_run_tunes_on_validation_only_and_serves_the_choice(
    processed_without_test, model_version, small_config, tmp_path, monkeypatch
):
    """One training run (candidate generator only; the shared version's rankers are reused) with
    the real tuner: it never opens the test part, chooses the argmax of the trials it records, the
    choice reaches the manifest, MLflow and the exported ordering stage, and each trial's figure is
    what the served funnel's lists score. The affinity's dropout candidates both differ from the
    configured 0, so the served weights are the ones refitted for the choice."""
    import mlflow

    from deployment.export import export_repository
    from evaluation import offline
    from evaluation.metrics import ndcg_at_k
    from evaluation.tuning import validation_positives, validation_tuner
    from models.train import train_all
    from serving.stages import HeavyRanker, Ordering
    from workflows.pipeline import ProcessedData

    data = processed_without_test
    read = []
    real_read_parquet = pd.read_parquet

    def spy(path, *args, **kwargs):
        read.append(str(path))
        return real_read_parquet(path, *args, **kwargs)

    monkeypatch.setattr(pd, "read_parquet", spy)

    def no_test(self):
        raise AssertionError("the tuning step read the test part")

    monkeypatch.setattr(ProcessedData, "test", no_test)
    config = with_overrides(
        small_config,
        {
            "tuning": {
                "retrieval_weight": [0.0, 0.3],
                "affinity_weight": [0.0, 0.5, 0.8],
                "reg_weight": [],
                "affinity_dropout": [0.3, 0.6],  # EDLAE's, refitted per value (no retraining)
                # which of the shared version's two heavy-ranker members count, and how much
                "member_weights": [[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]],
                "max_users": 0,
            }
        },
    )
    model = train_all(
        data, config, tmp_path / "registry", verbose=0, rankers_from=model_version, tune=validation_tuner(data)
    )
    monkeypatch.undo()
    assert any(p.startswith(str(data.valid_dir)) for p in read), "the spy saw no validation read"
    assert not [p for p in read if p.startswith(str(data.test_dir))], read

    record = model.manifest["tuning"]
    metric = record["metric"]
    assert metric == "ndcg_at_10" and record["part"] == "validation" and record["users"] > 20
    assert len(record["trials"]) == 30  # (2 x 3 blends, less 0.3 + 0.8 > 1) x 2 dropouts x 3 member weightings
    best = max(t[metric] for t in record["trials"])
    assert record["best"] == best
    assert record["chosen"] == next(t["params"] for t in record["trials"] if t[metric] == best)
    # Two dropouts searched, neither at the domain's end: whichever was chosen is at an edge of the search.
    assert record["at_edge"] == tuning.at_edge(config, record["chosen"])
    assert "item_affinity.dropout" in {e["knob"] for e in record["at_edge"]}
    values = [t[metric] for t in record["trials"]]
    assert len(set(values)) > 1, "the blend weights made no difference to any list"
    by_members = {}
    for t in record["trials"]:
        by_members.setdefault(tuple(t["params"]["heavy_ranker.member_weights"]), []).append(t[metric])
    assert len({tuple(v) for v in by_members.values()}) > 1, "the member weights made no difference"
    by_dropout = {}
    for t in record["trials"]:
        by_dropout.setdefault(t["params"]["item_affinity.dropout"], []).append(t[metric])
    assert by_dropout[0.3] != by_dropout[0.6], "the affinity's dropout made no difference"
    dropout = record["chosen"]["item_affinity.dropout"]
    assert model.manifest["item_affinity"]["dropout"] == dropout
    assert model.manifest["config"]["item_affinity"]["dropout"] == dropout
    chosen_members = record["chosen"]["heavy_ranker.member_weights"]
    assert model.manifest["heavy_ranker"]["member_weights"] == chosen_members
    assert model.manifest["config"]["heavy_ranker"]["member_weights"] == chosen_members

    ordering = model.manifest["config"]["serving"]["ordering"]
    for key, value in record["chosen"].items():
        if key.startswith("serving.ordering."):
            assert ordering[key.rsplit(".", 1)[1]] == value
    repo = export_repository(model, tmp_path / "repo")
    served = Ordering(repo / "ordering" / str(model.version)).policy
    assert served.retrieval_weight == record["chosen"]["serving.ordering.retrieval_weight"]
    assert served.affinity_weight == record["chosen"]["serving.ordering.affinity_weight"]
    heavy = HeavyRanker(repo / "heavy_ranker" / str(model.version))
    assert len(heavy.members) == sum(w > 0 for w in chosen_members)  # a member weighted 0 is not loaded
    for name, weight in zip(model.manifest["heavy_ranker"]["members"], chosen_members):
        assert (repo / "heavy_ranker" / str(model.version) / name).exists() == (weight > 0 or name == "heavy_ranker")

    run = mlflow.search_runs(experiment_names=[config.training.mlflow_experiment], output_format="list")[0]
    assert (
        json.loads(run.data.params["tuning.chosen.serving.ordering.affinity_weight"])
        == (record["chosen"]["serving.ordering.affinity_weight"])
    )
    assert run.data.metrics[f"tuning.best.{metric}"] == pytest.approx(best)

    # The re-scored figure of the served blend equals what the exported funnel's lists score.
    relevant = validation_positives(data, Path(model.path))
    stages = offline.load_funnel(repo, model.version)
    lists, truth = [], []
    for user in sorted(relevant):
        out = offline.run_funnel(stages, int(user), 10)
        if bool(np.asarray(out["user_known"]).reshape(-1)[0]):
            items = np.full(10, -1, dtype=np.int64)
            served_items = np.asarray(out["item_ids"])[:10]
            items[: len(served_items)] = served_items
            lists.append(items)
            truth.append(relevant[user])
    trial = next(t for t in record["trials"] if t["params"] == record["chosen"])
    assert ndcg_at_k(np.stack(lists), truth, 10) == pytest.approx(trial[metric], abs=1e-9)


def test_retrained_grid_lists_candidate_generator_combinations_and_needs_logq_on():
    config = load_config(overrides={"tuning": {"logq_strength": [0.5, 1.5], "sampled_negatives": [0, 64]}})
    grid = tuning.retrained_grid(config)
    assert [tuple(p.values()) for p in grid] == [(0.5, 0), (0.5, 64), (1.5, 0), (1.5, 64)]
    assert tuning.retrained_grid(load_config()) == []  # nothing listed: nothing retrained
    off = load_config(overrides={"tuning": {"logq_strength": [0.5]}, "candidate_generator": {"logq_correction": False}})
    with pytest.raises(ValueError, match="logq_correction is off"):
        tuning.retrained_grid(off)
    with pytest.raises(ValueError, match="tuning.sampled_negatives"):
        load_config(overrides={"tuning": {"sampled_negatives": [-1]}})


def test_training_run_retrains_the_candidate_generator_per_combination_and_publishes_the_best(
    processed_without_test, model_version, small_config, tmp_path, monkeypatch
):
    """``train_tuned`` with two logQ strengths: one candidate generator each (the shared version's
    rankers reused), each scored by its best blend on validation, never the test part; the winner
    is what the registry publishes, its manifest holding both searches and the report plotting both.
    The blend search also switches the item affinity to EDLAE (the only dropout listed): the winner
    serves it, yet still lends its rankers to the configuration they were trained with (a MovieLens
    run whose first candidate generator chose another dropout refused to train the second)."""
    from evaluation.report import tuning_searches
    from evaluation.tuning import train_tuned
    from models import registry
    from workflows.pipeline import ProcessedData

    def no_test(self):
        raise AssertionError("the tuning step read the test part")

    monkeypatch.setattr(ProcessedData, "test", no_test)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where the trials' scratch registry goes
    config = with_overrides(
        small_config,
        {
            "candidate_generator": {"logq_correction": True},
            "tuning": {
                "logq_strength": [0.25, 2.0],
                "retrieval_weight": [0.0, 0.3],
                "affinity_weight": [0.5],
                "affinity_dropout": [0.5],
            },
        },
    )
    model = train_tuned(processed_without_test, config, tmp_path / "registry", base=model_version)
    monkeypatch.undo()
    # The trials logged to the run's own store, in their own experiment, not beside the scratch registry.
    assert not (scratch / "mlruns").exists() and sorted(p.name for p in scratch.iterdir()) == []
    trial_runs = list((tmp_path / "mlruns").glob("*/*/meta.yaml"))
    experiments = {(p.parent / "meta.yaml").read_text() for p in (tmp_path / "mlruns").glob("*/meta.yaml")}
    assert any("merlin-funnel-tuning-trials" in e for e in experiments) and len(trial_runs) >= 3

    record = model.manifest["tuning"]
    search = record["candidate_generator"]
    metric = search["metric"]
    assert [t["params"]["candidate_generator.logq_strength"] for t in search["trials"]] == [0.25, 2.0]
    best = max(search["trials"], key=lambda t: t[metric])
    assert search["chosen"] == best["params"] and search["best"] == best[metric]
    served = model.manifest["config"]["candidate_generator"]
    assert served["logq_strength"] == best["params"]["candidate_generator.logq_strength"]
    assert record["chosen"]["candidate_generator.logq_strength"] == served["logq_strength"]
    # Only the winner is published; the blend search ran again on it.
    assert registry.list_versions(tmp_path / "registry") == [int(model.version)]
    assert len(record["trials"]) == 2
    # The blend's and the retrained knobs' edges: two logQ strengths searched, so the winner is at one.
    assert record["at_edge"] == tuning.at_edge(config, record["chosen"])
    assert "candidate_generator.logq_strength" in {e["knob"] for e in record["at_edge"]}
    assert {s["name"] for s in tuning_searches(record)} == {"search", "candidate_generator"}
    assert model.manifest["config"]["item_affinity"]["dropout"] == record["chosen"]["item_affinity.dropout"] == 0.5
    assert model.manifest["ranker_inputs"]["item_affinity"]["dropout"] == 0.0  # as the rankers were trained
    from models.train import check_rankers_reusable

    check_rankers_reusable(model.manifest, config, model.manifest["data_fingerprint"])
    # ...and to a variant configured as it serves (the mitigation table's candidate generators).
    check_rankers_reusable(
        model.manifest, tuning.chosen_config(config, model.manifest), model.manifest["data_fingerprint"]
    )


def test_rankers_stay_reusable_whatever_member_weights_a_version_chose():
    """The member weights are chosen after training: a version that chose [1, 0] lends its rankers
    to a run configured with the plain mean (``train_tuned`` retraining the candidate generator);
    other heavy-ranker settings still refuse. MLflow's location does not."""
    from models.train import RANKER_INPUTS, check_rankers_reusable

    config = load_config(overrides={"heavy_ranker": {"members": [{}, {"hard_negatives": 5}]}})
    chosen = with_overrides(config, {"heavy_ranker": {"member_weights": [1.0, 0.0]}})
    manifest = {"version": 3, "data_fingerprint": "f", "config": json.loads(json.dumps(chosen.to_dict()))}
    check_rankers_reusable(manifest, config, "f")
    # Where MLflow logs the run is no ranker input either (an evaluation logging elsewhere reuses them)...
    check_rankers_reusable(manifest, with_overrides(config, {"training": {"mlflow_tracking_uri": "file:/x"}}), "f")
    # ...while a training setting that is one still refuses.
    with pytest.raises(ValueError, match="other ranker settings: \\['training'\\]"):
        check_rankers_reusable(manifest, with_overrides(config, {"training": {"history_event": "like"}}), "f")
    with pytest.raises(ValueError, match="other ranker settings: \\['heavy_ranker'\\]"):
        check_rankers_reusable(manifest, with_overrides(config, {"heavy_ranker": {"epochs": 9}}), "f")
    # A version whose tuning step chose another item affinity to serve records what its rankers were
    # trained with (the hard negatives read the configured affinity); that is what must match.
    served = with_overrides(chosen, {"item_affinity": {"dropout": 0.5}})
    tuned = {**manifest, "config": json.loads(json.dumps(served.to_dict()))}
    tuned["ranker_inputs"] = {key: manifest["config"][key] for key in RANKER_INPUTS}
    check_rankers_reusable(tuned, config, "f")
    check_rankers_reusable(tuned, served, "f")  # a variant of the version as it serves
    with pytest.raises(ValueError, match="other ranker settings: \\['item_affinity'\\]"):
        check_rankers_reusable(tuned, with_overrides(config, {"item_affinity": {"dropout": 0.3}}), "f")
    # A manifest written before that record is read through its config.
    with pytest.raises(ValueError, match="other ranker settings: \\['item_affinity'\\]"):
        check_rankers_reusable({**manifest, "config": tuned["config"]}, config, "f")
    with pytest.raises(ValueError, match="other data"):
        check_rankers_reusable(manifest, config, "g")


def test_tuning_without_a_validation_user_keeps_the_configured_values(processed, model_version, small_config, tmp_path):
    """A validation part where no user the models know has a click: every trial scored 0 and the first
    of the grid (retrieval 0, affinity 0) replaced the configured blend."""
    from evaluation.tuning import tune_on_validation
    from workflows.pipeline import ProcessedData

    root = tmp_path / "processed"
    shutil.copytree(processed.valid_dir, root / "valid")
    for part in (root / "valid").glob("*.parquet"):
        frame = pd.read_parquet(part)
        frame["click"] = 0
        frame.to_parquet(part, index=False)
    config = with_overrides(
        small_config,
        {
            "serving": {"ordering": {"retrieval_weight": 0.3, "affinity_weight": 0.5}},
            "tuning": {"retrieval_weight": [0.0, 0.3], "affinity_weight": [0.0, 0.5], "max_users": 0},
        },
    )
    record = tune_on_validation(Path(model_version.path), ProcessedData(root), config)
    assert record["users"] == 0 and record["best"] == 0.0 and record["at_edge"] == []
    assert record["chosen"]["serving.ordering.retrieval_weight"] == 0.3
    assert record["chosen"]["serving.ordering.affinity_weight"] == 0.5
    assert tuning.apply(config, record["chosen"]) == config


def test_a_version_without_item_affinity_searches_the_blend_at_affinity_weight_0(
    processed, model_version, small_config, tmp_path
):
    """A catalog above ``item_affinity.max_items`` exports no affinity weights; a search listing no
    affinity weight 0 then had no trial left and failed the training run at its end ("no tuning trial
    to choose from"). The blend is now searched with the affinity left out."""
    from evaluation.tuning import tune_on_validation

    version_dir = tmp_path / Path(model_version.path).name
    shutil.copytree(model_version.path, version_dir)
    manifest_path = version_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["item_affinity"] = None  # as train_item_affinity records a catalog above the limit
    manifest_path.write_text(json.dumps(manifest))
    for path in version_dir.rglob("item_affinity.*"):
        path.unlink()
    config = with_overrides(
        small_config,
        {
            "serving": {"ordering": {"retrieval_weight": 0.3, "affinity_weight": 0.0}},
            "tuning": {"retrieval_weight": [0.0, 0.3], "affinity_weight": [0.5], "reg_weight": [100.0, 250.0]},
        },
    )
    record = tune_on_validation(version_dir, processed, config)
    tried = [
        (t["params"]["serving.ordering.retrieval_weight"], t["params"]["serving.ordering.affinity_weight"])
        for t in record["trials"]
    ]
    assert tried == [(0.0, 0.0), (0.3, 0.0)]
    assert record["chosen"]["serving.ordering.affinity_weight"] == 0.0
    assert record["chosen"]["item_affinity.reg_weight"] == small_config.item_affinity.reg_weight


def test_an_unused_item_affinity_keeps_its_configured_fit_and_is_not_flagged():
    """Where the best blend gives the item affinity no weight, every (penalty, dropout) pair scored the
    same lists: the first of the grid (the smallest penalty) replaced the configured pair, was refitted
    and served by the fallback to users the models never saw, and was flagged as at the edge."""
    config = load_config(
        overrides={
            "item_affinity": {"reg_weight": 250.0, "dropout": 0.0},
            "tuning": {
                "affinity_weight": [0.0, 0.5],
                "reg_weight": [100.0, 250.0, 500.0],
                "affinity_dropout": [0.0, 0.5],
            },
        }
    )
    reg, dropout, weight = "item_affinity.reg_weight", "item_affinity.dropout", "serving.ordering.affinity_weight"
    unused = {weight: 0.0, reg: 100.0, dropout: 0.0}
    assert tuning.at_edge(config, unused) == []  # the search could not tell the penalties apart
    assert [e["knob"] for e in tuning.at_edge(config, {**unused, weight: 0.5})] == [weight, reg]
    trials = [
        {"params": p, "ndcg_at_10": 0.2 if p[weight] == 0.0 else 0.1}
        for p in tuning.grid(config)  # the affinity-free blends tie, whatever the fit
    ]
    chosen = tuning.choose(config, trials, "ndcg_at_10")
    assert chosen["params"][weight] == 0.0 and chosen["ndcg_at_10"] == 0.2
    assert (chosen["params"][reg], chosen["params"][dropout]) == (250.0, 0.0)  # as configured
    # A blend that uses the affinity: the argmax of the trials, as before.
    trials = [
        {"params": p, "ndcg_at_10": 0.2 if p[reg] == 500.0 and p[weight] > 0 else 0.1} for p in tuning.grid(config)
    ]
    assert tuning.choose(config, trials, "ndcg_at_10") is tuning.best_trial(trials, "ndcg_at_10")


def test_retrained_trials_log_to_the_runs_own_store_in_their_own_experiment(monkeypatch, tmp_path):
    """The candidate generators of the search train into a scratch registry in the temporary folder;
    by default a store sits beside its registry, so their MLflow runs went to /tmp/mlruns, outside the
    work folder, and stayed there. They log to the published run's store now, as their own experiment."""
    from types import SimpleNamespace

    from evaluation import tuning as tuner
    from models import train
    from models.tracking import tracking_uri

    config = load_config(
        overrides={"candidate_generator": {"logq_correction": True}, "tuning": {"logq_strength": [1, 2]}}
    )
    calls = []

    def fake_train_all(processed, config, registry_dir, verbose=0, rankers_from=None, tune=None):
        calls.append((config.training, Path(registry_dir)))
        return SimpleNamespace(manifest={"tuning": {"chosen": {}, "best": 0.5, "users": 1, "at_edge": []}})

    monkeypatch.setattr(tuner, "validation_tuner", lambda processed: None)
    monkeypatch.setattr(train, "train_all", fake_train_all)
    tuner.train_tuned(None, config, tmp_path / "registry")
    store = tracking_uri(config.training, tmp_path / "registry")
    assert store == (tmp_path / "mlruns").as_uri()
    *trials, (published, where) = calls
    assert len(trials) == 2 and where == tmp_path / "registry"
    for training, registry_dir in trials:
        assert registry_dir != tmp_path / "registry"  # scratch
        assert training.mlflow_tracking_uri == store  # old code: "" (beside the scratch registry)
        assert training.mlflow_experiment == "merlin-funnel-tuning-trials"
    assert published == config.training  # the published run as configured


def test_retrained_search_without_a_validation_user_keeps_the_configured_candidate_generator(monkeypatch):
    """Every candidate generator's blend search scored 0 on no user: the first combination (logQ 0.25)
    replaced the configured strength and was flagged as at the edge."""
    from types import SimpleNamespace

    from evaluation import tuning as tuner
    from models import train

    config = load_config(
        overrides={
            "candidate_generator": {"logq_correction": True, "logq_strength": 1.0},
            "tuning": {"logq_strength": [0.25, 2.0]},
        }
    )
    calls = []

    def fake_tune(version_dir, chosen_config):
        return {"chosen": {}, "best": 0.0, "users": 0, "at_edge": []}

    def fake_train_all(processed, config, registry_dir, verbose=0, rankers_from=None, tune=None):
        record = tune(Path(registry_dir), config)
        calls.append((config, record))
        return SimpleNamespace(manifest={"tuning": record})

    monkeypatch.setattr(tuner, "validation_tuner", lambda processed: fake_tune)
    monkeypatch.setattr(train, "train_all", fake_train_all)
    model = tuner.train_tuned(None, config, "unused")
    assert len(calls) == 3  # two candidate generators, then the chosen one
    published, record = calls[-1]
    assert published.candidate_generator.logq_strength == 1.0
    assert record["chosen"] == {"candidate_generator.logq_strength": 1.0, "candidate_generator.sampled_negatives": 0}
    assert record["at_edge"] == [] and model.manifest["tuning"] is record


def _stub_funnel(tmp_path, monkeypatch, heavy, retrieval, clocks=None):
    """``tune_on_validation``'s inputs without a trained model: one validation user (raw 10) who
    clicked raw item 102, and an exported funnel whose heavy ranker passes raw items 100-102 with
    ``heavy`` scores and ``retrieval`` percentiles, without item affinity weights. ``clocks`` collects
    the feature lookup's ``now`` at each request."""
    import time
    from types import SimpleNamespace

    from deployment import export
    from evaluation import offline
    from evaluation import tuning as tuner
    from workflows.pipeline import ProcessedData

    version = tmp_path / "version"
    (tmp_path / "valid").mkdir()
    version.mkdir()
    pd.DataFrame({"user_id": [1], "item_id": [2], "click": [1]}).to_parquet(tmp_path / "valid" / "part.parquet")
    pd.DataFrame({"user_id": [1], "user_id_raw": [10]}).to_parquet(version / "user_features.parquet")
    items = pd.DataFrame({"item_id": [0, 1, 2], "item_id_raw": [100, 101, 102]})
    items.to_parquet(version / "item_features.parquet")
    pd.DataFrame({"user_id_raw": [10], "item_id_raw": [999]}).to_parquet(version / "user_history.parquet")
    lookup = SimpleNamespace(name="feature_lookup", clock=time.time, activity_since=1_000_000.0)
    ordering = SimpleNamespace(
        name="ordering",
        affinity=None,
        policy=load_config().serving.ordering,
        categories=None,
        raw_ids=items["item_id_raw"].to_numpy(),
        retrieval_percentile=lambda x, ids: np.asarray(retrieval, dtype=np.float64),
    )

    def run_funnel(stages, user_id, k):
        if clocks is not None:
            clocks.append(stages[0].clock())
        ids = np.array([0, 1, 2], dtype=np.int64)
        return {"user_known": np.array([True]), "light_ids": ids, "heavy_scores": np.asarray(heavy), "seen_items": []}

    monkeypatch.setattr(export, "export_repository", lambda model, path: path)
    monkeypatch.setattr(tuner, "ModelVersion", lambda path: SimpleNamespace(version=1))
    monkeypatch.setattr(offline, "load_funnel", lambda repo, version: [lookup, ordering])
    monkeypatch.setattr(offline, "run_funnel", run_funnel)
    return version, ProcessedData(tmp_path)


def test_without_item_affinity_every_listed_retrieval_weight_is_searched(tmp_path, monkeypatch):
    """Without affinity weights the tuner set each listed blend's affinity weight to 0, after the grid
    had left out the retrieval weights that do not fit beside the smallest listed affinity weight:
    retrieval 0.6 and 0.9 (valid at affinity 0) were never tried, and 0.3, the largest tried, was
    chosen and not flagged."""
    from evaluation.tuning import tune_on_validation

    # Retrieval places the clicked item first, the heavy ranker last: it comes first from retrieval 0.48 on.
    version, processed = _stub_funnel(tmp_path, monkeypatch, heavy=[0.9, 0.5, 0.0], retrieval=[0.0, 0.5, 1.0])
    config = load_config(
        overrides={
            "serving": {"ordering": {"retrieval_weight": 0.0, "affinity_weight": 0.0}},
            "tuning": {"retrieval_weight": [0.0, 0.3, 0.6, 0.9], "affinity_weight": [0.5], "max_users": 0},
        }
    )
    record = tune_on_validation(version, processed, config)
    tried = [t["params"]["serving.ordering.retrieval_weight"] for t in record["trials"]]
    assert tried == [0.0, 0.3, 0.6, 0.9]
    assert {t["params"]["serving.ordering.affinity_weight"] for t in record["trials"]} == {0.0}
    assert record["chosen"]["serving.ordering.retrieval_weight"] == 0.6 and record["best"] == 1.0


def test_tuning_disabled_trains_the_configured_candidate_generator_once(monkeypatch):
    """``tuning.enabled: false`` with retrained candidates listed (configs/movielens-recbole.yaml turned
    off): train_tuned still trained one candidate generator per combination, whose manifests have no
    ``tuning`` (train_all tunes only when enabled), and failed on the first (KeyError 'tuning')."""
    from types import SimpleNamespace

    from evaluation import tuning as tuner
    from models import train

    calls = []

    def fake_train_all(processed, config, registry_dir, verbose=0, rankers_from=None, tune=None):
        calls.append(config)
        record = tune(Path(registry_dir), config) if tune is not None and config.tuning.enabled else None
        return SimpleNamespace(manifest={} if record is None else {"tuning": record})

    monkeypatch.setattr(tuner, "validation_tuner", lambda processed: lambda version_dir, config: {})
    monkeypatch.setattr(train, "train_all", fake_train_all)
    for logq_correction in (True, False):  # candidates listed for a correction turned off: not refused either
        calls.clear()
        config = load_config(
            overrides={
                "candidate_generator": {"logq_correction": logq_correction, "logq_strength": 1.0},
                "tuning": {"enabled": False, "logq_strength": [0.25, 2.0], "sampled_negatives": [0, 64]},
            }
        )
        model = tuner.train_tuned(None, config, "unused")
        assert len(calls) == 1 and calls[0].candidate_generator.logq_strength == 1.0
        assert "tuning" not in model.manifest

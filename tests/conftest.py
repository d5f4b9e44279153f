"""Shared fixtures: one small synthetic world, processed and trained once per test session."""
from __future__ import annotations

from pathlib import Path

import pytest

from configs.runtime import quiet_known_warnings

quiet_known_warnings()

SMALL = {
    "synthetic": {"num_users": 300, "num_items": 200, "events_per_user": 40, "seed": 7},
    "candidate_generator": {"epochs": 3, "batch_size": 512},
    "light_ranker": {"epochs": 2, "batch_size": 512},
    "heavy_ranker": {"epochs": 2, "batch_size": 512},
    "serving": {"retrieval_k": 100, "light_ranker_k": 30, "max_k": 50},
}


@pytest.fixture(scope="session")
def small_config():
    from configs import load_config

    return load_config(overrides=SMALL)


@pytest.fixture(scope="session")
def small_data(small_config):
    from workflows.sources.synthetic import generate

    return generate(small_config.synthetic)


@pytest.fixture(scope="session")
def raw_paths(small_data, tmp_path_factory):
    return small_data.write_parquet(tmp_path_factory.mktemp("raw"))


@pytest.fixture(scope="session")
def processed(raw_paths, small_config, tmp_path_factory):
    from workflows.pipeline import run_dataset_pipeline

    out = tmp_path_factory.mktemp("processed")
    return run_dataset_pipeline(
        raw_paths["events"], raw_paths["users"], raw_paths["items"], out, small_config.workflow
    )


@pytest.fixture(scope="session")
def model_version(processed, small_config, tmp_path_factory):
    from models.train import train_all

    return train_all(processed, small_config, tmp_path_factory.mktemp("registry"), verbose=0)


@pytest.fixture(scope="session")
def triton_repo(model_version, tmp_path_factory) -> Path:
    from serving.export import export_repository

    return export_repository(model_version, tmp_path_factory.mktemp("export") / "triton_repo")


def pytest_collection_modifyitems(config, items):
    """Notebooks first: they are the longest scopes, and xdist hands scopes out in collection order
    (longest first keeps one long notebook from running alone after everything else)."""
    items.sort(key=lambda item: 0 if item.nodeid.startswith("tests/test_notebooks.py") else 1)

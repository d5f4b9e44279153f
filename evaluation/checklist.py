"""The correctness checklist: executable checks over a model version and its export.

Models need tests like any software. Each check returns a ``CheckResult``; ``run_checklist`` runs
them all and ``scripts/checklist.py`` exits non-zero if any fails, so CI can gate on it.

    versions_consistent   query tower, item index, item affinity, manifest and every exported stage (and the
                          stamped artifacts it serves): one version
    scores_in_unit_range  the served funnel's scores lie in [0, 1], sorted (unless ordering explores), for sampled
                          users; so do the light and heavy rankers' own scores, which the ordering clips;
                          a request a stage refuses (``RequestError``) fails it, with the stage's message
    index_matches_items   the ANN index holds exactly the items of the serving item table, is the file its
                          ``item_index.json`` records (SHA-256, count, dim), and (with the export) the
                          copy that is served is that same file
    index_vectors         the index's vectors are what this version's item tower (saved beside the query tower)
                          makes of a fixed sample of the catalog, each under its own item id (exact kinds:
                          within 1e-4; quantized: the index's own encoding of each; no reconstruction: by
                          search); a version trained before the item tower was saved is not verifiable
                          (N/V), not a pass
    index_recall          exact search, or an approximate index whose search setting was measured
                          on validation queries and reached its recall target (``item_index.json``)
    data_checks           the dataset pipeline's own checks on the data this version was trained on
                          (``workflows/checks.py``): no duplicate user-item pairs, labels agree with
                          the raw signals, no feature uses future events, and the temporal split's
                          cutoff holds; each must be present and passed in the manifest
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serving.interface import stage_folder
from serving.request import RequestError
from workflows.local_parquet import read_parquet


@dataclass
class CheckResult:
    name: str
    passed: bool
    detail: str
    # False where the version lacks what the check needs (one trained before it was saved): not a
    # pass, and reported as "not verifiable" rather than as a defect found.
    verifiable: bool = True

    @property
    def label(self) -> str:
        return "PASS" if self.passed else "FAIL" if self.verifiable else "N/V "


def check_versions_consistent(model_dir: Path, repo: Path | None = None) -> CheckResult:
    from deployment.export import STAGE_ARTIFACTS

    manifest = json.loads((model_dir / "manifest.json").read_text())
    versions = {
        "manifest": int(manifest["version"]),
        "query_tower": int(json.loads((model_dir / "query_tower.json").read_text())["version"]),
        "item_index": int(json.loads((model_dir / "item_index.json").read_text())["version"]),
    }
    affinity_files = [model_dir / "item_affinity.json"] if manifest.get("item_affinity") else []
    if repo is not None:
        export = json.loads((repo / "export.json").read_text())
        versions["export"] = int(export["version"])
        # This version's folder of every stage (``<stage>/<version>/``, or inside the fused funnel): a
        # repository holds other versions beside it during a rollout or an A/B test, and those are
        # theirs, not this version's. A stage without this version's manifest counts as version -1.
        for stage in STAGE_ARTIFACTS:
            stage_manifest = stage_folder(repo, stage, versions["manifest"]) / "manifest.json"
            stamped = json.loads(stage_manifest.read_text()) if stage_manifest.exists() else {"version": -1}
            versions[f"stage:{stage}"] = int(stamped["version"])
            # The stamped artifacts the stage serves (the query tower's, the index's): a stage manifest of
            # this version beside an index copied from another run passed. Missing counts as -1.
            for name in (n for n in STAGE_ARTIFACTS[stage] if n.endswith(".json")):
                path = stage_manifest.parent / name
                stamp = int(json.loads(path.read_text())["version"]) if path.exists() else -1
                versions[f"{name.removesuffix('.json')}:{stage}/{versions['manifest']}"] = stamp
            if stage == "ordering" and stamped.get("item_affinity"):
                affinity_files.append(stage_manifest.parent / "item_affinity.json")
    for path in affinity_files:  # a missing file counts as version -1: inconsistent
        where = "registry" if path.parent == model_dir else f"ordering/{versions['manifest']}"
        versions[f"item_affinity:{where}"] = int(json.loads(path.read_text())["version"]) if path.exists() else -1
    ok = len(set(versions.values())) == 1
    return CheckResult("versions_consistent", ok, json.dumps(versions))


def check_index_matches_items(model_dir: Path, repo: Path | None = None) -> CheckResult:
    """The index holds exactly the item table's ids, is the file its ``item_index.json`` was written for
    (SHA-256, item count, dimension: the version stamp lives in the JSON, so another run's index file
    beside it carried this run's stamp), and, with ``repo``, the exported ``retrieval/<version>/`` copy,
    the one served, is that same file and its JSON records it. A JSON written before the digest was
    recorded cannot tie the registry's file to it: the detail says so (unverified), the rest is checked."""
    import faiss

    from models.item_index import INDEX_FILE, INDEX_META_FILE, file_sha256, shape_problems

    meta = json.loads((model_dir / INDEX_META_FILE).read_text())
    index = faiss.read_index(str(model_dir / INDEX_FILE))
    items = read_parquet(model_dir / "item_features.parquet")
    ids = np.sort(_index_ids(index))
    table = np.sort(items["item_id"].to_numpy())
    ok = len(ids) == len(table) and np.array_equal(ids, table)
    detail = f"index {len(ids)} ids, item table {len(items)} rows"
    if not ok:  # same counts with other ids read as a pass: name what differs
        only_index, only_table = np.setdiff1d(ids, table), np.setdiff1d(table, ids)
        detail += f"; only in the index: {only_index[:10].tolist()}, only in the table: {only_table[:10].tolist()}"
        repeated = len(ids) - len(np.unique(ids)), len(table) - len(np.unique(table))
        if any(repeated):
            detail += f"; repeated ids: index {repeated[0]}, table {repeated[1]}"
    problems = shape_problems(index, meta)
    digest = file_sha256(model_dir / INDEX_FILE)
    if "sha256" not in meta:
        detail += f"; digest unverified: the registry's {INDEX_META_FILE} records no sha256 (built before it was)"
    elif meta["sha256"] != digest:
        problems.append(f"the registry's {INDEX_FILE} is not the file its {INDEX_META_FILE} records (sha256)")
    else:
        detail += f"; sha256 {digest[:12]} as recorded"
    if repo is not None:
        version = int(json.loads((model_dir / "manifest.json").read_text())["version"])
        served = stage_folder(repo, "retrieval", version)
        where = served.relative_to(repo)
        if not (served / INDEX_FILE).exists():
            problems.append(f"{where}/{INDEX_FILE} is missing")
        else:
            served_digest = file_sha256(served / INDEX_FILE)
            if served_digest != digest:
                problems.append(f"the served {where}/{INDEX_FILE} is not the registry's index (sha256)")
            served_meta = served / INDEX_META_FILE
            recorded = json.loads(served_meta.read_text()).get("sha256") if served_meta.exists() else None
            if recorded is not None and recorded != served_digest:  # the stage refuses to load it
                problems.append(f"{where}/{INDEX_META_FILE} records another sha256 than its {INDEX_FILE}")
            if not problems:
                detail += f"; served {where} is the same file"
    if problems:
        detail += "; " + "; ".join(problems)
    return CheckResult("index_matches_items", ok and not problems, detail)


VECTOR_SAMPLE = 256  # catalog items whose vectors index_vectors recomputes (all of a smaller catalog)
# Largest |difference| per coordinate between a recomputed and a stored vector, times max(1, its norm): the
# towers' vectors are L2-normalised; the same graph on the same host gives them back bit for bit, and
# another device or batch shape differs in the last float32 bits (1e-7), while another epoch's weights
# or another item's vector differ by 1e-2 and more.
VECTOR_TOLERANCE = 1e-4
# Where the index stores quantized vectors (PQ, SQ), each stored vector is compared with the index's own
# encoding of the recomputed one; where it cannot reconstruct at all, each sampled item's recomputed vector
# must find the item among the index's top SELF_K. Either way for at least APPROXIMATE_SHARE of the sample.
SELF_K = 10
APPROXIMATE_SHARE = 0.95


def check_index_vectors(model_dir: Path, sample: int = VECTOR_SAMPLE) -> CheckResult:
    """The vectors the item index holds are what this version's item tower makes of the catalog.

    Stamps and digests tie the index file to its JSON, not to the model: an index built with another
    epoch's weights, or with every id shifted by one, passed them. This check loads the item tower the
    training run saved (``item_tower/``, its serving signature), embeds a fixed sample of ``sample``
    catalog items (seeded, in item id order; all of a smaller catalog) from ``item_features.parquet``,
    and compares each with the vector the index holds under that item's id: within ``VECTOR_TOLERANCE``
    where the index stores vectors exactly (flat, IVF-Flat, HNSW-Flat, the kinds ``build_index`` builds);
    with the index's own encoding of each where it quantizes them (PQ, SQ); by search where it cannot
    reconstruct (each item's own vector must retrieve it among the top ``SELF_K``). A version trained
    before the item tower was saved is not verifiable (``verifiable=False``): not a pass."""
    import faiss

    from models.columns import to_host
    from models.item_index import INDEX_FILE, INDEX_META_FILE, ItemVectors, set_search_param, stores_exact_vectors
    from models.registry import ITEM_TOWER

    name = "index_vectors"
    manifest = json.loads((model_dir / "manifest.json").read_text())
    if "item_tower" not in manifest:
        return CheckResult(
            name,
            False,
            f"not verifiable: version {manifest['version']} was trained before the item tower was saved "
            "(no item_tower in its manifest), so the index's vectors cannot be recomputed",
            verifiable=False,
        )
    tower_dir = model_dir / manifest["item_tower"].get("path", ITEM_TOWER)
    if not (tower_dir / "saved_model.pb").exists():
        return CheckResult(name, False, f"the manifest records an item tower, {tower_dir.name}/ holds none")
    import tensorflow as tf

    from serving.fast_inference import ServingFunction

    tower = ServingFunction(tf, tower_dir)
    items = read_parquet(model_dir / "item_features.parquet")
    missing = [n for n in tower.input_names if n not in items.columns]
    if missing:
        return CheckResult(name, False, f"item_features.parquet lacks the item tower's inputs {missing}")
    all_ids = to_host(items["item_id"]).astype(np.int64)
    order = np.argsort(all_ids, kind="stable")  # host numpy: the sample does not depend on the table's row order
    if len(order) > sample:
        order = order[np.sort(np.random.default_rng(0).choice(len(order), sample, replace=False))]
    ids = all_ids[order]
    batch = {
        n: tf.constant(to_host(items[n])[order].astype(spec.dtype.as_numpy_dtype))
        for n, spec in tower.input_specs.items()
    }
    (vectors,) = tower(batch).values()
    vectors = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32).reshape(len(ids), -1))

    index = faiss.read_index(str(model_dir / INDEX_FILE))
    set_search_param(index, json.loads((model_dir / INDEX_META_FILE).read_text()))
    what = f"{len(ids)} of {len(all_ids)} items re-embedded by {tower_dir.name}/"
    if vectors.shape[1] != index.d:
        return CheckResult(name, False, f"{what}: dimension {vectors.shape[1]}, the index's {index.d}")
    held = ItemVectors(index)
    found = held.holds(ids)
    problems = [f"ids not in the index: {ids[~found][:10].tolist()}"] if not found.all() else []
    ids, vectors = ids[found], vectors[found]
    exact = stores_exact_vectors(index)
    expected, how = vectors, "stored vectors"
    try:
        stored = held.vectors(ids)
        if not exact:  # quantized (PQ, SQ): the index holds its own encoding of the tower's vector
            base = faiss.downcast_index(index.index)
            expected, how = base.sa_decode(base.sa_encode(vectors)), "encoding of each (quantized)"
    except RuntimeError:  # no reconstruction (an IVF index without its direct map) or no standalone codec
        stored = None
    if stored is not None:
        diff = np.abs(stored - expected).max(axis=1) if len(ids) else np.zeros(0)
        bad = diff > VECTOR_TOLERANCE * np.maximum(1.0, np.linalg.norm(vectors, axis=1))
        detail = f"{what}: max |difference| {diff.max(initial=0.0):.2g} from the index's {how}"
        # Exact kinds: every vector. Quantized: a float32 wobble (another device) may flip a code at a boundary.
        if bad.any() and bad.mean() > (0.0 if exact else 1.0 - APPROXIMATE_SHARE):
            # Where another item's vector sits under an id (ids shifted), say which id holds this item's.
            _, nearest = index.search(vectors[bad][:5], 1)
            held_under = dict(zip(ids[bad][:5].tolist(), nearest[:, 0].tolist()))
            problems.append(
                f"{int(bad.sum())} vectors differ by more than {VECTOR_TOLERANCE:g} (ids {ids[bad][:10].tolist()}); "
                f"the index's nearest id to each one's own vector: {held_under}"
            )
    else:
        k = min(SELF_K, int(index.ntotal))
        _, got = index.search(vectors, k)
        share = float((got == ids[:, None]).any(axis=1).mean()) if len(ids) else 0.0
        detail = f"{what}: {share:.1%} find themselves among the index's top {k} (no reconstruction: by search)"
        if share < APPROXIMATE_SHARE:
            problems.append(f"below {APPROXIMATE_SHARE:.0%}: the index's vectors are not this item tower's")
    if problems:
        detail += "; " + "; ".join(problems)
    return CheckResult(name, not problems, detail)


def check_index_recall(model_dir: Path) -> CheckResult:
    meta = json.loads((model_dir / "item_index.json").read_text())
    kind = meta.get("kind")
    if kind == "exact":
        return CheckResult("index_recall", True, "exact search")
    recall, target = meta.get("recall_at_k"), meta.get("target_recall")
    if recall is None or target is None:
        what = f"{kind or 'approximate'} index whose recall was never measured: retrain to measure it"
        return CheckResult("index_recall", False, what)
    setting = {k: meta[k] for k in ("nlist", "nprobe", "ef_search") if k in meta}
    detail = f"{kind} {setting}: recall@{meta['k']} {recall} on {meta['queries']} validation queries, target {target}"
    # The build's own verdict on the measured recall: the recorded one is rounded to 4 places (0.94996 reads 0.95).
    return CheckResult("index_recall", bool(meta.get("target_met", recall >= target)), detail)


def _index_ids(index) -> np.ndarray:
    import faiss

    return faiss.vector_to_array(index.id_map).astype(np.int64)


def check_scores_in_unit_range(repo: Path, version: int, users) -> CheckResult:
    from evaluation.offline import close_funnel, load_funnel, run_funnel

    stages = load_funnel(repo, version)
    try:
        # An exploring ordering samples its list (serving/ordering.py): in range, but not sorted.
        sampled = next(s for s in stages if s.name == "ordering").policy.exploration_temperature > 0
        bad, tensors, refused = [], set(), []
        for user in users:
            try:
                out = run_funnel(stages, user, 10)
            except RequestError as err:  # a stage refusing its own funnel's output (NaN scores): a failure here
                bad.append(int(user))
                refused.append(str(err))
                continue
            s = np.asarray(out["scores"])
            # NaN compares false with everything: a NaN score would pass the range and order tests.
            broken = s.size == 0 or not np.isfinite(s).all()
            if broken or s.min() < 0 or s.max() > 1 or (not sampled and np.any(np.diff(s) > 0)):
                bad.append(int(user))
            # The ordering stage clips what it returns to [0, 1], so the served scores alone could not
            # fail: an uncalibrated head (logits) or objective weights summing past 1 came out clipped.
            # The rankers' own scores, before that clip, must lie in [0, 1] too.
            for name in MODEL_SCORES:
                x = np.asarray(out.get(name, np.zeros(0)), dtype=np.float64)
                if x.size and not (np.isfinite(x).all() and x.min() >= 0 and x.max() <= 1):
                    tensors.add(name)
                    if int(user) not in bad:
                        bad.append(int(user))
    finally:
        close_funnel(stages)
    detail = f"{len(users)} users checked, failing: {bad[:10]}"
    if tensors:
        detail += f"; outside [0, 1] before the ordering's clip: {sorted(tensors)}"
    if refused:
        detail += f"; {len(refused)} request(s) refused by a stage: {refused[0]}"
    return CheckResult("scores_in_unit_range", not bad, detail)


# The rankers' scores the funnel passes on (serving/stages.py): probabilities, in [0, 1] by contract.
MODEL_SCORES = ("light_scores", "heavy_scores")


REQUIRED_DATA_CHECKS = ("no_duplicate_pairs", "labels_agree", "point_in_time")


def check_data(model_dir: Path) -> CheckResult:
    manifest = json.loads((model_dir / "manifest.json").read_text())
    summary = manifest.get("data_summary", {})
    recorded = summary.get("checks", [])
    required = list(REQUIRED_DATA_CHECKS)
    if summary.get("split", {}).get("kind") == "temporal":
        required.append("temporal_split")
    if "event_features" in summary:
        # What the data carries, as the dataset pipeline recorded it: the training run's config is not
        # the config the data was prepared with (scripts/prepare_data.py --config, scripts/train.py
        # --config), and one with point_in_time: false let a version pass whose data had point-in-time
        # counts that were never probed (prepared with checks.point_in_time_probe: false).
        from_events = bool(summary["event_features"])
    else:  # a summary written before the pipeline recorded them: the version's config says
        features = manifest.get("config", {}).get("workflow", {}).get("features", {})
        from_events = features.get("point_in_time", True) or bool(features.get("activity_windows"))
    if not from_events:
        # No feature is computed from events (workflow.features.point_in_time: false and no
        # activity_windows), so none can see the future; the leak check has nothing to probe and the
        # pipeline does not record it. Windowed activity counts read earlier events as the counts do.
        required.remove("point_in_time")
    names = {c.get("check") for c in recorded}
    missing = [n for n in required if n not in names]
    failed = [c.get("check") for c in recorded if not c.get("passed")]
    ok = not missing and not failed
    return CheckResult("data_checks", ok, f"recorded {sorted(names)}; missing {missing}; failed {failed}")


def run_checklist(model_dir: str | Path, repo: str | Path | None = None, sample_users: int = 20) -> list[CheckResult]:
    model_dir = Path(model_dir)
    repo = Path(repo) if repo is not None else None
    results = [
        check_versions_consistent(model_dir, repo),
        check_index_matches_items(model_dir, repo),
        check_index_vectors(model_dir),
        check_index_recall(model_dir),
        check_data(model_dir),
    ]
    if repo is not None:
        version = int(json.loads((model_dir / "manifest.json").read_text())["version"])
        known = read_parquet(model_dir / "user_features.parquet", columns=["user_id_raw"])["user_id_raw"]
        users = known.head(sample_users).tolist()
        # And one unknown user, past every known id (the table is not in id order): the fallback must obey too.
        users.append(int(known.max()) + 1)
        if stage_folder(repo, "ordering", version).is_dir():
            results.append(check_scores_in_unit_range(repo, version, users))
        else:  # nothing of this version to serve: a failed check, not a crash
            results.append(CheckResult("scores_in_unit_range", False, f"{repo} does not hold version {version}"))
    return results

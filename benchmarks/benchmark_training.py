"""Training throughput of our Merlin two-tower against the same model written with TensorFlow Recommenders.

Both models get the same positives (the processed training clicks), the same features, the same
embedding widths (read from the Merlin model's tables), the same towers (MLP ``tower_layers`` ->
``embedding_dim``, L2-normalised), the same in-batch softmax with temperature 0.1, the same optimiser,
learning rate and batch size. Each is fed by its own native input pipeline (Merlin's dataloader;
``tf.data`` for TFRS), which is part of what "training examples/s" means for a library.

Epochs alternate between the two models (Merlin epoch, TFRS epoch, Merlin epoch, ...) so that load
from other processes on a shared machine hits both alike; the first epoch of each (tracing) is not
timed. Training metrics are off in both (they would time the metric, not the model). Prints JSON.
Needs tensorflow-recommenders: ``make bench`` installs it (requirements-bench.txt, ``--no-deps``: TFRS
declares the full ``tensorflow`` wheel, which would replace tensorflow-cpu; it runs on
tensorflow-cpu 2.12.1 as is)::

    .venv/bin/python -m benchmarks.benchmark_training [--users 1000] [--items 600] [--epochs 4] [--out bench.json]
"""

from __future__ import annotations

from configs.runtime import quiet_known_warnings

quiet_known_warnings()  # before TensorFlow is imported

import argparse  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import merlin.models.tf as mm
import numpy as np
import tensorflow as tf
from merlin.io import Dataset
from merlin.schema import Tags

from benchmarks import machine, print_json
from configs import CandidateGeneratorConfig, EmbeddingConfig
from configs.cli import config_file, output_file, positive_int
from models.candidate_generator import build_candidate_generator, positives, tower_schema
from models.embeddings import describe_tables


class _EpochTimer(tf.keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds = time.perf_counter() - self.start


def tfrs_two_tower(schema, dims: dict[str, int], config: CandidateGeneratorConfig):
    """The same two-tower in TFRS: embeddings -> MLP -> L2 norm per tower, ``tfrs.tasks.Retrieval``."""
    import tensorflow_recommenders as tfrs

    layers = list(config.tower_layers)
    if layers[-1] != config.embedding_dim:
        layers.append(config.embedding_dim)

    class Tower(tf.keras.Model):
        def __init__(self, tag):
            super().__init__()
            cols = schema.select_by_tag(tag)
            self.categorical = cols.select_by_tag(Tags.CATEGORICAL).column_names
            self.continuous = cols.select_by_tag(Tags.CONTINUOUS).column_names
            self.tables = {
                n: tf.keras.layers.Embedding(int(cols[n].int_domain.max) + 1, dims[n]) for n in self.categorical
            }
            self.mlp = tf.keras.Sequential(
                [tf.keras.layers.Dense(u, activation="relu") for u in layers[:-1]] + [tf.keras.layers.Dense(layers[-1])]
            )

        def call(self, features):
            parts = [self.tables[n](features[n]) for n in self.categorical]
            parts += [tf.expand_dims(tf.cast(features[n], tf.float32), -1) for n in self.continuous]
            return tf.math.l2_normalize(self.mlp(tf.concat(parts, axis=-1)), axis=-1)

    class TwoTower(tfrs.models.Model):
        def __init__(self):
            super().__init__()
            self.query, self.candidate = Tower(Tags.USER), Tower(Tags.ITEM)
            self.task = tfrs.tasks.Retrieval(temperature=0.1)

        def compute_loss(self, features, training=False):
            return self.task(self.query(features), self.candidate(features), compute_metrics=False)

    return TwoTower()


def benchmark(
    train: Dataset,
    config: CandidateGeneratorConfig,
    embeddings: EmbeddingConfig | None = None,
    epochs: int = 4,
    seed: int = 42,
) -> dict:
    """Train both for ``epochs`` epochs (interleaved); return throughput figures as a dict.

    A third entry feeds our Merlin model from the same ``tf.data`` pipeline as TFRS, to separate
    the cost of the model from the cost of Merlin's dataloader.
    """
    tf.keras.utils.set_random_seed(seed)
    data = positives(train)
    frame = data.to_ddf().compute()
    if hasattr(frame, "to_pandas"):
        frame = frame.to_pandas()
    n = len(frame)
    schema = tower_schema(data.schema)

    merlin_model = build_candidate_generator(data.schema, config, embeddings)
    merlin_model.compile(optimizer=tf.keras.optimizers.Adam(config.learning_rate))
    loader = mm.Loader(data, batch_size=config.batch_size, shuffle=True)
    merlin_model.fit(loader, epochs=1, verbose=0, steps_per_epoch=1)  # build, so the tables exist
    dims = {t["table"]: t["dim"] for t in describe_tables(merlin_model)}

    tfrs_model = tfrs_two_tower(schema, dims, config)
    tfrs_model.compile(optimizer=tf.keras.optimizers.Adam(config.learning_rate))
    columns = schema.column_names
    tensors = {c: np.asarray(frame[c].values) for c in columns}
    tf_data = (
        tf.data.Dataset.from_tensor_slices(tensors)
        .shuffle(n, seed=seed, reshuffle_each_iteration=True)
        .batch(config.batch_size)
        .prefetch(tf.data.AUTOTUNE)
    )

    merlin_tf_data = build_candidate_generator(data.schema, config, embeddings)
    merlin_tf_data.compile(optimizer=tf.keras.optimizers.Adam(config.learning_rate))
    merlin_inputs = tf_data.map(lambda x: {k: tf.expand_dims(v, -1) for k, v in x.items()})

    times: dict[str, list[float]] = {"merlin": [], "tfrs": [], "merlin_tf_data": []}
    runs = (
        ("merlin", merlin_model, loader),
        ("tfrs", tfrs_model, tf_data),
        ("merlin_tf_data", merlin_tf_data, merlin_inputs),
    )
    for _ in range(epochs):
        for name, model, inputs in runs:
            timer = _EpochTimer()
            model.fit(inputs, epochs=1, verbose=0, callbacks=[timer])
            times[name].append(timer.seconds)

    def summary(seconds: list[float], model) -> dict:
        timed = seconds[1:] if len(seconds) > 1 else seconds
        return {
            "examples_per_s": round(n / float(np.median(timed)), 1),
            "epoch_seconds": [round(s, 3) for s in seconds],
            "timed_epochs": len(timed),
            "params": int(sum(w.shape.num_elements() for w in model.weights)),
        }

    merlin, tfrs_ = summary(times["merlin"], merlin_model), summary(times["tfrs"], tfrs_model)
    merlin_tf = summary(times["merlin_tf_data"], merlin_tf_data)
    return {
        "examples": n,
        "batch_size": config.batch_size,
        "embedding_dims": dims,
        "tower_layers": list(config.tower_layers),
        "embedding_dim": config.embedding_dim,
        "merlin_two_tower": merlin,
        "tfrs_two_tower": tfrs_,
        "merlin_two_tower_fed_by_tf_data": merlin_tf,
        "ratio_merlin_over_tfrs": round(merlin["examples_per_s"] / tfrs_["examples_per_s"], 3),
        "ratio_merlin_tf_data_over_tfrs": round(merlin_tf["examples_per_s"] / tfrs_["examples_per_s"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=config_file, help="YAML config (default: configs/default.yaml)")
    # 0 read as "not given" (the config's value, silently) and a negative count failed in the config
    parser.add_argument("--users", type=positive_int, help="synthetic users (default: the config's)")
    parser.add_argument("--items", type=positive_int, help="synthetic items (default: the config's)")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per model; the first is not timed")
    parser.add_argument("--batch-size", type=positive_int, help="default: candidate_generator.batch_size")
    parser.add_argument("--out", type=output_file, help="also write the JSON here")
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be >= 2 (the first epoch is tracing and is not timed)")
    try:
        import tensorflow_recommenders  # noqa: F401
    except ImportError:
        sys.exit(
            "tensorflow-recommenders is not installed: run `make bench` "
            "(or pip install --no-deps -r requirements-bench.txt)"
        )

    from configs import load_config
    from workflows.pipeline import run_dataset_pipeline
    from workflows.sources.synthetic import generate

    overrides: dict = {"synthetic": {}}
    if args.users is not None:
        overrides["synthetic"]["num_users"] = args.users
    if args.items is not None:
        overrides["synthetic"]["num_items"] = args.items
    if args.batch_size is not None:
        overrides["candidate_generator"] = {"batch_size": args.batch_size}
    config = load_config(args.config, overrides)
    with tempfile.TemporaryDirectory() as tmp:
        raw = generate(config.synthetic).write_parquet(Path(tmp) / "raw")
        processed = run_dataset_pipeline(
            raw["events"], raw["users"], raw["items"], Path(tmp) / "processed", config.workflow
        )
        result = benchmark(
            processed.train(), config.candidate_generator, config.embeddings, epochs=args.epochs, seed=config.seed
        )
    result["machine"] = machine()  # the TensorFlow and TFRS versions among the others
    print_json(result, args.out)  # makes --out's folder: a missing one lost the figures after the run


if __name__ == "__main__":
    main()

"""The stage stubs on a GPU workstation: each TensorFlow stage is a process of its own, so none may
map the whole GPU (docs/gpu-workstation.md). Checked without a GPU: what ``import_tf`` sets before
TensorFlow first sets up a device."""

from serving import stages


def test_import_tf_lets_tensorflow_grow_its_gpu_memory(monkeypatch):
    """By default TensorFlow maps almost all of a GPU's memory in the first process using it: the
    query tower's stub would leave the rankers' stubs (and every further instance or version) none."""
    monkeypatch.delenv("TF_FORCE_GPU_ALLOW_GROWTH", raising=False)
    stages.import_tf()
    assert stages.os.environ.get("TF_FORCE_GPU_ALLOW_GROWTH") == "true"


def test_import_tf_keeps_an_operators_gpu_memory_setting(monkeypatch):
    monkeypatch.setenv("TF_FORCE_GPU_ALLOW_GROWTH", "false")
    stages.import_tf()
    assert stages.os.environ["TF_FORCE_GPU_ALLOW_GROWTH"] == "false"

"""Each model's tensors are declared once, in code (serving/interface.py, the stage classes, the
router): the checked-in triton_repo/*/config.pbtxt must say the same, and the ensemble must wire
every step's outputs into inputs that exist."""

from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from online.router import ABRouter, FeedbackService
from serving import interface
from serving.fused import FusedFunnel
from serving.stages import FUNNEL, STAGES

REPO = Path(__file__).resolve().parents[1] / "triton_repo"
DECLARED = {
    **{name: (cls.inputs, cls.outputs) for name, cls in STAGES.items()},
    interface.FUNNEL: (interface.FUNNEL_INPUTS, interface.FUNNEL_OUTPUTS),
    interface.FUSED: (FusedFunnel.inputs, FusedFunnel.outputs),
    interface.ROUTER: (ABRouter.inputs, ABRouter.outputs),
    interface.FEEDBACK: (FeedbackService.inputs, FeedbackService.outputs),
}


def config(name: str) -> mc.ModelConfig:
    parsed = mc.ModelConfig()
    text_format.Parse((REPO / name / "config.pbtxt").read_text(), parsed)
    return parsed


def as_declared(tensors) -> dict:
    return {
        t.name: (
            mc.DataType.Name(t.data_type).removeprefix("TYPE_"),
            tuple(t.dims),
            bool(getattr(t, "optional", False)),
        )
        for t in tensors
    }


def declared(tensors) -> dict:
    return {t.name: (t.dtype, t.dims, t.optional) for t in tensors}


def test_every_model_of_the_repository_is_declared():
    assert sorted(p.name for p in REPO.iterdir() if (p / "config.pbtxt").exists()) == sorted(DECLARED)


@pytest.mark.parametrize("name", sorted(DECLARED))
def test_config_pbtxt_matches_the_declared_tensors(name):
    inputs, outputs = DECLARED[name]
    parsed = config(name)
    assert parsed.name == name
    assert as_declared(parsed.input) == declared(inputs)
    assert as_declared(parsed.output) == declared(outputs)


def test_the_ensemble_wires_each_step_to_declared_tensors_in_funnel_order():
    steps = config(interface.FUNNEL).ensemble_scheduling.step
    assert [s.model_name for s in steps] == FUNNEL
    available = {t.name for t in interface.FUNNEL_INPUTS}
    for step in steps:
        inputs, outputs = DECLARED[step.model_name]
        required = {t.name for t in inputs if not t.optional}
        assert required <= set(step.input_map), (step.model_name, required - set(step.input_map))
        assert set(step.input_map) <= {t.name for t in inputs}
        assert set(step.input_map.values()) <= available, step.model_name  # produced by an earlier step
        assert set(step.output_map) <= {t.name for t in outputs}  # a step may leave an output unused
        available |= set(step.output_map.values())
    assert {t.name for t in interface.FUNNEL_OUTPUTS} <= available


def test_the_fused_ensemble_is_one_step_through_the_fused_funnel():
    """``serving.batching.fuse_stages``: the export replaces the ensemble's steps with the fused
    funnel, which takes and gives exactly the ensemble's tensors."""
    from deployment.export import fused_ensemble

    fused = mc.ModelConfig()
    text_format.Parse(fused_ensemble((REPO / interface.FUNNEL / "config.pbtxt").read_text()), fused)
    original = config(interface.FUNNEL)
    assert (fused.name, fused.platform, fused.input, fused.output) == (
        original.name,
        original.platform,
        original.input,
        original.output,
    )
    (step,) = fused.ensemble_scheduling.step
    assert step.model_name == interface.FUSED
    assert dict(step.input_map) == {t.name: t.name for t in interface.FUNNEL_INPUTS}
    assert dict(step.output_map) == {t.name: t.name for t in interface.FUNNEL_OUTPUTS}
    assert as_declared(config(interface.FUSED).input) == as_declared(original.input)

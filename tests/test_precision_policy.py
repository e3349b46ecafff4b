"""Precision policy: every loaded (and so exported) weight has the dtype transformers gives it when loading the same
checkpoint in that precision (T5's ``wo`` stays fp32 in fp16, is bf16 in bf16)."""

from __future__ import annotations

import onnx
import pytest
import torch

from skrr_export.adapters.t5 import T5Adapter
from skrr_export.apply import apply_plan
from skrr_export.errors import InvariantError
from skrr_export.export import ExportOptions, export_onnx
from skrr_export.model import ModelSource, load_encoder

from .helpers import FAMILIES
from .test_apply import make_plan

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
ONNX_DTYPES = {torch.float32: onnx.TensorProto.FLOAT, torch.float16: onnx.TensorProto.FLOAT16,
               torch.bfloat16: onnx.TensorProto.BFLOAT16}


def hugging_face_dtypes(family, folder, precision):
    """The independent reference: transformers' own loader."""
    from transformers import AutoModel, CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel, UMT5EncoderModel

    cls = {"t5": T5EncoderModel, "umt5": UMT5EncoderModel, "clip": CLIPTextModel,
           "clip-projection": CLIPTextModelWithProjection}.get(family, AutoModel)
    model = cls.from_pretrained(folder, dtype=DTYPES[precision])
    return {n: p.dtype for n, p in model.named_parameters(remove_duplicate=False)}


@pytest.mark.parametrize("precision", DTYPES)
@pytest.mark.parametrize("family", FAMILIES)
def test_loaded_and_exported_weights_have_hugging_faces_dtypes(family, precision, tiny_models, tmp_path):
    _, folder = tiny_models[family]
    plan = make_plan(family, "heavy-reuse")
    enc = load_encoder(ModelSource(folder), plan, precision)
    expected = hugging_face_dtypes(family, folder, precision)
    loaded = {n: p.dtype for n, p in enc.model.named_parameters(remove_duplicate=False) if not p.is_meta}
    assert loaded and all(expected[n] == dtype for n, dtype in loaded.items()), \
        {n: (d, expected[n]) for n, d in loaded.items() if expected[n] != d}
    if family == "t5":  # the case that matters: wo kept in fp32 in fp16 only
        wo = [d for n, d in loaded.items() if n.endswith(".wo.weight")]
        assert wo and set(wo) == {torch.float32 if precision == "fp16" else torch.bfloat16}
    if family != "t5":
        return  # the export stores what was loaded: checked once, on the family with a keep-in-fp32 module
    module = apply_plan(enc, plan)
    path = export_onnx(module, tmp_path / "model.onnx", ExportOptions(), vocab_size=96).path
    params = dict(enc.model.named_parameters(remove_duplicate=False))  # the file names weights as the checkpoint does
    stored = {i.name: i.data_type for i in onnx.load(str(path)).graph.initializer if i.name in params}
    assert stored and all(ONNX_DTYPES[params[n].dtype] == t for n, t in stored.items())


def test_a_loader_that_stores_wo_in_fp16_is_refused(tiny_models, monkeypatch):
    """The planted fault: the adapter forgets T5's keep-in-fp32 module."""
    monkeypatch.setattr(T5Adapter, "fp32_in_fp16", ())
    _, folder = tiny_models["t5"]
    with pytest.raises(InvariantError, match=r"wo\.weight is torch.float16 but transformers loads it as torch.float32"):
        load_encoder(ModelSource(folder), make_plan("t5", "heavy-reuse"), "fp16")
    load_encoder(ModelSource(folder), make_plan("t5", "heavy-reuse"), "bf16")  # bf16 has no keep-in-fp32 module

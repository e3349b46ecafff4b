"""--optimize ort: attention fused into MultiHeadAttention, norms and GELU into ONNX Runtime's operators, every weight
still stored once, parity against PyTorch, and never an input to TensorRT."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest

from skrr_export.apply import computed_in_fp32, unique_parameter_bytes
from skrr_export.cli import main
from skrr_export.compare import DEFAULT_TOLERANCES, compare
from skrr_export.errors import InvariantError
from skrr_export.artifacts import SMALL_CONSTANT_BYTES, onnx_initializer_sizes
from skrr_export.graph import weights as weights_invariant
from skrr_export.ort_fusion import fuse_artifact
from skrr_export.pipeline import ExportConfig, run_export
from skrr_export.runners import OrtFp32ArithmeticRunner, OrtRunner, TorchRunner

from .test_apply import make_plan
from .test_export import exported, feed

FUSED = {  # the norm and GELU operators ONNX Runtime's optimizer writes for each family, in fp32
    "t5": ("com.microsoft.SkipSimplifiedLayerNormalization", "com.microsoft.FastGelu"),
    "umt5": ("com.microsoft.SkipSimplifiedLayerNormalization", "com.microsoft.FastGelu"),
    "bert": ("com.microsoft.SkipLayerNormalization", "com.microsoft.BiasGelu"),
    "clip": ("com.microsoft.SkipLayerNormalization", "com.microsoft.QuickGelu"),
}


@pytest.fixture(scope="module")
def exports(tiny_models, tmp_path_factory):
    """``exports(family, precision)``: the heavy-reuse export made once per module, as (module, fused artifact, fusion
    result, path of a copy of the file as exported, before fusing). The tests only read them; a test that edits a
    graph saves its edit to a file of its own."""
    made: dict[tuple[str, str], tuple] = {}

    def get(family: str, precision: str = "fp32"):
        if (family, precision) not in made:
            folder = tmp_path_factory.mktemp(f"fused-{family}-{precision}")
            module, art = exported(tiny_models, family, folder, precision=precision)
            assert art.data_path is None  # one file: the copy below is the whole export
            unfused = Path(shutil.copy(art.path, folder / "unfused.onnx"))
            from skrr_export.adapters import ADAPTERS

            art, result = fuse_artifact(art, ADAPTERS[family.split("-")[0]])
            made[family, precision] = (module, art, result, unfused)
        return made[family, precision]

    return get


def op_types(path) -> Counter:
    return Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}"
                   for n in onnx.load(str(path), load_external_data=False).graph.node)


def attention_slots(family: str) -> int:
    return sum(1 for slot, _ in make_plan(family, "heavy-reuse").schedule() if slot % 2 == 0)


@pytest.mark.parametrize("family", FUSED)
def test_heavy_reuse_fuses_every_attention_slot_keeps_weights_once_and_matches_pytorch(family, exports):
    module, art, result, _ = exports(family)
    ops = op_types(art.path)
    # heavy-reuse runs attention sub-block 0 in all three attention slots: three MultiHeadAttention nodes, each
    # reading the same three projection weights (unpacked), and no softmax attention left
    assert ops["com.microsoft.MultiHeadAttention"] == attention_slots(family) == result.attention == 3
    assert ops["Softmax"] == 0 and result.unfused_softmax == 0
    norm, gelu = FUSED[family]
    assert ops[norm] >= 4 and ops[gelu] == 3, ops
    # read back from the file: one initializer per distinct parameter, holding the module's unique parameter bytes
    model = onnx.load(str(art.path))
    sizes = dict(zip((i.name for i in model.graph.initializer), onnx_initializer_sizes(art.path)))
    aliases = {module.checkpoint_name(n): id(p) for n, p in module.named_parameters(remove_duplicate=False)}
    assert sorted(aliases[n] for n in sizes if n in aliases) == sorted(id(p) for p in dict(module.named_parameters()).values())
    assert sum(sizes[n] for n in sizes if n in aliases) == unique_parameter_bytes(module) == art.initializers.weight_bytes
    assert sum(sizes[n] for n in sizes if n not in aliases) == art.initializers.constant_bytes <= SMALL_CONSTANT_BYTES
    assert model.ir_version <= 10
    # and it computes what PyTorch does, on ONNX Runtime's CPU provider
    batch = feed(module=module)  # padded: the padding mask reaches MultiHeadAttention as its attention bias
    with TorchRunner(module, module.output_names) as t, OrtRunner(art.path) as o:
        result = compare(("pytorch", t.infer(batch)), ("onnxruntime", o.infer(batch)), batch["attention_mask"],
                         {"*": DEFAULT_TOLERANCES["wiring"]})
    assert result, str(result)
    assert max(out.max_abs for out in result.outputs) < 1e-4  # fp32: the fusions change rounding only


def test_wrong_attention_scale_fails_parity(exports, tmp_path):
    """The parity check sees the fused attention: BERT's 1/sqrt(head size) dropped from every slot fails it."""
    module, art, _, _ = exports("bert")
    model = onnx.load(str(art.path))
    for node in model.graph.node:
        if node.op_type == "MultiHeadAttention":
            next(a for a in node.attribute if a.name == "scale").f = 1.0
    onnx.save(model, str(tmp_path / "wrong_scale.onnx"))
    batch = feed(module=module)
    with TorchRunner(module, module.output_names) as t, OrtRunner(tmp_path / "wrong_scale.onnx") as o:
        result = compare(("pytorch", t.infer(batch)), ("onnxruntime", o.infer(batch)), batch["attention_mask"],
                         {"*": DEFAULT_TOLERANCES["wiring"]})
    assert max(out.max_abs for out in result.outputs) > 1e-3


@pytest.mark.parametrize("family, precision", [("t5", "fp16"), ("clip", "fp16"), ("t5", "bf16")])
def test_half_fused_graph_runs_in_fp32_arithmetic(family, precision, exports):
    """Half-precision parity on the CPU provider goes through the fp32-arithmetic copy; it runs the com.microsoft
    operators too. T5's fp32-computed RMSNorms fuse (SimplifiedLayerNormalization; in fp16 also with the residual
    Add, which the fp32 ``wo`` keeps in fp32), and its GELU, whose constants the bf16 graph holds rounded."""
    module, art, _, _ = exports(family, precision)
    ops = op_types(art.path)
    assert ops["com.microsoft.MultiHeadAttention"] == 3 and ops["Softmax"] == 0
    if family == "t5":
        assert ops["com.microsoft.SkipSimplifiedLayerNormalization"] + ops["SimplifiedLayerNormalization"] == 7
        assert ops["ReduceMean"] == 0 and ops["com.microsoft.FastGelu"] == 3 and ops["Tanh"] == 0
    batch = feed(module=module)
    with computed_in_fp32(module), TorchRunner(module, module.output_names) as t:
        reference = t.infer(batch)
    with OrtFp32ArithmeticRunner(art.path, precision) as runner:
        result = compare(("pytorch", reference), ("onnxruntime", runner.infer(batch)), batch["attention_mask"],
                         {"*": DEFAULT_TOLERANCES["wiring"]})
    assert result, str(result)
    # the fusions change rounding only (the plain bf16 T5 export's 1e-3 here came from its rounded GELU constants)
    assert max(out.max_abs for out in result.outputs) < 1e-4


def test_external_data_file_is_neither_read_nor_rewritten(tiny_models, tmp_path):
    module, art = exported(tiny_models, "t5", tmp_path, external_data=True)
    digest = hashlib.sha256(art.data_path.read_bytes()).hexdigest()
    from skrr_export.adapters import ADAPTERS

    art, result = fuse_artifact(art, ADAPTERS["t5"])
    assert result.attention == 3
    assert hashlib.sha256(art.data_path.read_bytes()).hexdigest() == digest
    assert art.initializers.weight_bytes == unique_parameter_bytes(module)


def _fused_check(exports, family, plant):
    """The weights-once check of the fused graph against the export it came from, after ``plant(fused proto, name of
    its first 2-D weight)`` edited the fused graph; the check's message."""
    import onnx_ir as ir

    _, art, _, unfused = exports(family)
    expected = weights_invariant.stored_expected(ir.load(str(unfused)))
    proto = onnx.load(str(art.path))
    assert weights_invariant.check(ir.from_proto(proto), expected), "the fused graph as made passes"
    weight = next(t for t in proto.graph.initializer if t.name in expected.holders and len(t.dims) == 2)
    plant(proto, weight)
    result = weights_invariant.check(ir.from_proto(proto), expected)
    assert not result
    return result.message()


def _added(proto, name, array):
    proto.graph.initializer.append(onnx.numpy_helper.from_array(np.ascontiguousarray(array), name))


def test_the_invariant_catches_a_packed_copy(exports):
    """A fusion that packs Q, K and V into a new initializer stores the re-used attention weights twice."""
    def packed(proto, _):
        parts = [onnx.numpy_helper.to_array(t) for t in proto.graph.initializer
                 if t.name.endswith(("query.weight", "key.weight", "value.weight"))]
        _added(proto, "packed_qkv", np.concatenate(parts))

    assert "packed_qkv (12,288 bytes) copies weight" in _fused_check(exports, "bert", packed)


@pytest.mark.parametrize("form", ["as stored", "transposed"])
def test_the_invariant_catches_a_weight_copied_into_another_initializer(form, exports):
    """A weight of the fused graph duplicated as an initializer of its own (as a fusion's constant folding would
    write it), as stored or transposed."""
    def copied(proto, weight):
        values = onnx.numpy_helper.to_array(weight)
        _added(proto, "planted_copy", values.T if form == "transposed" else values)

    assert "planted_copy (" in (message := _fused_check(exports, "t5", copied)) and "bytes) copies weight" in message
    assert f"({form}, all of it)" in message


def test_the_invariant_catches_a_weight_rewritten_in_place(exports):
    """ONNX Runtime's optimizer folds a weight's Transpose into the weight, under its name (left out for that)."""
    def transposed(proto, weight):
        weight.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(weight).T.copy(), weight.name))

    assert "is not the weight the original stored" in _fused_check(exports, "t5", transposed)


def write_plan(tmp_path, family="t5"):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(make_plan(family, "heavy-reuse").to_json()))
    return path


@pytest.mark.parametrize("engine", ["trt", "trt-rtx"])
def test_optimize_ort_with_a_tensorrt_engine_is_refused(engine, tiny_models, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["--plan", str(write_plan(tmp_path)), "--model", str(tiny_models["t5"][1]), "--random-ids", "--out", str(out),
                 "--engine", engine, "--optimize", "ort", "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "--optimize ort" in err[0] and "TensorRT" in err[0] and "Traceback" not in err[0]
    assert not out.exists()


def test_the_job_reports_an_onnx_runtime_only_variant(tiny_models, tmp_path):
    """The main job with optimize="ort" (fp16 on this CPU: the wiring check in fp32 arithmetic and the precision
    check emulating fp16, on the fused graph): parity executed and passed, report.json and report.md say the model
    is for ONNX Runtime only."""
    out = tmp_path / "out"
    report = run_export(ExportConfig(plan=write_plan(tmp_path), out=out, model=tiny_models["t5"][1], precision="fp16",
                                     random_ids=True, optimize="ort", dense_distance=False, measure=False))
    assert [(p["check"], p["passed"]) for p in report["parity"]] == [("wiring", True)] * 2 + [("precision", True)] * 2
    fusion = report["onnx"]["ort_fusion"]
    assert fusion["fused_attention"] == 3 and fusion["op_counts"]["com.microsoft.MultiHeadAttention"] == 3
    assert "never TensorRT" in fusion["runtime"]
    assert json.loads((out / "report.json").read_text())["onnx"]["ort_fusion"] == fusion
    assert "ONNX Runtime only" in (out / "report.md").read_text()
    assert report["onnx"]["weights"]["bytes"] == report["onnx"]["unique_parameter_bytes"]



def test_quantized_export_fuses_too(tiny_models, tmp_path):
    """--quantize int8 joins each slot's Q, K and V MatMuls (quantize.py); the attention after the Split still fuses
    and the quantized weights stay as the export stored them."""
    from skrr_export.quantize import quantization

    report = run_export(ExportConfig(plan=write_plan(tmp_path), out=tmp_path / "out", model=tiny_models["t5"][1],
                                     quantization=quantization("int8", None), optimize="ort", dense_distance=False,
                                     measure=False, random_ids=True))
    assert [p["passed"] for p in report["parity"]] == [True, True]
    fusion = report["onnx"]["ort_fusion"]
    assert fusion["fused_attention"] == 3 and fusion["unfused_softmax"] == 0
    assert fusion["op_counts"]["DequantizeLinear"] == 4  # q+k+v, o, wi_0+wi_1, wo: each once for three slots


def test_trtexec_script_is_refused_for_a_fused_export(tiny_models, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--plan", str(write_plan(tmp_path)), "--model", str(tiny_models["t5"][1]), "--random-ids", "--out", str(out),
                 "--optimize", "ort", "--no-dense-distance", "-q"]) == 0
    capsys.readouterr()
    code = main(["trtexec", "--artifacts", str(out), "--batch", "1,1,4", "--sequence", "1,8,16"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--optimize ort" in err[0] and "ONNX Runtime" in err[0], err
    assert not (out / "build_engine.sh").exists()
    # the Triton repository for it uses the onnxruntime backend
    assert main(["triton", "--artifacts", str(out), "--repo", str(tmp_path / "repo"), "-q"]) == 0
    assert 'platform: "onnxruntime_onnx"' in next((tmp_path / "repo").glob("*/config.pbtxt")).read_text()

"""Weight-only quantization: each re-used weight quantized and stored once, the graph computes with exactly the stored
integers and scales, the bytes match the plan's, engines build, bad flags are one line."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from skrr_export.adapters import ADAPTERS, complete_feed
from skrr_export.apply import apply_plan
from skrr_export.cli import main
from skrr_export.compare import DEFAULT_TOLERANCES, compare
from skrr_export.errors import ArgumentError, InvariantError
from skrr_export.artifacts import onnx_initializer_sizes
from skrr_export.export import ExportOptions, export_onnx
from skrr_export.model import ModelSource, build_meta, load_config, load_encoder
from skrr_export.quantize import (
    SCALE_SUFFIX,
    QUANTIZED_SUFFIX,
    Quantization,
    plan_accounting,
    quantization,
    quantize_module,
)
from skrr_export.runners import OrtRunner, TorchRunner
from skrr_export.trt import WEIGHT_SLACK, EngineOptions, ShapeRange, available, build_engine
from skrr_export.units import size

from . import helpers
from .helpers import ids_and_mask, plan_family
from .reference import reference_forward
from .test_apply import PLANS, make_plan

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("t5", "bert", "clip-projection")
SCHEMES = {"int8": Quantization("int8"), "int4": Quantization("int4", 32)}
WIDTH, FFN = 64, 128  # every block size the tests use divides both input widths
needs_rtx = pytest.mark.skipif(not available("trt-rtx"), reason="tensorrt-rtx is not installed (pip install tensorrt-rtx)")


TINY_CONFIG = helpers.tiny_config


def wide_config(family: str):
    config = TINY_CONFIG(family)
    for name, value in (("d_model", WIDTH), ("hidden_size", WIDTH), ("d_ff", FFN), ("intermediate_size", FFN),
                        ("d_kv", WIDTH // 4)):
        if hasattr(config, name):
            setattr(config, name, value)
    return config


@pytest.fixture(scope="module")
def wide_models(tmp_path_factory):
    """family -> (Hugging Face model in memory, its folder): the tiny models at widths 64 / 128."""
    out = {}
    with pytest.MonkeyPatch.context() as mp:  # only while building: other tests' tiny models keep their widths
        mp.setattr(helpers, "tiny_config", wide_config)
        for family in FAMILIES:
            out[family] = (helpers.build_reference_model(family), tmp_path_factory.mktemp(f"wide-{family}"))
    for model, folder in out.values():
        model.save_pretrained(folder)
    return out


def quantized_export(folder: Path, family: str, q: Quantization, tmp_path: Path, precision: str = "fp32"):
    plan = make_plan(plan_family(family), "heavy-reuse")
    enc = load_encoder(ModelSource(folder), plan, precision)
    module = apply_plan(enc, plan)
    quantized = quantize_module(module, q)
    art = export_onnx(module, tmp_path / "model.onnx", ExportOptions(), vocab_size=96, quantized=quantized)
    return enc, module, quantized, art


@pytest.fixture(scope="module")
def exports(wide_models, tmp_path_factory):
    """``exports(family, scheme, precision)``: quantized_export's (encoder, module, quantized, artifact) for the heavy-
    reuse plan, made once per module and shared by the tests below, which only read them (a test that edits the
    ONNX file saves its edit to a file of its own)."""
    made: dict[tuple[str, str, str], tuple] = {}

    def get(family: str, scheme: str, precision: str = "fp32"):
        if (family, scheme, precision) not in made:
            folder = tmp_path_factory.mktemp(f"quantized-{family}-{scheme}-{precision}")
            made[family, scheme, precision] = quantized_export(wide_models[family][1], family, SCHEMES[scheme], folder,
                                                               precision)
        return made[family, scheme, precision]

    return get


def stored_weights(path: Path, hf) -> dict[str, np.ndarray]:
    """Each parameter's [out, in] weight as the ONNX file stores it, by its name in the Hugging Face model ``hf``,
    computed here with numpy: integers x scales for quantized ones (joined initializers cut back into their
    parameters), the tensor itself for the rest."""
    model = onnx.load(str(path))
    arrays = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    params = dict(hf.named_parameters())
    out = {n: a.astype(np.float32) for n, a in arrays.items() if n in params}
    for name, values in arrays.items():
        if not name.endswith(QUANTIZED_SUFFIX):
            continue
        sources = name.removesuffix(QUANTIZED_SUFFIX).split("+")
        scales = arrays[name.removesuffix(QUANTIZED_SUFFIX) + SCALE_SUFFIX].astype(np.float32)
        if scales.ndim == 2:
            scales = np.repeat(scales, values.shape[0] // scales.shape[0], axis=0)
        weight = values.astype(np.float32) * scales  # [in, sum of outs]
        cuts = np.cumsum([params[s].shape[0] for s in sources])[:-1]
        for source, part in zip(sources, np.split(weight, cuts, axis=1)):
            assert source not in out, f"{source} stored twice"
            out[source] = part.T
    return out


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("family", FAMILIES)
def test_heavy_reuse_quantized_weights_are_stored_once_at_the_plans_quantized_size(family, scheme, wide_models, exports):
    q = SCHEMES[scheme]
    _, folder = wide_models[family]
    enc, module, quantized, art = exports(family, scheme)
    model = onnx.load(str(art.path))
    sizes = dict(zip((i.name for i in model.graph.initializer), onnx_initializer_sizes(art.path)))
    aliases = dict(module.named_parameters(remove_duplicate=False))  # every name a parameter goes by in the module
    params = {id(p): p for p in aliases.values()}
    # the file names what it stores as the checkpoint does: the Hugging Face model's own names (the reference) are
    # the only ones read here, mapped to the module's parameters by identity (the module holds the loaded ones)
    checkpoint = {n: p for n, p in enc.model.named_parameters() if n in dict(wide_models[family][0].named_parameters())}
    holders: dict[int, list[str]] = {}
    for name in sizes:
        for suffix in (QUANTIZED_SUFFIX, SCALE_SUFFIX, ""):
            if suffix and not name.endswith(suffix):
                continue
            sources = (name.removesuffix(suffix) if suffix else name).split("+")
            if all(s in checkpoint for s in sources):
                for s in sources:
                    holders.setdefault(id(checkpoint[s]), []).append(name)
                break
    assert not [n for n in sizes if n.startswith(("kept.", "stem.", "head."))]  # no module path left
    linear = {id(p) for n, p in aliases.items() if p.ndim == 2 and n.startswith("kept.") and "relative" not in n
              and "embed" not in n}
    assert set(holders) == set(params)  # every kept parameter is stored ...
    for key in params:  # ... once: plain, or in one integer initializer and one scale initializer
        assert len(holders[key]) == (2 if key in linear else 1), holders[key]
    ints = {i.name: i.data_type for i in model.graph.initializer if i.name.endswith(QUANTIZED_SUFFIX)}
    assert set(ints.values()) == {onnx.TensorProto.INT8 if q.bits == 8 else onnx.TensorProto.INT4}
    # the bytes, computed here from the shapes: integers at q.bits per element, one scale per output channel
    # (int8) or per block of 32 inputs (int4), in the weight's dtype
    expected = 0
    for key, p in params.items():
        if key in linear:
            scales = p.shape[0] * (p.shape[1] // 32 if q.bits == 4 else 1)
            expected += p.numel() * q.bits // 8 + scales * p.element_size()
        else:
            expected += p.numel() * p.element_size()
    weight_bytes = sum(sizes[n] for n in {h for hs in holders.values() for h in hs})
    assert abs(weight_bytes - expected) <= 0.01 * expected
    assert weight_bytes == art.initializers.weight_bytes
    linear_fp32 = sum(params[k].numel() * 4 for k in linear)
    assert weight_bytes < sum(p.numel() * p.element_size() for p in params.values()) - 0.7 * linear_fp32
    # the same figure from the model's config alone (what `inspect --quantize` reports)
    meta = build_meta(load_config(ModelSource(folder)))
    assert abs(plan_accounting(meta, make_plan(plan_family(family), "heavy-reuse"), q)["total_bytes"] - expected) <= 0.01 * expected
    # a re-used weight: one DequantizeLinear whose output every slot running it reads
    reused = next(n for n in ints if re.search(r"\.(\d+)\.", n)[1] == "0")  # block 0: sub-block 0's q+k+v
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == reused]
    assert len(dq) == 1
    assert len([n for n in model.graph.node if dq[0].output[0] in n.input]) == 3  # slots 0, 2 and 4
    assert model.opset_import[0].version == 21


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("family", FAMILIES)
def test_onnx_runtime_computes_with_the_stored_integers(family, scheme, wide_models, exports):
    """The independent reference: the Hugging Face model, its kept linear weights replaced by the ONNX file's own
    integers x scales (numpy), run by the plain reference loop; ONNX Runtime must match it as closely as an
    unquantized export matches PyTorch. The stored weights must also be a faithful quantization of the originals."""
    q = SCHEMES[scheme]
    hf, _ = wide_models[family]
    enc, module, quantized, art = exports(family, scheme)
    weights = stored_weights(art.path, hf)  # by the Hugging Face model's names: the file's (graph.names)
    reference = copy.deepcopy(hf)
    original = dict(hf.named_parameters())
    loaded = dict(enc.model.named_parameters())  # the module's parameters, by the same names
    targets = dict(reference.named_parameters())
    changed = 0
    with torch.no_grad():
        for name, stored in weights.items():
            if id(loaded[name]) not in quantized.weights:  # stored as it was: the reference keeps its own value
                continue
            w, stored = original[name], torch.from_numpy(stored)
            step = w.abs().amax(dim=1, keepdim=True) / q.qmax if q.bits == 8 else \
                (w.reshape(w.shape[0], -1, 32).abs().amax(-1, keepdim=True) / q.qmax).expand(-1, -1, 32).reshape(w.shape)
            assert ((stored - w).abs() <= step / 2 + 1e-6).all(), name  # round to nearest on the right grid
            assert not torch.equal(stored, w)
            targets[name].copy_(stored)
            changed += 1
    assert changed == len(quantized.weights)
    skip, reuse = PLANS["heavy-reuse"]
    ids, mask = ids_and_mask()
    expected = reference_forward(plan_family(family), reference, helpers.NUM_BLOCKS, skip, reuse, ids, mask)
    with OrtRunner(art.path) as runner:
        got = runner.infer(complete_feed(ADAPTERS[plan_family(family)].inputs, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}))
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value.numpy(), atol=2e-5, rtol=0)
    # and the quantization is visible: the unquantized model differs by far more
    dense = reference_forward(plan_family(family), hf, helpers.NUM_BLOCKS, skip, reuse, ids, mask)["last_hidden_state"]
    assert np.abs(got["last_hidden_state"] - dense.numpy()).max() > 1e-3


def test_the_pytorch_reference_uses_the_dequantized_weights(exports, tmp_path):
    """quantize_module leaves the module computing with the quantized weights (the main job's parity reference):
    ONNX Runtime matches it to fp32 rounding, and a scale rewired to another weight's breaks the match."""
    _, module, _, art = exports("t5", "int4")
    ids, mask = ids_and_mask()
    feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    with TorchRunner(module, module.output_names) as t, OrtRunner(art.path) as o:
        ref, got = t.infer(feed), o.infer(feed)
    assert compare(("pytorch", ref), ("onnxruntime", got), feed["attention_mask"], {"*": DEFAULT_TOLERANCES["wiring"]})
    assert np.abs(ref["last_hidden_state"] - got["last_hidden_state"]).max() < 2e-5
    model = onnx.load(str(art.path))
    scales = [i for i in model.graph.initializer if i.name.endswith(SCALE_SUFFIX) and "wo" in i.name][0]
    values = onnx.numpy_helper.to_array(scales)
    scales.CopyFrom(onnx.numpy_helper.from_array(values[:, ::-1].copy(), scales.name))  # one weight's columns swapped
    onnx.save(model, str(tmp_path / "wrong.onnx"))  # the shared export stays as it was
    with OrtRunner(tmp_path / "wrong.onnx") as o:
        wrong = o.infer(feed)
    assert not compare(("pytorch", ref), ("onnxruntime", wrong), feed["attention_mask"], {"*": DEFAULT_TOLERANCES["wiring"]})


def test_the_invariant_catches_a_weight_stored_twice(exports):
    _, module, quantized, art = exports("bert", "int8")
    import onnx_ir as ir

    from skrr_export.quantize import quantized_weights_once

    model = ir.load(str(art.path))
    joined = next(n for n in model.graph.initializers if n.endswith(QUANTIZED_SUFFIX) and "+" in n)
    first = joined.split("+")[0] + QUANTIZED_SUFFIX  # the first of the joined weights, once more on its own
    model.graph.register_initializer(ir.Value(name=first, const_value=model.graph.initializers[joined].const_value))
    with pytest.raises(InvariantError, match="stored twice"):
        quantized_weights_once(model, module, quantized)


@pytest.mark.parametrize("args, message", [
    (["--quant-block", "64"], "--quant-block needs --quantize int4"),
    (["--quantize", "int8", "--quant-block", "64"], "applies to --quantize int4 only"),
    (["--quantize", "int4", "--quant-block", "48"], "must be one of 32, 64, 128"),
    (["--quantize", "int2"], "invalid choice"),
])
def test_bad_quantization_flags_are_one_line_exit_2(args, message, tmp_path, capsys):
    assert main(["--plan", str(ROOT / "recipes/minilm/plan.json"), "--out", str(tmp_path / "o"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and not (tmp_path / "o").exists()


def test_a_block_that_does_not_divide_an_input_width_is_refused(tiny_models, tmp_path, capsys):
    """The tiny models' feed-forward width is 48: block 32 does not divide it."""
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"format": "skrr-plan/1", "encoder": {"family": "t5", "num_blocks": 3}, "skip": [3]}))
    code = main(["--plan", str(plan), "--model", str(tiny_models["t5"][1]), "--random-ids", "--out", str(tmp_path / "o"),
                 "--quantize", "int4", "--quant-block", "32"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "does not divide the input width 48" in err and len(err.splitlines()) == 1
    assert "48 of encoder.block.0.layer.1.DenseReluDense.wo.weight; " in err  # the checkpoint's name, not kept.1.…
    with pytest.raises(ArgumentError):
        quantization("int4", 16)


def test_inspect_reports_t5_xxl_pixart_plan_under_1_7_gb_at_block_64(capsys):
    """The real T5-v1.1-XXL config and the PixArt-Sigma 41.9 % plan: int4 kept bytes, checked against a count made
    here from the model's dimensions (d_model 4096, d_ff 10240, 64 x 64 heads, vocab 32128, 13 attention and 14 FFN
    sub-blocks kept, bf16 scales and embedding)."""
    d, f, vocab = 4096, 10240, 32128
    for block, limit in ((64, 1.7e9), (128, 1.7e9), (32, 1.8e9)):
        assert main(["inspect", "--recipe", "pixart-sigma-41.9", "--quantize", "int4", "--quant-block", str(block), "--json"]) == 0
        info = json.loads(capsys.readouterr().out)["quantization"]
        linear = 13 * 4 * d * d + 14 * 3 * d * f
        scales = 13 * 4 * d * (d // block) + 14 * (2 * f * (d // block) + d * (f // block))
        small = vocab * d + 32 * 64 + (13 + 14 + 1) * d  # embedding, position table, norms
        expected = linear // 2 + 2 * scales + 2 * small
        assert info["total_bytes"] == expected and info["total_bytes"] <= limit
        assert info["quantized"]["count"] == 13 * 4 + 14 * 3
    assert main(["inspect", "--recipe", "pixart-sigma-41.9", "--quantize", "int4"]) == 0
    assert "block 64" in capsys.readouterr().out


def test_main_job_on_minilm_reports_what_was_quantized(tmp_path, capsys, minilm_path):
    """In this process, as the other CLI tests run it (a subprocess spent two thirds of its time importing torch)."""
    from safetensors import safe_open

    out = tmp_path / "out"
    assert main(["--plan", str(ROOT / "recipes/minilm/plan.json"), "--out", str(out), "--quantize", "int4",
                 "--quant-block", "128", "-q"]) == 0
    # model.onnx names what it stores as the checkpoint file does (its keys, the reference): a weight by its name,
    # integers and scales by the names of the weights they hold joined by '+'; besides, the exporter's constants
    # (val_17: no dot) and the split widths of a joined weight after it
    with safe_open(str(minilm_path / "model.safetensors"), "pt") as checkpoint:
        keys = set(checkpoint.keys())
    names = [i.name for i in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.initializer]
    held = [n.removesuffix(QUANTIZED_SUFFIX).removesuffix(SCALE_SUFFIX).split("+") for n in names
            if "." in n and not n.endswith(".widths")]
    assert len(names) == len(set(names)) and all(set(parts) <= keys for parts in held), sorted(names)
    assert sum(len(parts) for parts in held) > 26 * 2 and any(len(parts) == 3 for parts in held)  # joined q+k+v
    report = json.loads((out / "report.json").read_text())
    q = report["quantization"]
    assert (q["scheme"], q["block"]) == ("int4", 128)
    assert q["quantized"]["count"] == 26 and "embeddings.word_embeddings.weight" in q["not_quantized"]["roles"]
    assert not any(role.startswith(("kept.", "stem.", "head.")) for side in ("quantized", "not_quantized")
                   for role in q[side]["roles"])  # the checkpoint's names, as inspect names them
    unquantized = report["onnx"]["unique_parameter_bytes"]
    assert report["onnx"]["weights"]["bytes"] == q["total_bytes"] == unquantized - q["quantized"]["bytes_before"] + q["quantized"]["bytes"]
    assert q["quantized"]["bytes"] < 0.14 * q["quantized"]["bytes_before"]  # 4 bits of 32, and the scales
    assert all(p["passed"] for p in report["parity"])
    assert max(o["max_token_error"] for p in report["parity"] for o in p["outputs"]) < 1e-4
    md = (out / "report.md").read_text()
    assert "## Weight-only quantization" in md and md.startswith("# skrr-export report: bert, fp32, int4 weight-only (block 128)")
    assert f"(int4 weight-only; the quantized plan: {size(q['total_bytes'])}; unquantized in fp32 the kept parameters " \
           f"would be {size(unquantized)})" in md
    # inspect agrees with the file, reading its quantization from it; a contradicting --quantize is refused
    inspect = ["inspect", "--plan", str(ROOT / "recipes/minilm/plan.json"), "--onnx", str(out / "model.onnx"), "--json"]
    capsys.readouterr()
    assert main([*inspect, "--quantize", "int4", "--quant-block", "128"]) == 0
    told = json.loads(capsys.readouterr().out)
    assert told["exported"]["agrees"] and told["quantization"]["total_bytes"] == q["total_bytes"]
    assert told["quantization"]["quantized"]["roles"] == q["quantized"]["roles"]  # one set of names
    assert main(inspect) == 0
    untold = json.loads(capsys.readouterr().out)
    assert untold["exported"]["quantization"] == {"scheme": "int4", "block": 128} and untold["exported"]["agrees"]
    assert untold["quantization"]["total_bytes"] == q["total_bytes"]
    assert main([*inspect[:-1], "--quantize", "int8"]) == 2
    assert "holds int4 weight-only (block 128) weights; leave --quantize out" in capsys.readouterr().err


@needs_rtx
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("family", FAMILIES)
def test_rtx_engine_from_quantized_heavy_reuse_stores_the_quantized_bytes(family, scheme, exports, tmp_path):
    _, _, _, art = exports(family, scheme, "fp16")
    options = EngineOptions(batch=ShapeRange(1, 2, 4), sequence=ShapeRange(1, 16, 64))
    engine = build_engine(art.path, "trt-rtx", options, tmp_path / "engine.plan", {})
    total = engine.metadata["weights"]["total_bytes"]
    assert engine.metadata["onnx_weight_bytes"] == sum(onnx_initializer_sizes(art.path))
    assert engine.metadata["onnx_weight_bytes"] <= total <= engine.metadata["onnx_weight_bytes_aligned"] * WEIGHT_SLACK


@needs_rtx
def test_rtx_engine_of_minilm_int4_holds_the_quantized_bytes_within_2_percent(tmp_path):
    out = tmp_path / "out"
    assert main(["--plan", str(ROOT / "recipes/minilm/plan.json"), "--out", str(out), "--quantize", "int4",
                 "--engine", "trt-rtx", "--no-dense-distance", "-q"]) == 0
    engine = json.loads((out / "engine.json").read_text())
    onnx_bytes = sum(onnx_initializer_sizes(out / "model.onnx"))
    assert abs(engine["weights"]["total_bytes"] - onnx_bytes) <= 0.02 * onnx_bytes
    assert onnx_bytes < 0.7 * json.loads((out / "report.json").read_text())["onnx"]["unique_parameter_bytes"]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_quantized_export_runs_in_fp32_arithmetic_one_dequantize_per_reader(precision, exports):
    """The CPU parity path of half-precision exports: the fp32-arithmetic copy dequantizes each stored weight once
    per reading MatMul, after that MatMul's activation exists (not all up front), and matches PyTorch computing in
    fp32 with the same quantized weights; the PyTorch module holds no weight values between calls."""
    from skrr_export.apply import computed_in_fp32
    from skrr_export.graph.passes import run
    from skrr_export.graph.read import model_referencing_weights
    from skrr_export.runners import OrtFp32ArithmeticRunner

    _, module, quantized, art = exports("t5", "int4", precision)
    held = [p for n, p in module.named_parameters() if id(p) in quantized.weights]
    assert all(p.untyped_storage().nbytes() <= 4 for p in held)  # placeholders: one element each
    ids, mask = ids_and_mask()
    feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    with computed_in_fp32(module), TorchRunner(module, module.output_names) as t:
        ref = t.infer(feed)
    assert all(p.untyped_storage().nbytes() <= 4 for p in held)  # let go again after the run
    with OrtFp32ArithmeticRunner(art.path, precision) as o:
        got = o.infer(feed)
    assert compare(("pytorch", ref), ("onnxruntime", got), feed["attention_mask"], {"*": DEFAULT_TOLERANCES["wiring"]})
    assert np.abs(ref["last_hidden_state"] - got["last_hidden_state"]).max() < 5e-3  # outputs ~3; bf16 graph constants
    model = model_referencing_weights(art.path)
    stored = sum(1 for n in model.graph if n.op_type == "DequantizeLinear")
    run(model, "fp32-arithmetic")
    readers = [n for n in model.graph if n.op_type == "DequantizeLinear"]
    assert stored == 4 and len(readers) == 3 * stored  # q+k+v, o, wi_0+wi_1, wo; each read in three slots
    assert all(n.inputs[1].producer().op_type in ("Cast", "Reshape") for n in readers)  # scales wait for the activation

"""`skrr-export measure` rehearsed on the CPU for every form the recipes ship (issue 27, item 5).

    PYTHONPATH=/work/main python benchmarks/rehearse_forms.py --out /tmp/forms [--forms sd3-bf16,int32-fp32]

Each form is one `skrr-export measure` command (benchmarks/rehearsal.py: ONNX Runtime's CPU provider stands in for
CUDA, memory figures read 0) on the T5-v1.1-XXL config at 1/64 of its width and full depth (tiny_copy), random
weights, the PixArt-Sigma 41.9 % plan: the recipes' fixed sequences (SD3 256, PixArt 300, FLUX 512) in their bf16 and
in fp16, int32 inputs, a dynamic fp32 export, and the PixArt fp16 form with ort-cuda-fused (`--optimize ort`). Per
form it records what every backend measured, skipped (with the reason) or failed on (with the reason): `forms.json`
and `forms.md` in --out. No number in it is a GPU measurement. int8 / int4: the PixArt form quantized
(`measure --quantize`), in bf16 and, so that the CPU provider runs its DequantizeLinear, fp16.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu_run import _unstated, tiny_copy  # noqa: E402

MODEL = ROOT / "recipes" / "t5-v1_1-xxl"
PLAN = ROOT / "recipes" / "t5-v1_1-xxl" / "pixart-sigma-41.9.json"
# name -> the measure flags of that form (batch 1 and the fixed length, or 128 tokens where the sequence is dynamic)
FORMS = {
    "sd3-bf16": ["--precision", "bf16", "--fixed-sequence", "256"],
    "pixart-bf16": ["--precision", "bf16", "--fixed-sequence", "300"],
    "flux-bf16": ["--precision", "bf16", "--fixed-sequence", "512"],
    "sd3-fp16": ["--precision", "fp16", "--fixed-sequence", "256"],
    "pixart-fp16": ["--precision", "fp16", "--fixed-sequence", "300"],
    "flux-fp16": ["--precision", "fp16", "--fixed-sequence", "512"],
    "int32-fp32": ["--precision", "fp32", "--fixed-sequence", "256", "--input-dtype", "int32"],
    "dynamic-fp32": ["--precision", "fp32", "--seq", "128"],
    # --optimize ort as measure runs it: ort-cuda-fused, the fused copy of the export reading its data file
    "pixart-fp16-fused": ["--precision", "fp16", "--fixed-sequence", "300", "--backends", "torch,ort-cuda,ort-cuda-fused"],
    # weight-only quantized (measure --quantize): the plan variant's export stores integers and scales; block 32 divides
    # the narrow model's widths (64, 160)
    "pixart-bf16-int8": ["--precision", "bf16", "--fixed-sequence", "300", "--quantize", "int8"],
    "pixart-bf16-int4": ["--precision", "bf16", "--fixed-sequence", "300", "--quantize", "int4", "--quant-block", "32"],
    "pixart-fp16-int4": ["--precision", "fp16", "--fixed-sequence", "300", "--quantize", "int4", "--quant-block", "32"],
}


def run_form(name: str, model: Path, plan: Path, out: Path, iterations: int) -> dict[str, Any]:
    """One form's measure command; its results.json reduced to what each backend did."""
    import torch

    from skrr_export.cli import main

    torch.manual_seed(0)
    start = time.perf_counter()
    code = main(["measure", "--plan", str(plan), "--model", str(model), "--random-weights", "--out", str(out / name),
                 "--backends", "torch,ort-cuda", "--batch", "1", "--warmup", "1", "--iterations", str(iterations),
                 "-q", *FORMS[name]])  # a form's own --backends comes last and wins
    record: dict[str, Any] = {"form": name, "flags": FORMS[name], "exit_code": code,
                              "seconds": round(time.perf_counter() - start, 1)}
    if code != 0:
        return record
    r = json.loads((out / name / "results.json").read_text())
    return record | {
        "inputs": r["inputs"],
        "measured": [{"variant": x["variant"], "backend": x["backend"], "shape": f"{s['batch']}x{s['seq']}",
                      "median_ms": round(s["median_ms"], 2)} for x in r["runs"] for s in x["shapes"]],
        "parity": [{"variant": p["variant"], "backend": p["backend"], "passed": p["passed"]} for p in r["parity"]],
        "skipped": r["skipped"], "errors": r["errors"]}


def inputs(folder: Path, layers: int | None) -> tuple[Path, Path]:
    """The narrow config and the plan without its stated sparsity; with ``layers``, both cut to that depth."""
    model, plan = tiny_copy(MODEL, folder / "configs"), _unstated(PLAN, folder)
    if layers:
        config, data = json.loads((model / "config.json").read_text()), json.loads(plan.read_text())
        (model / "config.json").write_text(json.dumps(config | {"num_layers": layers}))
        reuse = {k: v for k, v in data.get("reuse", {}).items() if int(k) < 2 * layers and v < 2 * layers}
        plan.write_text(json.dumps(data | {"encoder": data["encoder"] | {"num_blocks": layers}, "reuse": reuse,
                                           "skip": [i for i in data["skip"] if i < 2 * layers]}))
    return model, plan


def render(records: list[dict[str, Any]]) -> str:
    lines = ["# measure on the shipped forms: CPU rehearsal (no number here is a GPU measurement)", "",
             "| form | inputs | exit | measured (variant/backend shape: median ms) | parity | skipped or failed |",
             "|---|---|---|---|---|---|"]
    for r in records:
        inputs = r.get("inputs", {})
        form = f"{inputs.get('dtypes', {}).get('input_ids', '?')}, seq {inputs.get('sequence', '?')}"
        measured = "; ".join(f"{m['variant']}/{m['backend']} {m['shape']}: {m['median_ms']}" for m in r.get("measured", []))
        parity = ", ".join(f"{p['backend']} {'ok' if p['passed'] else 'FAIL'}" for p in r.get("parity", [])) or "-"
        other = "; ".join([f"{s['backend']} {s['shape']}: {s['reason']}" for s in r.get("skipped", [])] +
                          [f"{e['backend']} ({e['variant']}): {e['error'][:90]}" for e in r.get("errors", [])]) or "-"
        lines.append(f"| {r['form']} | {form} | {r['exit_code']} | {measured} | {parity} | {other} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--forms", default=",".join(FORMS), help=f"comma-separated, of {', '.join(FORMS)}")
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--layers", type=int, help="fewer blocks than T5-v1.1-XXL's 24 (a quicker pass; the plan then "
                   "keeps only its slots that fit)")
    args = p.parse_args()
    import torch

    from benchmarks.rehearsal import rehearsal_on_cpu

    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    records = []
    with tempfile.TemporaryDirectory() as tmp, rehearsal_on_cpu():
        model, plan = inputs(Path(tmp), args.layers)
        for name in args.forms.split(","):
            records.append(run_form(name, model, plan, Path(tmp) / "runs", args.iterations))
            print(f"{name}: exit {records[-1]['exit_code']} in {records[-1]['seconds']} s", flush=True)
    (args.out / "forms.json").write_text(json.dumps(records, indent=2) + "\n")
    (args.out / "forms.md").write_text(render(records))
    print(render(records))
    return 0 if all(r["exit_code"] == 0 for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())

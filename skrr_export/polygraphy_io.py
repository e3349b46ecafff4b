"""polygraphy_io: the parity inputs and PyTorch's outputs on them, saved in Polygraphy's JSON formats beside the
artifacts, so that NVIDIA's own tool re-checks an export:

    polygraphy run model.onnx --onnxrt --load-inputs parity_inputs.json --load-outputs parity_reference.json

The only module that imports polygraphy (an optional dependency: ``pip install 'skrr-export[polygraphy]'``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Polygraphy compares numpy arrays and numpy has no bfloat16: bf16 exports are checked by skrr-export only.
PRECISIONS = ("fp32", "fp16")
INPUTS, REFERENCE = "parity_inputs.json", "parity_reference.json"


def save_parity_data(folder: Path, batches: Any, outputs: dict[str, dict[str, Any]], precision: str) -> dict[str, Any]:
    """Write the feeds of ``batches`` and PyTorch's ``outputs`` on them (label -> output name -> array), one
    Polygraphy iteration per batch; returns what the report says about it."""
    if precision not in PRECISIONS:
        return {"written": False, "reason": f"Polygraphy has no {precision} path (numpy has no bfloat16)"}
    try:
        from polygraphy.comparator import RunResults
        from polygraphy.comparator.struct import IterationResult
        from polygraphy.json import save_json
        from polygraphy.logger import G_LOGGER
    except ImportError:
        return {"written": False, "reason": "polygraphy is not installed (pip install 'skrr-export[polygraphy]')"}
    G_LOGGER.colors = False  # else its first message asks on stdout for the 'colored' package
    with G_LOGGER.verbosity(G_LOGGER.ERROR):  # the job's console output stays the job's
        save_json([dict(batch.feed) for batch in batches], str(folder / INPUTS), description="parity inputs")
        results = RunResults()
        results.append(("pytorch", [IterationResult(dict(outputs[b.label]), runner_name="pytorch") for b in batches]))
        results.save(str(folder / REFERENCE))
    return {"written": True, "inputs": INPUTS, "reference": REFERENCE, "iterations": [b.label for b in batches],
            "command": f"polygraphy run model.onnx --onnxrt --load-inputs {INPUTS} --load-outputs {REFERENCE}"}

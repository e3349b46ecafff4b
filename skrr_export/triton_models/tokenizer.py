"""Triton Python-backend model written by skrr-export: prompts in, the encoder's inputs out.

TEXT (BYTES, one UTF-8 prompt per batch row) is tokenized by the tokenizer in ``1/tokenizer`` (no network access)
as the recipe's pipeline tokenizes it: padded to ``max_length`` when the pipeline pads to a fixed length (SD3, FLUX,
PixArt-Sigma), else to the request's longest prompt; longer prompts are truncated, as diffusers truncates them. The
empty prompt is a prompt (the negative prompt of classifier-free guidance). Every output the config declares is
returned in its declared dtype; an input the tokenizer does not produce (BERT's token_type_ids) is zeros.
"""

import json
import os
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils


def parameters(config):
    return {key: value["string_value"] for key, value in config.get("parameters", {}).items()}


class TritonPythonModel:
    def initialize(self, args):
        os.environ["HF_HUB_OFFLINE"] = "1"  # the tokenizer is the folder beside this file, never a download
        from transformers import AutoTokenizer

        config = json.loads(args["model_config"])
        params = parameters(config)
        folder = Path(args["model_repository"]) / args["model_version"] / "tokenizer"
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        self.max_length = int(params["max_length"])
        self.padding = "max_length" if params["padding"] == "max_length" else "longest"
        self.outputs = [(o["name"], pb_utils.triton_string_to_numpy(o["data_type"])) for o in config["output"]]

    def execute(self, requests):
        return [self.tokenize(request) for request in requests]

    def tokenize(self, request):
        text = pb_utils.get_input_tensor_by_name(request, "TEXT").as_numpy()
        if text.size == 0 or text.ndim != 2 or text.shape[1] != 1:
            return error(f"TEXT must hold at least one prompt, one per row (shape [n, 1]); got shape {list(text.shape)}")
        try:
            prompts = [p.decode("utf-8") if isinstance(p, bytes) else str(p) for p in text[:, 0]]
        except UnicodeDecodeError as exc:
            return error(f"TEXT must be UTF-8: {exc}")
        encoded = self.tokenizer(prompts, padding=self.padding, max_length=self.max_length, truncation=True,
                                 return_tensors="np")
        ids = np.asarray(encoded["input_ids"])
        tensors = [pb_utils.Tensor(name, np.ascontiguousarray(np.asarray(encoded[name]) if name in encoded
                                                              else np.zeros_like(ids)).astype(dtype))
                   for name, dtype in self.outputs]
        return pb_utils.InferenceResponse(output_tensors=tensors)


def error(message):
    """A bad request: Triton's INVALID_ARG (HTTP 400), the model keeps serving."""
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    failure = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
    return pb_utils.InferenceResponse(output_tensors=[], error=failure)

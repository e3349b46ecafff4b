"""Triton Python-backend model written by skrr-export: the exported ONNX (``1/model.onnx``) run with ONNX Runtime.

ONNX Runtime's CUDA provider on the instance's GPU when the instance is a GPU one and onnxruntime-gpu is installed
(TF32 off, as the parity checks run it), else its CPU provider. A bf16 export has no CPU kernels: it is refused on
CPU when the model loads. Requests the dynamic batcher gathers are run together where their shapes agree (one
sequence length) and split again; a bf16 output is widened to FP32 (exactly: every value is a bf16 value).
"""

import ctypes
import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils


def parameters(config):
    return {key: value["string_value"] for key, value in config.get("parameters", {}).items()}


def as_float32(array):
    """An ONNX Runtime bf16 output as float32: ml_dtypes.bfloat16 widens; raw 16-bit words are shifted into place."""
    array = np.asarray(array)
    if array.dtype == np.uint16:
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array.astype(np.float32, copy=False)


def bf16_words(value):
    """A bf16 OrtValue in CPU memory as its 16-bit words (ONNX Runtime's Python API has no numpy type for bf16)."""
    shape = tuple(value.shape())
    count = int(np.prod(shape))
    if count == 0:
        return np.zeros(shape, dtype=np.uint16)
    words = np.ctypeslib.as_array(ctypes.cast(value.data_ptr(), ctypes.POINTER(ctypes.c_uint16)), shape=(count,))
    return words.copy().reshape(shape)


class TritonPythonModel:
    def initialize(self, args):
        import onnxruntime as ort

        config = json.loads(args["model_config"])
        precision = parameters(config).get("precision", "fp32")
        path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        gpu = args["model_instance_kind"] == "GPU" and "CUDAExecutionProvider" in ort.get_available_providers()
        if precision == "bf16" and not gpu:
            raise pb_utils.TritonModelException(
                f"{config['name']}: model.onnx is bf16 and ONNX Runtime's CPU provider has no bf16 kernels; serve it on "
                "a GPU instance with onnxruntime-gpu, or export fp32 / fp16 for CPU serving")
        providers = ["CPUExecutionProvider"]
        if gpu:
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": int(args["model_instance_device_id"]), "use_tf32": 0}))
        self.session = ort.InferenceSession(str(path), providers=providers)
        self.inputs = [(i["name"], pb_utils.triton_string_to_numpy(i["data_type"])) for i in config["input"]]
        self.outputs = [(o["name"], pb_utils.triton_string_to_numpy(o["data_type"])) for o in config["output"]]
        self.bf16 = any(o.type == "tensor(bfloat16)" for o in self.session.get_outputs())

    def execute(self, requests):
        feeds = [{name: pb_utils.get_input_tensor_by_name(r, name).as_numpy() for name, _ in self.inputs} for r in requests]
        responses = [None] * len(requests)
        for group in groups(feeds, [name for name, _ in self.inputs]):
            try:
                outputs = self.run([feeds[i] for i in group])
            except Exception:  # a bad request (an id out of the vocabulary) fails alone: the others run without it
                for i in group:
                    responses[i] = self.run_alone(feeds[i])
                continue
            for i, out in zip(group, outputs):
                responses[i] = pb_utils.InferenceResponse(output_tensors=out)
        return responses

    def run_alone(self, feed):
        try:
            return pb_utils.InferenceResponse(output_tensors=self.run([feed])[0])
        except Exception as exc:
            return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(f"{type(exc).__name__}: {exc}"))

    def run(self, feeds):
        """One ONNX Runtime run for requests of one shape; each request's outputs as Triton tensors."""
        sizes = [len(f[self.inputs[0][0]]) for f in feeds]
        batch = {name: np.concatenate([f[name] for f in feeds]).astype(dtype, copy=False) for name, dtype in self.inputs}
        results = self.run_bound(batch) if self.bf16 else self.session.run([name for name, _ in self.outputs], batch)
        bounds = np.cumsum([0] + sizes)
        return [[pb_utils.Tensor(name, np.ascontiguousarray(as_float32(r[lo:hi]) if dtype == np.float32 else
                                                            np.asarray(r[lo:hi]).astype(dtype)))
                 for (name, dtype), r in zip(self.outputs, results)] for lo, hi in zip(bounds[:-1], bounds[1:])]

    def run_bound(self, batch):
        """The outputs bound to CPU memory (ONNX Runtime copies them off the GPU), bf16 ones read as 16-bit words."""
        binding = self.session.io_binding()
        for name, value in batch.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name, _ in self.outputs:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        return [bf16_words(v) if v.data_type() == "tensor(bfloat16)" else v.numpy() for v in binding.get_outputs()]


def groups(feeds, names):
    """Request indices by the shapes of their inputs past the batch axis (only those can be one batch)."""
    by_shape = {}
    for i, feed in enumerate(feeds):
        by_shape.setdefault(tuple(feed[n].shape[1:] for n in names), []).append(i)
    return list(by_shape.values())

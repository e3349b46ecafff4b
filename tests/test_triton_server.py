"""A real Triton Inference Server (the tritonserver of nvidia-pytriton 0.7.0: Triton 2.51, Python backend) serving
the repositories ``skrr-export triton --backend python --text`` writes, for the real MiniLM (its recipe's plan) and a
tiny T5 with a Skrr plan (fixed sequence, no mask: SD3's call). Text goes in over HTTP and gRPC; the embeddings must
equal the exported ONNX run directly on the same tokenized text. One server for the module, started with
``skrr-export serve`` and stopped by its own process ids, also when a test fails."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from skrr_export.cli import main

from .test_cli import write_plan

http = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is not installed")
grpc = pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is not installed")
from tritonclient.utils import InferenceServerException  # noqa: E402

from skrr_export.triton_server import INSTALL, free_port, python_env, server_files  # noqa: E402

try:
    server_files()
except Exception as exc:  # CI installs the wheel (.ci/run): there a missing binary is a failure, not a skip
    if os.environ.get("CI"):
        raise
    pytest.skip(f"no tritonserver here ({exc}); {INSTALL}", allow_module_level=True)

T5_LENGTH = 16
TOKEN_ERROR = 1e-6
PROMPTS = ["A red fox curled up asleep in fresh snow at the edge of a pine forest.", "",
           "Macro photo of a dew drop on a spider web.", "an astronaut riding a horse " * 80]  # the last is truncated
REQUEST_TIMEOUT = 60.0  # seconds per request: every loop below is bounded in count and in time


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tiny_models) -> dict[str, Path]:
    from .test_tokenizer_lookup import write_tokenizer

    tmp = tmp_path_factory.mktemp("triton_exports")
    assert main(["--recipe", "minilm", "--out", str(tmp / "minilm"), "--no-dense-distance", "-q"]) == 0
    model, folder = tiny_models["t5"]
    tokenizer = write_tokenizer(tmp / "t5_tokenizer", model.config.vocab_size)
    plan = write_plan(tmp, {"format": "skrr-plan/1", "encoder": {"family": "t5", "num_blocks": 3}, "skip": [2, 3],
                            "reuse": {"3": 1}})
    assert main(["--plan", str(plan), "--model", str(folder), "--tokenizer", str(tokenizer), "--fixed-sequence",
                 str(T5_LENGTH), "--no-attention-mask", "--no-dense-distance", "--out", str(tmp / "t5"), "-q"]) == 0
    return {"minilm": tmp / "minilm", "t5": tmp / "t5"}


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Path:
    return python_env(tmp_path_factory.mktemp("triton_env") / "env")  # numpy 1.x for the 2.51 stub, else this Python's


@pytest.fixture(scope="module")
def repo(tmp_path_factory, exports, env) -> Path:
    tmp = tmp_path_factory.mktemp("triton_repo")
    for name, folder in exports.items():
        assert main(["triton", "--artifacts", str(folder), "--repo", str(tmp / "repo"), "--name", name, "--backend",
                     "python", "--text", "--python-env", str(env), "-q"]) == 0
    return tmp / "repo"


def _wait_for_line(path: Path, process: subprocess.Popen, text: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = [line for line in path.read_text().splitlines() if text in line]
        if lines:
            return lines[0]
        if process.poll() is not None:
            pytest.fail(f"skrr-export serve exited with {process.returncode}: {path.read_text()[-2000:]}")
        time.sleep(0.2)
    pytest.fail(f"skrr-export serve printed no '{text}' within {timeout:.0f} s: {path.read_text()[-2000:]}")


def _stop(pid: int, timeout: float = 30.0) -> None:
    """SIGTERM to our own process that is not our child (a child is waited on), SIGKILL after ``timeout``."""
    try:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            os.kill(pid, 0)
            time.sleep(0.2)
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def server(tmp_path_factory, repo):
    """``skrr-export serve REPO`` on free ports; the module's tests share it. Teardown stops the serve process and,
    should it have left its tritonserver behind, that server's own pid."""
    work = tmp_path_factory.mktemp("triton_work")
    ports = free_port(), free_port()
    out = work / "serve.out"
    with open(out, "w") as sink:
        process = subprocess.Popen([sys.executable, "-m", "skrr_export.cli", "serve", str(repo), "--http-port",
                                    str(ports[0]), "--grpc-port", str(ports[1]), "--work", str(work)],
                                   stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    tritonserver = None
    try:
        line = _wait_for_line(out, process, "serving ", 300)
        tritonserver = int(line.split("tritonserver pid ")[1].split(";")[0])
        assert f"http://127.0.0.1:{ports[0]}" in line and "t5_text (READY)" in line and "minilm_text (READY)" in line
        yield {"http": f"127.0.0.1:{ports[0]}", "grpc": f"127.0.0.1:{ports[1]}", "log": work / "tritonserver.log"}
    finally:
        # our child: waited on, not polled with kill(pid, 0), which a zombie answers until the 30 s run out
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        if tritonserver is not None:
            _stop(tritonserver)


# ----------------------------------------------------------------------------------------------- references


class Reference:
    """The exported ONNX run directly with ONNX Runtime on the prompts tokenized as the pipeline tokenizes them."""

    def __init__(self, folder: Path, fixed: int | None):
        import json

        import onnxruntime as ort
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(json.loads((folder / "report.json").read_text())["model"]["tokenizer"])
        self.session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
        self.fixed = fixed

    def tokens(self, prompts: list[str]) -> dict[str, np.ndarray]:
        pad = {"padding": "max_length", "max_length": self.fixed} if self.fixed else {"padding": "longest", "max_length": 256}
        enc = self.tokenizer(prompts, truncation=True, return_tensors="np", **pad)
        names = [i.name for i in self.session.get_inputs()]
        return {n: np.asarray(enc[n]) if n in enc else np.zeros_like(enc["input_ids"]) for n in names}

    def __call__(self, prompts: list[str]) -> np.ndarray:
        return self.session.run(None, self.tokens(prompts))[0]


@pytest.fixture(scope="module")
def references(exports) -> dict[str, Reference]:
    return {"minilm": Reference(exports["minilm"], None), "t5": Reference(exports["t5"], T5_LENGTH)}


def token_error(test: np.ndarray, ref: np.ndarray) -> float:
    assert test.shape == ref.shape, (test.shape, ref.shape)
    norms = np.linalg.norm(ref, axis=-1)
    return float(np.max(np.linalg.norm(test - ref, axis=-1) / np.maximum(norms, 1e-12)))


def text_input(module, prompts: list[str], dtype: str = "BYTES", shape: list[int] | None = None):
    data = np.array([[p.encode()] for p in prompts], dtype=object).reshape(len(prompts), 1)
    tensor = module.InferInput("TEXT", shape or list(data.shape), dtype)
    tensor.set_data_from_numpy(data)
    return tensor


def infer(module, url: str, model: str, prompts: list[str]) -> np.ndarray:
    if module is http:
        client = http.InferenceServerClient(url, connection_timeout=REQUEST_TIMEOUT, network_timeout=REQUEST_TIMEOUT)
        return client.infer(f"{model}_text", [text_input(http, prompts)]).as_numpy("last_hidden_state")
    client = grpc.InferenceServerClient(url)
    return client.infer(f"{model}_text", [text_input(grpc, prompts)], client_timeout=REQUEST_TIMEOUT).as_numpy("last_hidden_state")


# ----------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("model", ["minilm", "t5"])
def test_text_in_embeddings_out_equal_the_onnx_run_directly(server, references, model):
    """Each prompt alone (the empty one included) and all of them in one request, over HTTP and gRPC: within
    token error 1e-6 of ONNX Runtime on the same tokens; a prompt longer than the pipeline's length is truncated."""
    ref = references[model]
    for module, url in ((http, server["http"]), (grpc, server["grpc"])):
        for prompt in PROMPTS:
            got = infer(module, url, model, [prompt])
            assert token_error(got, ref([prompt])) <= TOKEN_ERROR, (module.__name__, model, prompt[:40])
        together = infer(module, url, model, PROMPTS)
        assert token_error(together, ref(PROMPTS)) <= TOKEN_ERROR
    longest = infer(http, server["http"], model, PROMPTS[-1:]).shape[1]
    assert longest == (T5_LENGTH if model == "t5" else 256), "the long prompt is truncated at the pipeline's length"
    if model == "t5":  # no mask, fixed length: the empty prompt is padded to 16 like every other, and differs from them
        empty = infer(http, server["http"], model, [""])
        assert empty.shape == (1, T5_LENGTH, 32) and token_error(empty, ref([PROMPTS[0]])) > 1e-3


def test_dynamic_batching_answers_equal_single_requests(server, references):
    """64 requests from 8 client threads, half over gRPC: each answer within token error 1e-6 of its single-request
    answer, and the server did batch them (MiniLM: fewer encoder executions than requests; 32 ran in 11 here)."""
    # prompts of one token count (9 for MiniLM): different answers the batcher may put in one batch, so a request
    # answered with another's rows would be seen
    alike = ["a red fox asleep in the snow", "a blue cat awake on the grass", "an old man reading by the window",
             "a green frog sitting on a leaf"]
    assert len({len(references["minilm"].tokens([p])["input_ids"][0]) for p in alike}) == 1
    jobs = [(("t5", "minilm")[i % 2], alike[(i // 2) % 4]) for i in range(64)]
    single = {job: infer(http, server["http"], job[0], [job[1]]) for job in set(jobs)}
    before = {m: _counts(server["http"], m) for m in ("t5", "minilm")}
    deadline = time.monotonic() + 300

    def one(i: int):  # every other pair of requests over gRPC
        assert time.monotonic() < deadline, "the 64 requests took over 300 s"
        module, url = (http, server["http"]) if i % 4 < 2 else (grpc, server["grpc"])
        return infer(module, url, jobs[i][0], [jobs[i][1]])

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(len(jobs)), timeout=300))
    for job, answer in zip(jobs, answers):
        assert token_error(answer, single[job]) <= TOKEN_ERROR, job
    runs = {m: tuple(a - b for a, b in zip(_counts(server["http"], m), before[m])) for m in before}
    print(f"encoder (requests, executions): {runs}")
    assert runs["t5"][0] == runs["minilm"][0] == 32
    assert runs["minilm"][1] < 32, "the dynamic batcher ran no two requests together"


def _counts(url: str, model: str) -> tuple[int, int]:
    stats = http.InferenceServerClient(url).get_inference_statistics(model)["model_stats"][0]
    return int(stats["inference_count"]), int(stats["execution_count"])


def test_bad_requests_get_a_triton_error_and_the_server_keeps_serving(server, references):
    bad_utf8 = http.InferInput("TEXT", [1, 1], "BYTES")
    bad_utf8.set_data_from_numpy(np.array([[b"\xff\xfe"]], dtype=object))
    wrong_dtype = http.InferInput("TEXT", [1, 1], "INT64")
    wrong_dtype.set_data_from_numpy(np.zeros((1, 1), dtype=np.int64))
    wrong_shape = http.InferInput("TEXT", [1, 2], "BYTES")
    wrong_shape.set_data_from_numpy(np.array([[b"a", b"b"]], dtype=object))
    empty_batch = http.InferInput("TEXT", [0, 1], "BYTES")
    empty_batch.set_data_from_numpy(np.zeros((0, 1), dtype=object))
    too_big = text_input(http, ["a"] * 9)
    client = http.InferenceServerClient(server["http"], network_timeout=REQUEST_TIMEOUT)
    for name, tensor in [("no element", empty_batch), ("wrong dtype", wrong_dtype), ("wrong shape", wrong_shape),
                         ("over max_batch_size", too_big), ("not UTF-8", bad_utf8)]:
        with pytest.raises(InferenceServerException):
            client.infer("minilm_text", [tensor])
        assert client.is_server_ready(), name
    g = grpc.InferenceServerClient(server["grpc"])
    for shape, dtype, data in (([1, 1], "INT64", np.zeros((1, 1), dtype=np.int64)),
                               ([1, 2], "BYTES", np.array([[b"a", b"b"]], dtype=object))):
        tensor = grpc.InferInput("TEXT", shape, dtype)
        tensor.set_data_from_numpy(data)
        with pytest.raises(InferenceServerException, match="expects 'BYTES'|unexpected shape"):  # the server's words
            g.infer("t5_text", [tensor], client_timeout=REQUEST_TIMEOUT)
        assert g.is_server_ready()
    ids = http.InferInput("input_ids", [1, T5_LENGTH], "INT64")
    ids.set_data_from_numpy(np.full((1, T5_LENGTH), 10**6, dtype=np.int64))  # beyond the vocabulary: ONNX Runtime fails
    with pytest.raises(InferenceServerException, match="out of"):
        client.infer("t5", [ids])
    assert token_error(infer(grpc, server["grpc"], "t5", [""]), references["t5"]([""])) <= TOKEN_ERROR
    assert token_error(infer(http, server["http"], "minilm", [""]), references["minilm"]([""])) <= TOKEN_ERROR


def test_a_model_that_fails_to_load_stops_the_server_with_its_error(tmp_path, env):
    """The server's own error line names the model and the exception; the server is gone afterwards."""
    from skrr_export.triton_server import ServerError, TritonServer

    model = tmp_path / "repo" / "broken"
    (model / "1").mkdir(parents=True)
    (model / "1" / "model.py").write_text("class TritonPythonModel:\n    def initialize(self, args):\n"
                                          "        raise RuntimeError('planted: cannot load')\n")
    (model / "config.pbtxt").write_text(f'name: "broken"\nbackend: "python"\nmax_batch_size: 0\n'
                                        'input [ { name: "X" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
                                        'output [ { name: "Y" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
                                        f'parameters: {{ key: "EXECUTION_ENV_PATH" value: {{ string_value: "{env}" }} }}\n')
    server = TritonServer(tmp_path / "repo", tmp_path / "work")
    try:
        with pytest.raises(ServerError, match="planted: cannot load") as info:
            server.start(ready_timeout=120)
        assert "broken" in str(info.value) and "\n" not in str(info.value)
        assert server.process is None or server.process.poll() is not None
    finally:
        server.stop()

"""The benchmark's parts that run without building llama-server: the HTTP stream reader and clients
(llama-server's, the HTTP front's, llama-cpp-python's server's), the servers' arguments, the build flags
derived from how the llama.cpp environment was built, and the report's pairs of paths."""

from __future__ import annotations

import json
import platform
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import pytest

from bench.common import rotated
from bench.http_stream import FrontClient, LlamaServerClient, StreamError, length_finish_tokens, parse_sse
from bench.llama_cpp_python_server import completions_client, server_environ
from bench.llama_cpp_python_server import reuse_reason as env_reuse_reason
from bench.llama_cpp_python_server import server_command as lcp_server_command
from bench.llama_server import server_command
from bench.report import single_figures
from bench.llama_server_build import (
    LLAMA_CPP_PYTHON_FLAGS,
    ServerBuildError,
    build_settings,
    ensure_llama_server,
    ggml_digest,
    ggml_package,
    reuse_reason,
)
from supervisor.node.builds import NO_AMX
from tests.conftest import shared_settings

# A stream as llama-server's /completion writes it (stream: true), trimmed to the fields read.
RECORDED = [
    b'data: {"index":0,"content":" Paris","tokens":[9079],"stop":false,"id_slot":0}\n',
    b"\n",
    b": keep-alive comment\n",
    b"\n",
    b'data: {"index":0,"content":".","tokens":[236761],"stop":false,"id_slot":0}\n',
    b"\n",
    b'data: {"index":0,"content":"","tokens":[],"stop":true,"tokens_predicted":2,"tokens_evaluated":6,"stop_type":"limit","timings":{"predicted_n":2}}\n',
    b"\n",
    b'data: {"content":"never read"}\n',
]


def test_sse_stream_yields_each_data_payload_and_ends_at_the_stop_chunk() -> None:
    chunks = list(parse_sse(RECORDED))
    assert [c["content"] for c in chunks] == [" Paris", ".", ""]
    assert chunks[-1]["stop"] is True and chunks[-1]["tokens_predicted"] == 2


def test_sse_stream_ends_at_done() -> None:
    lines = [
        b'data: {"choices":[{"text":"a"}]}\n',
        b"\n",
        b"data: [DONE]\n",
        b"\n",
        b'data: {"choices":[{"text":"never"}]}\n',
    ]
    assert [c["choices"][0]["text"] for c in parse_sse(lines)] == ["a"]


def test_sse_error_payload_raises_with_the_servers_message() -> None:
    with pytest.raises(StreamError, match="context size exceeded"):
        list(parse_sse([b'data: {"error":{"code":400,"message":"context size exceeded"}}\n']))


class _StubServer(BaseHTTPRequestHandler):
    """Answers as llama-server's /completion and the HTTP front's /v1/completions do: chunked SSE, one
    token per chunk, then llama-server's final chunk, or the front's finish, usage and [DONE].  Without
    ``stream_options`` it answers as llama-cpp-python's server: no usage chunk, and a prompt starting
    "eos" ends early, finishing with "stop" as at an end-of-generation token."""

    protocol_version = "HTTP/1.1"  # chunked transfer encoding, as llama-server streams
    bodies: list[dict[str, Any]] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.bodies.append(body)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if self.path == "/completion":
            n = body["n_predict"]
            events: list[Any] = [{"content": f"w{i} ", "stop": False} for i in range(n)]
            events.append({"content": "", "stop": True, "tokens_predicted": n, "timings": {"predicted_n": n}})
        else:
            early = body["prompt"].startswith("eos")
            n = body["max_tokens"] - 1 if early else body["max_tokens"]
            events = [{"choices": [{"index": 0, "text": f"w{i} ", "finish_reason": None}]} for i in range(n)]
            events.append({"choices": [{"index": 0, "text": "", "finish_reason": "stop" if early else "length"}]})
            events += (
                [{"choices": [], "usage": {"completion_tokens": n}}, "[DONE]"]
                if "stream_options" in body
                else ["[DONE]"]
            )
        for event in events:
            data = f"data: {event if event == '[DONE]' else json.dumps(event)}\n\n".encode()
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.write(b"0\r\n\r\n")

    def log_message(self, *_args: Any) -> None:
        pass


@pytest.fixture
def stub_server() -> Iterator[ThreadingHTTPServer]:
    _StubServer.bodies = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StubServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_llama_server_client_reads_a_chunked_stream_and_counts_what_the_server_reports(
    stub_server: ThreadingHTTPServer,
) -> None:
    client = LlamaServerClient(stub_server.server_address[1])
    first = client.run("The capital of France is", 5)
    second = client.run("Once upon a time", 3)
    assert first["text"] == "w0 w1 w2 w3 w4 " and first["tokens"] == 5
    assert second["tokens"] == 3 and second["server_timings"] == {"predicted_n": 3}
    assert 0 < first["ttft_s"] <= first["total_s"]
    asked = _StubServer.bodies[0]
    assert asked["stream"] is True and asked["cache_prompt"] is False and asked["ignore_eos"] is True
    assert asked["temperature"] == 0.0 and asked["n_predict"] == 5


def test_front_client_reads_the_openai_stream_and_counts_its_usage(stub_server: ThreadingHTTPServer) -> None:
    run = FrontClient(stub_server.server_address[1], "llama4").run("The capital of France is", 4)
    assert run["text"] == "w0 w1 w2 w3 " and run["tokens"] == 4
    asked = _StubServer.bodies[0]
    assert asked["model"] == "llama4" and asked["stream"] is True and asked["stream_options"] == {"include_usage": True}
    assert asked["ignore_eos"] is True and asked["temperature"] == 0.0 and asked["max_tokens"] == 4


def test_llama_cpp_python_server_client_asks_greedy_without_penalty_and_counts_a_stream_that_ran_its_length(
    stub_server: ThreadingHTTPServer,
) -> None:
    run = completions_client(stub_server.server_address[1], "gemma").run("The capital of France is", 5)
    assert run["text"] == "w0 w1 w2 w3 w4 " and run["tokens"] == 5
    asked = _StubServer.bodies[0]
    assert asked["model"] == "gemma" and asked["stream"] is True and asked["max_tokens"] == 5
    assert asked["temperature"] == 0.0 and asked["repeat_penalty"] == 1.0  # the server's own default is 1.1
    assert "ignore_eos" not in asked and "stream_options" not in asked  # it takes neither


def test_a_stream_that_stopped_before_its_length_is_refused_rather_than_counted(
    stub_server: ThreadingHTTPServer,
) -> None:
    with pytest.raises(StreamError, match="fewer than 5 tokens"):
        completions_client(stub_server.server_address[1], "gemma").run("eos soon", 5)
    with pytest.raises(StreamError, match="no finish_reason"):
        length_finish_tokens([{"choices": [{"text": "a", "finish_reason": None}]}], 1)


def _arguments(command: list[str]) -> dict[str, str]:
    """Each option of a command line with its value (a flag without one maps to "")."""
    found, options = {}, command[1:]
    for i, item in enumerate(options):
        if item.startswith("--"):
            following = options[i + 1] if i + 1 < len(options) else "--"
            found[item] = "" if following.startswith("--") else following
    return found


def test_server_computes_with_what_the_worker_has_in_force_and_the_context_per_slot() -> None:
    settings = {
        "n_threads": 2,
        "n_threads_batch": 3,
        "n_batch": 2048,
        "n_ubatch": 256,
        "flash_attn": True,
        "n_gpu_layers": -1,
    }
    arguments = _arguments(server_command(Path("/x/llama-server"), Path("/m.gguf"), 8080, 2048, settings, 4))
    assert arguments["--ctx-size"] == "8192" and arguments["--parallel"] == "4"  # llama-server divides -c among slots
    assert "--no-kv-unified" in arguments  # each slot its own cells, as the worker's sequences
    assert (arguments["--threads"], arguments["--threads-batch"]) == ("2", "3")
    assert (arguments["--batch-size"], arguments["--ubatch-size"]) == ("2048", "256")
    assert arguments["--n-gpu-layers"] == "all" and arguments["--flash-attn"] == "on"
    cpu = _arguments(
        server_command(
            Path("/x/llama-server"),
            Path("/m.gguf"),
            8080,
            2048,
            {**settings, "flash_attn": False, "n_gpu_layers": 0},
            1,
        )
    )
    assert cpu["--n-gpu-layers"] == "0" and cpu["--flash-attn"] == "off" and cpu["--ctx-size"] == "2048"
    assert "--swa-full" in cpu  # llama.cpp's library default, which the worker's context has


def test_llama_cpp_python_server_loads_the_model_as_the_worker_and_the_library_do() -> None:
    settings = {
        "n_threads": 2,
        "n_threads_batch": 3,
        "n_batch": 1024,
        "n_ubatch": 256,
        "flash_attn": True,
        "n_gpu_layers": -1,
    }
    command = lcp_server_command(Path("/b/bin/python"), Path("/m.gguf"), "m", 8080, 2048, settings)
    assert command[:3] == ["/b/bin/python", "-m", "llama_cpp.server"]
    arguments = _arguments(command)
    assert (arguments["--model"], arguments["--model_alias"], arguments["--host"], arguments["--port"]) == (
        "/m.gguf",
        "m",
        "127.0.0.1",
        "8080",
    )
    assert (arguments["--n_ctx"], arguments["--n_threads"], arguments["--n_threads_batch"]) == ("2048", "2", "3")
    assert (
        arguments["--n_batch"],
        arguments["--n_ubatch"],
        arguments["--flash_attn"],
        arguments["--n_gpu_layers"],
    ) == ("1024", "256", "true", "-1")
    # The server's own defaults that the library's (and the baseline's) are not.
    assert (arguments["--logits_all"], arguments["--use_mlock"], arguments["--verbose"]) == ("false", "false", "false")


def test_llama_cpp_python_server_reads_no_setting_from_the_benchs_environment() -> None:
    environ = {
        "PATH": "/usr/bin",
        "MODEL": "/other.gguf",
        "n_ctx": "8",
        "HOST": "0.0.0.0",
        "PORT": "1",
        "CONFIG_FILE": "x",
        "HOME": "/root",
    }
    assert server_environ(["model", "n_ctx", "host", "port"], environ) == {"PATH": "/usr/bin", "HOME": "/root"}


def test_the_servers_environment_is_reused_only_as_it_was_made(tmp_path: Path) -> None:
    wanted = {"version": "0.3.36", "record_sha256": "abc", "pins": ["numpy==2.3.5"]}
    assert env_reuse_reason(tmp_path, wanted) == "not made yet"
    (tmp_path / "bench-env.json").write_text(json.dumps({**wanted, "packages": {"fastapi": "1"}}))
    assert env_reuse_reason(tmp_path, wanted) == "its interpreter is missing"
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python").write_text("")
    assert env_reuse_reason(tmp_path, wanted) is None
    assert env_reuse_reason(tmp_path, {**wanted, "record_sha256": "def"}) == "made with another record_sha256"
    assert env_reuse_reason(tmp_path, {**wanted, "version": "0.3.37", "pins": []}) == "made with another version, pins"


def _runs(tokens_per_s: float, ttft_s: float, text: str = "same") -> list[dict]:
    return [{"text": text, "tokens": 10, "total_s": 10 / tokens_per_s, "ttft_s": ttft_s}] * 3


def test_the_report_sets_the_http_front_against_llama_cpp_pythons_server_when_it_ran() -> None:
    single = {
        "direct": _runs(50, 0.020),
        "daemon": _runs(50, 0.020),
        "http-front": _runs(40, 0.025),
        "llama-server": _runs(50, 0.021),
    }
    without = single_figures(single)
    assert not any("llama-cpp-python-server" in key for key in without["ratios"])
    figures = single_figures({**single, "llama-cpp-python-server": _runs(20, 0.030, "other")})
    assert figures["ratios"]["http-front/llama-cpp-python-server"] == pytest.approx(2.0)
    assert figures["paired_ttft_ms"]["http-front - llama-cpp-python-server"] == pytest.approx(-5.0)
    assert figures["paired_ttft_ms"]["llama-cpp-python-server - direct"] == pytest.approx(10.0)
    assert figures["paths"]["llama-cpp-python-server"]["same_text_as_direct"] is False


def installed_ggml(root: Path) -> Path:
    """An environment's site-packages as llama-cpp-python's wheel leaves them: ggml's CMake package, headers, libs."""
    site = root / "lib" / "python3.12" / "site-packages"
    package = site / "lib" / "cmake" / "ggml"
    package.mkdir(parents=True)
    (package / "ggml-config.cmake").write_text("set(GGML_CUDA OFF)\n")
    (site / "include").mkdir()
    (site / "include" / "ggml.h").write_text("/* ggml */\n")
    (site / "lib" / "libggml-base.so.0.25.3").write_bytes(b"\x7fELF base")
    (site / "lib" / "libggml-base.so").symlink_to("libggml-base.so.0.25.3")
    return package


def test_cpu_build_flags_are_llama_cpp_pythons_own_and_the_projects_cflags_on_the_installed_ggml(tmp_path) -> None:
    ggml = installed_ggml(tmp_path)
    wanted = build_settings({"cuda": False, "cmake_args": ""}, ggml, environ={"PATH": "/usr/bin"})
    assert wanted["cuda"] is False
    assert list(LLAMA_CPP_PYTHON_FLAGS) == wanted["cmake_flags"][: len(LLAMA_CPP_PYTHON_FLAGS)]
    assert "-DLLAMA_USE_SYSTEM_GGML=ON" in wanted["cmake_flags"] and f"-Dggml_DIR={ggml}" in wanted["cmake_flags"]
    assert not any("GGML_CUDA" in flag for flag in wanted["cmake_flags"])
    assert wanted["ggml"] == ggml_digest(ggml)
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert NO_AMX in wanted["CFLAGS"] and NO_AMX in wanted["CXXFLAGS"]


def test_a_cuda_environments_ggml_and_cuda_args_are_left_to_the_ggml_it_installed(tmp_path) -> None:
    """ggml is not compiled again, so the flags that shape only ggml (CUDA, its architectures) are not given;
    the rest of the environment's CMAKE_ARGS are."""
    wanted = build_settings(
        {"cuda": True, "cmake_args": "-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=89;90 -DLLAMA_LLGUIDANCE=OFF"},
        installed_ggml(tmp_path),
        environ={"PATH": "/usr/bin"},
    )
    assert wanted["cuda"] is True
    assert "-DLLAMA_LLGUIDANCE=OFF" in wanted["cmake_flags"] and "-DLLAMA_USE_SYSTEM_GGML=ON" in wanted["cmake_flags"]
    assert not any(flag.startswith(("-DGGML_", "-DCMAKE_CUDA_")) for flag in wanted["cmake_flags"])
    if platform.system() == "Linux":  # the CUDA runtime libraries libggml-cuda needs are found at run time
        assert "-DCMAKE_EXE_LINKER_FLAGS=-Wl,--allow-shlib-undefined" in wanted["cmake_flags"]


def test_the_installed_ggml_is_found_in_the_environment_and_its_digest_follows_its_files(tmp_path) -> None:
    ggml = installed_ggml(tmp_path)
    assert ggml_package(tmp_path) == ggml
    before = ggml_digest(ggml)
    (ggml.parent.parent / "libggml-base.so.0.25.3").write_bytes(b"\x7fELF another build")
    assert ggml_digest(ggml) != before
    with pytest.raises(ServerBuildError, match="no ggml CMake package"):
        ggml_package(tmp_path / "elsewhere")


def test_a_kept_build_is_reused_only_for_the_same_version_flags_and_ggml(tmp_path: Path) -> None:
    wanted = build_settings(
        {"cuda": False, "cmake_args": ""}, installed_ggml(tmp_path / "env"), environ={"PATH": "/usr/bin"}
    )
    kept = tmp_path / "kept"
    assert reuse_reason(kept, "0.3.36", wanted) == "not built yet"
    (kept / "bin").mkdir(parents=True)
    (kept / "bin" / "llama-server").write_text("")
    (kept / "build.json").write_text(json.dumps({"version": "0.3.36", **wanted}))
    assert reuse_reason(kept, "0.3.36", wanted) is None
    assert reuse_reason(kept, "0.3.37", wanted) == "built from 0.3.36, not 0.3.37"
    assert reuse_reason(kept, "0.3.36", {**wanted, "CFLAGS": "-O1"}) == "built with other CFLAGS"
    assert reuse_reason(kept, "0.3.36", {**wanted, "ggml": "0123456789abcdef"}) == "built with other ggml"


def test_asking_for_the_other_kind_of_build_than_the_environment_has_is_refused_before_building(
    shared_state: dict[str, Path],
) -> None:
    settings = shared_settings()
    marker = json.loads((settings.envs_dir / "llamacpp" / "node-supervisor-env.json").read_text())
    environment_is_cuda = bool((marker.get("build") or {}).get("cuda"))
    with pytest.raises(ServerBuildError, match="--gpu" if environment_is_cuda else "CPU-only"):
        ensure_llama_server(settings, gpu=not environment_is_cuda, on_line=lambda line: None)


def test_rotation_puts_every_path_in_every_place() -> None:
    paths = ["direct", "daemon", "llama-server"]
    orders = [rotated(paths, r) for r in range(3)]
    assert all(sorted(order) == sorted(paths) for order in orders)
    for place in range(len(paths)):
        assert {order[place] for order in orders} == set(paths)

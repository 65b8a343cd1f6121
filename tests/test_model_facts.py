"""Reading a model's shape and sizes from its file: GGUF headers, EXL2 directories, broken files.

The default model (shared test state, installed by the session's fixture) is
read; everything else is written here with tests/gguf_writer.py: the
tensor data of those files is a hole (a sparse file), so a "1 GiB" model
costs nothing, and reading its facts must not touch it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import struct
import time
from pathlib import Path
from typing import Any

import pytest

from supervisor.planning.measure.model_facts import ModelFacts, ModelFactsError, read_model_facts, swa_layer_count

from .gguf_writer import Q, tensor_bytes, write_gguf

REPO = Path(__file__).resolve().parent.parent
TEST_STATE = Path(os.environ.get("NODESUP_TEST_STATE") or REPO / ".state")
DEFAULT_MODEL = TEST_STATE / "data" / "models" / "gemma-3-270m-q4_k_m.gguf"


def llama_like(
    n_layer: int = 2,
    n_embd: int = 2048,
    n_head: int = 32,
    n_head_kv: int = 8,
    n_ff: int = 5632,
    n_vocab: int = 32000,
    qtype: str = Q.Q8_0,
    tied: bool = False,
) -> tuple[dict[str, Any], list[tuple[str, tuple[int, ...], Q]]]:
    """Metadata and tensor table of a Llama-shaped model (TinyLlama 1.1B's widths by default)
    that llama.cpp loads: no tokenizer ("none") and ``llama.vocab_size`` dummy tokens."""
    head_dim = n_embd // n_head
    kv: dict[str, Any] = {
        "llama.block_count": n_layer,
        "llama.embedding_length": n_embd,
        "llama.feed_forward_length": n_ff,
        "llama.attention.head_count": n_head,
        "llama.attention.head_count_kv": n_head_kv,
        "llama.context_length": 2048,
        "llama.rope.dimension_count": head_dim,
        "llama.attention.layer_norm_rms_epsilon": 1e-5,
        "llama.vocab_size": n_vocab,
        "general.file_type": 7,
        "tokenizer.ggml.model": "none",
    }
    tensors = [("token_embd.weight", (n_embd, n_vocab), qtype), ("output_norm.weight", (n_embd,), Q.F32)]
    if not tied:
        tensors.append(("output.weight", (n_embd, n_vocab), qtype))
    for il in range(n_layer):
        tensors += [
            (f"blk.{il}.attn_norm.weight", (n_embd,), Q.F32),
            (f"blk.{il}.attn_q.weight", (n_embd, n_embd), qtype),
            (f"blk.{il}.attn_k.weight", (n_embd, n_head_kv * head_dim), qtype),
            (f"blk.{il}.attn_v.weight", (n_embd, n_head_kv * head_dim), qtype),
            (f"blk.{il}.attn_output.weight", (n_embd, n_embd), qtype),
            (f"blk.{il}.ffn_norm.weight", (n_embd,), Q.F32),
            (f"blk.{il}.ffn_gate.weight", (n_embd, n_ff), qtype),
            (f"blk.{il}.ffn_up.weight", (n_embd, n_ff), qtype),
            (f"blk.{il}.ffn_down.weight", (n_ff, n_embd), qtype),
        ]
    return kv, tensors


needs_default_model = pytest.mark.usefixtures("shared_state")  # installs the default model if it is missing


@needs_default_model
def test_default_model_facts():
    facts = read_model_facts(DEFAULT_MODEL)
    assert (facts.format, facts.architecture, facts.file_type) == ("gguf", "gemma3", "Q4_K_M")
    assert (facts.n_layer, facts.n_embd, facts.n_head, facts.n_head_kv) == (18, 640, 4, 1)
    assert (facts.head_dim_k, facts.head_dim_v, facts.n_vocab, facts.n_ctx_train) == (256, 256, 262144, 32768)
    # Gemma 3: 5 sliding-window layers, then 1 global: 3 of 18 are global.
    assert (facts.sliding_window, facts.swa_layers) == (512, 15)
    assert facts.output_bytes == 0  # tied to token_embd
    assert facts.token_embd_bytes == tensor_bytes((640, 262144), Q.Q8_0)
    assert len(facts.layer_bytes) == 18 and min(facts.layer_bytes) > 3_000_000
    # the Q4_K tensors (attn_output, some ffn_down) get a repacked CPU copy: 12.66 MiB in llama.cpp's log
    assert sum(facts.layer_repack_bytes) == 13_271_040
    weights = sum(facts.layer_bytes) + facts.token_embd_bytes + facts.output_bytes + facts.other_bytes
    assert facts.file_bytes == DEFAULT_MODEL.stat().st_size
    assert 0.95 * facts.file_bytes < weights < facts.file_bytes  # the rest is the header (vocabulary)


def _drop_page_cache(path: Path) -> None:
    """Evict the file's pages so the timing below is a cold read, where the kernel allows it."""
    if not hasattr(os, "posix_fadvise"):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@needs_default_model
def test_reading_the_default_model_is_fast_even_cold():
    _drop_page_cache(DEFAULT_MODEL)
    start = time.perf_counter()
    read_model_facts(DEFAULT_MODEL)
    assert time.perf_counter() - start < 0.5


def test_a_large_model_is_read_without_touching_its_tensor_data(tmp_path):
    """A model with a 1 GiB tensor (and 9 GiB in all): a read that touched the data
    would fault in at least 262 144 pages of the 1 GiB tensor; the header walk
    touches a handful."""
    resource = pytest.importorskip("resource")  # page-fault counts: POSIX only
    path = tmp_path / "big.gguf"
    kv, tensors = llama_like(n_layer=4, n_embd=8192, n_head=64, n_ff=28672, n_vocab=65536, qtype=Q.F16)
    tensors.append(("blk.3.big.weight", (1 << 14, 1 << 15), Q.F16))  # 1 GiB
    total = write_gguf(path, "llama", kv, tensors)
    assert path.stat().st_size > 9 << 30 and path.stat().st_blocks * 512 < 1 << 20  # sparse
    faults = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    facts = read_model_facts(path)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    assert elapsed < 0.5
    assert (after.ru_minflt - faults.ru_minflt) + (after.ru_majflt - faults.ru_majflt) < 5000
    assert facts.layer_bytes[3] == facts.layer_bytes[0] + (1 << 30)
    assert sum(facts.layer_bytes) + facts.token_embd_bytes + facts.output_bytes + facts.other_bytes == total


def test_llama_shape_and_sizes(tmp_path):
    path = tmp_path / "llama.gguf"
    write_gguf(path, "llama", *llama_like())
    facts = read_model_facts(path)
    assert (facts.architecture, facts.n_layer, facts.n_embd, facts.n_head, facts.n_head_kv) == ("llama", 2, 2048, 32, 8)
    assert (facts.head_dim_k, facts.head_dim_v, facts.n_vocab, facts.file_type) == (64, 64, 32000, "Q8_0")
    assert (facts.sliding_window, facts.swa_layers) == (None, 0)
    embd = tensor_bytes((2048, 32000), Q.Q8_0)
    assert facts.token_embd_bytes == facts.output_bytes == embd
    assert facts.other_bytes == 2048 * 4  # output_norm
    block = 2 * 2048 * 4 + tensor_bytes((2048, 2048), Q.Q8_0) * 2 + tensor_bytes((2048, 512), Q.Q8_0) * 2
    assert facts.layer_bytes == (block + 3 * tensor_bytes((2048, 5632), Q.Q8_0),) * 2


def test_repackable_blocks_are_counted(tmp_path):
    path = tmp_path / "q4_0.gguf"
    write_gguf(path, "llama", *llama_like(qtype=Q.Q4_0))
    facts = read_model_facts(path)
    norms = 2 * 2048 * 4
    assert facts.layer_repack_bytes == tuple(b - norms for b in facts.layer_bytes)  # every matrix, no norm
    path = tmp_path / "q8_0.gguf"
    write_gguf(path, "llama", *llama_like(qtype=Q.Q8_0))
    assert read_model_facts(path).layer_repack_bytes == ()


def test_tied_output_reads_as_zero_output_bytes(tmp_path):
    path = tmp_path / "tied.gguf"
    write_gguf(path, "llama", *llama_like(tied=True))
    assert read_model_facts(path).output_bytes == 0


@pytest.mark.parametrize(
    ("arch", "extra", "expected"),
    [
        ("gemma3", {}, (512, 22)),  # 26 layers, period 6: layers 5, 11, 17, 23 are global
        ("gemma2", {}, (512, 13)),  # period 2: even layers slide
        ("gemma3", {"gemma3.attention.sliding_window_pattern": 2}, (512, 13)),  # a period in the file wins
        ("gemma3", {"gemma3.attention.sliding_window_pattern": [True] * 20 + [False] * 6}, (512, 20)),
        ("llama", {}, (None, 0)),  # llama.cpp runs llama without SWA even with a window in the file
    ],
)
def test_sliding_window_layers_follow_llama_cpp(tmp_path, arch, expected, extra):
    kv, tensors = llama_like(n_layer=26, n_embd=64, n_head=2, n_head_kv=1, n_ff=128, n_vocab=256)
    kv = {k.replace("llama.", f"{arch}."): v for k, v in kv.items()}
    kv[f"{arch}.attention.sliding_window"] = 512
    path = tmp_path / "swa.gguf"
    write_gguf(path, arch, {**kv, **extra}, tensors)
    facts = read_model_facts(path)
    assert (facts.sliding_window, facts.swa_layers) == expected


def test_swa_layer_count_matches_set_swa_pattern():
    assert swa_layer_count(18, 6) == 15
    assert swa_layer_count(8, 4, dense_first=True) == 6  # layers 0 and 4 are global
    assert swa_layer_count(5, 0) == 5  # period 0: every layer slides


def _write_safetensors(path: Path, tensors: dict[str, int]) -> None:
    offset, header = 0, {}
    for name, size in tensors.items():
        header[name] = {"dtype": "U8", "shape": [size], "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(offset))


def test_exl2_directory(tmp_path):
    config = {
        "architectures": ["LlamaForCausalLM"],
        "num_hidden_layers": 2,
        "hidden_size": 256,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "vocab_size": 1000,
        "quantization_config": {"quant_method": "exl2", "bits": 4.25, "head_bits": 6},
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    _write_safetensors(
        tmp_path / "output-00001.safetensors",
        {"model.embed_tokens.weight": 512000, "model.layers.0.self_attn.q_proj.q_weight": 3000},
    )
    _write_safetensors(
        tmp_path / "output-00002.safetensors",
        {"model.layers.1.mlp.up_proj.q_weight": 5000, "lm_head.q_weight": 7000, "model.norm.weight": 512},
    )
    facts = read_model_facts(tmp_path)
    assert isinstance(facts, ModelFacts)
    assert (facts.format, facts.architecture, facts.bits, facts.head_bits) == ("exl2", "LlamaForCausalLM", 4.25, 6)
    assert (facts.n_layer, facts.n_head, facts.n_head_kv, facts.head_dim_k, facts.n_vocab) == (2, 8, 2, 32, 1000)
    assert facts.layer_bytes == (3000, 5000)
    assert (facts.token_embd_bytes, facts.output_bytes, facts.other_bytes) == (512000, 7000, 512)
    assert facts.file_bytes == sum(p.stat().st_size for p in tmp_path.glob("*.safetensors"))


def test_unreadable_models_say_which_file_and_why(tmp_path):
    cases = {"missing.gguf": None, "empty.gguf": b"", "text.gguf": b"hello, I am not a model\n"}
    for name, content in cases.items():
        if content is not None:
            (tmp_path / name).write_bytes(content)
    for name in cases:
        with pytest.raises(ModelFactsError, match=name):
            read_model_facts(tmp_path / name)
    with pytest.raises(ModelFactsError, match="not a GGUF"):
        read_model_facts(tmp_path / "text.gguf")
    (tmp_path / "exl2").mkdir()
    (tmp_path / "exl2" / "config.json").write_text(json.dumps({"num_hidden_layers": 2}))
    with pytest.raises(ModelFactsError, match="quantization_config"):
        read_model_facts(tmp_path / "exl2")


def test_truncated_gguf_is_refused(tmp_path):
    full = tmp_path / "full.gguf"
    write_gguf(full, "llama", *llama_like(n_layer=1, n_embd=64, n_head=2, n_head_kv=1, n_ff=128, n_vocab=256))
    data = full.read_bytes()
    for name, cut in (("header.gguf", 200), ("data.gguf", len(data) - 1)):
        (tmp_path / name).write_bytes(data[:cut])
        with pytest.raises(ModelFactsError, match="truncated"):
            read_model_facts(tmp_path / name)


def test_the_format_numbers_written_out_are_ggmls_own(shared_state):
    """The daemon reads headers with the format's numbers written out: each type's block and size
    must be what the ggml library that loads the models says (asked in the llama.cpp environment)."""
    from supervisor.planning.measure.model_facts import _ggml_types as ggml

    code = (
        "import ctypes, json, pathlib, llama_cpp; lib = ctypes.CDLL(str(pathlib.Path(llama_cpp.__file__).parent / 'lib' / 'libggml-base.so'));"
        "lib.ggml_type_size.restype = ctypes.c_size_t; lib.ggml_blck_size.restype = ctypes.c_int64; lib.ggml_type_name.restype = ctypes.c_char_p;"
        f"print(json.dumps({{t: [lib.ggml_blck_size(t), lib.ggml_type_size(t), lib.ggml_type_name(t).decode()] for t in {sorted(ggml.QUANT_SIZES)}}}))"
    )
    result = subprocess.run(
        [str(shared_state["envs_dir"] / "llamacpp" / "bin" / "python"), "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    from_ggml = {int(t): v for t, v in json.loads(result.stdout.strip().splitlines()[-1]).items()}
    names = {number: name for name, number in ggml.TYPE_NAMES.items()}
    for number, (block, size) in ggml.QUANT_SIZES.items():
        assert from_ggml[number][:2] == [block, size], (names[number], from_ggml[number])
        assert from_ggml[number][2].upper() == names[number].upper(), (number, from_ggml[number])


def test_reading_model_facts_imports_no_numpy():
    code = "import sys; from supervisor.planning.measure.model_facts import read_model_facts; from supervisor.planning.measure.inputs import Planning; print('numpy' in sys.modules, 'gguf' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.split() == ["False", "False"], result

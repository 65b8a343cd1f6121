"""llama.cpp's threads, batch sizes and flash attention per load (workers/llamacpp/settings.py): pure, no llama_cpp."""

from __future__ import annotations

from pathlib import Path

import pytest

from workers.llamacpp import settings as s
from workers.protocol.messages import LoadSpec


def sysfs(root: Path, siblings: dict[int, str]) -> Path:
    """A /sys/devices/system/cpu tree: each CPU's hyper-thread siblings."""
    for cpu, listed in siblings.items():
        topology = root / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        (topology / "thread_siblings_list").write_text(listed + "\n")
    return root


def test_physical_cores_leave_hyper_threads_out(tmp_path):
    tree = sysfs(tmp_path, {0: "0,2", 1: "1,3", 2: "0,2", 3: "1,3"})
    assert s.physical_cores({0, 1, 2, 3}, tree, tmp_path / "none") == 2
    assert s.physical_cores({0, 2}, tree, tmp_path / "none") == 1  # both threads of one core allowed: one core


def test_physical_cores_from_cpuinfo_without_a_topology(tmp_path):
    blocks = [f"processor\t: {n}\nphysical id\t: {n // 4}\ncore id\t\t: {(n // 2) % 2}\n" for n in range(8)]
    (tmp_path / "cpuinfo").write_text("\n".join(blocks))
    assert s.physical_cores({0, 1}, tmp_path / "no-sysfs", tmp_path / "cpuinfo") == 4  # 2 packages x 2 cores


def test_physical_cores_fall_back_to_the_logical_count(tmp_path, monkeypatch):
    monkeypatch.setattr(s.os, "cpu_count", lambda: 6)
    assert s.physical_cores({0}, tmp_path / "no-sysfs", tmp_path / "no-cpuinfo") == 6


def test_defaults_on_the_cpu(monkeypatch):
    monkeypatch.setattr(s, "physical_cores", lambda: 3)
    assert s.choose(LoadSpec(model="m"), {}, layers_on_gpu=False, quantized_cache=False) == s.LoadSettings(
        3, 3, 512, 512, s.FLASH_ATTN_DISABLED
    )


def test_defaults_with_layers_on_a_gpu(monkeypatch):
    monkeypatch.setattr(s, "physical_cores", lambda: 8)
    assert s.choose(LoadSpec(model="m"), {}, layers_on_gpu=True, quantized_cache=False) == s.LoadSettings(
        8, 8, 2048, 512, s.FLASH_ATTN_AUTO
    )


def test_spec_values_win_over_options_which_win_over_defaults():
    spec = LoadSpec(model="m", n_threads=2, n_threads_batch=None, n_batch=256, n_ubatch=None, flash_attn=None)
    options = {"n_threads": 7, "n_ubatch": 128, "flash_attn": True}
    got = s.choose(spec, options, layers_on_gpu=False, quantized_cache=False)
    assert got == s.LoadSettings(
        n_threads=2, n_threads_batch=2, n_batch=256, n_ubatch=128, flash_attn=s.FLASH_ATTN_ENABLED
    )
    assert got.llama_kwargs() == {"n_threads": 2, "n_threads_batch": 2, "n_batch": 256, "n_ubatch": 128}


@pytest.mark.parametrize(
    ("asked", "on_gpu", "want"), [(False, True, s.FLASH_ATTN_DISABLED), (True, False, s.FLASH_ATTN_ENABLED)]
)
def test_flash_attention_as_set_on_either_device(asked, on_gpu, want):
    assert (
        s.choose(LoadSpec(model="m", n_threads=1, flash_attn=asked), {}, on_gpu, quantized_cache=False).flash_attn
        == want
    )


def test_a_quantized_cache_turns_flash_attention_on_whatever_was_set():
    assert (
        s.choose(
            LoadSpec(model="m", n_threads=1, flash_attn=False), {}, layers_on_gpu=False, quantized_cache=True
        ).flash_attn
        == s.FLASH_ATTN_ENABLED
    )

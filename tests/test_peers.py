"""benchmarks/peers.py's byte accounting and its refusal without the peers' environment (the
quantizers themselves run only in the benchmark: llm-compressor lives in its own environment)."""

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def peers():
    sys.path.insert(0, str(BENCHMARKS))  # peers.py imports protocol and results_md
    try:
        spec = importlib.util.spec_from_file_location("peers", BENCHMARKS / "peers.py")
        module = sys.modules["peers"] = importlib.util.module_from_spec(spec)  # its dataclass looks itself up
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCHMARKS))
        sys.modules.pop("peers", None)


def test_group_formats_cost_their_bits_plus_a_scale_per_group(peers):
    shapes = [(576, 576), (1536, 576), (576, 1536)]  # SmolLM2's: every width a multiple of 64
    assert peers.format_bits(shapes, 4, 64, 16) == pytest.approx(4.25)
    assert peers.format_bits(shapes, 3, 64, 16) == pytest.approx(3.25)
    assert peers.format_bits(shapes, 4, 64, 40) == pytest.approx(4.625)  # torchao: fp32 scale + int8 zero


def test_a_group_that_does_not_divide_a_row_costs_a_whole_scale_for_its_remainder(peers):
    assert peers.format_bits([(2, 100)], 4, 64, 16) == pytest.approx((2 * 100 * 4 + 2 * 2 * 16) / 200)


def test_per_channel_formats_cost_one_scale_per_output_row(peers):
    shapes = [(3, 8), (5, 16)]
    assert peers.format_bits(shapes, 8, 0, 16) == pytest.approx((8 * (24 + 80) + 16 * (3 + 5)) / 104)


def test_every_peer_group_divides_smollm2s_widths(peers):
    assert all(576 % p.group == 0 and 1536 % p.group == 0 for p in peers.PEERS.values() if p.group)


def test_without_the_peers_environment_skip_install_refuses_in_one_line(peers, tmp_path, monkeypatch):
    monkeypatch.setenv("ZSFW_CACHE", str(tmp_path))
    with pytest.raises(SystemExit) as refused:
        peers.peers_python(skip_install=True)
    message = str(refused.value)
    assert "\n" not in message and str(tmp_path / "peers-venv") in message and "llmcompressor" in message
    assert not (tmp_path / "peers-venv").exists()

"""The dispatch table: automatic choice, overrides, and clear errors for forced backends."""
import pytest
import torch

import fastft.ops  # noqa: F401  (registers the backends)
from fastft import dispatch
from fastft.ops import rms_norm


def test_table_is_data_and_every_op_has_the_reference():
    for op, order in dispatch.TABLE.items():
        assert order[-1] == "torch", f"{op}: the torch reference must be the last resort"
        assert set(order) <= set(dispatch.BACKEND_NAMES)


def test_cpu_choice_follows_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    dispatch.clear_cache()
    assert dispatch.backend_for("rms_norm", "cpu", torch.float32) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    dispatch.clear_cache()
    assert dispatch.backend_for("rms_norm", "cpu", torch.float32) == "torch"
    # float64 is no kernel dtype: the reference serves it
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    dispatch.clear_cache()
    assert dispatch.backend_for("rms_norm", "cpu", torch.float64) == "torch"


def test_forcing_cuda_on_cpu_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("FASTFT_BACKEND", "cuda")
    with pytest.raises(dispatch.BackendUnavailable, match="FASTFT_BACKEND=cuda.*rms_norm"):
        rms_norm(torch.randn(2, 8), torch.randn(8))


def test_per_op_override_beats_global(monkeypatch):
    monkeypatch.setenv("FASTFT_BACKEND", "cuda")
    monkeypatch.setenv("FASTFT_BACKEND_RMS_NORM", "torch")
    assert dispatch.backend_for("rms_norm", "cpu", torch.float32) == "torch"
    with pytest.raises(dispatch.BackendUnavailable):
        dispatch.backend_for("layer_norm", "cpu", torch.float32)


def test_bad_override_value(monkeypatch):
    monkeypatch.setenv("FASTFT_BACKEND", "fast")
    with pytest.raises(dispatch.BackendUnavailable, match="not a backend"):
        dispatch.backend_for("rms_norm", "cpu", torch.float32)


def test_forced_triton_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(dispatch.BackendUnavailable, match="interpreter is off"):
        rms_norm(torch.randn(2, 8), torch.randn(8), backend="triton")


def test_forced_backend_argument_with_unsupported_dtype():
    with pytest.raises(dispatch.BackendUnavailable, match="dtype torch.float64"):
        rms_norm(torch.randn(2, 8, dtype=torch.float64), torch.randn(8), backend="triton")


def test_report_lists_every_op():
    rep = dispatch.report("cpu")
    assert set(rep) == set(dispatch.TABLE)


def test_env_command_runs(capsys):
    from fastft import env

    assert env.main() == 0
    out = capsys.readouterr().out
    for word in ("torch", "transformers", "peft", "backend per op", "rms_norm"):
        assert word in out


def test_arch_list_rules(monkeypatch):
    from fastft import _ext

    monkeypatch.setattr(_ext, "arch_list", lambda: ["8.0", "9.0+PTX"])
    assert _ext.built_for((8, 0)) and _ext.built_for((8, 6)) and _ext.built_for((9, 0))
    assert _ext.built_for((12, 0))  # through PTX
    assert not _ext.built_for((7, 5))
    monkeypatch.setattr(_ext, "arch_list", lambda: ["9.0a"])
    assert _ext.built_for((9, 0)) and not _ext.built_for((10, 0))

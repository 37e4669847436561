"""`fastft train` / `fastft export`: the default job end to end, configs, exports, bad input."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fastft(*args, cwd, timeout=600):
    env = dict(os.environ, PYTHONPATH=ROOT, FASTFT_BACKEND="torch", HF_HUB_OFFLINE="1")
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-m", "fastft", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_default_job_learns_the_task(tmp_path):
    proc = fastft("train", "--output", "out", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["accuracy_after"] > summary["accuracy_before"], summary
    assert summary["final_loss"] < summary["first_loss"]
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").is_file()
    assert "accuracy after training" in proc.stdout


def test_config_file_and_gguf_export(tmp_path):
    (tmp_path / "job.yaml").write_text(
        "max_steps: 3\nbatch_size: 4\noutput: run1\nsave: ['gguf:q8_0']\neval_examples: 5\n")
    proc = fastft("train", "--config", "job.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run1" / "summary.json").read_text())
    assert summary["steps"] == 3
    ggufs = [f for f in os.listdir(tmp_path / "run1" / "gguf") if f.endswith(".gguf")]
    assert ggufs, os.listdir(tmp_path / "run1" / "gguf")
    from gguf import GGUFReader

    reader = GGUFReader(str(tmp_path / "run1" / "gguf" / ggufs[0]))
    names = {t.name for t in reader.tensors}
    assert "token_embd.weight" in names and "blk.0.attn_q.weight" in names


@pytest.mark.parametrize("args, message", [
    (["--data", "missing.jsonl"], "does not exist"),
    (["--data", "bad.jsonl"], "matches no known format"),
    (["--target-modules", "q_proj,nonexistent_proj", "--max-steps", "1"], "nonexistent_proj"),
    (["--save", "zip"], "--save 'zip'"),
    (["--output", "full"], "not empty"),
])
def test_bad_input_gives_a_message_and_exit_code(tmp_path, args, message):
    (tmp_path / "bad.jsonl").write_text(json.dumps({"question": "q", "reply": "a"}) + "\n")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("user file")
    proc = fastft("train", *args, cwd=tmp_path)
    assert proc.returncode == 2, (proc.stdout[-2000:], proc.stderr[-2000:])
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert (tmp_path / "full" / "keep.txt").read_text() == "user file"


def test_4bit_where_bitsandbytes_cannot_run(tmp_path, monkeypatch):
    from fastft import train

    monkeypatch.setattr(train, "bitsandbytes_problem", lambda: "no bitsandbytes library")
    cfg = train.TrainConfig(load_in_4bit=True, output=str(tmp_path / "o"))
    with pytest.raises(train.UsageError, match="--load-in-4bit needs bitsandbytes"):
        train.validate(cfg)


def test_env_subcommand(tmp_path):
    proc = fastft("env", cwd=tmp_path)
    assert proc.returncode == 0 and "rms_norm" in proc.stdout

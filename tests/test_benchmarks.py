"""The GPU benchmark's CPU smoke: every training entry point and its plain-TRL twin run a
few steps of a tiny random model and are measured (the GPU table comes from a GPU run)."""

from benchmarks.gpu_training import main


def test_gpu_training_benchmark_smoke_runs_every_trainer(tmp_path, capsys):
    rows = main(["--smoke", "--json", str(tmp_path / "rows.json")])
    names = [r["trainer"] for r in rows]
    assert names == [
        "TRACE hybrid",
        "TRL DPOTrainer",
        "P-Aligner SFT+DPO",
        "TRL SFTTrainer + DPOTrainer",
        "PersonaKnob constrained DPO",
        "TRL DPOTrainer",
        "PPOpt SFT+GRPO",
        "TRL SFTTrainer + GRPOTrainer",
        "MedAD SFT+GRPO (HF VLM)",
    ]
    for r in rows:
        assert r["train_tokens"] > 0 and r["tokens_per_s"] > 0 and r["step_s"] > 0, r
        assert r["mfu"] is None  # no peak FLOP/s is claimed for a CPU
    # GRPO generates: its rows count inference tokens too
    assert all(r["infer_tokens"] > 0 for r in rows if "GRPO" in r["trainer"])
    table = capsys.readouterr().out
    assert "| TRACE hybrid | 2 |" in table and "| ↳ TRL DPOTrainer | 2 |" in table
    assert "n/a (no TRL twin)" in table

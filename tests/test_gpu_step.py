"""benchmarks/gpu_step.py on a tiny config on CPU: both variants run and report what the GPU run reports."""
import importlib.util
import math
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_step_benchmark_runs_a_tiny_config_on_cpu():
    spec = importlib.util.spec_from_file_location("gpu_step", ROOT / "benchmarks" / "gpu_step.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    res = mod.run(config="tiny", device="cpu", iterations=1, warmup=0, nodes=2, batch=2)
    for variant in ("plain", "disback"):
        assert res[variant]["step_s_median"] > 0 and res[variant]["peak_memory_gib"] is None
    assert res["lora_layers"] > 0 and res["switch_s_median"] > 0 and math.isfinite(res["disback_over_plain"])
    assert res["gpu"] is None and res["device"] == "cpu"

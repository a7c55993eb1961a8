"""benchmarks/speed.py runs end to end and reports every field the speed issue asks for.
(Timings themselves are benchmark results, never asserted here.)"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import speed, speed_report  # noqa: E402


def test_speed_benchmark_smoke(tmp_path):
    out = tmp_path / "speed.json"
    result = speed.main(["--model", "resnet20", "--target-flops", "0.35", "--batch-size", "8",
                         "--repeats", "1", "--round-to", "8", "--json", str(out)])
    stored = json.loads(out.read_text())
    for key in ("step_ratio", "bookkeeping_share", "peak_mem_ratio", "latency_speedup_b1",
                "latency_speedup_b64", "flops_ratio", "model", "batch_size", "target_flops"):
        assert key in stored and stored[key] == result[key]
    assert abs(stored["flops_ratio"] - 0.35) <= 0.01
    assert stored["sliced_hard_forward"] is True
    assert stored["step_ratio"] > 0 and 0 < stored["bookkeeping_share"] < 1
    phases = stored["phases_over_plain_step"]
    for key in ("soft_forward_backward", "mask_backward", "hard_forward_backward",
                "exported_forward_backward"):
        assert phases[key] == result["phases_over_plain_step"][key]
    assert len(stored["latency_rounds"]["b64_rounds"]) == 5
    assert stored["hard_layout"] in ("contiguous_format", "channels_last")
    assert stored["step_ratio_model_layout"] > 0
    # the floors: this machine's (sum of the irreducible phases) and the FLOPs-proportional one
    here, proportional = speed_report.floors(stored)
    assert here == (phases["soft_forward_backward"] + phases["mask_backward"]
                    + min(phases["hard_forward_backward"], phases["exported_forward_backward"]))
    assert proportional == 1 + 1 / 3 + stored["flops_ratio"]
    assert stored["round_to"] == 8
    assert all(w % 8 == 0 for w in stored["kept_widths"].values())  # groups: 16, 32, 64

    # the report turns the JSON into a table row and a picture
    png = tmp_path / "speed.png"
    text = speed_report.main([str(out), "--png", str(png)])
    assert "| resnet20, round_to 8" in text and f"{stored['step_ratio']:.2f}" in text
    assert png.read_bytes().startswith(b"\x89PNG")

"""The README's generated parts match the code."""
from pathlib import Path

from sortformer_triton.contract import tensor_table_markdown
from sortformer_triton.presets import PRESETS

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_tensor_table_is_current():
    start = README.index("<!-- tensor-table:start")
    start = README.index("-->", start) + 3
    end = README.index("<!-- tensor-table:end -->")
    assert README[start:end].strip() == tensor_table_markdown().strip(), \
        "regenerate with: python -c 'from sortformer_triton.contract import tensor_table_markdown as t; print(t())'"


def test_preset_table_is_current():
    for p in PRESETS.values():
        row = (f"| {p.name} | {round(p.latency_seconds, 2):g} s | {p.chunk_len} | {p.right_context} | "
               f"{p.left_context} | {p.fifo_len} | {p.spkcache_update_period} | {p.spkcache_len} | "
               f"{round(p.step_seconds, 2):g} s |")
        assert row in README, row

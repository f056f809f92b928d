"""The README's generated parts match the code."""
from pathlib import Path

from sortformer_triton.contract import tensor_table_markdown
from sortformer_triton.presets import PRESETS

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


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


def test_every_module_and_script_the_readme_runs_exists():
    import importlib.util
    import re

    modules = set(re.findall(r"python -m ([\w.]+)", README))
    assert {"export", "clients.diarize", "clients.gateway", "sortformer_triton.local_server"} <= modules
    for module in sorted(modules):
        assert importlib.util.find_spec(module) is not None, f"README runs `python -m {module}`: no such module"
    for script in set(re.findall(r"(scripts/[\w.]+\.sh)", README)):
        assert (ROOT / script).is_file(), script


def test_every_file_the_readme_links_exists():
    import re

    for target in set(re.findall(r"\]\(([^)#]+)\)", README)):
        if not target.startswith("http"):
            assert (ROOT / target).exists(), f"README links {target}, which does not exist"

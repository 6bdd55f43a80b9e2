"""jobs/gpu_benchmark.py's behaviour that a CPU can check: which sections run, the vLLM section's skip line and
its table, and the attention-kernel check (passing for the engine's SDPA paths, failing loudly otherwise)."""

import sys

import pytest
import torch

from jobs.gpu_benchmark import Bench, main, sections_to_run, vllm_section
from specvlm.evaluation.kernels import FUSED_BACKENDS, UnfusedAttention, check_engine, check_fused
from specvlm.evaluation.vllm_plain import EngineSetting, VllmRun, versus_table, vllm_missing

CPU_FLASH = "aten::_scaled_dot_product_flash_attention_for_cpu"


def test_sections_run_in_order_and_vllm_brings_engine_settings_to_compare_with():
    assert sections_to_run(["compile", "suite"]) == ["suite", "compile"]
    assert sections_to_run(["vllm"]) == ["compile", "vllm"]
    assert sections_to_run(["vllm", "caps"]) == ["caps", "vllm"]
    assert sections_to_run(["vllm", "continuous", "suite"]) == ["suite", "continuous", "compile", "vllm"]


def test_vllm_section_is_skipped_with_a_line_saying_why(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    lines = []
    bench = Bench(target=None, prompts=None, args=None, report=lines.append)
    vllm_section(bench)
    assert lines == [f"vLLM plain decoding: skipped, {vllm_missing()}."]
    assert lines[0].startswith("vLLM plain decoding: skipped, vllm does not import here (ModuleNotFoundError")


def test_vllm_table_counts_preprocessing_and_the_best_setting_at_any_cap():
    vllm = VllmRun("vLLM plain, max_num_seqs default", [1.0, 1.5], [[1, 2]] * 10)  # 10 images/s at best
    engine = [
        EngineSetting("plain, eager, cap 8", False, 0.9, [[1, 2]] * 10),
        EngineSetting("plain, compiled, cap 64", False, 0.7, [[1, 2]] * 10),
        EngineSetting("replay a=0.8, adaptive, compiled, cap 64", True, 0.3, [[1, 3]] * 10),
        EngineSetting("replay a=0.8, adaptive, eager, cap 8", True, 0.5, [[1, 3]] * 10),
    ]
    table = versus_table(vllm, engine, preprocess_seconds=0.3)
    # Best plain: 10 / (0.7 + 0.3) = 10 images/s, as fast as vLLM; best speculative: 10 / 0.6 = 16.67 images/s.
    assert "| engine best plain: plain, compiled, cap 64 | 10.00 | 1.00x | 1.00x | 100% |" in table
    assert "| engine best speculative: replay a=0.8, adaptive, compiled, cap 64 | 16.67 | 1.67x | 1.67x | 0% |" in table
    assert "Faster than vLLM plain: yes (1.67x)." in table
    slower = versus_table(vllm, engine[:2], preprocess_seconds=0.5)  # no speculative setting measured
    assert "Faster than vLLM plain" not in slower
    assert "| vLLM plain, max_num_seqs default | 10.00 | 1.00x | 1.00x | 100% |" in slower


@pytest.mark.parametrize("static_shapes", [False, True], ids=["exact", "bucketed"])
def test_kernel_check_passes_for_the_engines_sdpa_paths(family, static_shapes):
    found = check_engine(family.target, family.requests(3), max_new_tokens=6, static_shapes=static_shapes)
    assert len(found) == 3
    for path, kernels in found.items():
        assert kernels == {CPU_FLASH}, (path, kernels)


def test_kernel_check_fails_loudly_where_attention_would_run_unfused():
    q = torch.randn(2, 4, 3, 16)
    keys = torch.randn(2, 4, 8, 16)
    mask = torch.zeros(2, 1, 3, 8, requires_grad=True)  # a mask that needs its gradient has only the math path
    attend = lambda: torch.nn.functional.scaled_dot_product_attention(q, keys, keys, mask)
    with pytest.raises(UnfusedAttention, match="masked window: an attention call has no fused SDPA kernel"):
        check_fused(attend, "masked window")
    with torch.nn.attention.sdpa_kernel(FUSED_BACKENDS + [torch.nn.attention.SDPBackend.MATH]):
        attend()  # the same call runs when math attention is allowed: the exclusion is what fails it


def test_kernel_check_fails_where_nothing_attends_through_sdpa():
    with pytest.raises(UnfusedAttention, match="no call reached scaled_dot_product_attention"):
        check_fused(lambda: torch.ones(4) @ torch.ones(4), "eager attention")


def test_check_kernels_runs_no_section_and_reports_each_path(tmp_path):
    out = tmp_path / "kernels.md"
    main(["--shape", "tiny", "--requests", "4", "--max-new-tokens", "6", "--check-kernels", "--out", str(out)])
    text = out.read_text()
    for path in ("plain decoding", "chain verification", "tree verification"):
        assert f"| {path}" in text and CPU_FLASH in text
    assert "FAILED" not in text and "tok/s" not in text  # no benchmark section ran

"""Mistral: sliding-window attention on every layer, exact whether or not SEQ exceeds the window."""

from family_harness import SEQ, describe, export_verify, onnx_nodes  # noqa: F401


def test_window_not_shorter_than_seq(export_verify):
    result = export_verify("mistral", sliding_window=SEQ)
    assert result.report.passed, describe(result.report)


def test_window_shorter_than_seq_is_applied_in_the_blocks(export_verify):
    # An 8-token prompt and 8 new tokens with a 4-token window: every step attends over a cut history.
    result = export_verify("mistral", sliding_window=4)
    assert result.report.passed, describe(result.report)


def test_window_masking_only_when_needed(export_verify):
    wide = export_verify("mistral", sliding_window=SEQ)
    narrow = export_verify("mistral", sliding_window=4)
    for name in ("block_0", "block_cache_0"):
        assert onnx_nodes(narrow.out / f"{name}.onnx") > onnx_nodes(wide.out / f"{name}.onnx")

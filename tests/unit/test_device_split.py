"""compiler/device_split.py: model_tool's listings of a multi-device bmodel -> whether each segment was split, what
each device holds, and whether the cascade net takes only the segment's own inputs (listings as tpu-mlir 1.30.2
prints them, cut down)."""

from __future__ import annotations

from tpugraph.compiler.device_split import add_weights, parse_info, segment_splits

INFO = """\
bmodel version: B.2.2+v1.30.2-20260831
chip: BM1684X,  device num: 2
==========================================
net 0: [embedding_0]  static
device id: 0
input: input_ids, [1, 16], int32, scale: 1, zero_point: 0
==========================================
net 1: [embedding_1]  static
device id: 1
input: input_ids, [1, 16], int32, scale: 1, zero_point: 0
==========================================
net 4: [block_0_0_0]  static
device id: 0
input: input_states, [1, 16, 512], bfloat16, scale: 1, zero_point: 0
output: /Add_4_output_0_Add_0, [1, 16, 512], bfloat16, scale: 1, zero_point: 0
==========================================
net 5: [block_0_0_1]  static
device id: 1
input: input_states, [1, 16, 512], bfloat16, scale: 1, zero_point: 0
==========================================
net 6: [block_0_1_0]  static
device id: 0
input: /Add_4_output_0_Add_0, [1, 16, 512], bfloat16, scale: 1, zero_point: 0
==========================================
net 7: [block_0_1_1]  static
device id: 1
input: /Add_4_output_0_Add_1, [1, 16, 512], bfloat16, scale: 1, zero_point: 0
==========================================
net: [block_0]  cascade
input: devid(0) input_states, [1, 16, 512], bfloat16, scale: 1, zero_point: 0
input: devid(0) history_k_0, [1, 16, 2, 64], bfloat16, scale: 1, zero_point: 0
input: devid(1) input_states, [1, 16, 512], bfloat16, scale: 1, zero_point: 0
input: devid(1) history_k_1, [1, 16, 2, 64], bfloat16, scale: 1, zero_point: 0
==========================================
net: [embedding]  cascade
input: devid(0) input_ids, [1, 16], int32, scale: 1, zero_point: 0
input: devid(0) /Add_4_output_0_Add_distribute_end, [1, 16, 64], bfloat16, scale: 1, zero_point: 0
"""

WEIGHTS = """\
net 0 : "embedding_0", stage:0
-------------------------------
tpu.Gather.source : [0x0, 0x40000)
==========================================
net 1 : "embedding_1", stage:0
tpu.Gather.source : [0x0, 0x40000)
==========================================
net 4 : "block_0_0_0", stage:0
tpu.RMSNorm.gamma : [0x0, 0x1000)
tpu.MatMul.weight : [0x1000, 0x21000)
==========================================
net 5 : "block_0_0_1", stage:0
tpu.RMSNorm.gamma : [0x0, 0x1000)
tpu.MatMul.weight : [0x1000, 0x21000)
"""


def test_split_and_whole_segments_are_told_apart_with_their_bytes_per_device():
    nets = parse_info(INFO)
    add_weights(nets, WEIGHTS)
    assert nets["block_0_0_1"].device == 1 and nets["block_0"].kind == "cascade"
    splits = {s.segment: s for s in segment_splits(
        nets, {"embedding": ["input_ids"], "block_0": ["input_states", "history_k"], "lm_head": ["x"]}, 2)}
    assert set(splits) == {"embedding", "block_0"}  # lm_head has no net in the listing
    embedding, block = splits["embedding"], splits["block_0"]
    assert not embedding.split and embedding.device_weight_bytes == (0x40000, 0x40000)
    assert "not split" in embedding.line()
    assert block.split and block.steps == 2 and block.well_formed  # history_k_<device>: the device's KV share
    assert block.device_weight_bytes == (0x21000, 0x21000)
    assert block.to_json()["well_formed"] is True


def test_a_cascade_input_that_is_not_the_segments_own_marks_the_split_malformed():
    nets = parse_info(INFO.replace("net 0: [embedding_0]", "net 0: [embedding_0_0]")
                      .replace("net 1: [embedding_1]", "net 1: [embedding_1_0]"))
    (embedding,) = segment_splits(nets, {"embedding": ["input_ids"]}, 2)
    assert embedding.split and not embedding.well_formed
    assert embedding.unexpected_inputs == ("/Add_4_output_0_Add_distribute_end",)
    assert "malformed" in embedding.line()

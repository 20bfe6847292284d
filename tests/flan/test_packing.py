"""Packing: segment layout, truncation rule, segments never crossed, every target token kept once."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from engine.batch import IGNORE_INDEX
from flan.packing import (choose_segments, efficiency, encode_pair, make_segment, pack_rows, rows_to_batch,
                          truncate_pair)

EOS, BOS, PAD = 3, 2, 0


def test_segment_layout_by_hand():
    seg = make_segment([10, 11, 12], [20, 21, EOS])
    assert seg.tokens == [10, 11, 12, 20, 21]
    assert seg.labels == [IGNORE_INDEX, IGNORE_INDEX, 20, 21, EOS]  # label[t] follows token[t]


def test_truncation_keeps_input_end_and_target_start():
    inp, tgt = truncate_pair(list(range(10, 20)), list(range(30, 40)), input_len=4, target_len=3, eos_id=EOS,
                             bos_id=BOS)
    assert inp == [16, 17, 18, 19] and tgt == [30, 31, EOS]
    assert truncate_pair([], [5], 4, 3, EOS, BOS) == ([BOS], [5, EOS])


def test_encode_pair_with_a_tokenizer(word_tokenizer):
    seg = encode_pair(word_tokenizer, "a b c", "yes", input_len=2, target_len=4)
    b, c, yes = word_tokenizer.encode("b c yes")
    assert seg.tokens == [b, c, yes] and seg.labels == [IGNORE_INDEX, yes, EOS]


def test_choose_segments_oldest_first_then_best_fit():
    assert choose_segments([5, 3, 4, 2], 10) == [0, 2]         # 5, then the longest fit (4); 1 left
    assert choose_segments([5, 3, 3, 2], 8) == [0, 1]          # ties go to the oldest
    assert choose_segments([2, 3, 3, 2], 10) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="cannot fit a row of 4"):
        choose_segments([5], 4)


pairs = st.lists(st.tuples(st.lists(st.integers(4, 99), min_size=0, max_size=30),
                           st.lists(st.integers(4, 99), min_size=0, max_size=12)), min_size=1, max_size=40)


@settings(max_examples=40, deadline=None)
@given(pairs, st.integers(1, 16))
def test_packed_rows_keep_every_target_token_and_never_cross_segments(examples, pool):
    input_len, target_len = 24, 8
    row_len = input_len + target_len
    segments = [make_segment(*truncate_pair(i, t, input_len, target_len, EOS, BOS)) for i, t in examples]
    rows = list(pack_rows(segments, row_len, pool))
    batch = rows_to_batch(rows, row_len, PAD)
    assert sorted(map(tuple, (s.tokens for r in rows for s in r))) == sorted(tuple(s.tokens) for s in segments)
    for b, row in enumerate(rows):
        seg_ids = batch.segment_ids[b].tolist()
        labels, tokens, pos = batch.labels[b].tolist(), batch.tokens[b].tolist(), batch.positions[b].tolist()
        start = 0
        for sid, seg in enumerate(row, 1):
            end = start + seg.length
            assert seg_ids[start:end] == [sid] * seg.length and pos[start:end] == list(range(seg.length))
            got = [x for x in labels[start:end] if x != IGNORE_INDEX]
            n_input = seg.labels.count(IGNORE_INDEX) + 1
            target = seg.tokens[n_input:] + [EOS]
            assert got == target, "every target token, EOS included, is a label exactly once, in order"
            for t in range(start, end - 1):  # labels inside a segment predict its own next token
                assert labels[t] in (IGNORE_INDEX, tokens[t + 1])
            start = end
        assert seg_ids[start:] == [0] * (row_len - start) and set(labels[start:]) <= {IGNORE_INDEX}
    assert batch.num_target_tokens() == sum(len(t[:target_len - 1]) + 1 for _, t in examples)
    assert 0 < efficiency(rows, row_len) <= 1


def test_batch_contract_dtypes():
    rows = [[make_segment([5, 6], [7, EOS])], [make_segment([8], [EOS])]]
    batch = rows_to_batch(rows, 6, PAD)
    assert batch.tokens.dtype == torch.int64 and batch.labels.dtype == torch.int64
    assert batch.segment_ids.dtype == torch.int32 and batch.positions.dtype == torch.int32
    assert batch.tokens.tolist() == [[5, 6, 7, 0, 0, 0], [8, 0, 0, 0, 0, 0]]
    assert batch.labels.tolist() == [[-100, 7, EOS, -100, -100, -100], [EOS, -100, -100, -100, -100, -100]]
    assert efficiency(rows, 6) == 4 / 12

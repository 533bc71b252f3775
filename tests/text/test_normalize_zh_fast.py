"""The zh fast path reads plain numbers exactly as the WeTextProcessing grammar would.

`numbers_zh._fast` skips the grammar (~0.3 ms a call) for the common shapes; here both read the
same random numbers in random contexts and must agree, and the shapes left to the grammar must
really be left to it.
"""
from __future__ import annotations

import random

import pytest

from chattts_vllm.text import numbers_zh

pytest.importorskip("wetext")

RIGHT = ["个", "元", "米", "人", "名", "月", "日", "号", "点", "分", "岁", "天", "克", "季度", "分钟",
         "倍", "万", "亿", "块", "小时", "层", "页", "章", "位", "条", "家", "度", "的", "多", "楚", "上"]
LEFT = ["", "约", "共", "有", "是", "了", "在", "下午", "达到", "增长", "零下", "编号", "电话", "房间"]
ENDS = ["", "。", "，", "！", "？", "、", "；"]


def _number(rng: random.Random) -> str:
    digits = rng.choice([1, 2, 3, 4, 6, 7, 8, 9])
    return str(rng.randint(10 ** (digits - 1) if digits > 1 else 0, 10 ** digits - 1))


def _samples(rng: random.Random, n: int):
    for _ in range(n):
        kind = rng.randrange(4)
        if kind == 0:                                  # integer before a CJK character
            core, after = _number(rng), rng.choice(RIGHT)
        elif kind == 1:                                # integer before punctuation or the end
            core, after = _number(rng), rng.choice(ENDS)
        elif kind == 2:                                # decimal
            core, after = f"{rng.randint(0, 9999)}.{rng.randint(0, 999)}", rng.choice(RIGHT + ENDS)
        else:                                          # percentage
            frac = f".{rng.randint(0, 99)}" if rng.random() < 0.5 else ""
            core, after = f"{rng.randint(0, 100)}{frac}%", rng.choice(RIGHT + ENDS)
        yield rng.choice(LEFT), core, after


def test_fast_path_agrees_with_grammar():
    grammar = numbers_zh._grammar()
    rng = random.Random(0)
    used = 0
    for left, core, after in _samples(rng, 400):
        fast = numbers_zh._fast(core, left[-1:], after[:1])
        if fast is None:
            continue
        used += 1
        assert left + fast + after == grammar.normalize(left + core + after), (left, core, after)
    assert used > 300                                  # the fast path covers most plain numbers


@pytest.mark.parametrize("core, before, after", [
    ("2", "", "个"),            # 两个 vs 二次: the grammar knows the measure words
    ("12345", "", "。"),        # 5 digits before punctuation are a code: 幺二三四五
    ("110", "拨", "报"),         # service numbers
    ("26", "", "年"),           # N年 with N ≠ 4 digits
    ("10.1", "", ""),           # 十月一日
    ("1234567890", "", "个"),   # > 9 digits
    ("3.5kg", "", ""),          # units, symbols, letters
    ("-3", "", "度"),
])
def test_grammar_shapes_are_left_to_it(core, before, after):
    assert numbers_zh._fast(core, before, after) is None


def test_fast_path_improvements():
    fast = numbers_zh._fast
    assert fast("2", "第", "季") == "二"                       # grammar: 第两季度
    assert fast("200", "第", "名") == "二百"
    assert fast("1,234,567", "有", "人") == "一百二十三万四千五百六十七"  # grammar: 一,两百...
    assert fast("0:30", "", "") == "零点三十分"                 # grammar: 零比三十
    assert fast("2:05", "", "") == "两点零五分"
    assert fast("12:00", "", "") == "十二点"
    assert fast("23:59:59", "", "") == "二十三点五十九分五十九秒"
    assert fast("007", "", "") == "零零七"
    assert fast("13812345678", "", "") == "幺三八幺二三四五六七八"

"""Text front-end latency on a 4,096-character mixed zh/en input full of numbers (target: < 50 ms).

Each timed run gets a fresh text built from seeded templates (seed = run index) and an empty zh
window cache, so nothing carries over from one run to the next; every invocation sees the same
texts. Writes benchmarks/results/normalize-cpu-<date>.json and prints one line.

    python benchmarks/bench_normalize.py [--repeat 30]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import statistics
import time
from pathlib import Path

from chattts_vllm.text import numbers_zh
from chattts_vllm.text.normalize import Normalizer, split_sentences
from bench_common import cpu_name

CHARS = 4096
_ZH = [
    "今天是{y}年{m}月{d}日，下午{h}点{mi:02d}分我们在会议室讨论了{n}个问题。",
    "这款手机售价{p}.{c}元，比去年便宜了{pct}.{c2}%，重量只有{g}克。",
    "北京今天最高气温{t}℃，最低-{t2}°C，风速{w}km/h。",
    "第{n}季度营收达到{big}元，同比增长{pct}%。[uv_break]",
    "请拨打电话{tel}咨询，或者在{h}:{mi:02d}之前到{n}号窗口办理。",
    "他跑了{km}.{c}公里，用时{mi}分钟，排名第{n}。",
]
_EN = [
    "It costs ${p}.{c:02d} on {y}-{m:02d}-{d:02d}, about {pct}% more than in {y2}. ",
    "The train leaves at {h}:{mi:02d} pm and covers {km} km in {mi} minutes. ",
    "Call {tel} or email team{n}@example.com before May {d}th. [laugh]",
    "Revenue grew to ${big} in Q{q}, and {n} of {n2} users rated it {q}/5. ",
    "Heat it to {t}°C for {mi} min, then add {g} g of sugar & {c} ml of milk. ",
    "The {n}th runner finished {km}.{c} miles in {h}:{mi:02d}:{s:02d}. ",
]


def make_text(seed: int = 0, chars: int = CHARS) -> str:
    """Alternate zh and en sentences with fresh random numbers until `chars` characters."""
    rng = random.Random(seed)
    out, i = [], 0
    while sum(map(len, out)) < chars:
        tpl = (_ZH if i % 2 == 0 else _EN)[rng.randrange(6)]
        out.append(tpl.format(
            y=rng.randint(1990, 2030), y2=rng.randint(1990, 2030), m=rng.randint(1, 12),
            d=rng.randint(1, 28), h=rng.randint(1, 11), mi=rng.randint(0, 59),
            s=rng.randint(0, 59), n=rng.randint(1, 99), n2=rng.randint(100, 999),
            p=rng.randint(1, 9999), c=rng.randint(0, 99), c2=rng.randint(1, 9),
            pct=rng.randint(1, 99), g=rng.randint(1, 999), t=rng.randint(1, 40),
            t2=rng.randint(1, 20), w=rng.randint(1, 120), km=rng.randint(1, 500),
            big=f"{rng.randint(1, 999)},{rng.randint(0, 999):03d},{rng.randint(0, 999):03d}",
            q=rng.randint(1, 4), tel=f"1{rng.randint(30, 89)}{rng.randint(10**7, 10**8 - 1)}",
        ))
        i += 1
    return "".join(out)[:chars]


def time_ms(fn, texts: list[str]) -> tuple[list[float], list[float]]:
    """Wall and CPU milliseconds per text; CPU time is what to read on a shared, busy machine."""
    fn(texts[0])                                                # warm-up: loads the zh grammar
    wall, cpu = [], []
    for text in texts[1:]:
        numbers_zh._verbalize.cache_clear()                     # cold: no window seen before
        t0, c0 = time.perf_counter(), time.process_time()
        fn(text)
        wall.append((time.perf_counter() - t0) * 1e3)
        cpu.append((time.process_time() - c0) * 1e3)
    return wall, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()

    texts = [make_text(seed) for seed in range(args.repeat + 1)]
    norm = Normalizer()
    cases = {
        "normalize (lang=None, per-sentence)": lambda t: norm(t),
        "normalize (lang=zh)": lambda t: norm(t, lang="zh"),
        "normalize (lang=en)": lambda t: norm(t, lang="en"),
        "normalize, no homophones": lambda t: norm(t, do_homophone_replacement=False),
        "filter only (do_text_normalization=False)": lambda t: norm(t, do_text_normalization=False),
        "split_sentences (max_chars=120)": lambda t: split_sentences(t),
        "Normalizer.split (split + normalize + cap)": lambda t: norm.split(t),
    }
    rows = []
    for name, fn in cases.items():
        t, cpu = time_ms(fn, texts)
        rows.append({"case": name, "chars": CHARS, "repeat": args.repeat,
                     "median_ms": round(statistics.median(t), 3),
                     "p90_ms": round(sorted(t)[int(0.9 * (len(t) - 1))], 3),
                     "min_ms": round(min(t), 3),
                     "cpu_median_ms": round(statistics.median(cpu), 3)})
    date = dt.date.today().isoformat()
    result = {"card": cpu_name(), "date": date, "python": platform.python_version(),
              "load_avg_1m": round(os.getloadavg()[0], 2), "cpus": os.cpu_count(),
              "target_ms": 50, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"normalize-cpu-{date}.json"
    path.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    head = rows[0]
    print(f"normalize {head['chars']} chars mixed zh/en: median {head['median_ms']:.1f} ms "
          f"(cpu {head['cpu_median_ms']:.1f} ms), p90 {head['p90_ms']:.1f} ms, target < 50 ms; "
          f"{result['card']}, load {result['load_avg_1m']} on {result['cpus']} cpus -> {path}")


if __name__ == "__main__":
    main()

